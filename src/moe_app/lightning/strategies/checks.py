"""Checks and names for the distributed strategy, before anything heavy runs.

moe-app scales through Lightning's own engines. What each ``--trainer.strategy`` means here:

* ``ddp``: Lightning's DDP; CPU (gloo) or GPU.
* ``fsdp``: moe-app's :class:`~moe_app.lightning.strategies.fsdp.DecoderLayerFSDPStrategy` (FSDP2 on
  decoder layers, full HF checkpoints); CPU (gloo) or GPU. The bare name is rewritten to it, because
  Lightning's own ``FSDPStrategy`` (FSDP1) refuses CPUs and would save rank 0's shard as the model.
* ``deepspeed_stage_2``: Lightning's DeepSpeed ZeRO-2; CUDA only.
* ``deepspeed_stage_3`` is refused: ZeRO-3 partitions parameters while ``configure_model`` loads
  the pretrained weights, which transformers only supports with its own DeepSpeed integration, and
  the partitioned model cannot be saved as a full directory. ``fsdp`` gives the same sharding.
"""

from __future__ import annotations

from typing import Any

from moe_app.errors import ConfigError

FSDP_CLASS = "moe_app.lightning.strategies.fsdp.DecoderLayerFSDPStrategy"
GPU_ONLY = ("deepspeed",)


def _class_path(strategy: Any) -> str | None:
    class_path = getattr(strategy, "class_path", None)
    if class_path is None and hasattr(strategy, "get") and not isinstance(strategy, str):
        class_path = strategy.get("class_path")
    return str(class_path) if class_path else None


def _name(strategy: Any) -> str:
    if strategy is None:
        return "auto"
    if isinstance(strategy, str):
        return strategy
    class_path = _class_path(strategy)
    if class_path:
        return class_path.rsplit(".", 1)[-1].lower().replace("strategy", "")
    return type(strategy).__name__.lower().replace("strategy", "")


def _is_lightning_fsdp1(strategy: Any) -> bool:
    if isinstance(strategy, str):  # Lightning's registered variants, e.g. fsdp_cpu_offload
        return strategy.lower().startswith("fsdp")
    class_path = _class_path(strategy)
    if class_path is None:  # an instance (moe-app's strategy is a ModelParallelStrategy)
        from lightning.pytorch.strategies import FSDPStrategy

        return isinstance(strategy, FSDPStrategy)
    # lightning.pytorch.strategies.FSDPStrategy, pytorch_lightning's, or a subclass named like it
    return class_path != FSDP_CLASS and class_path.rsplit(".", 1)[-1] == "FSDPStrategy"


def check_strategy(trainer_cfg: Any) -> None:
    """Resolve ``fsdp`` to moe-app's FSDP and raise ConfigError for strategies that cannot run."""
    if trainer_cfg is None:
        return
    get = trainer_cfg.get if hasattr(trainer_cfg, "get") else (lambda k, d=None: getattr(trainer_cfg, k, d))
    strategy = get("strategy", None)
    if isinstance(strategy, str) and strategy.lower() in ("fsdp", "fsdp2"):
        from jsonargparse import Namespace

        resolved = Namespace(class_path=FSDP_CLASS, init_args=Namespace())
        if hasattr(trainer_cfg, "__setitem__"):
            trainer_cfg["strategy"] = resolved
        else:
            trainer_cfg.strategy = resolved
        return
    if _is_lightning_fsdp1(strategy):
        raise ConfigError(
            "Lightning's FSDPStrategy (FSDP1) is not supported: it needs CUDA and moe-app would save rank 0's "
            "shard as the model directory.",
            where="trainer.strategy",
            fix="use --trainer.strategy fsdp (or -c configs/presets/fsdp.yaml): FSDP2 on decoder layers, full "
            "checkpoints, CPU or GPU",
        )
    name = _name(strategy).lower()
    if "deepspeed" in name and ("stage_3" in name or _zero_stage(strategy) == 3):
        raise ConfigError(
            "DeepSpeed ZeRO-3 is not supported: it partitions parameters while the pretrained weights load, "
            "and the partitioned model cannot be written as a full model directory.",
            where="trainer.strategy",
            fix="use --trainer.strategy fsdp (the same parameter sharding; reshard_after_forward: true), or "
            "deepspeed_stage_2 on GPUs",
        )
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
            fix="use --trainer.strategy ddp or fsdp (both run on CPU, e.g. --trainer.accelerator cpu "
            "--trainer.devices 2), or run on a machine with GPUs",
        )


def _zero_stage(strategy: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed strategy given as a Namespace/dict or an instance: its
    ``stage`` argument, or ``zero_optimization.stage`` of its DeepSpeed config."""
    if strategy is None or isinstance(strategy, str):
        return None

    def field(obj: Any, key: str) -> Any:
        if obj is None:
            return None
        if hasattr(obj, "get") and not isinstance(obj, str):
            return obj.get(key)
        return getattr(obj, key, None)

    init_args = field(strategy, "init_args")
    source = init_args if init_args is not None else strategy
    config = field(source, "config")
    stage = field(field(config, "zero_optimization"), "stage")
    if stage is None:
        stage = field(source, "stage")
    try:
        return int(stage) if stage is not None else None
    except (TypeError, ValueError):
        return None
