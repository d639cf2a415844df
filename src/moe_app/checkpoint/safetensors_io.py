"""Safetensors files written in place, tensor by tensor, and headers read without loading tensors.

The safetensors format (https://github.com/huggingface/safetensors, "Format") is: an 8-byte
little-endian header length ``N``, ``N`` bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`` (which *may* be padded with trailing
spaces; the reference writer pads it to a multiple of 8 so the data stays aligned), then the data
buffer, in which the tensors lie back to back, without gaps, at their ``data_offsets``.

Because the header is a function of the names, dtypes and shapes alone, a writer that knows them
in advance knows every tensor's offset before any byte arrives. :class:`SafetensorsFile` therefore
preallocates the file (``posix_fallocate``: a full disk fails at once, not half-way), writes each
tensor's bytes at its offset as soon as the tensor exists (``pwrite``, no copy of the tensor, so
nothing waits in memory for the shard to fill), and writes the header *last*: a file cut short by
a crash has a zero header length, which every reader refuses, instead of a valid header over
missing data. Where the tensors are not known in advance (``reserve_header``) the data starts
after a header area reserved up front and the header is padded with spaces to fill it, which the
format allows; if it does not fit, the data is moved once when the file is finished.

Every tensor starts at an offset aligned to its element size, as in the reference writer's files
(readers that map the file hand those bytes to kernels as they lie, and a misaligned float weight
can change the last bit of a product). A planned file orders its tensors by decreasing element
size, then name, as the reference writer does. An unplanned one places each tensor whose size is a
multiple of 8 bytes in arrival order, so each starts 8-aligned; the others (few and small: an
odd-sized norm, bitsandbytes' quantisation state) wait in a side file and are appended when the
file is finished, by decreasing element size, so they stay aligned too. All writes go through
:func:`write_at` (a single place to inject faults in tests); an ``OSError`` (e.g. ``ENOSPC``) becomes a
:class:`~moe_app.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moe_app.errors import CheckpointError

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}
DTYPES: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}
COPY_CHUNK = 16 * 1024**2
"""Bytes moved per read/write when a tensor is copied from file to file (the copy's whole buffer)."""


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, t: Tensor) -> TensorInfo:
        return cls(name, t.dtype, tuple(t.shape))


@dataclass(frozen=True)
class StoredTensor:
    """A tensor inside a safetensors file on disk: where its bytes are."""

    info: TensorInfo
    path: Path
    offset: int  # absolute byte offset of the tensor's data in the file


def read_header(path: str | Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """The tensors of a safetensors file (``name -> StoredTensor``, in file order) and its metadata.

    Reads only the header; raises ``CheckpointError`` if the file is missing, truncated or not safetensors.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            if len(head) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or 8 + n > size or n > 100 * 1024**2:
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise _missing(path) from e
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise _cut_short(path, f"is truncated or corrupt ({e})") from e
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    out: dict[str, StoredTensor] = {}
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    for name, e in entries:
        if e.get("dtype") not in DTYPES:
            raise CheckpointError(
                f"tensor {name!r} has unsupported dtype {e.get('dtype')!r}",
                where=str(path),
                fix="convert the checkpoint to a float/int dtype torch knows",
            )
        info = TensorInfo(name, DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"]))
        begin, end = e["data_offsets"]
        if end - begin != info.nbytes or start + end > size:
            raise CheckpointError(
                f"tensor {name!r} does not fit its data_offsets {[begin, end]}",
                where=str(path),
                fix="the file is truncated or corrupt: copy it again or regenerate it",
            )
        out[name] = StoredTensor(info, path, start + begin)
    return out, metadata


def read_tensor(stored: StoredTensor, out: Tensor | None = None) -> Tensor:
    """One tensor read from its file into a fresh tensor, or into ``out`` (a contiguous CPU tensor of
    its dtype and shape, e.g. one expert's slice of a stacked parameter): one copy, no mapping, and
    the torch allocator's 64-byte alignment. (safetensors' ``get_tensor`` returns buffers aligned to
    8 bytes; BLAS picks its code path by alignment, so a product on such a weight can differ in the
    last bit from the same product on a model's own parameters.) A short or vanished file is a
    ``CheckpointError``."""
    if out is None:
        out = torch.empty(stored.info.shape, dtype=stored.info.dtype)  # (shape)
    elif out.dtype != stored.info.dtype or tuple(out.shape) != stored.info.shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {stored.info.dtype} tensor of shape {stored.info.shape}")
    view = tensor_buffer(out)  # out's own bytes (contiguous, so no copy)
    path = stored.path
    n = 0
    try:
        with open(path, "rb") as f:
            f.seek(stored.offset)
            while n < view.nbytes:  # one read(2) returns at most ~2 GiB
                got = f.readinto(view[n:])
                if not got:
                    break
                n += got
    except FileNotFoundError as e:
        raise _missing(path) from e
    except OSError as e:
        raise CheckpointError(
            f"could not read {path.name} ({e})", where=str(path), fix="check the disk"
        ) from e
    if n != view.nbytes:
        raise _cut_short(
            path, f"is truncated: {stored.info.name!r} needs {view.nbytes} bytes, {n} were there"
        )
    return out


def _missing(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path.name} is missing",
        where=str(path),
        fix="the checkpoint is incomplete (or was removed while in use): copy it again or regenerate it",
    )


def _cut_short(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path.name} {what}",
        where=str(path),
        fix="the file was cut short (an interrupted copy, download or write): copy it again or regenerate it",
    )


def layout(infos: Iterable[TensorInfo]) -> dict[str, tuple[int, int]]:
    """``name -> (begin, end)`` in the data buffer: by element size (descending), then name."""
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for info in sorted(infos, key=lambda i: (-i.dtype.itemsize, i.name)):
        offsets[info.name] = (pos, pos + info.nbytes)
        pos += info.nbytes
    return offsets


def header_bytes(
    infos: dict[str, TensorInfo], offsets: dict[str, tuple[int, int]], metadata: dict[str, str] | None
) -> bytes:
    """The JSON header (compact, metadata first, padded with spaces to a multiple of 8)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    for name, (b, e) in sorted(offsets.items(), key=lambda kv: kv[1]):
        info = infos[name]
        header[name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape), "data_offsets": [b, e]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def tensor_buffer(t: Tensor) -> memoryview:
    """The bytes of ``t`` (little-endian, row-major) without copying a contiguous CPU tensor."""
    t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    if sys.byteorder != "little":  # pragma: no cover (every platform torch ships on is little-endian)
        raise CheckpointError("big-endian hosts are not supported", fix="write on a little-endian machine")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_at(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (``pwrite`` may write less than asked)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover
            raise OSError("pwrite wrote nothing")
        view, offset = view[n:], offset + n


def write_error(path: Path, e: OSError) -> CheckpointError:
    where = path.parent
    if (
        where.name.startswith(".") and ".tmp-" in where.name
    ):  # an atomic_directory staging dir: name the output
        where = where.with_name(where.name[1:].rsplit(".tmp-", 1)[0])
    return CheckpointError(
        f"could not write {path.name}: {e.strerror or e}",
        where=str(where),
        fix="free disk space (or pick an output directory on a disk with room) and run again; "
        "nothing partial was kept",
    )


class SafetensorsFile:
    """One safetensors file, filled at known offsets, with its header written last.

    ``infos`` known up front (``reserve_header=None``): exact header, exact layout, preallocated.
    Otherwise tensors are placed in arrival order after ``reserve_header`` bytes kept for the header.
    """

    def __init__(
        self,
        path: str | Path,
        infos: Iterable[TensorInfo] = (),
        *,
        metadata: dict[str, str] | None = None,
        reserve_header: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self.infos: dict[str, TensorInfo] = {i.name: i for i in infos}
        self.planned = reserve_header is None
        self._written: set[str] = set()
        self._tail: dict[str, int] = {}  # unplanned: name -> offset in the side file (sizes not 8-aligned)
        self._tail_path = self.path.with_name(self.path.name + ".tail")
        self._tail_fd, self._tail_size = -1, 0
        if self.planned:
            self.offsets = layout(self.infos.values())
            self._header = header_bytes(self.infos, self.offsets, self.metadata)
            self.data_start = 8 + len(self._header)
            self.data_size = sum(i.nbytes for i in self.infos.values())
        else:
            self.offsets = {}
            self.data_start = 8 + reserve_header + (-reserve_header % 8)
            self.data_size = 0
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise write_error(self.path, e) from e
        if self.planned:
            self._preallocate(self.data_start + self.data_size)

    @property
    def nbytes(self) -> int:
        return self.data_size + self._tail_size

    @property
    def complete(self) -> bool:
        return self._written == set(self.infos)

    def _preallocate(self, size: int) -> None:
        try:
            os.posix_fallocate(self.fd, 0, size) if size else None
        except OSError as e:
            if e.errno not in (getattr(os, "EOPNOTSUPP", 95), 22):  # unsupported here: grow lazily
                raise write_error(self.path, e) from e
            os.ftruncate(self.fd, size)

    def _slot(self, info: TensorInfo) -> tuple[int, Path, int]:
        """Where ``info``'s bytes go: (file descriptor, its path, absolute offset), placing it now if
        unplanned (in the side file when its size would break the 8-byte alignment of what follows)."""
        if info.name in self._written:
            raise ValueError(f"tensor {info.name!r} written twice to {self.path.name}")
        if self.planned:
            want = self.infos.get(info.name)
            if want is None:
                raise ValueError(f"tensor {info.name!r} is not planned for {self.path.name}")
            if want != info:
                raise ValueError(
                    f"tensor {info.name!r} is {info.dtype} {info.shape}, planned {want.dtype} {want.shape}"
                )
        else:
            self.infos[info.name] = info
            if info.nbytes % 8:  # it would misalign what follows: to the side file until finish
                self._written.add(info.name)
                return self._tail_slot(info)
            self.offsets[info.name] = (self.data_size, self.data_size + info.nbytes)
            self.data_size += info.nbytes
        self._written.add(info.name)
        return self.fd, self.path, self.data_start + self.offsets[info.name][0]

    def _tail_slot(self, info: TensorInfo) -> tuple[int, Path, int]:
        if self._tail_fd < 0:
            try:
                self._tail_fd = os.open(self._tail_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            except OSError as e:
                raise write_error(self._tail_path, e) from e
        self._tail[info.name] = self._tail_size
        self._tail_size += info.nbytes
        return self._tail_fd, self._tail_path, self._tail[info.name]

    def write(self, name: str, t: Tensor) -> None:
        """Write ``t``'s bytes at its slot."""
        fd, path, offset = self._slot(TensorInfo.of(name, t))
        try:
            write_at(fd, tensor_buffer(t), offset)
        except OSError as e:
            raise write_error(path, e) from e

    def copy(self, name: str, src: StoredTensor, buffer: bytearray | None = None) -> None:
        """Copy a stored tensor's bytes unchanged (at most :data:`COPY_CHUNK` bytes in memory)."""
        fd, path, offset = self._slot(TensorInfo(name, src.info.dtype, src.info.shape))
        copy_bytes(src.path, src.offset, fd, path, offset, src.info.nbytes, buffer)

    def _append_tail(self) -> None:
        """Move the side file's tensors to the end of the data, by decreasing element size, then name:
        after the 8-aligned data each starts aligned to its element size."""
        if self._tail_fd < 0:
            return
        for name in sorted(self._tail, key=lambda n: (-self.infos[n].dtype.itemsize, n)):
            n = self.infos[name].nbytes
            copy_bytes(
                self._tail_path,
                self._tail[name],
                self.fd,
                self.path,
                self.data_start + self.data_size,
                n,
                None,
            )
            self.offsets[name] = (self.data_size, self.data_size + n)
            self.data_size += n
        self._tail, self._tail_size = {}, 0
        self._close_tail()

    def finish(self) -> None:
        """Write the header, fsync and close; raises if a planned tensor never arrived."""
        missing = sorted(set(self.infos) - self._written)
        if missing:
            self.close()
            raise ValueError(f"{self.path.name}: planned tensors never written: {missing[:8]}")
        try:
            if self.planned:
                header = self._header
            else:
                self._append_tail()
                header = header_bytes(self.infos, self.offsets, self.metadata)
                room = self.data_start - 8
                if len(header) > room:  # the reserve was too small: move the data once
                    self._relocate(8 + len(header))
                    room = len(header)
                header = header + b" " * (room - len(header))
                os.ftruncate(self.fd, self.data_start + self.data_size)
            write_at(self.fd, struct.pack("<Q", len(header)) + header, 0)
            os.fsync(self.fd)
        except OSError as e:
            raise write_error(self.path, e) from e
        finally:
            self.close()

    def _relocate(self, new_start: int) -> None:
        """Move the data buffer (written after a too-small header reserve) to ``new_start``."""
        tmp = self.path.with_name(self.path.name + ".move")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            copy_bytes(self.path, self.data_start, fd, tmp, new_start, self.data_size, None)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(self.fd)
        self.fd, self.data_start = fd, new_start

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._close_tail()

    def _close_tail(self) -> None:
        if self._tail_fd >= 0:
            os.close(self._tail_fd)
            self._tail_fd = -1
            self._tail_path.unlink(missing_ok=True)

    def __del__(self) -> None:  # a writer abandoned by an exception must not keep a deleted file's space
        if getattr(self, "fd", -1) >= 0 or getattr(self, "_tail_fd", -1) >= 0:
            self.close()

    def abort(self) -> None:
        """Close and delete the (incomplete) file."""
        self.close()
        self.path.unlink(missing_ok=True)


def copy_bytes(
    src: Path, src_offset: int, fd: int, dst: Path, offset: int, n: int, buffer: bytearray | None
) -> None:
    """Copy ``n`` bytes of file ``src`` at ``src_offset`` to ``fd`` at ``offset``, chunk by chunk.

    Plain reads (not a memory map) so the pages read never count in this process's resident memory.
    """
    buf = buffer if buffer is not None else bytearray(min(n, COPY_CHUNK) or 1)
    view = memoryview(buf)
    try:
        fin = os.open(src, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError(
            f"cannot read {src.name} ({e.strerror or e})",
            where=str(src),
            fix="the input checkpoint is incomplete or was removed while in use: restore it and run again",
        ) from e
    try:
        done = 0
        while done < n:
            want = min(len(buf), n - done)
            got = os.preadv(fin, [view[:want]], src_offset + done)
            if got <= 0:
                raise CheckpointError(
                    f"{src.name} ended early (truncated while in use?)",
                    where=str(src),
                    fix="restore the input checkpoint and run again",
                )
            try:
                write_at(fd, view[:got], offset + done)
            except OSError as e:
                raise write_error(dst, e) from e
            done += got
    finally:
        os.close(fin)
