"""Reliability callbacks and checkpoint I/O: stop cleanly, never train on NaN, resume exactly.

Lightning already restores the model, optimiser, LR scheduler and loop counters from a
checkpoint; what it leaves out, and what this module adds (docs/reliability.md has the full
fault table):

* :class:`NumericalGuard`: a non-finite loss or gradient stops the run *before* the optimiser
  step that would spread it into the weights, after writing a diagnostic checkpoint
  ``<checkpoints>/nonfinite-step<N>.ckpt``; the error names the step, the value, the stage (the
  LightningModule) and the first offending parameter. Without it a NaN gradient, clipped or not,
  silently turns every weight into NaN and the run "finishes".
* :class:`GracefulStop`: SIGTERM (schedulers, ``kill``) and SIGINT (Ctrl-C) finish the current
  optimiser step, write ``last.ckpt`` where ``--ckpt_path last`` finds it, and exit with
  ``128 + signum`` (143 / 130) and one line saying how to resume. Lightning 2.6 alone, outside
  SLURM, turns SIGTERM into a ``SystemExit`` with exit code 0 and no checkpoint, and Ctrl-C into
  a ``KeyboardInterrupt`` that may land in the middle of an optimiser step.
* :class:`TrainingRNG`: training steps draw randomness (dropout, router noise and jitter) from a
  stream of their own, saved in every checkpoint. Lightning does not checkpoint RNG state, and the
  global stream is also consumed between steps by things a resumed run does differently (sanity
  check, validation, creating data-loader iterators); isolating the training stream makes a resumed
  run draw exactly what the uninterrupted one drew.
* :class:`AtomicCheckpointIO`: ``torch.save`` into a temporary file in the checkpoint's own
  directory, ``fsync``, then ``os.replace``. Lightning's own ``_atomic_save`` writes through an
  fsspec transaction whose temporary file lives in ``$TMPDIR``; when that is another filesystem
  (tmpfs ``/tmp``, a node-local disk) the final "rename" is ``shutil.move``, i.e. a copy straight
  into ``last.ckpt`` that a kill can leave truncated, having already destroyed the previous one.
  It also loads with ``weights_only=True`` always (Lightning defaults remote checkpoints to
  ``weights_only=False``).

The data loader's position within an epoch is the remaining piece; the data modules provide it
with :class:`moe_app.lightning.data.resumable.ResumableDataLoader` (and the mixture sampler's own state).

All callback state is plain tensors / lists / ints: Lightning checkpoints are loaded with
``weights_only=True``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from moe_app.errors import ConfigError, MoeAppError

log = logging.getLogger("moe_app.reliability")

_FIX_NONFINITE = (
    "lower the learning rate (--model.init_args.optim.lr), keep gradient clipping on "
    "(--trainer.gradient_clip_val 1.0), use bf16 rather than fp16, or resume from an earlier checkpoint"
)


# ================================================================================================
# Numerical guard


class NonFiniteError(MoeAppError):
    """Training produced a non-finite loss or gradient. The CLI reports it in one line, exit code 2."""

    def __init__(
        self,
        what: str,
        *,
        step: int,
        value: float,
        stage: str,
        kind: str,
        checkpoint: str | None = None,
    ) -> None:
        self.step = step
        self.value = value
        self.stage = stage
        self.kind = kind
        self.checkpoint = checkpoint
        super().__init__(what, fix=_FIX_NONFINITE)


def _stage_name(pl_module: L.LightningModule) -> str:
    """The training stage for messages: module class, plus its ``stage`` label if it has one."""
    label = getattr(pl_module, "stage", None)
    name = type(pl_module).__name__
    return f"{name} ({label})" if isinstance(label, (str, int)) and label != "" else name


def _as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().reshape(-1)[0]) if value.numel() else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


class NumericalGuard(L.Callback):
    """Stop on a non-finite loss or gradient, after saving a diagnostic checkpoint.

    The gradient check runs in ``on_before_optimizer_step`` (after backward, before clipping and
    the update), so the weights in the diagnostic checkpoint are still the last finite ones. With
    fp16 mixed precision the gradient check is left to the loss scaler, whose job is to skip steps
    with overflowing gradients.

    Args:
        check_loss: stop when the training loss is NaN or infinite.
        check_gradients: stop when any gradient is NaN or infinite.
        save_checkpoint: write ``<checkpoint dir>/nonfinite-step<N>.ckpt`` before stopping.
    """

    def __init__(self, check_loss: bool = True, check_gradients: bool = True, save_checkpoint: bool = True):
        super().__init__()
        self.check_loss = check_loss
        # Read by CausalLMModule: when set, the module leaves a non-finite loss to this guard.
        self.handles_nonfinite_loss = check_loss
        self.check_gradients = check_gradients
        self.save_checkpoint = save_checkpoint
        self._saved: str | None = None
        self._attempted = False

    # -- checks ------------------------------------------------------------------------------
    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        if not self.check_loss:
            return
        bad = local_bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            # One rank's batch can overflow alone; every rank must stop (and save) together, or the
            # others would wait forever in the next collective.
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            where = "the training loss" + (" (on at least one rank)" if trainer.world_size > 1 else "")
            value = _as_float(loss) if local_bad else None  # this rank's loss may be finite
            self._stop(trainer, pl_module, kind="loss", value=value, where=where)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.check_gradients or _uses_grad_scaler(trainer):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        # Max-abs over all gradients: finite iff every element is (a 2-norm could overflow).
        peak = torch.nn.utils.get_total_norm(grads, norm_type=math.inf)
        if bool(torch.isfinite(peak)):
            return
        bad = [
            name
            for name, p in pl_module.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        where = f"the gradient of {bad[0]}" + (
            f" (and {len(bad) - 1} more parameters)" if len(bad) > 1 else ""
        )
        self._stop(trainer, pl_module, kind="gradient", value=float(peak), where=where)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # A module may check its own loss first (CausalLMModule does) and raise before backward:
        # still leave the diagnostic checkpoint behind.
        # Saving is collective under several processes: only _stop (reached by every rank
        # together) may save there; an exception raised on one rank cannot.
        alone = trainer.world_size == 1
        if self.save_checkpoint and alone and not self._attempted and _is_nonfinite_error(exception):
            self._save(trainer)

    # -- stopping ------------------------------------------------------------------------------
    def _stop(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *, kind: str, value: float | None, where: str
    ):
        step = int(trainer.global_step)
        stage = _stage_name(pl_module)
        saved = self._save(trainer) if self.save_checkpoint else None
        shown = "nan" if value is None or math.isnan(value) else repr(value)
        what = f"non-finite {kind} ({shown}) in {where} at global step {step}, stage {stage}"
        what += f"; diagnostic checkpoint (weights before this step): {saved}." if saved else "."
        raise NonFiniteError(what, step=step, value=value, stage=stage, kind=kind, checkpoint=saved)

    def _save(self, trainer: L.Trainer) -> str | None:
        self._attempted = True  # one try: a failed save is not retried from on_exception
        path = checkpoint_dir(trainer) / f"nonfinite-step{int(trainer.global_step)}.ckpt"
        try:
            trainer.save_checkpoint(path)
        except Exception as err:  # the stop matters more than the diagnostic
            log.warning("could not save the diagnostic checkpoint %s: %s", path, err)
            return None
        self._saved = str(path)
        return self._saved


def _is_nonfinite_error(exc: BaseException) -> bool:
    return isinstance(exc, NonFiniteError) or (
        isinstance(exc, MoeAppError) and "non-finite" in getattr(exc, "what", str(exc))
    )


def _uses_grad_scaler(trainer: L.Trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """Where this run's checkpoints go: the ModelCheckpoint's dirpath, else ``<root>/checkpoints``."""
    cb = trainer.checkpoint_callback
    dirpath = getattr(cb, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """The file ``--ckpt_path last`` resolves to (``last.ckpt`` in the checkpoint directory)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = trainer.checkpoint_callback
    name = (
        cb.CHECKPOINT_NAME_LAST if isinstance(cb, ModelCheckpoint) else ModelCheckpoint.CHECKPOINT_NAME_LAST
    )
    ext = cb.FILE_EXTENSION if isinstance(cb, ModelCheckpoint) else ModelCheckpoint.FILE_EXTENSION
    return checkpoint_dir(trainer) / f"{name}{ext}"


# ================================================================================================
# Graceful stop on SIGTERM / SIGINT


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


# ================================================================================================
# RNG stream of the training steps


def _collect_rng() -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _plain(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), *map(_plain, np_state[2:])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain(x: Any) -> Any:
    if isinstance(x, tuple):
        return [_plain(v) for v in x]
    return x


def _tuple(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_tuple(v) for v in x)
    return x


def _set_rng(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), *rest))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


class TrainingRNG(L.Callback):
    """Training steps draw from their own RNG stream, which every checkpoint carries.

    Between ``on_train_batch_start`` and ``on_train_batch_end`` the global generators (torch CPU
    and CUDA, numpy, ``random``) hold the training stream; outside, they hold the rest of the
    program's. So dropout and router noise see the same numbers in an uninterrupted and a resumed
    run, whatever validation, sanity checks or data-loader start-up drew in between. A fresh run
    starts the stream from the global state at ``on_train_start`` (i.e. from ``seed_everything``).
    Under data parallelism every rank draws its own stream; Lightning writes callback state from
    rank 0 only, so the checkpoint gathers all ranks' streams and each rank resumes its own (a
    resume on a different number of processes falls back to rank 0's stream, with a warning).
    """

    def __init__(self) -> None:
        super().__init__()
        self._stream: dict[str, Any] | None = None
        self._outside: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stream is None:
            self._stream = _collect_rng()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._stream is None:
            self._stream = _collect_rng()
        self._outside = _collect_rng()
        _set_rng(self._stream)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._swap_out()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._swap_out()

    def _swap_out(self) -> None:
        if self._outside is not None:
            self._stream = _collect_rng()
            _set_rng(self._outside)
            self._outside = None

    def state_dict(self) -> dict[str, Any]:
        # Inside a step (a checkpoint written by a callback that runs before ours at batch end), the
        # live global state *is* the training stream.
        stream = _collect_rng() if self._outside is not None else self._stream
        if stream is None:
            return {}
        state: dict[str, Any] = {"stream": stream}
        world = _world()
        if world is not None:  # every rank saves a checkpoint together (Lightning's contract)
            streams: list[Any] = [None] * world[1]
            torch.distributed.all_gather_object(streams, stream)
            state["rank_streams"] = streams
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stream = state_dict.get("stream")
        streams = state_dict.get("rank_streams")
        world = _world()
        if streams is not None and world is not None and len(streams) == world[1]:
            stream = streams[world[0]]
        elif streams is not None and len(streams) != (world[1] if world else 1):
            log.warning(
                "the checkpoint holds RNG streams for %d processes, this run has %d: every rank resumes rank "
                "0's stream (deterministic, not identical to an uninterrupted run)",
                len(streams),
                world[1] if world else 1,
            )
        if stream is not None:
            self._stream = stream


def _world() -> tuple[int, int] | None:
    """``(rank, world_size)`` of an initialised multi-process group, else ``None``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


# ================================================================================================
# Checkpoint I/O


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file next to the target, ``fsync``, ``os.replace``; load safely.

    An interrupted save leaves the previous checkpoint intact and no partial file under the final
    name (temporary files start with ``.`` and end in ``.tmp-*``, which ``--ckpt_path last``
    ignores). Remote (``scheme://``) paths fall back to Lightning's writer. Loading always uses
    ``weights_only=True``: a checkpoint holding pickled objects is refused, never executed.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ConfigError(
                "loading a checkpoint with weights_only=False (arbitrary pickled objects) is disabled.",
                where=str(path),
                fix="use a checkpoint that holds only tensors and plain types (every moe-app checkpoint does)",
            )
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (same-directory temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def default_trainer_plugins(trainer_cfg: Any) -> None:
    """Give a Trainer config the atomic checkpoint writer when it names no plugins of its own.

    Called by the CLI before the Trainer is built; leaves configs with ``plugins`` set alone
    (e.g. a custom ``CheckpointIO`` or a precision plugin) and strategies that write sharded
    checkpoint directories (DeepSpeed, Lightning's FSDP1) to their own writers.
    """
    if trainer_cfg is None or trainer_cfg.get("plugins") not in (None, []):
        return
    strategy = trainer_cfg.get("strategy")
    name = str(strategy if isinstance(strategy, str) else getattr(strategy, "class_path", "") or "")
    from moe_app.lightning.strategies.checks import FSDP_CLASS

    # moe-app's FSDP writes full checkpoints on rank 0 through the CheckpointIO; Lightning's FSDP1
    # and DeepSpeed write their own sharded directories.
    if "deepspeed" in name.lower() or ("fsdp" in name.lower() and name != FSDP_CLASS):
        return
    from jsonargparse import Namespace

    trainer_cfg["plugins"] = [
        Namespace(class_path="moe_app.lightning.callbacks.reliability.AtomicCheckpointIO")
    ]


__all__ = [
    "AtomicCheckpointIO",
    "GracefulStop",
    "GracefulStopped",
    "NonFiniteError",
    "NumericalGuard",
    "TrainingRNG",
    "atomic_torch_save",
    "checkpoint_dir",
    "default_trainer_plugins",
    "last_checkpoint_path",
]
