"""Equal-size (balanced) k-means in plain torch.

Neuron partition by clustering (LLaMA-MoE v1, Zhu et al. 2024) needs clusters of exactly
``d_ff / E`` neurons, and router initialisation from data (LLaMA-MoE v2) and the importance split
want groups of comparable size so every expert gets calibration signal. Standard k-means gives
neither, so assignment here is capacity-constrained: in rounds, every unassigned point proposes its
nearest cluster that still has room and each cluster accepts its closest proposers up to its
remaining capacity. Each round fills at least one cluster or assigns every proposer, so at most
``k`` rounds of vectorised work are needed (no Python loop over points).

Points are compared by cosine similarity (inputs are L2-normalised), which is what both uses want:
W_up rows and hidden-state directions, not magnitudes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def balanced_capacities(n: int, k: int) -> Tensor:
    """``k`` capacities summing to ``n`` that differ by at most one."""
    cap = torch.full((k,), n // k, dtype=torch.long)
    cap[: n % k] += 1
    return cap


def balanced_assign(cost: Tensor, capacity: Tensor) -> Tensor:
    """Assign each of ``N`` points to one of ``k`` clusters with ``cost (N, k)`` and ``capacity (k,)``.

    Returns labels ``(N,)`` with exactly ``capacity[c]`` points in cluster ``c`` (``capacity`` must
    sum to ``N``). Greedy: lower cost wins a contested slot.
    """
    n = cost.shape[0]
    if int(capacity.sum()) != n:
        raise ValueError(f"capacities sum to {int(capacity.sum())}, expected {n}")
    labels = torch.full((n,), -1, dtype=torch.long)
    remaining = capacity.clone()
    cost = cost.float().clone()
    while True:
        todo = (labels < 0).nonzero().squeeze(-1)  # (U,)
        if todo.numel() == 0:
            return labels
        cost[:, remaining == 0] = float("inf")
        sub = cost[todo]  # (U, k)
        choice = sub.argmin(dim=-1)  # (U,)
        best = sub.gather(1, choice[:, None]).squeeze(-1)  # (U,)
        for c in choice.unique().tolist():
            mine = (choice == c).nonzero().squeeze(-1)  # proposers of cluster c
            take = int(min(remaining[c], mine.numel()))
            order = best[mine].argsort(stable=True)[:take]
            labels[todo[mine[order]]] = c
            remaining[c] -= take


def balanced_kmeans(
    x: Tensor, k: int, iters: int = 25, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Equal-size spherical k-means of ``x (N, d)`` into ``k`` clusters.

    Returns ``(labels (N,), centroids (k, d))``; centroids are unit-norm and the cluster sizes
    differ by at most one. Deterministic for a given ``generator``.
    """
    n = x.shape[0]
    if n < k:
        raise ValueError(f"cannot make {k} clusters from {n} points")
    x = F.normalize(x.float(), dim=-1)  # (N, d)
    capacity = balanced_capacities(n, k)
    init = torch.randperm(n, generator=generator)[:k]
    centroids = x[init].clone()  # (k, d)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        cost = -(x @ centroids.T)  # (N, k): negative cosine similarity
        new = balanced_assign(cost, capacity)
        sums = torch.zeros_like(centroids).index_add_(0, new, x)  # (k, d)
        centroids = F.normalize(sums, dim=-1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels, centroids
