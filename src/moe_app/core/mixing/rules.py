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

The paper's other baselines (ALGORITHMS.md section 7b):

* ``static_gate_load``: the ``dynamic`` update applied ONCE, to the starting weights, from the gate
  loads of the model before training, and then frozen: ``w = update_weights(w0, Delta, eta, c)``.
* ``sentence_embedding``: the ``dynamic`` update with each source's vector being its mean sentence
  embedding ``E_i`` (the mean over its probe rows of the mean last hidden state over the row's real
  tokens) and the distance the cosine distance (:func:`embedding_redundancy_scores`):
  ``Delta_i = (1/n) sum_j (1 - cos(E_i, E_j))``; a source whose embedding points where the others'
  do is redundant and loses weight. Applied every ``update_every`` steps, compounding, like ``dynamic``.
* ``random``: weights drawn once from Dirichlet(1) (:func:`random_weights`), seeded, then fixed.
* ``sequential``: the sources one after another (:func:`sequential_plan`), each for a share of the
  training batches proportional to its training rows.

Everything is computed in float64 on the CPU from the (already all-reduced) statistics, so every
DDP rank that calls these functions with the same inputs gets bitwise the same weights.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from moe_app.errors import ConfigError

STRATEGIES: tuple[str, ...] = (
    "uniform",
    "size",
    "static",
    "dynamic",
    "reference_loss",
    "static_gate_load",
    "sentence_embedding",
    "random",
    "sequential",
)
"""How the sampling weights are chosen (see the module docstring)."""
ADAPTIVE: tuple[str, ...] = ("dynamic", "reference_loss", "sentence_embedding")
"""Strategies updated every ``update_every`` steps from probes of the model."""
ONE_SHOT: tuple[str, ...] = ("static_gate_load",)
"""Strategies whose weights are measured from the model once, at the start of training, then frozen."""
MEASURED: tuple[str, ...] = ADAPTIVE + ONE_SHOT
"""Strategies that probe the model (they need dev probe sets and use ``eta`` / ``c``)."""
GATE_LOAD: tuple[str, ...] = ("dynamic", "static_gate_load")
"""Strategies that read the router's gate loads (they need an MoE)."""
DEFAULT_ETA: dict[str, float] = {
    "dynamic": 10.0,
    "reference_loss": 1.0,
    "static_gate_load": 10.0,
    "sentence_embedding": 10.0,
}
"""Step size ``eta`` per measured strategy (paper defaults)."""
DEFAULT_C: dict[str, float] = {
    "dynamic": 0.05,
    "reference_loss": 1e-4,
    "static_gate_load": 0.05,
    "sentence_embedding": 0.05,
}
"""Uniform smoothing ``c`` per measured strategy (paper defaults)."""


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
    seed: int = 0,
) -> Tensor:
    """Starting weights ``(n,)`` float64 summing to 1.

    ``uniform``: ``1/n``; ``size``: proportional to ``sizes`` (training rows per source);
    ``static``: the given ``weights``, normalised; the measured strategies (``dynamic``,
    ``reference_loss``, ``static_gate_load``, ``sentence_embedding``): the given ``weights`` if any,
    else uniform (the paper starts uniform); ``random``: :func:`random_weights` of ``seed``;
    ``sequential``: all weight on the first source (its plan is :func:`sequential_plan`).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown mixture strategy {strategy!r}", fix=f"use one of {list(STRATEGIES)}.")
    n = len(names)
    if strategy == "random":
        return random_weights(n, seed)
    if strategy == "sequential":
        return one_hot(n, 0)
    if strategy == "size":
        if sizes is None:
            raise ValueError("strategy 'size' needs the training sizes of the sources")
        w = _f64([float(sizes[name]) for name in names])
    elif weights is not None and strategy in ("static", *MEASURED):
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


def gate_load_weights(
    weights: Sequence[float] | Tensor, counts: Tensor, eta: float, c: float
) -> tuple[Tensor, Tensor]:
    """``static_gate_load``: the ``dynamic`` update applied once to the starting ``weights``.

    ``counts``: per-layer gate-load counts ``(L, n, E)`` (``L = 1`` for the last MoE layer). Returns
    ``(update_weights(weights, Delta, eta, c), Delta)`` with ``Delta = layered_redundancy_scores(counts)``;
    the caller freezes the result for the whole run.
    """
    delta = layered_redundancy_scores(counts)
    return update_weights(weights, delta, eta, c), delta


def mean_embeddings(row_embedding_sums: Tensor, rows: Tensor) -> Tensor:
    """Per-source mean sentence embedding ``E (n, H)`` from the (all-reduced) sum over each source's
    probe rows of the row embeddings ``(n, H)`` and the number of rows ``(n,)``."""
    return _f64(row_embedding_sums) / _f64(rows).clamp_min(1.0)[:, None]


def embedding_redundancy_scores(embeddings: Tensor) -> Tensor:
    """``Delta (n,)`` from per-source mean sentence embeddings ``E (n, H)``:

        cos_ij  = <E_i, E_j> / (||E_i|| ||E_j||)
        Delta_i = (1/n) sum_j (1 - cos_ij)          (j = i included, it is 0)

    The mean cosine distance of source ``i`` to every source, the analogue of ``dynamic``'s mean L2
    distance between gate loads: a source whose embedding points where the others' do scores low and
    loses weight in :func:`update_weights`. A zero embedding (a source with no rows) has cosine 0 to
    everything (distance 1).
    """
    e = _f64(embeddings)  # (n, H)
    unit = e / e.pow(2).sum(dim=-1, keepdim=True).sqrt().clamp_min(1e-300)  # (n, H)
    cos = (unit[:, None, :] * unit[None, :, :]).sum(dim=-1)  # (n, n); explicit, no matmul shortcut
    n = e.shape[0]
    dist = (1.0 - cos).clamp_min(0.0)  # (n, n); rounding can make 1 - cos_ii slightly negative
    dist.fill_diagonal_(0.0)
    return dist.sum(dim=1) / n  # (n,)


def random_weights(n: int, seed: int) -> Tensor:
    """``random``: weights ``(n,)`` drawn once from a flat Dirichlet(1) distribution (uniform on the
    simplex), float64, a pure function of ``(n, seed)``: ``x_i = -log(1 - u_i)`` (Exp(1) draws,
    ``u_i`` uniform in ``[0, 1)`` from a generator seeded with a hash of ``seed``), ``w = x / sum(x)``."""
    digest = hashlib.sha256(f"moe-app-mixture-random|{int(seed)}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    u = torch.rand(n, generator=g, dtype=torch.float64)  # (n,) in [0, 1)
    x = -torch.log1p(-u)  # (n,) Exp(1); u = 0 gives 0, which normalisation tolerates unless all are 0
    if float(x.sum()) <= 0:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    return x / x.sum()


def one_hot(n: int, i: int) -> Tensor:
    """Weights ``(n,)`` with all mass on source ``i``."""
    w = torch.zeros(n, dtype=torch.float64)
    w[i] = 1.0
    return w


def sequential_plan(sizes: Sequence[int], total_batches: int) -> list[tuple[int, int]]:
    """``sequential``: ``[(from_batch, source), ...]``, the sources in their configured order.

    The budget of ``total_batches`` training batches is split proportionally to the training rows
    ``sizes`` (every source is seen for about the same number of epochs), by rounding the
    cumulative shares: source ``i`` draws batches ``[b_i, b_{i+1})`` with
    ``b_i = round(total_batches * (s_0 + ... + s_{i-1}) / sum(s))`` (ties round half to even, in
    exact integer arithmetic), so the stages sum to exactly ``total_batches``. A source whose
    stage is empty (a budget shorter than the number of sources) is left out of the plan; the
    last planned source continues past the budget. Pure integer arithmetic: identical on every rank.
    """
    if total_batches < 1:
        raise ValueError(f"total_batches must be >= 1, got {total_batches}")
    if not sizes or any(int(s) < 0 for s in sizes) or sum(int(s) for s in sizes) <= 0:
        raise ValueError(f"sizes must be non-negative and not all 0, got {list(sizes)}")
    total = sum(int(s) for s in sizes)
    bounds = [_round_div(total_batches * c, total) for c in itertools.accumulate([0, *map(int, sizes)])]
    plan: list[tuple[int, int]] = []
    for i in range(len(sizes)):
        start, end = bounds[i], bounds[i + 1]
        if end > start:
            plan.append((start, i))
    return plan


def _round_div(num: int, den: int) -> int:
    q, r = divmod(num, den)
    if 2 * r > den or (2 * r == den and q % 2 == 1):
        q += 1
    return q


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
    "GATE_LOAD",
    "MEASURED",
    "ONE_SHOT",
    "STRATEGIES",
    "check_hyperparameters",
    "check_weights",
    "embedding_redundancy_scores",
    "gate_load_weights",
    "initial_weights",
    "layered_redundancy_scores",
    "mean_embeddings",
    "normalize_loads",
    "one_hot",
    "random_weights",
    "redundancy_scores",
    "reference_loss_scores",
    "sequential_plan",
    "update_weights",
]
