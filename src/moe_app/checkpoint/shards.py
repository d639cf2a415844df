"""Sharded safetensors writing and reading (the Hugging Face on-disk convention).

``ShardWriter`` writes every tensor's bytes to disk as soon as it is handed over (through
:class:`~moe_app.checkpoint.safetensors_io.SafetensorsFile`: bytes at their offset, header last),
so the writer itself holds no tensor: the peak memory of a conversion is what the caller holds
(about one decoder layer), whatever ``max_shard_size`` is. When the caller knows every output
tensor's name, dtype and shape in advance (:meth:`ShardWriter.plan`, as the streaming conversions
do), shards are assigned up front, each file is preallocated with its exact header, tensors may
arrive in any order, and a shard is finished (header, fsync) the moment its last tensor lands.
Without a plan a shard is cut as soon as adding the next tensor would exceed ``max_shard_size``.
Shards are named ``model-0000i-of-0000n.safetensors`` (renamed at the end) and listed in
``model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map": {key: file}}``),
which ``transformers.from_pretrained`` and ``moe_app.load_model`` both read. Only safetensors is
ever written or read: no pickle.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from moe_app.checkpoint.names import INDEX_FILE, SINGLE_FILE
from moe_app.checkpoint.safetensors_io import COPY_CHUNK, SafetensorsFile, StoredTensor, TensorInfo
from moe_app.errors import CheckpointError

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3
SHARD_METADATA = {"format": "pt"}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(size: int | str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / an int number of bytes -> bytes."""
    if isinstance(size, int):
        return size
    m = _SIZE.match(str(size))
    if not m:
        raise ValueError(f"bad size {size!r}; use e.g. '2GB', '500MB' or a number of bytes")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def tensor_nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def assign_shards(infos: Iterable[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    """Cut the tensors, in the order given, into shards of at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[list[TensorInfo]] = []
    size = 0
    for info in infos:
        if not shards or (shards[-1] and size + info.nbytes > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


class ShardWriter:
    """Write tensors into size-bounded safetensors shards plus an index, each tensor straight to disk."""

    def __init__(self, out_dir: str | Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
        self.out_dir = Path(out_dir)
        self.max_bytes = parse_size(max_shard_size)
        self._files: list[SafetensorsFile] = []
        self._keys: list[list[str]] = []
        self._current: SafetensorsFile | None = None  # unplanned: the shard being filled
        self._planned: dict[str, int] | None = None  # planned: name -> shard index
        self._plans: list[list[TensorInfo]] = []
        self._seen: set[str] = set()
        self._buffer: bytearray | None = None
        self.total_size = 0

    # --- planning -------------------------------------------------------------------------------

    def plan(self, infos: Iterable[TensorInfo]) -> None:
        """Declare every tensor that will be written (before the first one): shards are assigned now
        and each is preallocated with its final header when its first tensor arrives."""
        if self._seen or self._planned is not None:
            raise ValueError("ShardWriter.plan must be called once, before any tensor is added")
        infos = list(infos)
        names = [i.name for i in infos]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[:4]
            raise ValueError(f"duplicate tensor names in the plan: {dup}")
        self._plans = assign_shards(infos, self.max_bytes)
        self._planned = {i.name: s for s, shard in enumerate(self._plans) for i in shard}
        self._files = [None] * len(self._plans)  # type: ignore[list-item]
        self._keys = [[i.name for i in shard] for shard in self._plans]

    def _tmp_path(self, i: int) -> Path:
        return self.out_dir / f".shard-{i:05d}.safetensors"

    def _target(self, name: str, nbytes: int) -> SafetensorsFile:
        """The shard file ``name`` goes to (opening or cutting shards as needed)."""
        if name in self._seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        if self._planned is not None:
            s = self._planned.get(name)
            if s is None:
                raise ValueError(f"tensor {name!r} was not in the plan given to ShardWriter.plan")
            if self._files[s] is None:
                self._files[s] = SafetensorsFile(self._tmp_path(s), self._plans[s], metadata=SHARD_METADATA)
            return self._files[s]
        cur = self._current
        if cur is not None and cur.infos and cur.nbytes + nbytes > self.max_bytes:
            self.flush()
        if self._current is None:
            reserve = min(max(self.max_bytes // 1024, 4096), 1024**2)
            self._current = SafetensorsFile(
                self._tmp_path(len(self._files)), metadata=SHARD_METADATA, reserve_header=reserve
            )
            self._files.append(self._current)
            self._keys.append([])
        return self._current

    def _written(self, f: SafetensorsFile, name: str, nbytes: int) -> None:
        self._seen.add(name)
        self.total_size += nbytes
        if self._planned is None:
            self._keys[-1].append(name)
        elif f.complete:  # a planned shard is finished the moment its last tensor lands
            f.finish()

    # --- adding ---------------------------------------------------------------------------------

    def add(self, name: str, tensor: Tensor) -> None:
        """Write ``tensor`` now (its bytes go to disk before this returns)."""
        n = tensor_nbytes(tensor)
        f = self._target(name, n)
        f.write(name, tensor)
        self._written(f, name, n)

    def copy(self, name: str, src: StoredTensor) -> None:
        """Write a tensor stored in another safetensors file, byte for byte, without loading it."""
        f = self._target(name, src.info.nbytes)
        if self._buffer is None:
            self._buffer = bytearray(COPY_CHUNK)
        f.copy(name, src, self._buffer)
        self._written(f, name, src.info.nbytes)

    def reserve(self, nbytes: int) -> None:
        """Start a new shard now if ``nbytes`` more would overflow the current one (unplanned writers;
        a planned writer already knows where everything goes)."""
        cur = self._current
        if self._planned is None and cur is not None and cur.infos and cur.nbytes + nbytes > self.max_bytes:
            self.flush()

    def add_many(self, tensors: dict[str, Tensor]) -> None:
        for k, v in tensors.items():
            self.add(k, v)

    def flush(self) -> None:
        """Finish the shard being filled (unplanned); planned shards finish when complete."""
        if self._current is not None:
            self._current.finish()
            self._current = None

    def close(self) -> dict[str, str]:
        """Finish every shard, give shards their final names, write the index; returns the weight map."""
        self.flush()
        if self._planned is not None:
            missing = sorted(set(self._planned) - self._seen)
            if missing:
                self.abort()
                raise ValueError(f"ShardWriter.close: planned tensors never written: {missing[:8]}")
        n = len(self._files)
        weight_map: dict[str, str] = {}
        for i, (f, keys) in enumerate(zip(self._files, self._keys)):
            if f.fd >= 0:
                f.finish()
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            f.path.rename(self.out_dir / name)
            for k in keys:
                weight_map[k] = name
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map

    def abort(self) -> None:
        """Close and delete every shard written so far (the caller's staging dir is removed anyway)."""
        for f in self._files:
            if f is not None:
                f.abort()
        self._current = None


def shard_files(ckpt_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint dir (from the index, or the single file)."""
    d = Path(ckpt_dir)
    index = d / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(
                f"malformed index ({e})", where=str(index), fix="regenerate the checkpoint"
            ) from e
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"shard file(s) {missing} listed in {INDEX_FILE} are missing",
                where=str(d),
                fix="copy the complete checkpoint directory (all shards) or regenerate it",
            )
        return files
    if (d / SINGLE_FILE).is_file():
        return [d / SINGLE_FILE]
    if any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise CheckpointError(
            "only pickle weights (*.bin / *.pt) found; moe-app loads safetensors only",
            where=str(d),
            fix="convert the weights to safetensors (e.g. `model.save_pretrained(dir, safe_serialization=True)`)",
        )
    raise CheckpointError(
        f"no weights found (neither {INDEX_FILE} nor {SINGLE_FILE})",
        where=str(d),
        fix="point at a complete checkpoint directory",
    )


@contextlib.contextmanager
def open_shard(path: str | Path, device: str = "cpu") -> Iterator[Any]:
    """``safe_open`` a safetensors file; a truncated or corrupt file is a ``CheckpointError`` naming it.

    safetensors checks at open time that the header parses and that its offsets cover the file, so
    a file cut short by an interrupted copy or download is caught here, before any tensor is read.
    """
    try:
        handle = safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError) as e:
        raise corrupt_shard_error(path, e) from e
    with handle as h:
        yield h


def corrupt_shard_error(path: str | Path, cause: BaseException) -> CheckpointError:
    path = Path(path)
    return CheckpointError(
        f"{path.name} is truncated or corrupt ({cause})",
        where=str(path),
        fix="the file was cut short (an interrupted copy, download or write): copy it again from the "
        "source, or regenerate the checkpoint",
    )


def verify_shards(ckpt_dir: str | Path) -> list[Path]:
    """:func:`shard_files`, each opened once (header only, cheap) so that a bad file is named early."""
    files = shard_files(ckpt_dir)
    for f in files:
        with open_shard(f):
            pass
    return files


def iter_shards(ckpt_dir: str | Path) -> Iterator[tuple[Path, list[str]]]:
    """``(file, keys)`` per shard, without loading any tensor."""
    for f in shard_files(ckpt_dir):
        with open_shard(f) as h:
            keys = list(h.keys())
        yield f, keys


def load_shard(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    with open_shard(path, device=device) as h:
        keys = h.keys()
        try:
            return {k: h.get_tensor(k) for k in keys}
        except (SafetensorError, OSError) as e:
            raise corrupt_shard_error(path, e) from e


def load_all(ckpt_dir: str | Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint dir (small models and tests only)."""
    out: dict[str, Tensor] = {}
    for f in shard_files(ckpt_dir):
        out.update(load_shard(f))
    return out


def checkpoint_dtype(ckpt_dir: str | Path) -> torch.dtype | None:
    """The dtype of the first floating tensor in a checkpoint (cheap: header only)."""
    for f in shard_files(ckpt_dir):
        with open_shard(f) as h:
            keys = h.keys()
            for k in keys:
                dtype = h.get_slice(k).get_dtype()
                mapping = {
                    "F32": torch.float32,
                    "F16": torch.float16,
                    "BF16": torch.bfloat16,
                    "F64": torch.float64,
                }
                if dtype in mapping:
                    return mapping[dtype]
    return None
