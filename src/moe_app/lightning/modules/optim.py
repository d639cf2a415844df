"""AdamW with linear warm-up followed by a cosine, linear or constant schedule (stepped per batch).

The AdamW kernel matters for MoE models: a copy-upcycled model (Komatsuzaki et al. 2023, "Sparse
Upcycling") has ``E`` times the FFN parameters of its dense source while each token only computes
``k`` experts, so the optimiser, which touches every parameter, is a much larger share of a
training step than for a dense model. torch's default on CPU is the per-tensor loop (about ten
passes over parameter, gradient and both moments); its fused kernel does one (the 692M parameters
of SmolLM2-135M copied to 8 experts: 1.26 s -> 0.34 s per step on 2 CPU threads; see
``benchmarks/moe_train_step.py``, which times both on the same gradients). Every expert stack of a
layer is one parameter (``gate_up_proj (E, 2F, d)``), so the experts' states are already grouped
into a few large tensors per layer. The kernels compute the same update in a different operation
order, so they agree up to float rounding (``tests/test_optim_kernels.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_app.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")
IMPLS = ("auto", "fused", "foreach", "for_loop")


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate (reached at the end of warm-up)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW); not applied to biases and norm weights."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int | None = None
    """Linear warm-up steps; when unset, ``warmup_ratio`` of the total steps."""
    warmup_ratio: float = 0.03
    """Warm-up as a fraction of the total optimiser steps (LLaMA-MoE v2 uses 3%)."""
    schedule: str = "cosine"
    """After warm-up: cosine | linear | constant."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` for cosine/linear decay."""
    impl: str = "auto"
    """AdamW kernel: auto (fused where torch has a fused kernel for every parameter, else torch's
    choice) | fused | foreach | for_loop. Same update up to float rounding; fused is the fastest."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list
        if self.lr <= 0:
            raise ConfigError(
                f"optim.lr must be > 0, got {self.lr}.", fix="e.g. --model.init_args.optim.lr 3e-4"
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"unknown schedule {self.schedule!r}.", where="optim.schedule", fix=f"use one of {SCHEDULES}"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if self.impl not in IMPLS:
            raise ConfigError(
                f"unknown AdamW implementation {self.impl!r}.", where="optim.impl", fix=f"use one of {IMPLS}"
            )


def lr_multiplier(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _fused_devices() -> tuple[str, ...]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # an older or newer torch without the helper: the devices fused AdamW had in 2.4
        return ("cuda", "cpu", "mps", "xpu")


def fused_supported(params: list[Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes every parameter: plain (not DTensor / FSDP-sharded)
    floating-point tensors on a device with fused kernels (CPU and CUDA in torch >= 2.4)."""
    devices = _fused_devices()
    return bool(params) and all(
        type(p) in (Tensor, torch.nn.Parameter) and p.is_floating_point() and p.device.type in devices
        for p in params
    )


def adamw_kernel_kwargs(params: list[Tensor], impl: str) -> dict[str, bool]:
    """``fused`` / ``foreach`` arguments of ``torch.optim.AdamW`` for ``impl`` (see ``OptimConfig.impl``).

    ``auto`` takes fused where :func:`fused_supported` and otherwise leaves the choice to torch
    (foreach on CUDA, the loop elsewhere), which keeps sharded (DTensor) parameters on torch's path.
    """
    if impl == "fused" and not fused_supported(params):
        devices = sorted({p.device.type for p in params})
        raise ConfigError(
            f"optim.impl=fused needs plain floating-point parameters on a device with fused AdamW "
            f"kernels ({', '.join(_fused_devices())}); got parameters on {', '.join(devices)}.",
            where="optim.impl",
            fix="use optim.impl=auto (fused where possible) or foreach",
        )
    if impl == "fused" or (impl == "auto" and fused_supported(params)):
        return {"fused": True}
    if impl == "foreach":
        return {"foreach": True}
    if impl == "for_loop":
        return {"foreach": False}
    return {}


def build_optimizer(params, cfg: OptimConfig, total_steps: int, named_params=None):
    """Return Lightning's optimiser dict: AdamW plus a per-step LambdaLR."""
    params = list(params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    kernel = adamw_kernel_kwargs(params, cfg.impl)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kernel)
    if kernel.get("fused"):
        # A fused AdamW declares that its step unscales AMP gradients itself; Lightning then refuses
        # gradient clipping under mixed precision (it cannot unscale before clipping). Declaring
        # the ordinary contract instead lets GradScaler unscale first, as for any optimiser; the
        # step then runs without a grad scale, which the fused kernel supports.
        optimizer._step_supports_amp_scaling = False
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
