"""Data-mixture weighting, free of Lightning: the update rules (:mod:`moe_app.core.mixing.rules`) and the
router/dev-loss probe (:mod:`moe_app.core.mixing.probe`) behind ``MixtureDataModule`` and
``MixtureWeightsCallback`` (Zhu et al., arXiv 2406.11256; ALGORITHMS.md section 7)."""

from __future__ import annotations

from moe_app.core.mixing.probe import ProbeStats, probe_model, router_kind, select_layers
from moe_app.core.mixing.rules import (
    ADAPTIVE,
    MEASURED,
    ONE_SHOT,
    STRATEGIES,
    embedding_redundancy_scores,
    gate_load_weights,
    initial_weights,
    layered_redundancy_scores,
    mean_embeddings,
    random_weights,
    redundancy_scores,
    reference_loss_scores,
    sequential_plan,
    update_weights,
)

__all__ = [
    "ADAPTIVE",
    "MEASURED",
    "ONE_SHOT",
    "STRATEGIES",
    "ProbeStats",
    "embedding_redundancy_scores",
    "gate_load_weights",
    "initial_weights",
    "layered_redundancy_scores",
    "mean_embeddings",
    "probe_model",
    "random_weights",
    "redundancy_scores",
    "reference_loss_scores",
    "router_kind",
    "select_layers",
    "sequential_plan",
    "update_weights",
]
