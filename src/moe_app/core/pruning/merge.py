"""HC-SMoE expert merging (Chen et al. 2024, "Retraining-Free Merging of Sparse Mixture-of-Experts via
Hierarchical Clustering", arXiv 2410.08589): reduce every MoE layer from ``E`` to ``R`` experts by
*merging* groups of experts instead of deleting them.

Per MoE layer, on the calibration tokens (padding excluded; the block inputs ``X`` captured by
:mod:`~moe_app.core.pruning.calibration`):

1. **Expert statistics.** Every token goes through *every* expert (not only the routed ones, as
   HC-SMoE does, so the clustering does not depend on the routing): ``a_e = mean_t o_e(x_t)``, one
   ``d``-vector per expert (``o_e`` is :meth:`MoeLayerView.expert_outputs`, before combine weights).
   Alongside, the routing frequency ``f_e`` = number of tokens that select ``e`` in their top-k
   under the layer's own rule.
2. **Clustering.** Hierarchical agglomerative clustering of the ``E`` vectors ``a_e`` into ``R``
   clusters with **average linkage** (UPGMA: the distance of two clusters is the mean pairwise
   distance of their members; Lance-Williams update). The point distance is **Euclidean** by default
   (``distance="cosine"``: ``1 - cos``). Euclidean is the default because the merged expert
   replaces its members' *outputs*, magnitudes included: two experts pointing the same way with
   very different norms are not interchangeable, which cosine would ignore. Ties merge the pair
   with the lowest indices first, so the result is deterministic. ``E`` is at most a few hundred,
   so the ``O(E^3)`` loop in torch (float64) costs nothing next to the calibration pass.
3. **Merging.** Each cluster ``C`` becomes one expert whose weights are the frequency-weighted
   average ``W = sum_{i in C} w_i W_i`` with ``w_i = f_i / sum_{j in C} f_j`` (uniform when no
   member was ever selected), for every per-expert tensor (SwiGLU ``gate_up_proj`` / ``down_proj``;
   PESC adapters ``down`` / ``up``). The sum is taken in float64 and rounded once to the parameter
   dtype, so a cluster of identical experts merges to exactly that expert, and a cluster of one
   keeps its expert bit for bit.
4. **Router.** Stock MoE blocks need one router row per expert, so HC-SMoE's "route with the old
   router, then map the chosen expert to its group" cannot be written to a Mixtral / Qwen config.
   Default ``router="average"``: the merged expert's row is the *same* frequency-weighted average of
   its members' rows. Its logit is then the frequency-weighted mean of the members' logits
   (linear in ``x``), i.e. the row that reproduces, on average over the tokens that actually used the
   cluster, how strongly the router wanted that cluster, and it is consistent with the weight merge
   (the merged expert is the frequency-weighted mean of the members in both its function and its
   routing key). ``router="dominant"`` keeps the row of the most frequent member instead (MC-SMoE
   style), which reproduces exactly the routing of the dominant member's tokens but ignores the
   directions in which the other members were chosen.

Surgery reuses :meth:`MoeLayerView.keep`: the merged weights overwrite the cluster's
*representative* (its most frequent member; ties: lowest index), then the representatives are
kept, which slices the experts and router rows and updates the expert counts of every supported
block (moe-app ``SparseMoeBlock``, PESC, stock Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE). If
``top_k > R`` the layer's ``top_k`` becomes ``R`` (router, block and, for stock models, the config's
``num_experts_per_tok``). MixLoRA ``LoraExpertsMoeBlock`` layers are refused: averaging LoRA factors
``A`` and ``B`` separately does not average the experts' deltas ``B A``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe_app.core.models.views import MoeLayerView
from moe_app.errors import ConfigError, UnsupportedModelError

MERGE_DISTANCES = ("euclidean", "cosine")
MERGE_ROUTERS = ("average", "dominant")


@dataclass
class MergeConfig:
    """HC-SMoE settings (linkage is always average)."""

    distance: str = "euclidean"
    """Distance between the experts' average outputs: ``euclidean`` or ``cosine`` (``1 - cos``)."""
    router: str = "average"
    """Merged router row: ``average`` (frequency-weighted mean of the members' rows) or ``dominant``
    (the most frequent member's row)."""
    chunk_tokens: int = 2048
    """Tokens per chunk when running every expert on the calibration tokens."""

    def __post_init__(self) -> None:
        if self.distance not in MERGE_DISTANCES:
            raise ConfigError(
                f"unknown merge distance {self.distance!r}", fix=f"use one of {', '.join(MERGE_DISTANCES)}"
            )
        if self.router not in MERGE_ROUTERS:
            raise ConfigError(
                f"unknown merge router rule {self.router!r}", fix=f"use one of {', '.join(MERGE_ROUTERS)}"
            )
        if self.chunk_tokens < 1:
            raise ConfigError("merge chunk_tokens must be >= 1", fix="use 2048")


# ---------------------------------------------------------------------------------------- clustering
def pairwise_distances(points: Tensor, distance: str = "euclidean") -> Tensor:
    """``(N, N)`` float64 distances between the rows of ``points (N, D)``."""
    p = points.double()
    if distance == "euclidean":
        return torch.cdist(p, p).fill_diagonal_(0.0)
    if distance == "cosine":
        u = p / torch.linalg.vector_norm(p, dim=-1, keepdim=True).clamp_min(1e-300)
        return (1.0 - u @ u.T).clamp_min(0.0).fill_diagonal_(0.0)
    raise ConfigError(f"unknown distance {distance!r}", fix=f"use one of {', '.join(MERGE_DISTANCES)}")


def agglomerative_clusters(points: Tensor, n_clusters: int, distance: str = "euclidean") -> list[list[int]]:
    """Average-linkage agglomerative clustering of the rows of ``points (N, D)`` into ``n_clusters``.

    Returns the clusters as sorted member lists, ordered by their smallest member. At each step the
    two closest clusters merge (ties: the pair with the lowest indices), and the distances to the
    new cluster follow Lance-Williams for average linkage:
    ``d(k, i u j) = (n_i d(k, i) + n_j d(k, j)) / (n_i + n_j)``.
    """
    n = points.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"cannot cluster {n} points into {n_clusters} clusters")
    dist = pairwise_distances(points, distance)  # (N, N)
    dist.fill_diagonal_(float("inf"))
    members: list[list[int] | None] = [[i] for i in range(n)]
    alive = torch.ones(n, dtype=torch.bool)
    for _ in range(n - n_clusters):
        masked = dist.masked_fill(~(alive.unsqueeze(0) & alive.unsqueeze(1)), float("inf"))
        flat = int(torch.argmin(masked))  # first minimum in row-major order: lowest (i, j)
        i, j = divmod(flat, n)
        i, j = min(i, j), max(i, j)
        ni, nj = len(members[i]), len(members[j])
        new_row = (ni * dist[i] + nj * dist[j]) / (ni + nj)  # (N,)
        dist[i], dist[:, i] = new_row, new_row
        dist[i, i] = float("inf")
        members[i] = sorted(members[i] + members[j])
        members[j] = None
        alive[j] = False
    return sorted((m for m in members if m is not None), key=lambda m: m[0])


# ---------------------------------------------------------------------------------------- statistics
@torch.no_grad()
def expert_statistics(
    view: MoeLayerView, xs: Sequence[Tensor], chunk_tokens: int = 2048
) -> tuple[Tensor, Tensor]:
    """``(mean outputs (E, d) float64, top-k selection counts (E,) float64)`` on the block inputs ``xs``."""
    dev, dtype = view.router_weight.device, view.router_weight.dtype
    num_e = view.num_experts
    total: Tensor | None = None
    counts = torch.zeros(num_e, dtype=torch.float64, device=dev)  # (E,)
    tokens = 0
    for x_b in xs:
        for t0 in range(0, x_b.shape[0], chunk_tokens):
            x = x_b[t0 : t0 + chunk_tokens].to(dev, dtype)  # (T, d)
            outs = view.expert_outputs(x).double().sum(1)  # (E, d)
            total = outs if total is None else total + outs
            _, idx = view.routing(view.router_logits(x))  # (T, k)
            counts += (
                torch.zeros(x.shape[0], num_e, dtype=torch.float64, device=dev).scatter_(1, idx, 1.0).sum(0)
            )
            tokens += x.shape[0]
    if total is None or tokens == 0:
        raise ValueError("no calibration tokens reached the layer")
    return (total / tokens).cpu(), counts.cpu()


def merge_weights(counts: Tensor, cluster: Sequence[int]) -> Tensor:
    """Frequency weights ``(len(cluster),)`` float64 summing to 1 (uniform if no member was selected)."""
    f = counts.double()[list(cluster)]
    s = float(f.sum())
    return f / s if s > 0 else torch.full_like(f, 1.0 / len(cluster))


def representative(counts: Tensor, cluster: Sequence[int]) -> int:
    """The most frequently selected member (ties: the lowest index)."""
    return min(cluster, key=lambda e: (-float(counts[e]), e))


# ---------------------------------------------------------------------------------------- surgery
def _expert_tensors(view: MoeLayerView, where: str | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """``(per-expert tensors, router tensors)`` of ``view``, expert index on dim 0."""
    m = view.module
    if view.kind in ("moe-app", "hf"):
        experts = [m.experts.gate_up_proj, m.experts.down_proj]
    elif view.kind == "pesc":
        if getattr(m.adapters, "down_mask", None) is not None:
            raise UnsupportedModelError(
                "HC-SMoE merging of sparse PESC adapters (adapter_sparsity > 0) is not supported: each expert "
                "has its own fixed mask, and a merged expert would need the union of its members' masks",
                where=where,
                fix="use a pruning method (enumerate, frequency, reap, expert_drop) on sparse adapters",
            )
        experts = [m.adapters.down, m.adapters.up]
    else:
        raise UnsupportedModelError(
            f"HC-SMoE merging of {type(m).__name__} layers is not supported: averaging LoRA factors "
            "A and B separately does not average the experts' deltas B A",
            where=where,
            fix="use a pruning method (enumerate, frequency, reap, expert_drop), or merge the LoRA experts first",
        )
    if view.kind == "hf":
        routers = [m.gate.weight]
    else:
        routers = [m.router.weight] + ([m.router.noise_weight] if m.router.noise_weight is not None else [])
    return experts, routers


def check_mergeable(view: MoeLayerView, where: str | None = None) -> None:
    """Raise ``UnsupportedModelError`` if ``view``'s experts cannot be merged by weight averaging."""
    _expert_tensors(view, where)


def _average(t: Tensor, cluster: Sequence[int], w: Tensor) -> Tensor:
    rows = t.detach()[list(cluster)].double()  # (n, ...)
    merged = torch.tensordot(w.to(rows.device), rows, dims=1)  # (...)
    return merged.to(t.dtype)


@torch.no_grad()
def merge_clusters(
    view: MoeLayerView, clusters: Sequence[Sequence[int]], counts: Tensor, router: str = "average"
) -> list[int]:
    """Merge each cluster of ``view`` into one expert in place; return the representatives kept.

    ``clusters`` partitions ``range(E)``. The merged expert takes the place of the cluster's
    representative (its most frequent member), then :meth:`MoeLayerView.keep` removes the rest.
    Lowers ``top_k`` to the new expert count if needed.
    """
    num_e = view.num_experts
    flat = sorted(e for c in clusters for e in c)
    if flat != list(range(num_e)):
        raise ValueError(f"clusters {clusters} do not partition the {num_e} experts")
    if router not in MERGE_ROUTERS:
        raise ConfigError(
            f"unknown merge router rule {router!r}", fix=f"use one of {', '.join(MERGE_ROUTERS)}"
        )
    experts, routers = _expert_tensors(view)
    updates: list[tuple[Tensor, int, Tensor]] = []  # computed from the originals before any write
    reps = []
    for cluster in clusters:
        rep = representative(counts, cluster)
        reps.append(rep)
        if len(cluster) == 1:
            continue  # a cluster of one keeps its expert exactly
        w = merge_weights(counts, cluster)
        updates += [(t, rep, _average(t, cluster, w)) for t in experts]
        if router == "average":
            updates += [(t, rep, _average(t, cluster, w)) for t in routers]
    for t, rep, value in updates:
        t.data[rep].copy_(value)
    reps = sorted(reps)
    if view.top_k > len(reps):
        set_top_k(view, len(reps))
    view.keep(reps)
    return reps


def set_top_k(view: MoeLayerView, k: int) -> None:
    """Set the layer's ``top_k`` (router and block; a stock model's config is updated by the caller)."""
    m = view.module
    owners: list[nn.Module] = [m]
    for name in ("gate", "router"):
        if isinstance(getattr(m, name, None), nn.Module):
            owners.append(getattr(m, name))
    for owner in owners:
        for attr in ("top_k", "num_experts_per_tok"):
            if isinstance(getattr(type(owner), attr, None), property):
                continue  # derived (e.g. a block's top_k read from its router)
            if isinstance(getattr(owner, attr, None), int):
                setattr(owner, attr, k)


@torch.no_grad()
def merge_layer(
    view: MoeLayerView, xs: Sequence[Tensor], r: int, cfg: MergeConfig | None = None
) -> tuple[list[int], list[list[int]]]:
    """HC-SMoE on one layer: statistics on ``xs``, cluster into ``r``, merge in place.

    Returns ``(representatives kept (sorted, old numbering), clusters)``; ``clusters[i]`` holds the
    experts merged into the ``i``-th kept expert.
    """
    cfg = cfg or MergeConfig()
    check_mergeable(view)
    if not 1 <= r < view.num_experts:
        raise ConfigError(
            f"cannot merge {view.num_experts} experts into {r}", fix=f"use 1 <= r < {view.num_experts}"
        )
    means, counts = expert_statistics(view, xs, cfg.chunk_tokens)
    clusters = agglomerative_clusters(means, r, cfg.distance)
    reps = merge_clusters(view, clusters, counts, cfg.router)
    by_rep = {representative(counts, c): list(c) for c in clusters}
    return reps, [by_rep[e] for e in reps]


__all__ = [
    "MERGE_DISTANCES",
    "MERGE_ROUTERS",
    "MergeConfig",
    "agglomerative_clusters",
    "check_mergeable",
    "expert_statistics",
    "merge_clusters",
    "merge_layer",
    "merge_weights",
    "pairwise_distances",
    "representative",
    "set_top_k",
]
