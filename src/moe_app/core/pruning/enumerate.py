"""Enumeration expert pruning: keep the r experts whose removal changes the layer output least.

Lu et al. 2024, "Not All Experts are Equal: Efficient Expert Pruning and Skipping for
Mixture-of-Experts Large Language Models" (arXiv 2402.14800), section 3.1. On calibration data,
with ``X`` the block input and ``Z`` its output, every subset ``S`` of ``r`` experts is scored by

    L(S) = sum over calibration batches b of ||Z_b - Z'_S(X_b)||_F

where ``Z'_S`` is the block with the other experts removed (their logits -inf: the same routing
rule over the kept experts, renormalised as the rule renormalises). The argmin is kept.

Why it is cheap here. The reference runs the block once per subset (C(8,4) = 70 block forwards per
layer). But a subset changes only the combine weights: with the layer written as
``y = base + sum_e W_S[t, e] o_e(x_t)`` (scale folded into ``W``) (:mod:`moe_app.core.models.views`), each expert output
``o_e`` is computed once per calibration token and every subset is a re-weighting. Two evaluations:

* ``impl="gram"`` (default): per token the Gram matrix ``G_t = O_t O_t^T`` ``(E, E)``,
  ``c_t = O_t R_t`` and ``n_t = ||R_t||^2`` with ``R = Z - base``, all in float64; then
  ``||R_t - W_S[t] O_t||^2 = n_t - 2 W c_t + W G_t W^T`` costs ``O(E^2)`` per (subset, token)
  instead of ``O(E d)``. float64 keeps the cancellation harmless (relative error ~1e-16 n_t / q_t).
* ``impl="direct"``: materialise ``Z'_S`` for a chunk of subsets and tokens (one batched matmul),
  the plain formula; memory-bounded by chunking.

Both agree with :func:`subset_losses_naive` (a deep copy of the block per subset with the experts
really removed, the test oracle) to ~1e-12 in float64.

Progressive pruning (recompute ``X`` through the layers already pruned, keep the original ``Z``) and
task-specific calibration are the caller's business (:mod:`moe_app.core.pruning.experts`). Beyond
``max_subsets`` candidates (C(16, 8) = 12870, C(64, 32) ~ 1.8e18) the search samples subsets
(always including the frequency and mean-probability choices) or falls back to a saliency score,
and says so in the log and the report.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_app.core.models.views import MoeLayerView, view_of
from moe_app.core.moe.router import combine_weights
from moe_app.core.pruning.saliency import saliency_scores, top_experts
from moe_app.errors import ConfigError

logger = logging.getLogger("moe_app.core.pruning")

IMPLS = ("gram", "direct")
FALLBACKS = ("sample", "frequency", "reap", "expert_drop")


@dataclass
class EnumerationConfig:
    """How the subset search runs."""

    max_subsets: int = 20000
    """Evaluate every subset while C(E, r) <= this; above it, use ``fallback``."""
    fallback: str = "sample"
    """Above ``max_subsets``: ``sample`` (``max_subsets`` random subsets plus the saliency choices) or
    a saliency method (``frequency``, ``reap``, ``expert_drop``)."""
    impl: str = "gram"
    """``gram`` (closed-form per-token quadratic, float64) or ``direct`` (materialised outputs)."""
    chunk_tokens: int = 2048
    """Tokens per chunk when computing expert outputs (bounds the ``(E, T, 2F)`` activation)."""
    memory_mb: int = 256
    """Budget for one chunk of per-subset tensors (subset chunking)."""
    exact_logits_limit: int = 512
    """Up to this many subsets, each subset's logits come from its sliced router rows (bitwise what
    the pruned router computes); above, from the full logits (differs in the last float32 bit)."""
    seed: int = 0
    """Seed of the subset sampling."""

    def __post_init__(self) -> None:
        if self.max_subsets < 1:
            raise ConfigError(f"max_subsets must be >= 1, got {self.max_subsets}", fix="use e.g. 20000")
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"unknown fallback {self.fallback!r}", fix=f"use one of {', '.join(FALLBACKS)}")
        if self.impl not in IMPLS:
            raise ConfigError(f"unknown enumeration impl {self.impl!r}", fix=f"use one of {', '.join(IMPLS)}")
        if self.chunk_tokens < 1 or self.memory_mb < 1 or self.exact_logits_limit < 0:
            raise ConfigError("chunk_tokens and memory_mb must be >= 1", fix="use the defaults")


def all_subsets(num_experts: int, r: int) -> Tensor:
    """Every sorted ``r``-subset of ``range(num_experts)``: ``(C(E, r), r)`` int64, lexicographic."""
    return torch.tensor(list(itertools.combinations(range(num_experts), r)), dtype=torch.long).reshape(-1, r)


def sample_subsets(
    num_experts: int, r: int, n: int, seed: int = 0, include: Sequence[Sequence[int]] = ()
) -> Tensor:
    """Up to ``n`` distinct random sorted ``r``-subsets (seeded), the ``include`` ones first: ``(n', r)``."""
    rng = random.Random(seed)
    seen: dict[tuple[int, ...], None] = {tuple(sorted(int(e) for e in s)): None for s in include}
    limit = min(n, math.comb(num_experts, r))
    tries = 0
    while len(seen) < limit and tries < 20 * limit:
        seen.setdefault(tuple(sorted(rng.sample(range(num_experts), r))), None)
        tries += 1
    return torch.tensor(list(seen), dtype=torch.long).reshape(-1, r)


def _kept_logits(view: MoeLayerView, x: Tensor, logits: Tensor, subsets: Tensor, exact_limit: int) -> Tensor:
    """Each subset's router logits ``(T, S, r)``.

    Up to ``exact_limit`` subsets they come from the sliced router matrix, bit for bit what the pruned
    router computes (a matmul over fewer rows can round differently in the last float32 bit, which
    is enough to move ``L(S)`` by ~1e-8 relative); beyond, they are gathered from the full logits.
    """
    if subsets.shape[0] > exact_limit:
        return logits[:, subsets]  # (T, S, r)
    return torch.stack([view.router_logits(x, rows=sub) for sub in subsets], dim=1)  # (T, S, r)


def _subset_weights(
    kept: Tensor, subsets: Tensor, num_experts: int, top_k: int, rule: str, scale: float
) -> Tensor:
    """Dense combine weights ``(T, S, E)`` of each subset's routing, from its logits ``kept (T, S, r)``.

    Soft-maxed among the kept experts, top-k'd and combined under the rule, exactly as
    ``TopKRouter`` on the sliced router does, then scattered back to expert positions.
    """
    t, s = kept.shape[0], subsets.shape[0]
    top_p, j = kept.softmax(dim=-1).topk(top_k, dim=-1)  # (T, S, k)
    w = combine_weights(top_p, rule) * scale  # (T, S, k) float32, as the block scales them
    experts = subsets.unsqueeze(0).expand(t, s, -1).gather(2, j)  # (T, S, k)
    dense = kept.new_zeros(t, s, num_experts)  # (T, S, E)
    return dense.scatter_(2, experts, w)


@torch.no_grad()
def subset_losses(
    view: MoeLayerView,
    xs: Sequence[Tensor],
    zs: Sequence[Tensor],
    subsets: Tensor,
    cfg: EnumerationConfig | None = None,
) -> Tensor:
    """``L(S)`` for every row of ``subsets (S, r)``: ``(S,)`` float64 (see the module docstring)."""
    cfg = cfg or EnumerationConfig()
    dev = view.router_weight.device
    dtype = view.router_weight.dtype
    num_e, top_k, rule, scale = view.num_experts, view.top_k, view.rule, view.weight_scale
    subsets = subsets.to(dev)
    losses = torch.zeros(subsets.shape[0], dtype=torch.float64, device=dev)  # (S,)
    for x_b, z_b in zip(xs, zs):
        sq = torch.zeros_like(losses)  # (S,) squared norm of this batch
        for t0 in range(0, x_b.shape[0], cfg.chunk_tokens):
            x = x_b[t0 : t0 + cfg.chunk_tokens].to(dev, dtype)  # (T, d)
            z = z_b[t0 : t0 + cfg.chunk_tokens].to(dev)  # (T, d)
            logits = view.router_logits(x)  # (T, E)
            outs = view.expert_outputs(x)  # (E, T, d)
            base = view.base_output(x)
            # (T, d): what the routed experts must produce; subtracted in >= float32 (bf16 would round it)
            hi = torch.promote_types(z.dtype, torch.float64 if cfg.impl == "gram" else torch.float32)
            target = z.to(hi) if base is None else z.to(hi) - base.to(hi)
            t, d = x.shape
            if cfg.impl == "gram":
                o = outs.transpose(0, 1).double()  # (T, E, d)
                r64 = target.double()  # (T, d)
                gram = torch.bmm(o, o.transpose(1, 2))  # (T, E, E)
                cvec = torch.bmm(o, r64.unsqueeze(-1))  # (T, E, 1)
                norm = r64.pow(2).sum(-1)  # (T,)
                per_subset = max(1, cfg.memory_mb * 2**20 // (t * num_e * 8 * 4))
            else:
                acc = torch.promote_types(outs.dtype, torch.float32)
                o = outs.transpose(0, 1).to(acc)  # (T, E, d)
                r_acc = target.to(acc)  # (T, d)
                per_subset = max(1, cfg.memory_mb * 2**20 // (t * (d + num_e) * 4 * 3))
            for s0 in range(0, subsets.shape[0], per_subset):
                sub = subsets[s0 : s0 + per_subset]  # (S_c, r)
                kept = _kept_logits(view, x, logits, sub, cfg.exact_logits_limit)  # (T, S_c, r)
                w = _subset_weights(kept, sub, num_e, top_k, rule, scale)  # (T, S_c, E) float32
                if cfg.impl == "gram":
                    w64 = w.double()
                    quad = (torch.bmm(w64, gram) * w64).sum(-1)  # (T, S_c)
                    lin = torch.bmm(w64, cvec).squeeze(-1)  # (T, S_c)
                    sq[s0 : s0 + len(sub)] += (norm.unsqueeze(1) - 2.0 * lin + quad).sum(0)
                else:
                    pred = torch.bmm(w.to(o.dtype), o)  # (T, S_c, d)
                    diff = (r_acc.unsqueeze(1) - pred).double()  # (T, S_c, d)
                    sq[s0 : s0 + len(sub)] += diff.pow(2).sum((0, 2))
        losses += sq.clamp_min(0.0).sqrt()
    return losses.cpu()


def _copy_block(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode, without the recorded routing (which may hold autograd tensors)."""
    saved = getattr(module, "last_routing", None)
    if saved is not None:
        module.last_routing = None
    try:
        return copy.deepcopy(module).eval()
    finally:
        if saved is not None:
            module.last_routing = saved


@torch.no_grad()
def subset_losses_naive(
    view: MoeLayerView, xs: Sequence[Tensor], zs: Sequence[Tensor], subsets: Tensor
) -> Tensor:
    """Test oracle: per subset, a deep copy of the block with the other experts removed, run on ``X``."""

    out = torch.zeros(subsets.shape[0], dtype=torch.float64)
    dev, dtype = view.router_weight.device, view.router_weight.dtype
    for i, sub in enumerate(subsets.tolist()):
        pruned = view_of(_copy_block(view.module))
        pruned.keep(sub)
        for x_b, z_b in zip(xs, zs):
            zp = pruned.forward(x_b.to(dev, dtype))  # (T, d)
            out[i] += torch.linalg.norm((z_b.to(dev).double() - zp.double()).reshape(-1)).item()
    return out


@dataclass
class SubsetChoice:
    """The result of one layer's search."""

    kept: list[int]
    """Kept expert indices (sorted, in the layer's current numbering)."""
    loss: float
    """``L(kept)``: summed per-batch Frobenius reconstruction error."""
    evaluated: int
    """Number of subsets scored."""
    how: str
    """``enumerate`` (all subsets), ``sample`` (sampled subsets) or the saliency fallback used."""


def search_layer(
    view: MoeLayerView,
    xs: Sequence[Tensor],
    zs: Sequence[Tensor],
    r: int,
    cfg: EnumerationConfig | None = None,
    where: str = "layer",
) -> SubsetChoice:
    """The best ``r``-subset of ``view``'s experts on ``(xs, zs)``."""

    cfg = cfg or EnumerationConfig()
    num_e = view.num_experts
    total = math.comb(num_e, r)
    if total <= cfg.max_subsets:
        subsets, how = all_subsets(num_e, r), "enumerate"
    elif cfg.fallback == "sample":
        include = [top_experts(saliency_scores(view, xs, m), r) for m in ("frequency", "expert_drop")]
        subsets, how = sample_subsets(num_e, r, cfg.max_subsets, cfg.seed, include), "sample"
        logger.warning(
            "%s: C(%d, %d) = %d subsets > max_subsets=%d: scoring %d sampled subsets "
            "(plus the frequency and mean-probability choices) instead of all",
            where, num_e, r, total, cfg.max_subsets, subsets.shape[0],
        )  # fmt: skip
    else:
        kept = top_experts(saliency_scores(view, xs, cfg.fallback), r)
        logger.warning(
            "%s: C(%d, %d) = %d subsets > max_subsets=%d: using %s saliency instead of enumeration",
            where, num_e, r, total, cfg.max_subsets, cfg.fallback,
        )  # fmt: skip
        loss = float(subset_losses(view, xs, zs, torch.tensor([kept]), cfg)[0])
        return SubsetChoice(kept=kept, loss=loss, evaluated=1, how=cfg.fallback)
    losses = subset_losses(view, xs, zs, subsets, cfg)  # (S,)
    best = int(torch.argmin(losses))
    return SubsetChoice(
        kept=subsets[best].tolist(), loss=float(losses[best]), evaluated=subsets.shape[0], how=how
    )


__all__ = [
    "FALLBACKS",
    "IMPLS",
    "EnumerationConfig",
    "SubsetChoice",
    "all_subsets",
    "sample_subsets",
    "search_layer",
    "subset_losses",
    "subset_losses_naive",
]
