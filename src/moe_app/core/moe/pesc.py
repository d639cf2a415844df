"""PESC blocks: a shared frozen FFN plus routed per-expert deltas.

:class:`PescMoeBlock` is the MoE layer of PESC (Wu et al. 2024, "Parameter-Efficient Sparsity
Crafting from Dense to Mixture-of-Experts for Instruction Tuning on General Tasks", arXiv
2401.02731; the Camelidae models). Expert ``i`` is ``E_i(x) = F(x) + s * A_i(F(x))``: the dense
FFN ``F`` followed in series by a small adapter. With renormalised routing the combine weights sum
to one, so

    y = F(x) + s * sum_{i in S(x)} w_i(x) A_i(F(x))

and ``F`` is computed **once per token**; only the adapters are per expert. (The reference code
computes ``F`` once per selected expert, ``k``-fold the work.) ``U_i = 0`` at initialisation makes
the block equal the dense FFN exactly, for any router (ALGORITHMS.md section 5). The router sees the
FFN *input*, the adapters the FFN *output*.

:class:`LoraExpertsMoeBlock` is the MixLoRA variant (Li et al. 2024, arXiv 2404.15159): expert ``i``
is the shared FFN with its own LoRA deltas on ``W_gate``, ``W_up``, ``W_down``. The base products
``W_gate x`` and ``W_up x`` are shared by every expert of a token and computed once; the down
projection depends on the expert's intermediate activation and runs per (token, slot).
:func:`merge_lora_experts` folds the deltas into full SwiGLU experts (``W + (alpha/r) B_i A_i``),
giving a plain :class:`~moe_app.core.moe.block.SparseMoeBlock` that exports to a stock Mixtral.

The shared FFN is the original Hugging Face MLP module, called as a module (``ffn(x)``,
``ffn.gate_proj(x)``), never through its ``.weight``: so it may be quantised to 4-bit
(bitsandbytes ``Linear4bit``) or carry a shared peft LoRA (QLoRA on gate/up/down, as the paper's
recipe does) without the block knowing. Both blocks record ``last_routing`` per call and expose
``router``, ``experts`` (the trainable per-expert parameters, for parameter accounting),
``num_experts`` and ``top_k`` like every moe-app MoE block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from moe_app.core.moe.adapters import BottleneckAdapters, LoraExperts, sort_by_expert
from moe_app.core.moe.block import RoutedBlock, SparseMoeBlock
from moe_app.core.moe.experts import SwiGLUExperts
from moe_app.core.moe.router import TopKRouter
from moe_app.errors import UnsupportedModelError


class _SharedFfnBlock(RoutedBlock):
    """A routed block around a frozen shared FFN (the dense layer's ``mlp``)."""

    def __init__(self, ffn: nn.Module, router: TopKRouter, scale: float) -> None:
        super().__init__(router, scale)
        self.ffn = ffn


class PescMoeBlock(_SharedFfnBlock):
    """``y = F(x) + s * sum_{i in S} w_i A_i(F(x))`` with ``F`` the shared frozen dense MLP.

    Args:
        mlp: the original dense MLP (``gate_proj``/``up_proj``/``down_proj``), stored as ``ffn``.
        router: top-k router on the FFN input (``softmax_topk_renorm`` in PESC).
        adapters: the ``E`` stacked bottleneck adapters, stored as ``adapters`` (dense, or SparseAdapter
            with fixed masks: ``BottleneckAdapters(..., sparsity=s)``; the block is the same either way).
        scale: ``s``, multiplier on the adapter mixture.
    """

    def __init__(self, mlp: nn.Module, router: TopKRouter, adapters: BottleneckAdapters, scale: float = 1.0):
        super().__init__(mlp, router, scale)
        if adapters.num_experts != router.num_experts:
            raise ValueError(
                f"{adapters.num_experts} adapters but the router has {router.num_experts} experts."
            )
        self.adapters = adapters

    @property
    def experts(self) -> BottleneckAdapters:
        return self.adapters

    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, d)
        routing = self.route(x)
        f = self.ffn(x)  # (T, d): the shared FFN, once per token whatever k is
        delta = self.adapters(f, routing.indices, routing.weights.to(f.dtype))  # (T, d)
        return (f + self.scale * delta).reshape(shape)


class LoraExpertsMoeBlock(_SharedFfnBlock):
    """MixLoRA experts: ``E_i = SwiGLU(W_gate + dG_i, W_up + dU_i, W_down + dD_i)`` over a shared base.

    ``y = s * sum_{i in S} w_i E_i(x)``; the base products ``W_gate x`` and ``W_up x`` are computed
    once per token and shared by the token's experts.

    Args:
        mlp: the original dense MLP, stored as ``ffn``.
        router: top-k router.
        experts: the stacked per-expert LoRA pairs, stored as ``expert_lora``.
        scale: multiplier on the combined output (1.0 keeps the dense function at init).
        act: the MLP activation name (``silu`` for the LLaMA family).
    """

    def __init__(
        self, mlp: nn.Module, router: TopKRouter, experts: LoraExperts, scale: float = 1.0, act: str = "silu"
    ) -> None:
        super().__init__(mlp, router, scale)
        if experts.num_experts != router.num_experts:
            raise ValueError(f"{experts.num_experts} LoRA experts but the router has {router.num_experts}.")
        self.expert_lora = experts
        self.act_name = act
        self.act_fn = ACT2FN[act]

    @property
    def experts(self) -> LoraExperts:
        return self.expert_lora

    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, d)
        routing = self.route(x)
        lora = self.expert_lora
        gate = self.ffn.gate_proj(x)  # (T, F): shared by the token's k experts
        up = self.ffn.up_proj(x)  # (T, F)
        dispatch = sort_by_expert(routing.indices, self.num_experts)
        xs = dispatch.gather(x)  # (N, d)
        gs = dispatch.gather(gate) + lora.delta("gate", xs, dispatch)  # (N, F)
        us = dispatch.gather(up) + lora.delta("up", xs, dispatch)  # (N, F)
        h = self.act_fn(gs) * us  # (N, F)
        ys = self.ffn.down_proj(h) + lora.delta("down", h, dispatch)  # (N, d)
        weights = routing.weights * self.scale  # (T, k)
        return dispatch.combine(ys, weights, x.shape[0]).reshape(shape)


def _plain_linear_weight(block: nn.Module, name: str) -> Tensor:
    lin = getattr(block.ffn, name)
    if type(lin) is not nn.Linear or lin.bias is not None or not lin.weight.dtype.is_floating_point:
        raise UnsupportedModelError(
            f"cannot merge LoRA experts: the shared `ffn.{name}` is a {type(lin).__name__}, not a plain "
            "bias-free nn.Linear (it is quantised or wrapped by peft)",
            fix="merge peft LoRA first (moe_app.core.pesc.merge.merge_peft_lora) and build PESC without "
            "quantize_4bit; a 4-bit base cannot be merged exactly",
        )
    return lin.weight


@torch.no_grad()
def merge_lora_experts(block: LoraExpertsMoeBlock, impl: str = "auto") -> SparseMoeBlock:
    """Fold every expert's LoRA deltas into full SwiGLU experts: an equivalent ``SparseMoeBlock``.

    Expert ``i`` gets ``W_p + (alpha / r) B_i A_i`` for p in gate, up, down (computed in fp32, stored in
    the base dtype). The router (same module) and scale carry over, so in eval mode (no LoRA dropout)
    the result computes the same function.
    """
    w_gate = _plain_linear_weight(block, "gate_proj")  # (F, d)
    w_up = _plain_linear_weight(block, "up_proj")  # (F, d)
    w_down = _plain_linear_weight(block, "down_proj")  # (d, F)
    lora = block.expert_lora
    experts = SwiGLUExperts(
        lora.num_experts, lora.hidden_size, lora.intermediate_size, act=block.act_name, impl=impl
    ).to(device=w_gate.device, dtype=w_gate.dtype)
    gate = lora.merged_weight("gate", w_gate)  # (E, F, d)
    up = lora.merged_weight("up", w_up)  # (E, F, d)
    experts.gate_up_proj.copy_(torch.cat([gate, up], dim=1))  # (E, 2F, d)
    experts.down_proj.copy_(lora.merged_weight("down", w_down))  # (E, d, F)
    return SparseMoeBlock(router=block.router, experts=experts, scale=block.scale)


# ---------------------------------------------------------------------- test oracles
def pesc_forward_naive(block: PescMoeBlock, hidden_states: Tensor) -> Tensor:
    """Test oracle: the PESC formula token by token, slot by slot (no dispatch)."""
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])  # (T, d)
    routing = block.router(x)
    f = block.ffn(x)  # (T, d)
    rows = []
    for t in range(x.shape[0]):
        y = f[t]  # (d,)
        for j in range(routing.indices.shape[1]):
            e = int(routing.indices[t, j])
            if e >= 0:
                a = block.adapters.expert_forward(e, f[t : t + 1])[0]  # (d,)
                y = y + block.scale * routing.weights[t, j].to(f.dtype) * a
        rows.append(y)
    return torch.stack(rows).reshape(shape)


def lora_experts_forward_naive(block: LoraExpertsMoeBlock, hidden_states: Tensor) -> Tensor:
    """Test oracle: each selected expert's full SwiGLU with its own LoRA deltas, token by token."""
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])  # (T, d)
    routing = block.router(x)
    lora, ffn = block.expert_lora, block.ffn
    rows = []
    for t in range(x.shape[0]):
        xt = x[t : t + 1]  # (1, d)
        y = torch.zeros_like(xt)
        for j in range(routing.indices.shape[1]):
            e = int(routing.indices[t, j])
            if e < 0:
                continue
            g = ffn.gate_proj(xt) + lora.expert_delta("gate", e, xt)  # (1, F)
            u = ffn.up_proj(xt) + lora.expert_delta("up", e, xt)  # (1, F)
            h = block.act_fn(g) * u  # (1, F)
            out = ffn.down_proj(h) + lora.expert_delta("down", e, h)  # (1, d)
            y = y + block.scale * routing.weights[t, j].to(x.dtype) * out
        rows.append(y[0])
    return torch.stack(rows).reshape(shape)


__all__ = [
    "LoraExpertsMoeBlock",
    "PescMoeBlock",
    "lora_experts_forward_naive",
    "merge_lora_experts",
    "pesc_forward_naive",
]
