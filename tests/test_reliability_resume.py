"""Kill -9 a real ``moe-app fit`` mid-step, resume with ``--ckpt_path last``: the same model, bitwise.

For each run kind (dense, upcycling, PESC, mixture) three subprocesses: an uninterrupted run, a
run parked mid-step after ``last.ckpt`` of step 4 (``PauseAt``) and SIGKILLed there, and the
restart with ``--ckpt_path last``. The final ``model/*.safetensors`` of the restart must equal the
uninterrupted run's exactly (CPU, ``trainer.deterministic``). Validation every 3 steps and a
sanity check make the runs consume randomness outside the training steps differently, which is
what :class:`~moe_app.lightning.callbacks.rng.TrainingRNG` must absorb; the SIGTERM test checks
the graceful path the same way.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from reliability_helpers import (
    ARCH,
    CONFIGS,
    FAST,
    assert_same_tensors,
    build_cache,
    cache_env,
    ckpt_step,
    finish,
    kill,
    pause_config,
    run,
    start,
    tail,
    tiny_dense_dir,
    wait_for,
)

pytestmark = pytest.mark.slow

MAX_STEPS = 8
PAUSE_STEP = 5  # last.ckpt is at step 4 (every 2 steps); the kill lands inside step 6


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A private MOE_APP_CACHE with the suite tokenizer built once for all subprocesses."""
    return build_cache(tmp_path_factory.mktemp("moe_app_cache"))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, dense_dir) -> Path:
    """A tiny upcycled MoE dir (what ``fit -c configs/tiny/upcycle.yaml`` writes), for the mixture run."""
    from moe_app import load_model
    from moe_app.checkpoint.hub import load_tokenizer
    from moe_app.checkpoint.model_dir import save_moe_checkpoint
    from moe_app.core.upcycling import upcycle
    from moe_app.core.upcycling.config import UpcycleConfig

    moe = upcycle(load_model(dense_dir), UpcycleConfig(method="copy", num_experts=4, top_k=2))
    out = tmp_path_factory.mktemp("moe") / "model"
    return save_moe_checkpoint(moe, out, tokenizer=load_tokenizer(dense_dir, required=True))


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, cache) -> Path:
    """A tiny dense model dir (what ``fit -c configs/tiny/dense.yaml`` writes), for the later stages."""
    with cache_env(cache):
        return tiny_dense_dir(tmp_path_factory.mktemp("dense") / "model")


def fit_args(config: str, root: Path, extra: list[str]) -> list[str]:
    return [
        "fit",
        "-c",
        str(CONFIGS / config),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.max_steps",
        str(MAX_STEPS),
        "--trainer.val_check_interval",
        "3",
        "--trainer.deterministic",
        "true",
        "--checkpoint.every_n_train_steps",
        "2",
        *FAST,
        *extra,
    ]


def kill_and_resume(tmp_path: Path, cache: Path, config: str, extra: list[str], sig: int = signal.SIGKILL):
    ref_root, root = tmp_path / "ref", tmp_path / "run"
    ref_log, run_log = tmp_path / "ref.log", tmp_path / "run.log"
    marker = tmp_path / "paused"
    pause = pause_config(tmp_path / "pause.yaml", PAUSE_STEP, marker)

    ref = start(fit_args(config, ref_root, extra), cache, ref_log)  # uninterrupted, concurrently
    victim = start([*fit_args(config, root, extra), "-c", str(pause)], cache, run_log)
    try:
        wait_for(marker, victim, run_log)
        kill(victim, signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert not (root / "model").exists(), "a killed run must not leave a model directory"
    assert ckpt_step(root / "checkpoints" / "last.ckpt") == PAUSE_STEP - 1

    resumed = run([*fit_args(config, root, extra), "--ckpt_path", "last"], cache)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-4000:]
    assert "last.ckpt" in out  # Lightning: "Restoring states from the checkpoint path at .../last.ckpt"
    assert "not resumable" not in out, "Lightning would replay the epoch from its start"

    assert finish(ref, ref_log) == 0, tail(ref_log)
    assert_same_tensors(ref_root / "model", root / "model")
    return root


def test_dense_kill_and_resume_is_bitwise_equal(tmp_path, cache):
    kill_and_resume(tmp_path, cache, "dense.yaml", ARCH)


def test_upcycle_kill_and_resume_is_bitwise_equal(tmp_path, cache, dense_dir):
    extra = [
        "--model.init_args.source.pretrained",
        str(dense_dir),
        "--model.init_args.upcycle.num_experts",
        "4",
        "--model.init_args.log_load_every_n_steps",
        "2",
    ]
    kill_and_resume(tmp_path, cache, "upcycle.yaml", extra)


def test_pesc_kill_and_resume_is_bitwise_equal(tmp_path, cache, dense_dir):
    if not (CONFIGS / "pesc.yaml").exists():
        pytest.skip("configs/tiny/pesc.yaml not shipped yet")
    extra = [
        "--model.init_args.source.pretrained",
        str(dense_dir),
        "--model.init_args.pesc.num_experts",
        "4",
        "--model.init_args.pesc.adapter_dim",
        "4",
    ]
    kill_and_resume(tmp_path, cache, "pesc.yaml", extra)


def test_mixture_kill_and_resume_is_bitwise_equal(tmp_path, cache, moe_dir):
    """Dynamic mixing: weights updated every 2 steps (one update lands between the checkpoint and
    the kill), the sampler position and the weight schedule come back from the checkpoint."""
    if not (CONFIGS / "mixture.yaml").exists():
        pytest.skip("configs/tiny/mixture.yaml not shipped yet")
    extra = [
        "--model.init_args.source.pretrained",
        str(moe_dir),
        "--data.init_args.mixture.update_every",
        "2",
        "--data.init_args.mixture.probe_size",
        "2",
    ]
    root = kill_and_resume(tmp_path, cache, "mixture.yaml", extra)
    ref = json.loads((tmp_path / "ref" / "mixture_weights.json").read_text())
    assert json.loads((root / "mixture_weights.json").read_text()) == ref
