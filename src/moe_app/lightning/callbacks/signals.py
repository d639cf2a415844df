"""``GracefulStop``: SIGTERM / SIGINT finish the step, write ``last.ckpt`` and exit 143 / 130.

Lightning 2.6 alone, outside SLURM, turns SIGTERM into a ``SystemExit`` with exit code 0 and no
checkpoint, and Ctrl-C into a ``KeyboardInterrupt`` that may land in the middle of an optimiser
step. Here the current optimiser step finishes, ``last.ckpt`` is written where ``--ckpt_path last``
finds it, and the process exits with ``128 + signum`` and one line saying how to resume. A signal
received by one rank is agreed across ranks every step, so the ranks stop together.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from moe_app.errors import ConfigError
from moe_app.lightning.checkpoint_io import last_checkpoint_path


class GracefulStopped(SystemExit):
    """Raised after the resumable checkpoint is written; the exit code is ``128 + signum``."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message


def _signal_numbers(names: Sequence[str]) -> list[int]:
    out = []
    for name in names:
        sig = getattr(signal, str(name).upper(), None)
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(
                f"graceful_stop.signals: {name!r} is not a signal that can be caught.",
                fix="use signal names such as SIGTERM, SIGINT, SIGUSR1",
            )
        out.append(int(sig))
    return out


class GracefulStop(L.Callback):
    """On SIGTERM / SIGINT: finish the current step, write ``last.ckpt``, exit ``128 + signum``.

    The handler only records the signal; the checkpoint is written at the end of the current
    training batch, the same point where ``ModelCheckpoint`` saves, so the run resumes with
    ``--ckpt_path last`` as if it had never stopped. A second signal while waiting stops at once
    (the signal's default action, or ``KeyboardInterrupt`` for SIGINT). No final model directory
    is written for a stopped run. Signals outside ``fit`` keep their usual behaviour.

    Args:
        signals: names of the signals that request a stop.
    """

    def __init__(self, signals: list[str] | None = None) -> None:
        super().__init__()
        self.signals = list(signals) if signals is not None else ["SIGTERM", "SIGINT"]
        self._signums = _signal_numbers(self.signals)
        self._received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> int | None:
        """The signal number received, or ``None``."""
        return self._received

    def _handler(self, signum: int, frame: Any) -> None:
        if self._received is not None:  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self._received = signum
        sys.stderr.write(
            f"moe-app: received {signal.Signals(signum).name}: stopping after the current step "
            "(send it again to stop immediately)\n"
        )

    def _install(self) -> None:
        # Lightning installs its own SIGTERM handler right before the fit loop (it would exit 0 at
        # the next batch boundary without a checkpoint); ours goes on top once that has happened.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self._signums:
            current = signal.getsignal(signum)
            if getattr(current, "__self__", None) is self:
                continue
            self._previous.setdefault(signum, current)
            signal.signal(signum, self._handler)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._received = None

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.world_size > 1:
            # A signal may reach one rank only (e.g. SIGINT to the launcher); all ranks must write
            # the checkpoint together, so agree on it every step (one scalar all-reduce).
            flag = torch.tensor(float(self._received or 0), device=pl_module.device)
            agreed = int(trainer.strategy.reduce(flag, reduce_op="max"))
            self._received = agreed or None
        if self._received is None:
            return
        signum = self._received
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        name = signal.Signals(signum).name
        message = (
            f"moe-app: stopped by {name} after global step {trainer.global_step}; resumable checkpoint "
            f"{path}. Resume: rerun the same command with --ckpt_path last"
        )
        if trainer.is_global_zero:
            sys.stderr.write(message + "\n")
        raise GracefulStopped(signum, message)

    # Put the previous handlers back before Lightning's own teardown restores what it found when
    # it registered (the originals): not in ``teardown``, which runs after that.
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
