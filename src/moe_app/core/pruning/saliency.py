"""Saliency scores for expert pruning: rank experts by a per-expert statistic, keep the top ones.

Cheaper than enumeration (one pass, no subset search) and the only option when ``C(E, r)`` is
astronomically large. Three scores, all over calibration tokens (padding excluded):

* ``frequency``: the fraction of tokens that select the expert in their top-k (the load).
* ``expert_drop`` (He et al. 2024, "Demystifying the Compression of Mixture-of-Experts Through a
  Unified Framework", arXiv 2406.02500): the mean *full* softmax probability ``mean_t p_e(x_t)``,
  ranked per layer or globally across layers (different layers then keep different counts;
  only moe-app checkpoints can store that).
* ``reap`` (Lasby et al. 2025, "REAP: Router-weighted Expert Activation Pruning", arXiv 2510.13999):
  ``S_j = mean over tokens routed to j of g_j(x) * ||E_j(x)||_2`` with ``g_j`` the combine weight
  under the layer's routing rule; an expert that is never routed scores 0.

Higher is more important; :func:`top_experts` keeps the ``r`` highest (ties: lower index).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moe_app.core.models.views import MoeLayerView
from moe_app.errors import ConfigError

SALIENCY_METHODS = ("frequency", "expert_drop", "reap")


@torch.no_grad()
def saliency_scores(
    view: MoeLayerView, xs: Sequence[Tensor], method: str, chunk_tokens: int = 2048
) -> Tensor:
    """Per-expert scores ``(E,)`` float64 of ``method`` on the block inputs ``xs`` (one tensor per batch)."""
    if method not in SALIENCY_METHODS:
        raise ConfigError(
            f"unknown saliency method {method!r}", fix=f"use one of {', '.join(SALIENCY_METHODS)}"
        )
    dev, dtype = view.router_weight.device, view.router_weight.dtype
    num_e = view.num_experts
    total = torch.zeros(num_e, dtype=torch.float64, device=dev)  # (E,)
    count = torch.zeros(num_e, dtype=torch.float64, device=dev)  # (E,) tokens that select e
    tokens = 0
    for x_b in xs:
        for t0 in range(0, x_b.shape[0], chunk_tokens):
            x = x_b[t0 : t0 + chunk_tokens].to(dev, dtype)  # (T, d)
            logits = view.router_logits(x)  # (T, E)
            weights, idx = view.routing(logits)  # (T, k) each
            tokens += x.shape[0]
            hits = torch.zeros_like(logits, dtype=torch.float64).scatter_(1, idx, 1.0)  # (T, E)
            count += hits.sum(0)
            if method == "expert_drop":
                total += logits.softmax(dim=-1).double().sum(0)
            elif method == "reap":
                norms = torch.linalg.vector_norm(view.expert_outputs(x).double(), dim=-1).T  # (T, E)
                g = torch.zeros_like(logits, dtype=torch.float64).scatter_(1, idx, weights.double())  # (T, E)
                total += (g * norms * hits).sum(0)
    if method == "frequency":
        return (count / max(tokens, 1)).cpu()
    if method == "expert_drop":
        return (total / max(tokens, 1)).cpu()
    return (total / count.clamp_min(1.0)).cpu()


def top_experts(scores: Tensor, r: int) -> list[int]:
    """The ``r`` highest-scoring experts, sorted by index (stable: ties keep the lower index)."""
    order = sorted(range(scores.shape[0]), key=lambda e: (-float(scores[e]), e))
    return sorted(order[:r])


def global_keep_counts(scores: dict[int, Tensor], r: int, min_keep: dict[int, int]) -> dict[int, int]:
    """He et al.'s global expert drop: keep ``r * L`` experts in total, the highest scores over all layers.

    Every layer keeps at least ``min_keep[layer]`` (its top-k) experts, so it can still route.
    """
    budget = r * len(scores)
    counts = {lay: min_keep[lay] for lay in scores}
    pool = []
    for lay, s in scores.items():
        ranked = sorted(range(s.shape[0]), key=lambda e: (-float(s[e]), e))
        pool += [(float(s[e]), lay, pos) for pos, e in enumerate(ranked) if pos >= min_keep[lay]]
    left = budget - sum(counts.values())
    for _, lay, _ in sorted(pool, key=lambda item: (-item[0], item[1], item[2]))[: max(left, 0)]:
        counts[lay] += 1
    return counts


__all__ = ["SALIENCY_METHODS", "global_keep_counts", "saliency_scores", "top_experts"]
