"""Expert pruning, dynamic skipping, layer drop and block drop (core: no Lightning).

* :mod:`~moe_app.core.models.views`: one view over every MoE layer kind (moe-app, PESC, stock HF).
* :mod:`~moe_app.core.pruning.enumerate`: Lu et al. 2024 (arXiv 2402.14800) enumeration, vectorised.
* :mod:`~moe_app.core.pruning.saliency`: frequency, expert drop (He et al. 2024), REAP (arXiv 2510.13999).
* :mod:`~moe_app.core.pruning.merge`: HC-SMoE expert merging (hierarchical clustering, arXiv 2410.08589).
* :mod:`~moe_app.core.pruning.experts`: whole-model pruning (layer-wise / progressive) and config updates.
* :mod:`~moe_app.core.pruning.skipping`: dynamic skipping betas (median ``w2 / w1``) and skip rates.
* :mod:`~moe_app.core.pruning.drop`: layer drop and block drop (He et al. 2024, arXiv 2406.02500).
* :mod:`~moe_app.core.pruning.calibration`: calibration data and activation capture.
"""

from moe_app.core.models.views import MoeLayerView, model_kind, moe_layer_views, view_of
from moe_app.core.pruning.calibration import CalibrationConfig, calibration_batches, eval_loss
from moe_app.core.pruning.drop import (
    block_drop_scores,
    drop_blocks,
    drop_mlp_layers,
    layer_drop_scores,
    replace_dropped_mlps,
)
from moe_app.core.pruning.enumerate import EnumerationConfig, search_layer, subset_losses, subset_losses_naive
from moe_app.core.pruning.experts import (
    PRUNE_METHODS,
    ExpertPruneConfig,
    PruneReport,
    keep_experts,
    prune_experts,
)
from moe_app.core.pruning.merge import MergeConfig, agglomerative_clusters, merge_clusters, merge_layer
from moe_app.core.pruning.saliency import SALIENCY_METHODS, saliency_scores
from moe_app.core.pruning.skipping import apply_skipping, calibrate_skipping, skip_rates

__all__ = [
    "PRUNE_METHODS",
    "SALIENCY_METHODS",
    "CalibrationConfig",
    "EnumerationConfig",
    "ExpertPruneConfig",
    "MergeConfig",
    "MoeLayerView",
    "PruneReport",
    "agglomerative_clusters",
    "apply_skipping",
    "block_drop_scores",
    "calibrate_skipping",
    "calibration_batches",
    "drop_blocks",
    "drop_mlp_layers",
    "eval_loss",
    "keep_experts",
    "layer_drop_scores",
    "merge_clusters",
    "merge_layer",
    "model_kind",
    "moe_layer_views",
    "prune_experts",
    "replace_dropped_mlps",
    "saliency_scores",
    "search_layer",
    "skip_rates",
    "subset_losses",
    "subset_losses_naive",
    "view_of",
]
