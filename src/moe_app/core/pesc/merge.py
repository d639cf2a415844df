"""Merging a ``variant: lora`` PESC model into a plain MoE (MixLoRA-style experts -> SwiGLU experts).

peft's shared LoRA folds into the base linears first, then every expert's LoRA delta folds into its
copy of the shared FFN: ``W_i = W + (alpha / r) B_i A_i``. The result is exact and exports to a stock
Mixtral. Adapter experts (``variant: adapter``) are nonlinear and are refused.
"""

from __future__ import annotations

from torch import nn

from moe_app.core.moe.pesc import PescMoeBlock, merge_lora_experts
from moe_app.core.pesc.config import SPEC_KIND, attach_pesc_config
from moe_app.core.pesc.quantize import is_4bit, model_is_quantized
from moe_app.core.pesc.surgery import pesc_blocks
from moe_app.core.spec import spec_of
from moe_app.errors import UnsupportedModelError


# ---------------------------------------------------------------------- merging (lora variant)
def merge_peft_lora(model: nn.Module) -> nn.Module:
    """Fold peft LoRA layers into their base linears and remove the wrappers (in place)."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in wrapped:
        base = module.get_base_layer()
        if is_4bit(base):
            raise UnsupportedModelError(
                f"cannot merge LoRA into the 4-bit `{name}` exactly",
                fix="train without quantize_4bit to export a merged model",
            )
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    return model


def merge_pesc(model: nn.Module) -> nn.Module:
    """Turn a ``variant: lora`` PESC model into a plain SparseMoeBlock MoE (in place), exactly.

    peft LoRA is merged into the base first, then every ``LoraExpertsMoeBlock`` becomes a
    ``SparseMoeBlock`` with ``W + (alpha/r) B_i A_i`` experts. The result saves with
    ``moe_app.checkpoint.save_moe_checkpoint`` and exports to a stock Mixtral.
    """
    blocks = pesc_blocks(model)
    if any(isinstance(b, PescMoeBlock) for _, b in blocks):
        raise UnsupportedModelError(
            "PESC adapter experts (variant=adapter) are a nonlinear adapter in series after the FFN; they "
            "do not merge into standard SwiGLU experts",
            fix="keep the adapter-only or full moe-app checkpoint, or train with variant: lora to export a Mixtral",
        )
    if model_is_quantized(model):
        raise UnsupportedModelError(
            "the base is 4-bit quantised; merged experts would not equal the trained model",
            fix="train with quantize_4bit: false to export a merged model",
        )
    merge_peft_lora(model)
    for name, block in blocks:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, merge_lora_experts(block))
    attach_pesc_config(model, None)
    spec = spec_of(model)
    if spec is not None and (spec.adapters or {}).get("kind") == SPEC_KIND:
        spec.adapters = None  # the merged model is a plain MoE: nothing of PESC is left to describe
    return model
