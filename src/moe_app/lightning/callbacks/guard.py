"""``NumericalGuard``: a non-finite loss or gradient stops the run before the optimiser step.

Without it a NaN gradient, clipped or not, silently turns every weight into NaN and the run
"finishes". The guard stops *before* the optimiser step that would spread it into the weights,
after writing a diagnostic checkpoint ``<checkpoints>/nonfinite-step<N>.ckpt``; the error names
the step, the value, the stage (the LightningModule) and the first offending parameter. Under DDP
the decision is agreed across ranks, so no rank saves or raises alone (docs/reliability.md).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch

from moe_app.errors import MoeAppError
from moe_app.lightning.checkpoint_io import checkpoint_dir
from moe_app.lightning.protocols import NonFiniteLossHandler

log = logging.getLogger("moe_app.reliability")


_FIX_NONFINITE = (
    "lower the learning rate (--model.init_args.optim.lr), keep gradient clipping on "
    "(--trainer.gradient_clip_val 1.0), use bf16 rather than fp16, or resume from an earlier checkpoint"
)


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


class NumericalGuard(L.Callback, NonFiniteLossHandler):
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
        # NonFiniteLossHandler: when set, CausalLMModule leaves a non-finite loss to this guard.
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
