"""Top-k token routing shared by every MoE layer moe-app builds.

Routing decides, experts compute: the router returns ``(logits, probs, weights, indices)`` and the
experts take ``(x, indices, weights)``. Two routing rules are supported because the model
families differ here (see ALGORITHMS.md section 1):

* ``softmax_topk_renorm`` (Mixtral, PESC, LLaMA-MoE): ``p = softmax(z)``, keep the top-k,
  renormalise them to sum to one. Identical to softmax over the k selected logits.
* ``softmax_topk`` (Qwen2-MoE / Qwen3-MoE / OLMoE with ``norm_topk_prob=False``): keep ``p_i``.

Logits and softmax are computed in float32 whatever the model dtype (small router logit
differences flip top-k choices in bf16). Optional noisy gating follows LLaMA-MoE v1
(Zhu et al. 2024): ``z += eps * (softplus(x W_noise) + 0.01)`` during training, with ``W_noise``
zero-initialised so the noise starts at a small constant scale. Optional input jitter follows
Switch Transformer (Fedus et al. 2021).

Dynamic skipping (Lu et al. 2024, arXiv 2402.14800) is a router concern: with ``skip_beta`` set,
in eval mode a selected expert ``i > 0`` whose weight is below ``beta * w_1`` is dropped (index
``-1``, weight 0) and the kept weights are renormalised under the routing rule. Experts ignore
slots with index ``-1``, so a skipped expert costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROUTING_RULES = ("softmax_topk_renorm", "softmax_topk")


@dataclass
class RoutingOutput:
    """What a router decided for one forward call over ``T`` flattened tokens."""

    logits: Tensor  # (T, E) float32, before softmax (noise included when training)
    probs: Tensor  # (T, E) float32, full softmax
    weights: Tensor  # (T, k) float32, combine weights under the routing rule (no scale)
    indices: Tensor  # (T, k) int64, selected experts; -1 marks a skipped slot

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]


def routing_problem(num_experts: int, top_k: int, rule: str) -> str | None:
    """What is impossible about a routing setup (with the fix), or ``None``: the one check that the
    router, the upcycling config and the checkpoint spec all apply, each raising its own error type."""
    if num_experts < 1:
        return f"num_experts must be >= 1, got {num_experts}; use e.g. num_experts=8"
    if not 1 <= top_k <= num_experts:
        return (
            f"top_k={top_k} is not in [1, num_experts={num_experts}]; "
            f"choose 1 <= top_k <= num_experts (e.g. top_k=2 for {max(num_experts, 2)} experts)"
        )
    if rule not in ROUTING_RULES:
        return f"unknown routing rule {rule!r}; choose one of {', '.join(ROUTING_RULES)}"
    return None


def validate_routing(num_experts: int, top_k: int, rule: str) -> None:
    """Raise ``ValueError`` with the fix when a routing setup is impossible."""
    problem = routing_problem(num_experts, top_k, rule)
    if problem:
        raise ValueError(problem + ".")


class TopKRouter(nn.Module):
    """Linear router ``z = x W_r^T`` (no bias) with top-k selection.

    Parameters are ``weight`` ``(E, d)`` and, with noisy gating, ``noise_weight`` ``(E, d)``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        rule: str = "softmax_topk_renorm",
        noisy_gating: bool = False,
        jitter: float = 0.0,
        skip_beta: float | None = None,
    ) -> None:
        super().__init__()
        validate_routing(num_experts, top_k, rule)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.rule = rule
        self.jitter = jitter
        self.skip_beta = skip_beta
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size)) if noisy_gating else None

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, experts={self.num_experts}, top_k={self.top_k}, rule={self.rule}"
            + (", noisy" if self.noise_weight is not None else "")
            + (f", skip_beta={self.skip_beta:.4f}" if self.skip_beta is not None else "")
        )

    def forward(self, x: Tensor) -> RoutingOutput:
        """Route ``x`` of shape ``(T, d)``."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        x32 = x.float()
        logits = F.linear(x32, self.weight.float())  # (T, E)
        if self.noise_weight is not None and self.training:
            noise_std = F.softplus(F.linear(x32, self.noise_weight.float())) + 0.01  # (T, E)
            logits = logits + torch.randn_like(logits) * noise_std
        probs = logits.softmax(dim=-1)  # (T, E)
        top_p, indices = probs.topk(self.top_k, dim=-1)  # (T, k)
        if self.skip_beta is not None and not self.training and self.top_k > 1:
            keep = top_p >= self.skip_beta * top_p[:, :1]  # (T, k)
            keep[:, 0] = True  # the first choice is never skipped, even with beta > 1
            top_p = top_p * keep
            indices = indices.masked_fill(~keep, -1)
        weights = combine_weights(top_p, self.rule)
        return RoutingOutput(logits=logits, probs=probs, weights=weights, indices=indices)


def combine_weights(top_p: Tensor, rule: str) -> Tensor:
    """Turn the selected softmax probabilities ``(T, k)`` into combine weights."""
    if rule == "softmax_topk_renorm":
        return top_p / top_p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(top_p.dtype).tiny)
    return top_p
