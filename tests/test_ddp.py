"""Real 2-process DDP fits on CPU through the CLI (gloo): the tiny upcycle and PESC recipes.

Each rank must see a different shard of the data, the ranks must end with identical weights, the
saved model must be what rank 0 holds, and a run resumed from a mid-run checkpoint must end
bitwise equal to the uninterrupted one (every rank resumes its own RNG stream and data position).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_helpers import check_ranks, fit_two_processes, load_safetensors, probes

pytestmark = pytest.mark.slow


def test_ddp_upcycle_two_processes(ddp_upcycle_run: Path):
    check_ranks(ddp_upcycle_run, load_safetensors(ddp_upcycle_run / "model"))
    assert all(p["local_fraction"] == 1.0 for p in probes(ddp_upcycle_run))  # DDP replicates


def test_ddp_pesc_two_processes(ddp_pesc_run: Path):
    check_ranks(ddp_pesc_run, load_safetensors(ddp_pesc_run / "model"))


def test_ddp_resume_from_a_mid_run_checkpoint_is_bitwise(
    ddp_upcycle_run: Path, suite_dense_dir: Path, tmp_path: Path
):
    ckpt = ddp_upcycle_run / "checkpoints" / "epoch=0-step=2.ckpt"
    fit_two_processes("upcycle", "ddp", tmp_path / "resumed", suite_dense_dir, "--ckpt_path", str(ckpt))
    full = load_safetensors(ddp_upcycle_run / "model")
    resumed = load_safetensors(tmp_path / "resumed" / "model")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    # the resumed ranks drew the uninterrupted run's last two batches each
    for uninterrupted, after in zip(probes(ddp_upcycle_run), probes(tmp_path / "resumed")):
        assert after["batches"] == uninterrupted["batches"][2:]
