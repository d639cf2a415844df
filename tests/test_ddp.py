"""Real 2-process DDP fits on CPU through the CLI (gloo): the tiny upcycle and PESC recipes.

Each rank must see a different shard of the data, the ranks must end with identical weights, and
the saved model must be what rank 0 holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL_DATA = [
    "--data.init_args.batch_size",
    "4",
    "--data.init_args.max_length",
    "48",
    "--data.init_args.max_eval_examples_per_source",
    "4",
]


@pytest.fixture(scope="module")
def dense_dir(suite_dense_dir: Path) -> Path:
    return suite_dense_dir


def _fit_ddp(config: str, root: Path, dense: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MOE_APP_DEBUG", None)
    cmd = [
        sys.executable,
        "-m",
        "moe_app",
        "fit",
        "-c",
        config,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_steps",
        "4",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.deterministic",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--model.init_args.source.pretrained",
        str(dense),
        "--trainer.callbacks+=tests.ddp_probe.RankProbe",
        *SMALL_DATA,
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _check_ranks(root: Path, saved_params: dict[str, torch.Tensor]) -> None:
    probes = [json.loads((root / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(probes[0]["batches"]) == len(probes[1]["batches"]) == 4
    # different shards: no batch drawn by rank 0 at step i equals rank 1's at step i
    assert all(a != b for a, b in zip(probes[0]["batches"], probes[1]["batches"]))
    # identical replicas after training
    assert probes[0]["params"] == probes[1]["params"]
    # the saved model is rank 0's
    for name, value in probes[0]["params"].items():
        key = name if name in saved_params else name.removeprefix("model.")
        assert key in saved_params, name
        assert float(saved_params[key].double().sum()) == pytest.approx(value, rel=0, abs=1e-9)


def _load_safetensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in d.glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_ddp_upcycle_two_processes(tmp_path: Path, dense_dir: Path):
    root = tmp_path / "run"
    res = _fit_ddp(
        "configs/tiny/upcycle.yaml",
        root,
        dense_dir,
        "--model.init_args.upcycle.num_experts",
        "4",
        "--data.init_args.sources",
        '[{"name": "suite", "builtin": "all", "builtin_train_size": 64, "builtin_eval_size": 4}]',
    )
    assert res.returncode == 0, res.stderr[-4000:]
    _check_ranks(root, _load_safetensors(root / "model"))


@pytest.mark.slow
def test_ddp_pesc_two_processes(tmp_path: Path, dense_dir: Path):
    root = tmp_path / "run"
    res = _fit_ddp(
        "configs/tiny/pesc.yaml",
        root,
        dense_dir,
        "--model.init_args.pesc.num_experts",
        "4",
        "--data.init_args.sources",
        '[{"name": "arithmetic", "builtin": "arithmetic", "builtin_train_size": 64, "builtin_eval_size": 4}]',
    )
    assert res.returncode == 0, res.stderr[-4000:]
    _check_ranks(root, _load_safetensors(root / "model"))
