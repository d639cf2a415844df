"""The real command line, through subprocesses: fit -> saved model -> test report; error policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DENSE = str(ROOT / "configs" / "tiny" / "dense.yaml")
# A smaller model and a short run: the behaviour under test is the plumbing, not the accuracy.
TINY = [
    "--model.init_args.source.arch.hidden_size",
    "32",
    "--model.init_args.source.arch.intermediate_size",
    "64",
    "--model.init_args.source.arch.num_hidden_layers",
    "2",
    "--data.init_args.max_eval_examples_per_source",
    "4",
    "--data.init_args.batch_size",
    "8",
    "--model.init_args.generation.max_new_tokens",
    "4",
]


def moe_app(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MOE_APP_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "moe_app", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
def test_fit_saves_model_and_test_prints_per_domain_table(tmp_path: Path):
    run = tmp_path / "run"
    fit = moe_app(
        "fit",
        "-c",
        DENSE,
        "--trainer.default_root_dir",
        str(run),
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "3",
        *TINY,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    model_dir = run / "model"
    assert (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists()
    assert list(model_dir.glob("*.safetensors"))
    assert (run / "checkpoints" / "last.ckpt").exists()
    saved_cfg = list(run.glob("lightning_logs/version_*/config.yaml"))
    assert saved_cfg and "hidden_size: 32" in saved_cfg[0].read_text()

    from moe_app import load_model

    model = load_model(model_dir)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2

    test = moe_app("test", "-c", DENSE, "--trainer.default_root_dir", str(run), "--ckpt_path", "last", *TINY)
    assert test.returncode == 0, test.stderr[-3000:]
    from moe_app.core.data.synthetic import SUITE_DOMAINS

    for domain in SUITE_DOMAINS:
        assert domain in test.stdout
    assert "exact match" in test.stdout
    results = json.loads((run / "test_results.json").read_text())
    rows = {r["domain"]: r for r in results["rows"]}
    assert set(SUITE_DOMAINS) <= set(rows)
    assert all(r["n"] == 4 for d, r in rows.items() if d != "ALL")
    assert 0.0 < rows["ALL"]["loss"] < 20.0
    assert results["parameters"]["total"] == results["parameters"]["trainable"] > 0


@pytest.mark.slow
def test_broken_jsonl_line_exits_2_naming_file_and_line(tmp_path: Path):
    data = tmp_path / "train.jsonl"
    good = json.dumps({"instruction": "Say hi", "input": "", "output": "hi"})
    data.write_text(f"{good}\n{good}\n{{'instruction': broken\n{good}\n")
    sources = json.dumps([{"name": "mine", "path": str(data), "format": "alpaca", "dev_fraction": 0.25}])
    res = moe_app(
        "fit",
        "-c",
        DENSE,
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--data.init_args.sources",
        sources,
        *TINY,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "train.jsonl" in res.stderr and "line 3" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "model").exists()

    debug = moe_app(
        "fit",
        "-c",
        DENSE,
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--data.init_args.sources",
        sources,
        "--debug",
        *TINY,
    )
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_help_lists_training_and_offline_commands():
    res = moe_app("--help")
    assert res.returncode == 0
    for cmd in ("fit", "test", "upcycle", "export"):
        assert cmd in res.stdout


def test_unknown_command_exits_2_without_traceback():
    res = moe_app("frobnicate")
    assert res.returncode == 2
    assert "unknown command 'frobnicate'" in res.stderr and "Traceback" not in res.stderr


def test_missing_config_file_exits_2(tmp_path: Path):
    res = moe_app("fit", "-c", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2
    assert "nope.yaml" in res.stderr and "Traceback" not in res.stderr


def test_test_with_ckpt_path_last_but_no_checkpoint_exits_2(tmp_path: Path):
    res = moe_app(
        "test", "-c", DENSE, "--trainer.default_root_dir", str(tmp_path / "empty"), "--ckpt_path", "last"
    )
    assert res.returncode == 2
    assert "no " in res.stderr and "last.ckpt" in res.stderr and "untrained model" in res.stderr
    assert "Traceback" not in res.stderr


def test_save_dir_escaping_the_run_directory_is_refused_before_training(tmp_path: Path):
    res = moe_app(
        "fit",
        "-c",
        DENSE,
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.max_steps",
        "2",
        "--model.init_args.save_dir",
        "../escaped",
        *TINY,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "model.init_args.save_dir" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()  # refused before any step
