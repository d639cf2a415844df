"""PESC surgery: dense decoder -> shared frozen FFN + routed adapters (core: no file I/O).

Parameter-efficient sparsity crafting (Wu et al. 2024, "Parameter-Efficient Sparsity Crafting from
Dense to Mixture-of-Experts for Instruction Tuning on General Tasks", arXiv 2401.02731; ALGORITHMS.md
section 5) turns every selected decoder layer's MLP into a :class:`~moe_app.core.moe.pesc.PescMoeBlock`
(``variant: adapter``) or a MixLoRA-style :class:`~moe_app.core.moe.pesc.LoraExpertsMoeBlock`
(``variant: lora``), freezes the base, and optionally quantises the base to 4-bit NF4 and adds a
QLoRA (peft) on the base linears, as the paper's recipe does.

peft and the shared FFN: peft's LoRA is injected in place (``inject_adapter_in_model``, so the
model stays a plain ``PreTrainedModel``) and may wrap the shared FFN's ``gate_proj/up_proj/down_proj``
inside a PESC block. That is deliberate and safe: the blocks call the shared FFN through its modules,
never through ``.weight``, so a wrapped (or 4-bit) linear simply adds the shared QLoRA delta the paper
trains. peft never touches the routers or adapters: they are stacked parameters, not linears.

Configuration: :mod:`moe_app.core.pesc.config`; merging the ``lora`` variant into a plain MoE:
:mod:`moe_app.core.pesc.merge`; checkpoints: :mod:`moe_app.checkpoint.pesc`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from moe_app.core.models.layers import dense_mlp_parts, find_decoder_layers, hidden_act
from moe_app.core.moe.adapters import BottleneckAdapters, LoraExperts
from moe_app.core.moe.pesc import LoraExpertsMoeBlock, PescMoeBlock
from moe_app.core.moe.router import TopKRouter
from moe_app.core.pesc.config import (
    PESC_BLOCKS,
    SPEC_KIND,
    PeftLoraOptions,
    PescConfig,
    attach_pesc_config,
    is_pesc_saved_buffer,
    is_pesc_trainable,
)
from moe_app.core.pesc.quantize import quantize_base_4bit
from moe_app.core.upcycling.config import parse_layer_selection
from moe_app.core.upcycling.rng import layer_generator
from moe_app.errors import CheckpointError, ConfigError, UnsupportedModelError

log = logging.getLogger("moe_app.core.upcycling")


def pesc_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PESC_BLOCKS)]


def _new_block(layer: nn.Module, where: str, index: int, cfg: PescConfig, act: str) -> nn.Module:
    gate, _, _ = dense_mlp_parts(layer, where)  # raises naming the missing module
    ffn_dim, hidden = gate.weight.shape
    router = TopKRouter(hidden, cfg.num_experts, cfg.top_k)
    with torch.no_grad():
        router.weight.copy_(
            torch.randn(router.weight.shape, generator=layer_generator(cfg.seed, index, "pesc_router")) * 0.02
        )
    g = layer_generator(cfg.seed, index, "pesc_experts")
    if cfg.variant == "adapter":
        adapters = BottleneckAdapters(
            cfg.num_experts,
            hidden,
            cfg.adapter_dim,
            cfg.dropout,
            impl=cfg.impl,
            sparsity=cfg.adapter_sparsity,
            mask=cfg.adapter_mask,
        )
        adapters.reset_parameters(g)  # with adapter_sparsity > 0 this also fixes the masks from `g`
        block: nn.Module = PescMoeBlock(layer.mlp, router, adapters, scale=cfg.scale)
    else:
        lora = LoraExperts(
            cfg.num_experts, hidden, ffn_dim, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, impl=cfg.impl
        )
        lora.reset_parameters(g)
        block = LoraExpertsMoeBlock(layer.mlp, router, lora, scale=cfg.scale, act=act)
    # New parameters follow the base MLP's device and dtype (the router still computes in fp32).
    block.router.to(device=gate.weight.device, dtype=gate.weight.dtype)
    block.experts.to(device=gate.weight.device, dtype=gate.weight.dtype)
    return block


def build_pesc(model: nn.Module, cfg: PescConfig) -> nn.Module:
    """Apply PESC to ``model`` in place and return it: blocks, optional 4-bit base, optional peft LoRA, freezing.

    At initialisation the result computes exactly the dense function (zero ``U`` / zero LoRA ``B``).
    Afterwards only :data:`TRAINABLE_MARKERS` parameters have ``requires_grad``.
    """
    if pesc_blocks(model):
        raise ConfigError(
            f"{type(model).__name__} already has PESC blocks",
            where="build_pesc",
            fix="apply build_pesc to the dense model once",
        )
    path, layers = find_decoder_layers(model)
    chosen = parse_layer_selection(cfg.layers, len(layers))
    if not chosen:
        raise ConfigError(
            f"layers={cfg.layers!r} selects no layer", where="PescConfig.layers", fix="use 'all'"
        )
    act = hidden_act(model)
    for i in chosen:
        layer = layers[i]
        layer.mlp = _new_block(layer, f"{path}.{i}", i, cfg, act)
    if cfg.quantize_4bit:
        quantize_base_4bit(model, compute_dtype=cfg.quant_compute_dtype)
    if cfg.peft_lora.enabled:
        inject_peft_lora(model, cfg.peft_lora)
    trainable = mark_pesc_trainable(model)
    attach_pesc_config(model, cfg)
    log.info("PESC (%s): %d layers, %d trainable tensors", cfg.variant, len(chosen), len(trainable))
    return model


def inject_peft_lora(model: nn.Module, opts: PeftLoraOptions) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    lora_cfg = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=list(opts.target_modules),
        bias="none",
    )
    try:
        inject_adapter_in_model(lora_cfg, model)
    except ValueError as e:
        raise UnsupportedModelError(
            f"peft could not add LoRA to {opts.target_modules} in {type(model).__name__}: {e}",
            fix="set PescConfig.peft_lora.target_modules to linear names the model has (e.g. q_proj, v_proj)",
        ) from e


def mark_pesc_trainable(model: nn.Module) -> list[str]:
    """Freeze everything except :data:`TRAINABLE_MARKERS` parameters; return the trainable names."""
    names = []
    for name, p in model.named_parameters():
        train = is_pesc_trainable(name) and p.dtype.is_floating_point
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names


# ---------------------------------------------------------------------- adapter-only checkpoint
def pesc_checkpoint_tensors(model: nn.Module) -> dict[str, Tensor]:
    """What an adapter-only checkpoint holds, live: the trainable PESC parameters and the sparse-adapter masks."""
    out: dict[str, Tensor] = {n: p for n, p in model.named_parameters() if is_pesc_trainable(n)}
    out.update((n, b) for n, b in model.named_buffers() if is_pesc_saved_buffer(n))
    return out


def pesc_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable PESC tensors (routers, adapters / expert LoRA, peft LoRA) and sparse-adapter masks, detached on CPU."""
    return {n: t.detach().to("cpu").contiguous() for n, t in pesc_checkpoint_tensors(model).items()}


# ---------------------------------------------------------------------- full checkpoint (moe-app dir)
def pesc_spec_slot(cfg: PescConfig) -> dict[str, Any]:
    """What goes into ``moe_app.json``'s ``adapters`` slot for a PESC model."""
    return {"kind": SPEC_KIND, "config": cfg.to_dict()}


def pesc_skeleton(model: nn.Module, slot: dict[str, Any]) -> nn.Module:
    """Rebuild the PESC structure described by an ``adapters`` slot on a bare base (weights to be loaded).

    Meant for the loader's registry of adapter kinds (``slot["kind"] == "pesc"``).
    """
    if slot.get("kind") != SPEC_KIND:
        raise CheckpointError(
            f"adapters slot of kind {slot.get('kind')!r}, not {SPEC_KIND!r}", where="moe_app.json"
        )
    if pesc_blocks(model):
        return model  # already rebuilt (idempotent)
    return build_pesc(model, PescConfig.from_dict(slot["config"]))


__all__ = [
    "build_pesc",
    "inject_peft_lora",
    "mark_pesc_trainable",
    "pesc_blocks",
    "pesc_checkpoint_tensors",
    "pesc_skeleton",
    "pesc_spec_slot",
    "pesc_state_dict",
]
