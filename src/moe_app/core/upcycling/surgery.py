"""``upcycle(model, cfg)``: dense decoder -> Mixture-of-Experts, as a pure function on ``nn.Module``.

Each selected decoder layer's SwiGLU ``mlp`` is replaced by a ``SparseMoeBlock`` whose experts are
built by copying (sparse upcycling, Komatsuzaki et al. 2023), noisy copying, Drop-Upcycling
(Nakamura et al. 2025) or neuron partition (LLaMA-MoE, Zhu et al. 2024); optionally the attention
becomes an MoE over GQA groups (LLaMA-MoE v2). Everything the user can get wrong is checked on every
layer before the first module is replaced, so a failing call leaves the model untouched.

The per-layer tensor construction (``mlp_moe_tensors``, ``router_tensor``) depends only on the
dense weights, the config and the layer index; the streaming converter calls the same functions on
tensors read from disk, which is why both paths give identical checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moe_app.core.models.layers import dense_mlp_parts, find_decoder_layers, hidden_act
from moe_app.core.moe.block import SparseMoeBlock
from moe_app.core.spec import AttentionMoeSpec, MlpMoeSpec, MoeSpec, attach_spec, spec_of
from moe_app.core.upcycling.calibration import capture_inputs, neuron_importance, normalize_batches
from moe_app.core.upcycling.config import UpcycleConfig
from moe_app.core.upcycling.copy import copy_experts
from moe_app.core.upcycling.kmeans import balanced_kmeans
from moe_app.core.upcycling.partition import partition_experts, shared_expert_weights, split_neurons
from moe_app.core.upcycling.rng import layer_generator
from moe_app.core.upcycling.router_init import init_router_weight
from moe_app.core.upcycling.skeleton import build_attention_moe, build_mlp_moe, describe_structure
from moe_app.errors import ConfigError, UnsupportedModelError


@dataclass
class MlpMoeTensors:
    """Weights of one upcycled MLP layer (``SparseMoeBlock`` parameter names in comments)."""

    spec: MlpMoeSpec
    gate_up: Tensor  # experts.gate_up_proj (E, 2F, d)
    down: Tensor  # experts.down_proj (E, d, F)
    router: Tensor  # router.weight (E, d)
    shared: tuple[Tensor, Tensor, Tensor] | None = None  # shared_expert.{gate,up,down}_proj.weight

    def state_dict(self, prefix: str) -> dict[str, Tensor]:
        """Keys as in ``SparseMoeBlock.state_dict()`` under ``prefix`` (e.g. ``model.layers.3.mlp.``)."""
        out = {f"{prefix}router.weight": self.router}
        if self.spec.noisy_gating:
            out[f"{prefix}router.noise_weight"] = torch.zeros_like(self.router)
        out[f"{prefix}experts.gate_up_proj"] = self.gate_up
        out[f"{prefix}experts.down_proj"] = self.down
        if self.shared is not None:
            for name, t in zip(("gate_proj", "up_proj", "down_proj"), self.shared):
                out[f"{prefix}shared_expert.{name}.weight"] = t
        return out


def check_mlp_shape(cfg: UpcycleConfig, intermediate_size: int, where: str) -> None:
    """Raise ``ConfigError`` when the layer's ``d_ff`` cannot be partitioned as asked."""
    if cfg.method != "partition":
        return
    chunks = cfg.num_experts + cfg.shared_experts
    if intermediate_size % chunks:
        divisors = [
            e
            for e in range(2, min(intermediate_size, 64) + 1)
            if intermediate_size % (e + cfg.shared_experts) == 0
        ]
        raise ConfigError(
            f"d_ff={intermediate_size} is not divisible by num_experts + shared_experts = {chunks}",
            where=where,
            fix=f"choose num_experts among {divisors[:12]} (with shared_experts={cfg.shared_experts})",
        )


def mlp_spec_for(cfg: UpcycleConfig, intermediate_size: int) -> MlpMoeSpec:
    """The shape of the MoE block that ``cfg`` makes from a dense MLP with ``d_ff = intermediate_size``."""
    if cfg.method == "partition":
        chunk = intermediate_size // (cfg.num_experts + cfg.shared_experts)
        expert_f, shared_f = chunk, chunk * cfg.shared_experts
    else:
        expert_f, shared_f = intermediate_size, 0
    return MlpMoeSpec(
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        rule=cfg.rule,
        scale=cfg.resolved_scale,
        expert_intermediate_size=expert_f,
        shared_intermediate_size=shared_f,
        shared_gate=False,
        noisy_gating=cfg.noisy_gating,
        jitter=cfg.jitter,
        method=cfg.method,
        split=cfg.split if cfg.method == "partition" else None,
    )


def mlp_moe_tensors(
    cfg: UpcycleConfig,
    layer: int,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    *,
    importance: Tensor | None = None,
    centroids: Tensor | None = None,
) -> MlpMoeTensors:
    """Build one layer's MoE weights from its dense ``W_gate/W_up (F, d)`` and ``W_down (d, F)``."""
    f, d = w_gate.shape
    e = cfg.num_experts
    shared = None
    if cfg.method == "partition":
        shared_idx, groups = split_neurons(
            cfg.split,
            e,
            f,
            w_up=w_up,
            importance=importance,
            shared=cfg.shared_experts,
            seed=cfg.seed,
            layer=layer,
            kmeans_iters=cfg.kmeans_iters,
        )
        gate_up, down = partition_experts(w_gate, w_up, w_down, groups)
        if shared_idx is not None:
            shared = shared_expert_weights(w_gate, w_up, w_down, shared_idx)
        expert_f = groups.shape[1]
    else:
        gate_up, down = copy_experts(
            w_gate,
            w_up,
            w_down,
            e,
            method=cfg.method,
            noise_std=cfg.noise_std,
            drop_ratio=cfg.drop_ratio,
            seed=cfg.seed,
            layer=layer,
        )
        expert_f = f
    spec = mlp_spec_for(cfg, f)
    assert spec.expert_intermediate_size == expert_f, (spec, expert_f)
    assert spec.shared_intermediate_size == (shared[0].shape[0] if shared is not None else 0)
    router = router_tensor(cfg, layer, e, d, centroids).to(dtype=w_gate.dtype, device=w_gate.device)
    return MlpMoeTensors(spec=spec, gate_up=gate_up, down=down, router=router, shared=shared)


def router_tensor(
    cfg: UpcycleConfig,
    layer: int,
    num_experts: int,
    hidden_size: int,
    centroids: Tensor | None = None,
    purpose: str = "router",
    init: str | None = None,
) -> Tensor:
    """The router init of one layer in float32 on CPU (``init``: default ``cfg.router_init``)."""
    return init_router_weight(
        init or cfg.router_init,
        num_experts,
        hidden_size,
        std=cfg.router_std,
        seed=cfg.seed,
        layer=layer,
        purpose=purpose,
        centroids=centroids,
    )


def _num_kv_groups(model: nn.Module) -> int:
    c = model.config
    return int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)


def _already_done(model: nn.Module, cfg: UpcycleConfig) -> bool:
    spec = spec_of(model)
    if spec is None:
        return False
    stages = [s for s in spec.lineage if s.get("stage") == "upcycle"]
    return bool(stages) and stages[-1].get("config") == cfg.to_dict()


@dataclass
class _Plan:
    """What :func:`upcycle` will do, decided and validated before the model is touched."""

    path: str
    layers: list[nn.Module]
    selected: list[int]
    parts: dict[int, tuple[nn.Linear, nn.Linear, nn.Linear]]
    """The dense MLP linears (gate, up, down) of every selected layer that gets an MLP MoE."""
    groups: int = 0
    """KV groups = attention experts (0 without attention MoE)."""
    attn_k: int = 0
    attn_init: str | None = None


@dataclass
class _Calibration:
    """Statistics of the dense model that data-driven splits and router inits need."""

    centroids: dict[int, Tensor] = field(default_factory=dict)
    attn_centroids: dict[int, Tensor] = field(default_factory=dict)
    importance: dict[int, Tensor] = field(default_factory=dict)


def upcycle(
    model: nn.Module,
    cfg: UpcycleConfig,
    calibration: Iterable[Any] | None = None,
    *,
    data_description: Any = None,
) -> nn.Module:
    """Turn the selected decoder layers of ``model`` into MoE layers, in place; returns ``model``.

    ``calibration`` (an iterable of ``input_ids (B, S)`` tensors, ``(input_ids, attention_mask)``
    pairs or dicts) is required by ``split='importance'`` and ``router_init='kmeans'``.
    The surgery is attached to the model (:func:`~moe_app.core.spec.spec_of`, a ``MoeSpec``;
    ``save_moe_checkpoint`` writes it). Calling again with the same config on the result is a
    no-op (idempotent ``configure_model``).

    Four steps: validate everything before touching the model (:func:`_plan`), measure the dense
    model where the method needs data (:func:`_calibrate`), replace the modules (:func:`_operate`),
    and record what was done (:func:`_record`).
    """
    if _already_done(model, cfg):
        return model
    plan = _plan(model, cfg)
    stats = _calibrate(model, cfg, plan, calibration)
    previous = spec_of(model)
    _operate(model, cfg, plan, stats)
    attach_spec(model, _record(model, cfg, plan, previous, data_description))
    return model


def _plan(model: nn.Module, cfg: UpcycleConfig) -> _Plan:
    path, layers = find_decoder_layers(model)
    selected = cfg.select_layers(len(layers))
    parts: dict[int, tuple[nn.Linear, nn.Linear, nn.Linear]] = {}
    for i in selected:
        where = f"{path}.{i}"
        if cfg.builds_mlp_moe:
            if isinstance(layers[i].mlp, SparseMoeBlock):
                raise ConfigError(
                    f"`{where}.mlp` is already a Mixture-of-Experts",
                    where="upcycle",
                    fix="upcycle the dense model, or select only dense layers with `layers`",
                )
            parts[i] = dense_mlp_parts(layers[i], where)
            check_mlp_shape(cfg, parts[i][0].weight.shape[0], f"{where}.mlp")
        if cfg.attention_moe:
            attn = getattr(layers[i], "self_attn", None)
            if attn is None or not hasattr(attn, "q_proj"):
                raise UnsupportedModelError(
                    f"module `{where}.self_attn.q_proj` not found",
                    fix="attention MoE needs LLaMA-style attention (q_proj/k_proj/v_proj/o_proj)",
                )
            if hasattr(attn, "router"):
                raise ConfigError(f"`{where}.self_attn` is already an attention MoE", where="upcycle")
    plan = _Plan(path, list(layers), list(selected), parts)
    if cfg.attention_moe:
        plan.groups = _num_kv_groups(model)
        plan.attn_k = cfg.attention_top_k or plan.groups
        plan.attn_init = cfg.resolved_attention_router_init(plan.groups)
        if plan.attn_k > plan.groups:
            raise ConfigError(
                f"attention_top_k={plan.attn_k} > {plan.groups} key/value groups",
                where="UpcycleConfig.attention_top_k",
                fix=f"choose attention_top_k <= num_key_value_heads = {plan.groups}",
            )
    return plan


def _calibrate(
    model: nn.Module, cfg: UpcycleConfig, plan: _Plan, calibration: Iterable[Any] | None
) -> _Calibration:
    stats = _Calibration()
    if not cfg.needs_calibration:
        return stats
    if calibration is None:
        raise ConfigError(
            f"split={cfg.split!r} / router_init={cfg.router_init!r}"
            + (f" / attention_router_init={plan.attn_init!r}" if plan.attn_init == "kmeans" else "")
            + " needs calibration data",
            where="upcycle",
            fix="pass calibration batches (CLI: --calibration builtin or a .jsonl/.parquet/.csv file), "
            "or use a data-free split/router init",
        )
    batches = normalize_batches(calibration)
    mlp_ids = plan.selected if cfg.builds_mlp_moe else []
    states = capture_inputs(model, mlp_ids, batches, cfg.calibration_tokens) if mlp_ids else {}
    labels = {}
    for i, x in states.items():
        if x.shape[0] < cfg.num_experts:
            raise ConfigError(
                f"only {x.shape[0]} calibration tokens for {cfg.num_experts} clusters",
                where="calibration",
                fix="pass more calibration text",
            )
        labels[i], stats.centroids[i] = balanced_kmeans(
            x, cfg.num_experts, cfg.kmeans_iters, layer_generator(cfg.seed, i, "kmeans")
        )
    if cfg.builds_mlp_moe and cfg.method == "partition" and cfg.split == "importance":
        stats.importance = neuron_importance(
            model, mlp_ids, batches, labels, cfg.num_experts, cfg.calibration_tokens
        )
    if plan.attn_init == "kmeans":
        a_states = capture_inputs(model, plan.selected, batches, cfg.calibration_tokens, module="self_attn")
        for i, x in a_states.items():
            _, stats.attn_centroids[i] = balanced_kmeans(
                x, plan.groups, cfg.kmeans_iters, layer_generator(cfg.seed, i, "attn_kmeans")
            )
    return stats


def _operate(model: nn.Module, cfg: UpcycleConfig, plan: _Plan, stats: _Calibration) -> None:
    hidden = int(model.config.hidden_size)
    act = hidden_act(model)
    for i in plan.selected:
        layer = plan.layers[i]
        if cfg.builds_mlp_moe:
            gate, up, down = plan.parts[i]
            if gate.weight.is_meta:  # structure only: layerwise.py fills the weights one layer at a time
                spec = mlp_spec_for(cfg, gate.weight.shape[0])
                block = build_mlp_moe(spec, hidden, act, gate.weight.dtype, "meta")
            else:
                with torch.no_grad():
                    t = mlp_moe_tensors(
                        cfg,
                        i,
                        gate.weight.detach(),
                        up.weight.detach(),
                        down.weight.detach(),
                        importance=stats.importance.get(i),
                        centroids=stats.centroids.get(i),
                    )
                block = build_mlp_moe(t.spec, hidden, act, gate.weight.dtype, gate.weight.device)
                block.load_state_dict(t.state_dict(""), strict=True, assign=True)
            block.train(layer.training)
            layer.mlp = block
        if cfg.attention_moe:
            aspec = AttentionMoeSpec(
                num_experts=plan.groups,
                top_k=plan.attn_k,
                rule=cfg.rule,
                scale=cfg.resolved_attention_scale(plan.groups),
            )
            attn = layer.self_attn
            dtype = next(attn.parameters()).dtype
            wrapped = build_attention_moe(attn, aspec, hidden, dtype)
            w = router_tensor(
                cfg,
                i,
                plan.groups,
                hidden,
                stats.attn_centroids.get(i),
                purpose="attn_router",
                init=plan.attn_init,
            )
            with torch.no_grad():
                wrapped.router.weight.copy_(w)
            layer.self_attn = wrapped


def _record(
    model: nn.Module, cfg: UpcycleConfig, plan: _Plan, previous: MoeSpec | None, data_description: Any
) -> MoeSpec:
    """The spec of the upcycled model: what an earlier surgery recorded, the new structure, the stage."""
    spec = MoeSpec(
        base_architecture=previous.base_architecture if previous else type(model).__name__,
        base_model_type=previous.base_model_type
        if previous
        else str(getattr(model.config, "model_type", "")),
        layers=describe_structure(model, previous),
        source=previous.source if previous else (getattr(model.config, "_name_or_path", None) or None),
        adapters=previous.adapters if previous else None,
        pruning=previous.pruning if previous else None,
        skipping=dict(previous.skipping) if previous else {},
        lineage=list(previous.lineage) if previous else [],
    )
    if cfg.builds_mlp_moe:
        for i in plan.selected:
            spec.layers[i].mlp.method = cfg.method
            spec.layers[i].mlp.split = cfg.split if cfg.method == "partition" else None
    spec.add_stage("upcycle", cfg.to_dict(), data_description)
    return spec
