"""Experts by splitting the dense FFN's neurons (LLaMA-MoE v1 and v2, Zhu et al. 2024).

The ``d_ff`` intermediate neurons are split into ``E`` disjoint index sets ``S_e``; expert ``e``
takes rows ``S_e`` of W_gate and W_up and columns ``S_e`` of W_down. Because the SwiGLU FFN is a sum
over neurons, ``F(x) = sum_e E_e(x)``, so with all experts selected and every multiplier
``scale * w_i = 1`` the MoE equals the dense model exactly (ALGORITHMS.md section 3). With
``shared`` chunks, the neurons that matter for many groups form one always-on shared expert
("residual MoE", LLaMA-MoE v2) and ``F(x) = S(x) + sum_e E_e(x)`` still holds.

Splits: ``sequential`` (contiguous blocks, v2's default), ``random`` (v1's released models),
``clustering`` (equal-size k-means on L2-normalised W_up rows, v1) and ``importance``: with
``I[c, j] = mean_tokens |h_j * dL/dh_j|`` over the calibration tokens of group ``c`` (``h`` = input
of W_down, computed by ``calibration.neuron_importance``), neurons are assigned greedily, highest
remaining score first, until each expert holds ``d_ff / E``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_app.core.upcycling.kmeans import balanced_assign, balanced_kmeans
from moe_app.core.upcycling.rng import layer_generator


def split_neurons(
    split: str,
    num_experts: int,
    num_neurons: int,
    *,
    w_up: Tensor | None = None,
    importance: Tensor | None = None,
    shared: int = 0,
    seed: int = 0,
    layer: int = 0,
    kmeans_iters: int = 25,
) -> tuple[Tensor | None, Tensor]:
    """Split ``num_neurons`` into ``shared`` shared chunks and ``num_experts`` routed chunks.

    Returns ``(shared_idx (shared * c,) or None, groups (E, c))`` with ``c = num_neurons / (E + shared)``;
    every row is sorted. ``w_up (F, d)`` is needed by ``clustering``, ``importance (E, F)`` by
    ``importance``.
    """
    chunks = num_experts + shared
    if num_neurons % chunks:
        raise ValueError(f"{num_neurons} neurons do not split into {chunks} equal chunks")
    c = num_neurons // chunks
    if split in ("sequential", "random"):
        if split == "sequential":
            order = torch.arange(num_neurons)
        else:
            order = torch.randperm(num_neurons, generator=layer_generator(seed, layer, "split"))
        shared_idx = order[: shared * c].sort().values if shared else None
        groups = order[shared * c :].view(num_experts, c).sort(dim=-1).values  # (E, c)
        return shared_idx, groups
    if split == "clustering":
        if w_up is None:
            raise ValueError("split='clustering' needs w_up")
        if shared:
            raise ValueError("split='clustering' has no shared variant")
        g = layer_generator(seed, layer, "clustering")
        labels, _ = balanced_kmeans(w_up.detach().float().cpu(), num_experts, kmeans_iters, g)  # (F,)
        return None, _groups_from_labels(labels, num_experts, c)
    if split == "importance":
        if importance is None:
            raise ValueError("split='importance' needs importance scores")
        return _importance_split(importance.float().cpu(), num_experts, c, shared)
    raise ValueError(f"unknown split {split!r}")


def _groups_from_labels(labels: Tensor, num_groups: int, size: int) -> Tensor:
    order = torch.argsort(labels * (labels.numel() + 1) + torch.arange(labels.numel()))
    return order.view(num_groups, size)  # (E, c), rows sorted because the sort key keeps index order


def _importance_split(
    importance: Tensor, num_experts: int, c: int, shared: int
) -> tuple[Tensor | None, Tensor]:
    groups_n, f = importance.shape
    if groups_n != num_experts:
        raise ValueError(f"importance has {groups_n} groups, expected {num_experts}")
    # Normalise per group so a group with more tokens or larger gradients does not dominate.
    score = importance / importance.sum(dim=-1, keepdim=True).clamp_min(1e-30)  # (E, F)
    rest = torch.arange(f)
    shared_idx = None
    if shared:
        # A neuron "ranks high for many groups" when it is in the top (shared + 1) * c of many
        # groups' rankings; ties are broken by the mean rank across groups.
        rank = score.argsort(dim=-1, descending=True).argsort(dim=-1).float()  # (E, F), 0 = best
        high = (rank < (shared + 1) * c).sum(dim=0).float()  # (F,) groups that rank it high
        key = -high * f + rank.mean(dim=0)  # more groups first, then better mean rank
        order = torch.argsort(key, stable=True)
        shared_idx = order[: shared * c].sort().values
        keep = torch.ones(f, dtype=torch.bool)
        keep[shared_idx] = False
        rest = keep.nonzero().squeeze(-1)  # (F - Fs,)
    cost = -score[:, rest].T  # (F', E): higher importance = lower cost
    labels = balanced_assign(cost, torch.full((num_experts,), c, dtype=torch.long))
    groups = rest[_groups_from_labels(labels, num_experts, c)]  # (E, c)
    return shared_idx, groups


def partition_experts(w_gate: Tensor, w_up: Tensor, w_down: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Slice the dense FFN by ``groups (E, c)``: returns ``gate_up (E, 2c, d)`` and ``down (E, d, c)``."""
    groups = groups.to(w_gate.device)
    gate_up = torch.cat([w_gate[groups], w_up[groups]], dim=1)  # (E, 2c, d)
    down = w_down[:, groups].permute(1, 0, 2).contiguous()  # (E, d, c)
    return gate_up, down


def shared_expert_weights(
    w_gate: Tensor, w_up: Tensor, w_down: Tensor, idx: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The shared expert's ``gate (Fs, d)``, ``up (Fs, d)`` and ``down (d, Fs)`` for neurons ``idx``."""
    idx = idx.to(w_gate.device)
    return w_gate[idx].clone(), w_up[idx].clone(), w_down[:, idx].contiguous()
