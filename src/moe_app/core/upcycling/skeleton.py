"""MoE module structure <-> ``moe_app.json`` layer specs.

``build_mlp_moe`` creates an (uninitialised-cost) ``SparseMoeBlock`` of a given shape;
``apply_structure`` rebuilds a whole model's MoE layers from a ``MoeSpec`` so that a saved state
dict can be loaded strictly (``load_model``); ``describe_structure`` reads the shapes back from
live modules, so the saved spec always matches the weights, also after stages that changed them
(expert pruning gives layers different ``E``).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_app.core.models.dropped import is_dropped, norm_dropped, remove_mlp
from moe_app.core.models.layers import find_decoder_layers, hidden_act
from moe_app.core.moe.attention import AttentionMoe
from moe_app.core.moe.block import SparseMoeBlock
from moe_app.core.moe.experts import SwiGLUExperts
from moe_app.core.moe.router import TopKRouter
from moe_app.core.spec import AttentionMoeSpec, LayerSpec, MlpMoeSpec, MoeSpec
from moe_app.core.upcycling.shared_expert import SwiGLUMLP
from moe_app.errors import CheckpointError, UnsupportedModelError


def _no_init():
    """Skip weight init while building modules that will be overwritten (saves time on big models)."""
    from transformers.initialization import no_init_weights

    return no_init_weights()


def build_mlp_moe(
    spec: MlpMoeSpec, hidden_size: int, act: str, dtype: torch.dtype, device: torch.device | str | None = None
) -> SparseMoeBlock:
    """An MLP MoE block of the given shape; parameter values are arbitrary (to be loaded or set)."""
    with _no_init(), torch.device(device or "cpu"):
        router = TopKRouter(
            hidden_size,
            spec.num_experts,
            spec.top_k,
            rule=spec.rule,
            noisy_gating=spec.noisy_gating,
            jitter=spec.jitter,
        )
        experts = SwiGLUExperts(spec.num_experts, hidden_size, spec.expert_intermediate_size, act=act)
        shared = shared_gate = None
        if spec.shared_intermediate_size:
            shared = SwiGLUMLP(hidden_size, spec.shared_intermediate_size, act=act)
            if spec.shared_gate:
                shared_gate = nn.Linear(hidden_size, 1, bias=False)
        block = SparseMoeBlock(
            router, experts, shared_expert=shared, shared_gate=shared_gate, scale=spec.scale
        )
    return block.to(dtype)


def build_attention_moe(attention: nn.Module, spec: AttentionMoeSpec, hidden_size: int, dtype: torch.dtype):
    """Wrap an HF attention module into an ``AttentionMoe`` of the given shape."""

    device = next(attention.parameters()).device
    with _no_init(), torch.device(device):
        router = TopKRouter(hidden_size, spec.num_experts, spec.top_k, rule=spec.rule)
    return AttentionMoe(attention, router.to(dtype), scale=spec.scale)


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters())
    return p.dtype, p.device


def apply_structure(model: nn.Module, spec: MoeSpec) -> nn.Module:
    """Replace the dense MLP / attention of every MoE layer in ``spec`` by an empty MoE module, and
    the MLP (and its norm, where recorded) of every layer-dropped layer by the parameter-free
    ``DroppedMlp`` / ``DroppedNorm`` (``moe_app.core.models.dropped``)."""
    _, layers = find_decoder_layers(model)
    if len(layers) != spec.num_hidden_layers:
        raise CheckpointError(
            f"moe_app.json describes {spec.num_hidden_layers} layers but the base model has {len(layers)}",
            where="moe_app.json",
            fix="the surgery file and config.json come from different models; regenerate the checkpoint",
        )
    dtype, device = _model_dtype_device(model)
    hidden = model.config.hidden_size
    act = hidden_act(model)
    for lay in spec.layers:
        layer = layers[lay.index]
        if lay.mlp is not None:
            layer.mlp = build_mlp_moe(lay.mlp, hidden, act, dtype, device)
        elif lay.mlp_dropped:
            try:
                remove_mlp(layer, norm=lay.mlp_norm_dropped)
            except ValueError as e:
                raise CheckpointError(
                    f"layer {lay.index}: {e}",
                    where="moe_app.json",
                    fix="load the checkpoint with the transformers version that wrote it",
                ) from e
        if lay.attention is not None:
            layer.self_attn = build_attention_moe(layer.self_attn, lay.attention, hidden, dtype)
        beta = spec.skipping.get(lay.index)
        if beta is not None:
            if lay.mlp is None:
                raise CheckpointError(
                    f"skipping beta for layer {lay.index}, which has no MLP MoE",
                    where="moe_app.json",
                    fix="remove the entry from 'skipping'",
                )
            layer.mlp.router.skip_beta = float(beta)
    return model


def _is_attention_moe(module: nn.Module) -> bool:
    return hasattr(module, "router") and hasattr(module, "attention") and hasattr(module, "last_routing")


def describe_structure(model: nn.Module, previous: MoeSpec | None = None) -> list[LayerSpec]:
    """Per-layer specs read from the live modules (provenance fields kept from ``previous``)."""
    path, layers = find_decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        mlp_spec = attn_spec = None
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, SparseMoeBlock):
            if not isinstance(mlp.experts, SwiGLUExperts) or not isinstance(mlp.router, TopKRouter):
                raise UnsupportedModelError(
                    f"`{path}.{i}.mlp` uses {type(mlp.experts).__name__}/{type(mlp.router).__name__}, "
                    "which moe_app.json cannot describe",
                    fix="use SwiGLUExperts and TopKRouter, or record the custom structure in spec.adapters",
                )
            old = previous.layers[i].mlp if previous and i < len(previous.layers) else None
            shared = mlp.shared_expert
            mlp_spec = MlpMoeSpec(
                num_experts=mlp.router.num_experts,
                top_k=mlp.router.top_k,
                rule=mlp.router.rule,
                scale=mlp.scale,
                expert_intermediate_size=mlp.experts.intermediate_size,
                shared_intermediate_size=shared.intermediate_size if shared is not None else 0,
                shared_gate=mlp.shared_gate is not None,
                noisy_gating=mlp.router.noise_weight is not None,
                jitter=float(mlp.router.jitter),
                method=old.method if old else None,
                split=old.split if old else None,
            )
        attn = getattr(layer, "self_attn", None)
        if attn is not None and _is_attention_moe(attn):
            attn_spec = AttentionMoeSpec(
                num_experts=attn.router.num_experts,
                top_k=attn.router.top_k,
                rule=attn.router.rule,
                scale=float(attn.scale),
            )
        dropped = is_dropped(layer)
        out.append(
            LayerSpec(
                index=i,
                mlp=mlp_spec,
                attention=attn_spec,
                mlp_dropped=dropped,
                mlp_norm_dropped=dropped and norm_dropped(layer),
            )
        )
    return out


def skipping_from_model(model: nn.Module) -> dict[int, float]:
    """``{layer: beta}`` for every MLP MoE router with dynamic skipping enabled."""
    _, layers = find_decoder_layers(model)
    out = {}
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, SparseMoeBlock) and mlp.router.skip_beta is not None:
            out[i] = float(mlp.router.skip_beta)
    return out
