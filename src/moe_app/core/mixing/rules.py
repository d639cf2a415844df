"""Pure update rules of data-mixture weighting (no Lightning, no model): unit-testable numbers in,
numbers out.

Redundancy-aware dynamic data mixing (Zhu et al., "Dynamic Data Mixing Maximizes Instruction
Tuning for Mixture-of-Experts", arXiv 2406.11256; ALGORITHMS.md section 7). Every ``T`` steps
each dataset's fixed dev probe set is routed by the MoE; the gate load ``O_i`` (top-k
assignments per expert over the real tokens, L1-normalised) says how the router "sees" dataset
``i``. A dataset whose load looks like every other dataset's is redundant; a distinct one is
up-weighted:

    delta_ij = || O_i - O_j ||_2,   Delta_i = (1/n) sum_j delta_ij      (j = i included, it is 0)
    alpha    = softmax(log w + eta * Delta)
    w'       = (1 - c) * alpha + c / n,   w = w' / sum(w')

The paper's defaults are ``eta = 10``, ``c = 0.05``; weights compound across updates. The
DoReMi-like baseline replaces ``Delta`` by the excess dev loss ``dev_loss_i - ref_loss_i``
(``eta = 1``, ``c = 1e-4``), without DoReMi's clipping at zero, as in the paper's baseline.

Everything is computed in float64 on the CPU from the (already all-reduced) statistics, so every
DDP rank that calls these functions with the same inputs gets bitwise the same weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from moe_app.errors import ConfigError

STRATEGIES: tuple[str, ...] = ("uniform", "size", "static", "dynamic", "reference_loss")
"""How the sampling weights are chosen; the last two adapt during training."""
ADAPTIVE: tuple[str, ...] = ("dynamic", "reference_loss")
DEFAULT_ETA: dict[str, float] = {"dynamic": 10.0, "reference_loss": 1.0}
"""Step size ``eta`` per adaptive strategy (paper defaults)."""
DEFAULT_C: dict[str, float] = {"dynamic": 0.05, "reference_loss": 1e-4}
"""Uniform smoothing ``c`` per adaptive strategy (paper defaults)."""


def _f64(x: Sequence[float] | Tensor) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64).detach().cpu()


def check_weights(
    weights: Mapping[str, float], names: Sequence[str], where: str = "data.mixture.weights"
) -> None:
    """Raise :class:`ConfigError` unless ``weights`` gives every source a finite weight >= 0, not all 0."""
    unknown = [k for k in weights if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown source name(s) {unknown}; the sources are {list(names)}",
            where=where,
            fix="use the `name` of a configured data source for every key (check the spelling).",
        )
    missing = [n for n in names if n not in weights]
    if missing:
        raise ConfigError(
            f"no weight for source(s) {missing}",
            where=where,
            fix="give every source a weight (0 to leave a source out), e.g. "
            + "{"
            + ", ".join(f"{n}: 1.0" for n in names)
            + "}.",
        )
    for name, value in weights.items():
        v = float(value)
        if not v == v or v in (float("inf"), float("-inf")) or v < 0:  # NaN, inf or negative
            raise ConfigError(
                f"weight of source {name!r} is {value}; weights must be finite and >= 0",
                where=where,
                fix="use non-negative numbers; they are normalised to sum to 1.",
            )
    if sum(float(v) for v in weights.values()) <= 0:
        raise ConfigError(
            "all weights are 0: no source could ever be sampled",
            where=where,
            fix="give at least one source a positive weight.",
        )


def initial_weights(
    strategy: str,
    names: Sequence[str],
    sizes: Mapping[str, int] | None = None,
    weights: Mapping[str, float] | None = None,
) -> Tensor:
    """Starting weights ``(n,)`` float64 summing to 1.

    ``uniform``: ``1/n``; ``size``: proportional to ``sizes`` (training rows per source);
    ``static``: the given ``weights``, normalised; ``dynamic`` / ``reference_loss``: the given
    ``weights`` if any, else uniform (the paper starts uniform).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown mixture strategy {strategy!r}", fix=f"use one of {list(STRATEGIES)}.")
    n = len(names)
    if strategy == "size":
        if sizes is None:
            raise ValueError("strategy 'size' needs the training sizes of the sources")
        w = _f64([float(sizes[name]) for name in names])
    elif weights is not None and strategy in ("static", *ADAPTIVE):
        check_weights(weights, names)
        w = _f64([float(weights[name]) for name in names])
    elif strategy == "static":
        raise ConfigError(
            "strategy 'static' needs `weights`",
            where="data.mixture",
            fix="add weights: {source_name: weight, ...}, or use strategy uniform/size.",
        )
    else:
        w = torch.ones(n, dtype=torch.float64)
    if float(w.sum()) <= 0:
        raise ConfigError(
            "the initial mixture weights sum to 0", where="data.mixture", fix="check the sources."
        )
    return w / w.sum()


def normalize_loads(counts: Tensor) -> Tensor:
    """L1-normalise gate-load counts ``(n, E)`` per row: ``O_i``; a row with no tokens stays 0."""
    counts = _f64(counts)
    return counts / counts.sum(dim=-1, keepdim=True).clamp_min(1e-300)  # (n, E)


def redundancy_scores(counts: Tensor) -> Tensor:
    """``Delta (n,)`` from gate-load counts ``(n, E)``: mean L2 distance of ``O_i`` to every ``O_j``."""
    loads = normalize_loads(counts)  # (n, E)
    n = loads.shape[0]
    diff = loads[:, None, :] - loads[None, :, :]  # (n, n, E)
    dist = diff.pow(2).sum(dim=-1).sqrt()  # (n, n); explicit, not cdist (no matmul shortcut)
    return dist.sum(dim=1) / n  # (n,)


def layered_redundancy_scores(counts: Tensor) -> Tensor:
    """``Delta (n,)`` from per-layer counts ``(L, n, E)``: the mean over layers of each layer's Delta.

    Averaging the scores rather than the loads keeps layers with different expert counts (an
    attention MoE beside an MLP MoE) comparable and does not let layer-specific patterns cancel.
    """
    counts = _f64(counts)
    return torch.stack([redundancy_scores(c) for c in counts]).mean(dim=0)  # (n,)


def reference_loss_scores(
    dev_losses: Sequence[float] | Tensor, ref_losses: Sequence[float] | Tensor
) -> Tensor:
    """DoReMi-like ``Delta (n,)``: per-source excess dev loss over the reference loss."""
    return _f64(dev_losses) - _f64(ref_losses)


def update_weights(
    weights: Sequence[float] | Tensor, delta: Sequence[float] | Tensor, eta: float, c: float
) -> Tensor:
    """One multiplicative update: ``w <- norm((1 - c) softmax(log w + eta Delta) + c / n)``, float64."""
    w = _f64(weights)
    d = _f64(delta)
    if w.shape != d.shape or w.dim() != 1:
        raise ValueError(f"weights {tuple(w.shape)} and delta {tuple(d.shape)} must be equal 1-D shapes")
    n = w.shape[0]
    logits = torch.log(w) + eta * d  # (n,); log 0 = -inf keeps a zero weight at zero before smoothing
    alpha = torch.softmax(logits, dim=0)  # (n,)
    smoothed = (1.0 - c) * alpha + c / n  # (n,)
    return smoothed / smoothed.sum()


def check_hyperparameters(eta: float, c: float, where: str = "data.mixture") -> None:
    """``eta`` must be finite and > 0, ``c`` in ``[0, 1)``."""
    if not (eta == eta and 0 < eta < float("inf")):
        raise ConfigError(
            f"eta must be a finite number > 0, got {eta}",
            where=f"{where}.eta",
            fix="use the paper's eta: 10 (dynamic) or 1 (reference_loss); for fixed weights use strategy static.",
        )
    if not (c == c and 0 <= c < 1):
        raise ConfigError(
            f"c (uniform smoothing) must be in [0, 1), got {c}",
            where=f"{where}.c",
            fix="use the paper's c: 0.05 (dynamic) or 1e-4 (reference_loss); c = 1 would always give uniform weights.",
        )


__all__ = [
    "ADAPTIVE",
    "DEFAULT_C",
    "DEFAULT_ETA",
    "STRATEGIES",
    "check_hyperparameters",
    "check_weights",
    "initial_weights",
    "layered_redundancy_scores",
    "normalize_loads",
    "redundancy_scores",
    "reference_loss_scores",
    "update_weights",
]
