"""Helpers for the reliability tests: run the real CLI in subprocesses, pause them, compare outputs.

The subprocesses import this module (``tests`` is put on ``PYTHONPATH``) for :class:`PauseAt`, a
test-only callback that parks a run at a chosen step so the parent can kill it at a known point.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs" / "tiny"

# Smaller than the tiny configs and a short run: the behaviour under test is the plumbing.
FAST = [
    "--data.init_args.max_eval_examples_per_source",
    "2",
    "--data.init_args.batch_size",
    "4",
    "--data.init_args.max_length",
    "48",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.num_sanity_val_steps",
    "1",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--model.init_args.generation.max_new_tokens",
    "2",
]
ARCH = [
    "--model.init_args.source.arch.hidden_size",
    "32",
    "--model.init_args.source.arch.intermediate_size",
    "64",
    "--model.init_args.source.arch.num_hidden_layers",
    "2",
]


class PauseAt(L.Callback):
    """Test-only: at ``step`` (after backward, before the optimiser update) write ``marker`` and wait
    forever, so the test can kill the process mid-step at a known point."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(os.getpid()))
            while True:
                time.sleep(0.05)


class PauseUntilStopRequested(L.Callback):
    """Test-only: at ``step`` write ``marker`` and wait until GracefulStop has received a signal,
    then let the step finish (so the signal lands mid-step, at a known step)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        from moe_app.lightning.callbacks.signals import GracefulStop

        if trainer.global_step != self.step:
            return
        Path(self.marker).write_text(str(os.getpid()))
        stops = [cb for cb in trainer.callbacks if isinstance(cb, GracefulStop)]
        deadline = time.monotonic() + 300
        while not any(cb.requested for cb in stops) and time.monotonic() < deadline:
            time.sleep(0.05)


def env(cache: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("MOE_APP_DEBUG", None)
    e["MOE_APP_CACHE"] = str(cache)
    e["PYTHONPATH"] = os.pathsep.join([str(TESTS), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.setdefault("HF_HUB_OFFLINE", "1")
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e["OMP_NUM_THREADS"] = "1"  # the machine is shared; threads only add contention at this size
    return e


def start(args: list[str], cache: Path, log: Path) -> subprocess.Popen:
    """``python -m moe_app ARGS`` in the background, stdout+stderr to ``log``."""
    fh = open(log, "w")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen(
        [sys.executable, "-m", "moe_app", *args],
        cwd=ROOT,
        env=env(cache),
        stdout=fh,
        stderr=subprocess.STDOUT,
    )


def run(args: list[str], cache: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moe_app", *args],
        cwd=ROOT,
        env=env(cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {path.name}:\n{tail(log)}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}:\n{tail(log)}")
        time.sleep(0.1)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"timed out:\n{tail(log)}") from None


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.kill(proc.pid, sig)


def pause_config(path: Path, step: int, marker: Path, kind: str = "PauseAt") -> Path:
    """A config file adding :class:`PauseAt` (or ``kind``) to ``trainer.callbacks``."""
    path.write_text(
        f"trainer:\n  callbacks:\n    - class_path: reliability_helpers.{kind}\n"
        f"      init_args: {{step: {step}, marker: {str(marker)!r}}}\n"
    )
    return path


def load_dir_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    assert files, f"no safetensors in {model_dir}"
    for f in files:
        for k, v in load_file(f).items():
            out[f"{f.name}:{k}"] = v
    return out


def assert_same_tensors(a_dir: Path, b_dir: Path) -> None:
    a, b = load_dir_tensors(a_dir), load_dir_tensors(b_dir)
    assert a.keys() == b.keys()
    diff = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"{len(diff)} tensors differ, max abs diff per tensor: {dict(list(diff.items())[:8])}"


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def tiny_dense_dir(path: Path, seed: int = 0) -> Path:
    """A 2-layer hidden-32 LLaMA with the suite tokenizer, written like a dense fit's ``model`` dir."""
    from transformers import AutoModelForCausalLM

    from conftest import suite_llama_config
    from moe_app.checkpoint.pretrained import save_pretrained_dir
    from moe_app.core.data.tokenizer import suite_tokenizer

    tok = suite_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(suite_llama_config(tie_word_embeddings=True))
    return save_pretrained_dir(model, path, tokenizer=tok)


def build_cache(path: Path) -> Path:
    """Build the suite tokenizer once in ``path`` (a ``MOE_APP_CACHE`` shared by the subprocesses)."""
    with cache_env(path):
        from moe_app.core.data.tokenizer import suite_tokenizer

        suite_tokenizer()
    return path


class cache_env:
    """``MOE_APP_CACHE=path`` for the duration of a ``with`` block (module-scoped fixtures)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.old: str | None = None

    def __enter__(self) -> Path:
        self.old = os.environ.get("MOE_APP_CACHE")
        os.environ["MOE_APP_CACHE"] = str(self.path)
        return self.path

    def __exit__(self, *exc) -> None:
        if self.old is None:
            os.environ.pop("MOE_APP_CACHE", None)
        else:
            os.environ["MOE_APP_CACHE"] = self.old
