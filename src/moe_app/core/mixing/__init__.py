"""Data-mixture weighting, free of Lightning: the update rules (:mod:`moe_app.core.mixing.rules`) and the
router/dev-loss probe (:mod:`moe_app.core.mixing.probe`) behind ``MixtureDataModule`` and
``MixtureWeightsCallback`` (Zhu et al., arXiv 2406.11256; ALGORITHMS.md section 7)."""

from __future__ import annotations

from moe_app.core.mixing.probe import ProbeStats, probe_model, router_kind, select_layers
from moe_app.core.mixing.rules import (
    ADAPTIVE,
    STRATEGIES,
    initial_weights,
    layered_redundancy_scores,
    redundancy_scores,
    reference_loss_scores,
    update_weights,
)

__all__ = [
    "ADAPTIVE",
    "STRATEGIES",
    "ProbeStats",
    "initial_weights",
    "layered_redundancy_scores",
    "probe_model",
    "redundancy_scores",
    "reference_loss_scores",
    "router_kind",
    "select_layers",
    "update_weights",
]
