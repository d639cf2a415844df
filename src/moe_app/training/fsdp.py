"""FSDP that wraps decoder layers without naming their class in the config.

Lightning's ``FSDPStrategy`` needs an ``auto_wrap_policy`` naming module classes; a YAML preset
cannot name ``LlamaDecoderLayer`` and ``Qwen2DecoderLayer`` at once, and the class is only known
once ``configure_model`` has built (or upcycled) the model. This strategy finds the decoder layer
class on the model right before wrapping, so ``configs/presets/fsdp.yaml`` composes with every
recipe and model file. ``use_orig_params=True`` (set in the preset) lets frozen and trainable
parameters share a flat parameter, which PESC and LoRA need.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


def decoder_layer_classes(module: nn.Module) -> set[type[nn.Module]]:
    """Classes of the modules held in the model's decoder ``layers`` ModuleList(s)."""
    classes: set[type[nn.Module]] = set()
    for name, child in module.named_modules():
        if name.endswith("layers") and isinstance(child, nn.ModuleList) and len(child) > 0:
            classes.update(type(layer) for layer in child)
    return classes


class DecoderLayerFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` whose default auto-wrap policy is "every decoder layer".

    Args:
        use_orig_params: keep the original parameters visible to the optimiser, required when
            frozen and trainable parameters share a wrapped layer (PESC, LoRA). Default true.
        **kwargs: everything ``lightning.pytorch.strategies.FSDPStrategy`` accepts.
    """

    def __init__(self, *args: Any, use_orig_params: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, use_orig_params=use_orig_params, **kwargs)

    def _setup_model(self, model: nn.Module) -> Any:
        if "auto_wrap_policy" not in self.kwargs:
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            classes = decoder_layer_classes(model)
            if classes:
                self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(classes)
        return super()._setup_model(model)
