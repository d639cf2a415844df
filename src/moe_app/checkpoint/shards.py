"""Sharded safetensors writing and reading (the Hugging Face on-disk convention).

``ShardWriter`` accepts tensors one at a time and flushes a shard file as soon as adding the next
tensor would exceed ``max_shard_size``, so a writer never holds more than one output shard in
memory; this is what bounds the peak memory of streaming conversion. Shards are named
``model-0000i-of-0000n.safetensors`` (renamed at the end, when ``n`` is known) and listed in
``model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map": {key: file}}``),
which ``transformers.from_pretrained`` and ``moe_app.load_model`` both read. Only safetensors is
ever written or read: no pickle.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from moe_app.checkpoint.names import INDEX_FILE, SINGLE_FILE
from moe_app.errors import CheckpointError

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3

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


class ShardWriter:
    """Write tensors into size-bounded safetensors shards plus an index."""

    def __init__(self, out_dir: str | Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
        self.out_dir = Path(out_dir)
        self.max_bytes = parse_size(max_shard_size)
        self._pending: dict[str, Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self.total_size = 0

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        self._seen.add(name)
        n = tensor_nbytes(tensor)
        if self._pending and self._pending_bytes + n > self.max_bytes:
            self.flush()
        # Safetensors needs contiguous, unshared CPU tensors.
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += n
        self.total_size += n

    def reserve(self, nbytes: int) -> None:
        """Flush now if ``nbytes`` more would overflow the shard, so that pending tensors are written
        out *before* the caller materialises the next ones (keeps the peak at about one shard)."""
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self.flush()

    def add_many(self, tensors: dict[str, Tensor]) -> None:
        for k, v in tensors.items():
            self.add(k, v)

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.out_dir / f".shard-{len(self._files):05d}.safetensors"
        # safetensors refuses tensors sharing storage (views of stacked experts, repeated copies).
        pending, storages = {}, set()
        for k, v in self._pending.items():
            ptr = v.untyped_storage().data_ptr()
            shared = v.numel() and (ptr in storages or v.untyped_storage().nbytes() > tensor_nbytes(v))
            pending[k] = v.clone() if shared else v
            storages.add(ptr)
        save_file(pending, str(path), metadata={"format": "pt"})
        self._files.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Flush, give shards their final names, write the index; returns the weight map."""
        self.flush()
        n = len(self._files)
        weight_map: dict[str, str] = {}
        for i, (tmp, keys) in enumerate(self._files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.rename(self.out_dir / name)
            for k in keys:
                weight_map[k] = name
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map


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
