"""Checks on the distributed strategy before anything heavy runs.

moe-app scales through Lightning's own engines (DDP, FSDP, DeepSpeed). FSDP and DeepSpeed need
CUDA GPUs; on a CPU-only machine we refuse up front with the reason instead of letting a deep
stack trace surface minutes later.
"""

from __future__ import annotations

from typing import Any

from moe_app.errors import ConfigError

GPU_ONLY = ("fsdp", "deepspeed")


def _name(strategy: Any) -> str:
    if strategy is None:
        return "auto"
    if isinstance(strategy, str):
        return strategy
    class_path = getattr(strategy, "class_path", None) or (
        strategy.get("class_path") if hasattr(strategy, "get") else None
    )
    if class_path:
        return str(class_path).rsplit(".", 1)[-1].lower().replace("strategy", "")
    return type(strategy).__name__.lower().replace("strategy", "")


def check_strategy(trainer_cfg: Any) -> None:
    """Raise ConfigError if the configured strategy cannot run on this machine."""
    if trainer_cfg is None:
        return
    get = trainer_cfg.get if hasattr(trainer_cfg, "get") else (lambda k, d=None: getattr(trainer_cfg, k, d))
    name = _name(get("strategy", None)).lower()
    accelerator = str(get("accelerator", "auto") or "auto").lower()
    if not any(g in name for g in GPU_ONLY):
        return
    import torch

    if accelerator == "cpu" or not torch.cuda.is_available():
        raise ConfigError(
            f"strategy {name!r} needs CUDA GPUs, but "
            + (
                "the accelerator is set to cpu."
                if accelerator == "cpu"
                else "no CUDA GPU is visible on this machine."
            ),
            where="trainer.strategy",
            fix="use --trainer.strategy ddp (works on CPU with --trainer.accelerator cpu --trainer.devices 2), "
            "or run on a machine with GPUs",
        )
