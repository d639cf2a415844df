"""AdamW with linear warm-up followed by a cosine, linear or constant schedule (stepped per batch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_app.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


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


def build_optimizer(params, cfg: OptimConfig, total_steps: int, named_params=None):
    """Return Lightning's optimiser dict: AdamW plus a per-step LambdaLR."""
    params = list(params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
