"""MixtureDataModule + MixtureWeightsCallback in real training runs through the CLI: outputs, worker
processes, exact resume, and a 2-process DDP run (identical weights, different draws per rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    {"name": "arithmetic", "builtin": "arithmetic", "builtin_train_size": 64, "builtin_eval_size": 16},
    {
        "name": "arithmetic_alt",
        "builtin": "arithmetic_alt",
        "builtin_train_size": 64,
        "builtin_eval_size": 16,
    },
    {"name": "strings", "builtin": "strings", "builtin_train_size": 64, "builtin_eval_size": 16},
]


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory) -> Path:
    """A moe-app checkpoint: 2-layer LLaMA (hidden 32) upcycled to 4 experts top-2, suite tokenizer."""
    from transformers import AutoModelForCausalLM

    from conftest import suite_llama_config
    from moe_app.checkpoint.model_dir import save_moe_checkpoint
    from moe_app.core.data.tokenizer import suite_tokenizer
    from moe_app.core.upcycling import upcycle
    from moe_app.core.upcycling.config import UpcycleConfig

    tok = suite_tokenizer()
    cfg = suite_llama_config(tie_word_embeddings=True)
    torch.manual_seed(0)
    model = upcycle(
        AutoModelForCausalLM.from_config(cfg), UpcycleConfig(method="noise", num_experts=4, top_k=2)
    )
    return save_moe_checkpoint(model, tmp_path_factory.mktemp("mix") / "tiny-moe", tokenizer=tok)


def write_config(
    path: Path, model_dir: Path, root: Path, *, max_steps: int, num_workers: int = 0, **mixture
) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
        },
        "model": {
            "class_path": "moe_app.lightning.modules.moe.MoeLMModule",
            "init_args": {
                "source": {"pretrained": str(model_dir)},
                "upcycle": None,
                "log_load_every_n_steps": 0,
                "optim": {"lr": 3.0e-3, "warmup_steps": 0, "schedule": "constant"},  # max_steps-free
            },
        },
        "data": {
            "class_path": "moe_app.lightning.data.mixture.MixtureDataModule",
            "init_args": {
                "sources": SOURCES,
                "max_length": 48,
                "batch_size": 4,
                "num_workers": num_workers,
                "mixture": {"strategy": "dynamic", "update_every": 3, "probe_size": 8, **mixture},
            },
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(*args: str, ckpt_path: Path | None = None) -> None:
    from moe_app.cli.main import cli_main

    if ckpt_path is None:
        cli_main(["fit", *[str(a) for a in args]])
        return
    # `moe-app fit --ckpt_path` re-parses the checkpoint's hyperparameters against the base module
    # class and rejects MoeLMModule's (no `_class_path` in them): resume through the same objects.
    cli = cli_main([str(a) for a in args], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt_path))


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_fit_with_workers_logs_writes_history_and_plot(tiny_moe_dir, tmp_path):
    root = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml", tiny_moe_dir, root, max_steps=7, num_workers=1, dump_rank_files=True
    )
    fit("-c", cfg)
    payload = json.loads((root / "mixture_weights.json").read_text())
    assert [h["step"] for h in payload["history"]] == [0, 3, 6]
    assert payload["history"][1]["from_batch"] == 3 + 4  # apply_delay = 2 + 2 * 1 worker
    assert payload["final"] == payload["history"][-1]["weights"]
    assert sum(payload["final"].values()) == pytest.approx(1.0)
    assert (root / "mixture_weights.png").stat().st_size > 0
    metrics = next(root.glob("lightning_logs/version_*/metrics.csv")).read_text().splitlines()
    assert "mixture/strings" in metrics[0]
    dump = json.loads((root / "mixture_rank0.json").read_text())
    assert dump["started_batches"] == 7 and sorted(map(int, dump["draws"])) == list(range(7))


@pytest.mark.slow
def test_resume_after_an_update_reproduces_the_uninterrupted_run(tiny_moe_dir, tmp_path):
    full_root, part_root = tmp_path / "full", tmp_path / "part"
    fit("-c", write_config(tmp_path / "full.yaml", tiny_moe_dir, full_root, max_steps=9))
    part_cfg = write_config(tmp_path / "part.yaml", tiny_moe_dir, part_root, max_steps=5)
    fit("-c", part_cfg)  # interrupted after the update at step 3
    interrupted = json.loads((part_root / "mixture_weights.json").read_text())
    assert [h["step"] for h in interrupted["history"]] == [0, 3]
    ckpt = part_root / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["MixtureDataModule"]
    assert state["started_batches"] == 5
    fit("-c", part_cfg, "--trainer.max_steps", "9", ckpt_path=ckpt)

    full = json.loads((full_root / "mixture_weights.json").read_text())
    resumed = json.loads((part_root / "mixture_weights.json").read_text())
    assert [h["step"] for h in full["history"]] == [0, 3, 6]
    assert resumed["history"] == full["history"]  # bit-equal floats through JSON
    a, b = _tensors(full_root / "model"), _tensors(part_root / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_ddp_two_processes_identical_weights_different_draws(tiny_moe_dir, tmp_path):
    root = tmp_path / "ddp"
    cfg = write_config(tmp_path / "ddp.yaml", tiny_moe_dir, root, max_steps=7, dump_rank_files=True)
    env = {**os.environ, "MOE_APP_DEBUG": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_app",
            "fit",
            "-c",
            str(cfg),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((root / "mixture_rank0.json").read_text())
    r1 = json.loads((root / "mixture_rank1.json").read_text())
    assert (r0["world_size"], r1["world_size"]) == (2, 2)
    assert [h["step"] for h in r0["history"]] == [0, 3, 6]
    assert r0["weights_hex"] == r1["weights_hex"]  # bitwise identical
    assert r0["history"] == r1["history"]
    assert r0["weights"] != [1 / 3] * 3
    assert r0["draws"].keys() == r1["draws"].keys() == {str(b) for b in range(7)}
    assert all(r0["draws"][b] != r1["draws"][b] for b in r0["draws"])
