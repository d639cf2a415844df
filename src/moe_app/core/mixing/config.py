"""``MixtureConfig``: how the training sources are mixed (``data.init_args.mixture`` in a config).

Strategies: ``uniform``, ``size``, ``static``, ``dynamic`` (gate-load redundancy, Zhu et al. 2024,
arXiv 2406.11256), ``reference_loss`` (DoReMi-like excess dev loss) and the paper's other baselines
``static_gate_load``, ``sentence_embedding``, ``random`` and ``sequential``. Plain dataclass, no
Lightning: the update rules in :mod:`moe_app.core.mixing.rules` read it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moe_app.core.mixing.rules import (
    ADAPTIVE,
    DEFAULT_C,
    DEFAULT_ETA,
    MEASURED,
    ONE_SHOT,
    STRATEGIES,
    check_hyperparameters,
    check_weights,
)
from moe_app.errors import ConfigError


@dataclass
class MixtureConfig:
    """How the training sources are mixed (``data.init_args.mixture`` in a config)."""

    strategy: str = "uniform"
    """``uniform``, ``size`` (proportional to training rows), ``static`` (``weights``), ``dynamic``
    (gate-load redundancy, Zhu et al. 2024), ``reference_loss`` (DoReMi-like excess dev loss), or the
    paper's baselines: ``static_gate_load`` (the ``dynamic`` update applied once, before training,
    then frozen), ``sentence_embedding`` (the ``dynamic`` update every ``update_every`` steps with
    cosine distances between the sources' mean last hidden states instead of gate loads),
    ``random`` (Dirichlet(1) weights drawn once from the data module's ``seed``) or ``sequential``
    (one source after another, in the configured order, each for a share of the training batches
    proportional to its training rows)."""
    weights: dict[str, float] | None = None
    """``{source_name: weight}`` for ``static``; the starting weights for ``dynamic`` /
    ``reference_loss`` / ``static_gate_load`` / ``sentence_embedding`` (default: uniform, as in the
    paper). Normalised to sum to 1."""
    update_every: int = 100
    """Optimizer steps between weight updates (paper: 100 of 2000)."""
    eta: float | None = None
    """Step size of the update; default 10 for ``dynamic`` / ``static_gate_load`` /
    ``sentence_embedding``, 1 for ``reference_loss``."""
    c: float | None = None
    """Uniform smoothing ``c`` in ``w' = (1-c) alpha + c/n``; default 0.05 for ``dynamic`` /
    ``static_gate_load`` / ``sentence_embedding``, 1e-4 for ``reference_loss``."""
    layer: int | str = -1
    """MoE layer whose gate load is compared: an index in model order (``-1``: the last, as in the
    paper) or ``all`` (the redundancy scores of every MoE layer, averaged)."""
    probe_size: int = 32
    """Dev rows per source in the fixed probe set (its first rows, the same every update)."""
    probe_batch_size: int | None = None
    """Rows per probe forward (default: the data module's ``eval_batch_size``)."""
    reference_losses: dict[str, float] | None = None
    """``reference_loss`` only: per-source reference dev losses; default: measured once at the start."""
    samples_per_epoch: int | None = None
    """Examples drawn per epoch (rounded up to whole batches); default: the training rows of all sources."""
    apply_delay: int | None = None
    """Batches between an update and the first batch drawn with its weights; must exceed the data
    loader's read-ahead (default ``2 + 2 * num_workers``). Part of the exact-resume contract."""
    plot: bool = True
    """Write ``mixture_weights.png`` next to ``mixture_weights.json`` at the end of fit."""
    dump_rank_files: bool = False
    """Debugging/tests: each rank writes ``mixture_rank{r}.json`` (its final weights, bit-exact as
    hex, and every drawn row index) at the end of fit."""

    def __post_init__(self) -> None:
        where = "data.mixture"
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"unknown strategy {self.strategy!r}",
                where=f"{where}.strategy",
                fix=f"use one of {list(STRATEGIES)}.",
            )
        if self.weights is not None and self.strategy in ("uniform", "size", "random", "sequential"):
            raise ConfigError(
                f"weights are given but strategy is {self.strategy!r}, which ignores them",
                where=f"{where}.weights",
                fix="use strategy static (fixed weights) or dynamic (starting weights), or remove weights.",
            )
        if self.strategy == "static" and self.weights is None:
            raise ConfigError(
                "strategy static needs weights",
                where=f"{where}.weights",
                fix="add weights: {source_name: weight, ...} for every source.",
            )
        if self.weights is not None:
            if not isinstance(self.weights, dict) or not self.weights:
                raise ConfigError(
                    "weights must be a non-empty mapping {source_name: weight}", where=f"{where}.weights"
                )
            check_weights(self.weights, list(self.weights), where=f"{where}.weights")  # values only
        for key in ("update_every", "probe_size", "probe_batch_size", "samples_per_epoch", "apply_delay"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(
                    f"{key} must be an integer >= 1, got {value!r}",
                    where=f"{where}.{key}",
                    fix=f"set {key} to a positive integer.",
                )
        if self.layer != "all" and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ConfigError(
                f"layer must be an integer index or 'all', got {self.layer!r}",
                where=f"{where}.layer",
                fix="use -1 (the last MoE layer), another index, or all.",
            )
        if self.eta is not None or self.c is not None or self.strategy in MEASURED:
            check_hyperparameters(self.resolved_eta, self.resolved_c, where=where)
        if self.reference_losses is not None:
            for name, value in self.reference_losses.items():
                if not math.isfinite(float(value)):
                    raise ConfigError(
                        f"reference loss of {name!r} is {value}",
                        where=f"{where}.reference_losses",
                        fix="give finite losses, or remove reference_losses to measure them at the start.",
                    )

    @property
    def adaptive(self) -> bool:
        """Updated every ``update_every`` steps (``dynamic``, ``reference_loss``, ``sentence_embedding``)."""
        return self.strategy in ADAPTIVE

    @property
    def one_shot(self) -> bool:
        """Measured from the model once, before training, then frozen (``static_gate_load``)."""
        return self.strategy in ONE_SHOT

    @property
    def measured(self) -> bool:
        """Probes the model (needs dev probe sets; uses ``eta`` and ``c``)."""
        return self.strategy in MEASURED

    @property
    def resolved_eta(self) -> float:
        return float(self.eta) if self.eta is not None else DEFAULT_ETA.get(self.strategy, 10.0)

    @property
    def resolved_c(self) -> float:
        return float(self.c) if self.c is not None else DEFAULT_C.get(self.strategy, 0.05)
