"""Real 2-process fits on CPU (gloo) through the CLI, shared by the DDP and FSDP tests.

Each recipe runs once per strategy in a session (the fits are the slow part); the DDP runs are
the reference the FSDP runs are compared with.
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
STEPS = 4
SMALL_DATA = (
    "--data.init_args.batch_size",
    "4",
    "--data.init_args.max_length",
    "48",
    "--data.init_args.max_eval_examples_per_source",
    "4",
)
# Per recipe: the config and what keeps it small. Router jitter makes training draw random numbers,
# so a resumed run only matches if every rank gets its own RNG stream back.
RECIPES: dict[str, tuple[str, ...]] = {
    "upcycle": (
        "configs/tiny/upcycle.yaml",
        "--model.init_args.upcycle.num_experts",
        "4",
        "--model.init_args.upcycle.jitter",
        "0.1",
        # expert pruning at fit end: under FSDP it must run on the gathered model
        '--trainer.callbacks+={"class_path": "moe_app.lightning.callbacks.pruning.ExpertPruning", "init_args": {"keep": 2, '
        '"calib_batches": 2, "eval_batches": 0}}',
        # a second pruning callback must get the trained model, not the first one's pruned copy
        '--trainer.callbacks+={"class_path": "moe_app.lightning.callbacks.pruning.ExpertSkipping", "init_args": {'
        '"calib_batches": 2, "eval_batches": 0}}',
        "--data.init_args.sources",
        '[{"name": "suite", "builtin": "all", "builtin_train_size": 64, "builtin_eval_size": 4}]',
    ),
    "pesc": (
        "configs/tiny/pesc.yaml",
        "--model.init_args.pesc.num_experts",
        "4",
        "--data.init_args.sources",
        '[{"name": "arithmetic", "builtin": "arithmetic", "builtin_train_size": 64, "builtin_eval_size": 4}]',
    ),
    # post-training stage 1 (dynamic mixing, one update in the run) from a pruned MoE checkpoint:
    # pass --model.init_args.init_from DIR
    "post": (
        "configs/tiny/post_stage1.yaml",
        "--data.init_args.sources",
        '[{"name": "arithmetic", "builtin": "arithmetic", "builtin_train_size": 64, "builtin_eval_size": 4}, '
        '{"name": "sorting", "builtin": "sorting", "builtin_train_size": 64, "builtin_eval_size": 4}]',
        "--data.init_args.mixture.update_every",
        "2",
        "--data.init_args.mixture.probe_size",
        "4",
    ),
    "lora": (
        "configs/tiny/lora.yaml",
        "--model.init_args.lora.rank",
        "4",
        "--data.init_args.sources",
        '[{"name": "sorting", "builtin": "sorting", "builtin_train_size": 64, "builtin_eval_size": 4}]',
    ),
}


def fit_two_processes(
    recipe: str, strategy: str, root: Path, dense: Path, *extra: str
) -> subprocess.CompletedProcess:
    """``moe-app fit`` of a tiny recipe on 2 CPU processes; checkpoints every 2 steps are kept."""
    return _two_processes(
        "fit",
        recipe,
        strategy,
        root,
        dense,
        "--trainer.max_steps",
        str(STEPS),
        "--trainer.limit_val_batches",
        "0",
        "--checkpoint.every_n_train_steps",
        "2",
        "--checkpoint.save_top_k",
        "-1",
        "--trainer.callbacks+=tests.ddp_probe.RankProbe",
        *extra,
    )


def test_two_processes(recipe: str, strategy: str, root: Path, dense: Path, ckpt: Path, *extra: str) -> dict:
    """``moe-app test`` of a fitted checkpoint on 2 CPU processes; returns ``test_results.json``."""
    _two_processes("test", recipe, strategy, root, dense, "--ckpt_path", str(ckpt), *extra)
    return json.loads((root / "test_results.json").read_text())


test_two_processes.__test__ = False  # a helper, not a test


def _two_processes(
    command: str, recipe: str, strategy: str, root: Path, dense: Path, *extra: str
) -> subprocess.CompletedProcess:
    config, *recipe_args = RECIPES[recipe]
    env = dict(os.environ)
    env.pop("MOE_APP_DEBUG", None)
    cmd = [
        sys.executable,
        "-m",
        "moe_app",
        command,
        "-c",
        config,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        strategy,
        "--trainer.deterministic",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--model.init_args.source.pretrained",
        str(dense),
        *SMALL_DATA,
        *recipe_args,
        *extra,
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def probes(root: Path) -> list[dict]:
    return [json.loads((root / f"probe_rank{r}.json").read_text()) for r in (0, 1)]


def load_safetensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors in {d}"
    return out


def check_ranks(root: Path, saved_params: dict[str, torch.Tensor]) -> None:
    """Different shards per rank, identical replicas, and the saved model equals rank 0's weights.

    Under FSDP each rank reports the gathered (full) weights, so the replica check is DDP's; what
    FSDP is held to is the comparison with the DDP run (tests/test_fsdp.py)."""
    p0, p1 = probes(root)
    assert len(p0["batches"]) == len(p1["batches"]) == STEPS
    # different shards: no batch drawn by rank 0 at step i equals rank 1's at step i
    assert all(a != b for a, b in zip(p0["batches"], p1["batches"]))
    # identical replicas after training
    assert p0["params"] == p1["params"]
    for name, value in p0["params"].items():
        key = name if name in saved_params else name.removeprefix("model.")
        assert key in saved_params, name
        assert float(saved_params[key].double().sum()) == pytest.approx(value, rel=0, abs=1e-9)
