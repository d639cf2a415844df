"""SIGTERM / SIGINT on a real ``moe-app fit``: a resumable ``last.ckpt``, a clear message, exit 128+N.

The signal is delivered while the run is parked inside step 6 (after backward, before the
update); the run finishes that step, writes ``last.ckpt`` of step 6, prints how to resume and
exits with 143 (SIGTERM) or 130 (SIGINT), writing no final model directory. The SIGTERM run is
then resumed with ``--ckpt_path last`` and must end bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from reliability_helpers import (
    ARCH,
    CONFIGS,
    FAST,
    assert_same_tensors,
    build_cache,
    ckpt_step,
    finish,
    kill,
    pause_config,
    run,
    start,
    tail,
    wait_for,
)

pytestmark = pytest.mark.slow

STEP = 5  # parked when global_step == 5, i.e. inside the 6th optimiser step


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("moe_app_cache"))


def fit_args(root: Path) -> list[str]:
    return [
        "fit",
        "-c",
        str(CONFIGS / "dense.yaml"),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.max_steps",
        "8",
        "--trainer.val_check_interval",
        "3",
        "--checkpoint.every_n_train_steps",
        "4",
        *FAST,
        *ARCH,
    ]


def stop_with(sig: int, tmp_path: Path, cache: Path, name: str):
    root, log, marker = tmp_path / name, tmp_path / f"{name}.log", tmp_path / f"{name}.paused"
    pause = pause_config(tmp_path / f"{name}.yaml", STEP, marker, kind="PauseUntilStopRequested")
    proc = start([*fit_args(root), "-c", str(pause)], cache, log)
    wait_for(marker, proc, log)
    kill(proc, sig)
    rc = finish(proc, log)
    return root, rc, log.read_text(errors="replace")


def check_stopped(root: Path, rc: int, out: str, sig: int) -> None:
    name = signal.Signals(sig).name
    assert rc == 128 + sig, out[-3000:]
    assert f"stopped by {name} after global step {STEP + 1}" in out, out[-3000:]
    assert "--ckpt_path last" in out
    assert "Traceback" not in out
    assert ckpt_step(root / "checkpoints" / "last.ckpt") == STEP + 1
    assert not (root / "model").exists(), "a stopped run must not write the final model"


def test_sigterm_saves_resumable_checkpoint_and_resume_is_bitwise_equal(tmp_path, cache):
    ref_log = tmp_path / "ref.log"
    ref = start(fit_args(tmp_path / "ref"), cache, ref_log)
    root, rc, out = stop_with(signal.SIGTERM, tmp_path, cache, "run")
    check_stopped(root, rc, out, signal.SIGTERM)

    resumed = run([*fit_args(root), "--ckpt_path", "last"], cache)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert finish(ref, ref_log) == 0, tail(ref_log)
    assert_same_tensors(tmp_path / "ref" / "model", root / "model")


def test_sigint_saves_resumable_checkpoint_and_exits_130(tmp_path, cache):
    root, rc, out = stop_with(signal.SIGINT, tmp_path, cache, "run")
    check_stopped(root, rc, out, signal.SIGINT)
    assert "KeyboardInterrupt" not in out
