"""Faults during a conversion: a full disk, an input shard that vanishes mid-run.

Each must end in one readable error (exit code 2, no traceback), leave nothing half-written at
``--out`` and keep a previous ``--out`` (replaced with ``--overwrite``) exactly as it was. The full
disk is simulated by making the shard writer's single write function fail with ``ENOSPC``, and,
where this process may mount one (root), by a real tmpfs too small for the output.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from conftest import tiny_llama_config
from moe_app.checkpoint import safetensors_io
from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.checkpoint.shards import shard_files
from moe_app.core.upcycling import UpcycleConfig
from upcycling_helpers import build, upcycled


def _cli(*argv) -> int:
    from moe_app.cli.main import main

    return main([str(a) for a in argv])


def _snapshot(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


@pytest.fixture
def moe_ckpt(tmp_path: Path) -> Path:
    """A 3-layer copy-upcycled LLaMA saved in many small shards."""
    model = upcycled(build(tiny_llama_config(num_hidden_layers=3)), UpcycleConfig(num_experts=4, top_k=2))
    return save_moe_checkpoint(model, tmp_path / "ckpt", max_shard_size="20KB")


def _fail_after(monkeypatch, calls: int) -> None:
    """Every shard byte goes through ``safetensors_io.write_at``: let ``calls`` writes through, then ENOSPC."""
    real = safetensors_io.write_at
    count = {"n": 0}

    def write_at(fd, data, offset):
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data, offset)

    monkeypatch.setattr(safetensors_io, "write_at", write_at)


@pytest.mark.parametrize("previous", [False, True])
def test_disk_full_during_export(moe_ckpt, tmp_path, monkeypatch, capsys, previous):
    out = tmp_path / "hf"
    if previous:
        assert _cli("export", "--ckpt", moe_ckpt, "--out", out) == 0
        before = _snapshot(out)
    _fail_after(monkeypatch, 5)
    rc = _cli("export", "--ckpt", moe_ckpt, "--out", out, "--overwrite", "--max_shard_size", "30KB")
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "Traceback" not in err
    assert "free disk space" in err
    assert _leftovers(out) == []
    if previous:
        assert _snapshot(out) == before
        AutoModelForCausalLM.from_pretrained(out)  # still the complete previous export
    else:
        assert not out.exists()


def test_disk_full_during_one_pass_upcycle(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "mixtral"
    _fail_after(monkeypatch, 3)
    argv = ["upcycle", "--model", tiny_llama_dir, "--out", out, "--format", "mixtral", "--num_experts", "4"]
    rc = _cli(*argv, "--top_k", "2", "--max_shard_size", "30KB")
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "Traceback" not in err
    assert not out.exists() and _leftovers(out) == []


@pytest.mark.parametrize("previous", [False, True])
def test_input_shard_vanishing_mid_export(moe_ckpt, tmp_path, monkeypatch, capsys, previous):
    import moe_app.checkpoint.export_streaming as es

    out = tmp_path / "hf"
    if previous:
        assert _cli("export", "--ckpt", moe_ckpt, "--out", out) == 0
        before = _snapshot(out)
    last = shard_files(moe_ckpt)[-1]  # holds the last layer: still needed after the first layer
    real = es.load_stored

    def load_then_lose_a_shard(t):
        tensor = real(t)
        last.unlink(missing_ok=True)  # e.g. an rsync --delete or a cleanup job racing the export
        return tensor

    monkeypatch.setattr(es, "load_stored", load_then_lose_a_shard)
    rc = _cli("export", "--ckpt", moe_ckpt, "--out", out, "--overwrite")
    err = capsys.readouterr().err
    assert rc == 2 and last.name in err and "Traceback" not in err
    assert "restore" in err  # how to fix it
    assert _leftovers(out) == []
    if previous:
        assert _snapshot(out) == before
    else:
        assert not out.exists()


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir()
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_real_full_tmpfs_keeps_the_previous_export(moe_ckpt, tmp_path, capsys):
    size = sum(f.stat().st_size for f in shard_files(moe_ckpt))
    disk = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    # room for one export plus half of another: the rewrite must run out of space part-way
    if not _mount_tmpfs(disk, (int(size * 1.5) // 4096 + 1) * 4096):
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = disk / "hf"
        assert _cli("export", "--ckpt", moe_ckpt, "--out", out) == 0
        before = _snapshot(out)
        rc = _cli("export", "--ckpt", moe_ckpt, "--out", out, "--overwrite", "--max_shard_size", "30KB")
        err = capsys.readouterr().err
        assert rc == 2 and "No space left on device" in err and "Traceback" not in err
        assert _snapshot(out) == before and _leftovers(out) == []
        AutoModelForCausalLM.from_pretrained(out)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30)


def test_read_tensor_is_exact_aligned_and_names_a_short_or_missing_file(tmp_path):
    """``safetensors_io.read_tensor``: the stored bits, in a 64-byte-aligned fresh tensor; a file cut
    short or gone is a CheckpointError naming it."""
    import torch
    from safetensors.torch import save_file

    from moe_app.errors import CheckpointError

    path = tmp_path / "t.safetensors"
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(4).bfloat16(),
    }
    save_file(tensors, str(path))
    stored, _ = safetensors_io.read_header(path)
    for name, t in tensors.items():
        got = safetensors_io.read_tensor(stored[name])
        assert got.dtype == t.dtype and torch.equal(got, t) and got.data_ptr() % 64 == 0
    stacked = torch.zeros(2, 3, 5)
    safetensors_io.read_tensor(stored["a"], out=stacked[1])  # into one slice of a stacked tensor
    assert torch.equal(stacked[1], tensors["a"]) and not stacked[0].any()
    with pytest.raises(ValueError, match=r"contiguous torch\.float32 tensor of shape"):
        safetensors_io.read_tensor(stored["a"], out=stacked[:, 0])
    last = max(stored.values(), key=lambda s: s.offset)
    os.truncate(path, last.offset + 1)
    with pytest.raises(CheckpointError, match=r"t\.safetensors is truncated"):
        safetensors_io.read_tensor(last)
    path.unlink()
    with pytest.raises(CheckpointError, match=r"t\.safetensors is missing"):
        safetensors_io.read_tensor(stored["a"])
