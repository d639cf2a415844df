"""Expert pruning of a whole model: score every MoE layer on calibration data, slice, update the config.

Orchestrates the per-layer algorithms (:mod:`~moe_app.core.pruning.enumerate` for Lu et al. 2024,
arXiv 2402.14800; :mod:`~moe_app.core.pruning.saliency` for frequency, He et al.'s expert drop and REAP;
:mod:`~moe_app.core.pruning.merge` for HC-SMoE merging, arXiv 2410.08589, which merges clusters of
experts into ``r`` instead of deleting experts) over the layers of a moe-app model or a stock transformers MoE:

* **layer-wise** (default): one calibration pass records every MoE block's input ``X`` and output
  ``Z``; each layer is searched independently.
* **progressive**: layers are pruned in order; before searching layer ``l`` its input ``X`` is
  recomputed through the layers already pruned (so the search sees the inputs the pruned model
  will really produce), while the target ``Z`` stays the *original* model's output.

Writing the result is :mod:`~moe_app.checkpoint.pruning`'s job; this module changes the model in
memory only: experts and router rows are sliced (:meth:`MoeLayerView.keep`), and the model config
(stock HF: ``num_local_experts`` / ``num_experts``) or the moe-app spec (``pruning`` slot; the
per-layer ``num_experts`` is read back from the modules when the checkpoint is saved) is updated.
Stock HF configs hold one expert count for all layers, so pruning them must keep the same number
in every layer (global expert drop is refused there).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moe_app.core.models.views import MoeLayerView, model_kind, moe_layer_views
from moe_app.core.pruning.calibration import (
    capture_block_inputs,
    capture_block_io,
    normalize_batches,
    num_tokens,
)
from moe_app.core.pruning.enumerate import EnumerationConfig, search_layer, subset_losses
from moe_app.core.pruning.merge import MergeConfig, check_mergeable, merge_layer
from moe_app.core.pruning.saliency import SALIENCY_METHODS, global_keep_counts, saliency_scores, top_experts
from moe_app.core.spec import spec_of
from moe_app.errors import ConfigError, UnsupportedModelError

logger = logging.getLogger("moe_app.core.pruning")

PRUNE_METHODS = ("enumerate", *SALIENCY_METHODS, "merge")


@dataclass
class ExpertPruneConfig:
    """What to prune and how."""

    keep: int
    """Experts kept per MoE layer (``r``); must satisfy ``top_k <= keep < num_experts``."""
    method: str = "enumerate"
    """``enumerate`` (Lu et al. 2024), ``frequency``, ``reap`` (arXiv 2510.13999), ``expert_drop``
    (mean routing probability, He et al. 2024) or ``merge`` (HC-SMoE, arXiv 2410.08589: cluster the
    experts into ``keep`` groups and merge each group; ``keep`` may then be below ``top_k``, which is
    lowered to ``keep``)."""
    progressive: bool = False
    """Recompute each layer's input through the layers already pruned (keeps the original target)."""
    scope: str = "layer"
    """``layer``: every layer keeps ``keep``; ``global`` (``expert_drop`` only, moe-app checkpoints):
    ``keep * L`` experts in total, by score across layers."""
    enumeration: EnumerationConfig = field(default_factory=EnumerationConfig)
    """Subset search settings (limits, sampling fallback, chunking)."""
    merge: MergeConfig = field(default_factory=MergeConfig)
    """HC-SMoE settings (``method="merge"`` only): distance and merged router rows."""

    def __post_init__(self) -> None:
        if isinstance(self.enumeration, dict):
            self.enumeration = EnumerationConfig(**self.enumeration)
        if isinstance(self.merge, dict):
            self.merge = MergeConfig(**self.merge)
        if self.keep < 1:
            raise ConfigError(
                f"keep must be >= 1, got {self.keep}", where="--keep", fix="keep e.g. 4 of 8 experts"
            )
        if self.method not in PRUNE_METHODS:
            raise ConfigError(
                f"unknown pruning method {self.method!r}",
                where="--method",
                fix=f"use one of {', '.join(PRUNE_METHODS)}",
            )
        if self.scope not in ("layer", "global"):
            raise ConfigError(f"unknown scope {self.scope!r}", fix="use layer or global")
        if self.scope == "global" and self.method != "expert_drop":
            raise ConfigError(
                "scope=global is defined for expert_drop only (He et al. 2024)",
                fix="use --method expert_drop with global scope, or scope=layer",
            )


@dataclass
class LayerPruneResult:
    """One layer's outcome."""

    layer: int
    """Decoder layer index."""
    num_experts: int
    """Experts before pruning."""
    kept: list[int]
    """Kept experts, in the layer's numbering before pruning."""
    loss: float
    """Reconstruction loss ``sum_b ||Z_b - Z'_b||_F`` of the kept set on the calibration data."""
    how: str
    """``enumerate``, ``sample`` or the saliency method that chose ``kept``."""
    evaluated: int = 1
    """Subsets scored."""
    clusters: list[list[int]] | None = None
    """``merge`` only: the experts merged into each kept one (old numbering, in the order of ``kept``)."""


@dataclass
class PruneReport:
    """What ``prune_experts`` did (goes into ``moe_app.json``'s ``pruning`` slot and the logs)."""

    method: str
    keep: int
    progressive: bool
    scope: str
    calibration_tokens: int
    layers: list[LayerPruneResult]

    @property
    def total_loss(self) -> float:
        return float(sum(r.loss for r in self.layers))

    def to_dict(self) -> dict[str, Any]:
        out = {
            "method": self.method,
            "keep": self.keep,
            "progressive": self.progressive,
            "scope": self.scope,
            "calibration_tokens": self.calibration_tokens,
            "kept": {str(r.layer): r.kept for r in self.layers},
            "num_experts_before": {str(r.layer): r.num_experts for r in self.layers},
            "reconstruction_loss": {str(r.layer): r.loss for r in self.layers},
            "search": {str(r.layer): {"how": r.how, "evaluated": r.evaluated} for r in self.layers},
        }
        if any(r.clusters is not None for r in self.layers):
            out["clusters"] = {str(r.layer): r.clusters for r in self.layers}
        return out


def check_prunable(
    model: nn.Module, keep: int, where: str = "model", method: str | None = None
) -> list[tuple[int, MoeLayerView]]:
    """The model's MoE views, or a ``MoeAppError`` when ``keep`` cannot be applied to them.

    ``method="merge"`` accepts ``keep < top_k`` (merging lowers ``top_k``) and refuses layers whose
    experts cannot be merged by weight averaging.
    """
    views = moe_layer_views(model)
    if not views:
        raise UnsupportedModelError(
            "the model has no MoE layers to prune (a dense checkpoint?)",
            where=where,
            fix="prune an MoE checkpoint (moe-app upcycle output, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)",
        )
    for lay, view in views:
        if keep >= view.num_experts:
            raise ConfigError(
                f"keep={keep} but layer {lay} has only {view.num_experts} experts: nothing to prune",
                where="--keep",
                fix=f"choose keep < {view.num_experts}",
            )
        if method == "merge":
            check_mergeable(view, f"{where}, layer {lay}")
        elif keep < view.top_k:
            raise ConfigError(
                f"keep={keep} is below layer {lay}'s top_k={view.top_k}: tokens could not route",
                where="--keep",
                fix=f"choose keep >= {view.top_k}",
            )
    return views


def keep_experts(model: nn.Module, kept: dict[int, Sequence[int]]) -> nn.Module:
    """Slice every listed layer to its kept experts in place and update the config of a stock HF model."""
    views = dict(moe_layer_views(model))
    for lay, idx in kept.items():
        views[lay].keep(list(idx))
    sync_expert_count(model)
    return model


def sync_expert_count(model: nn.Module) -> None:
    """Write the (uniform) expert count of a stock HF MoE into its config; refuse non-uniform counts."""
    if model_kind(model) != "hf":
        return
    counts = {view.num_experts for _, view in moe_layer_views(model)}
    if len(counts) != 1:
        raise UnsupportedModelError(
            f"stock transformers configs hold one expert count for all layers, got {sorted(counts)}",
            fix="keep the same number of experts in every layer (scope=layer), or prune a moe-app checkpoint",
        )
    n = counts.pop()
    cfg = model.config
    for key in ("num_local_experts", "num_experts"):
        if hasattr(cfg, key):
            setattr(cfg, key, n)
    top_ks = {view.top_k for _, view in moe_layer_views(model)}
    if len(top_ks) == 1 and hasattr(cfg, "num_experts_per_tok"):
        cfg.num_experts_per_tok = top_ks.pop()  # lowered by merging below top_k


@torch.no_grad()
def reconstruction_loss(
    view: MoeLayerView, xs: Sequence[Tensor], zs: Sequence[Tensor], kept: Sequence[int]
) -> float:
    """``sum_b ||Z_b - Z'_b||_F`` with only ``kept`` experts (float64)."""
    return float(subset_losses(view, xs, zs, torch.tensor([list(kept)]))[0])


@torch.no_grad()
def prune_experts(model: nn.Module, batches: Sequence[Any], cfg: ExpertPruneConfig) -> PruneReport:
    """Prune every MoE layer of ``model`` to ``cfg.keep`` experts in place; return the report."""
    batches = normalize_batches(batches)
    views = check_prunable(model, cfg.keep, method=cfg.method)
    was_training = model.training
    model.eval()
    try:
        modules = {lay: view.module for lay, view in views}
        io = capture_block_io(model, modules, batches)  # original X and Z of every MoE block
        counts = _keep_counts(views, io, cfg)
        results = []
        for lay, view in views:
            xs, zs = io[lay]
            if cfg.progressive and results:
                xs = capture_block_inputs(model, view.module, batches)  # through the pruned layers
            results.append(prune_layer(lay, view, xs, zs, counts[lay], cfg))
        sync_expert_count(model)
    finally:
        model.train(was_training)
    report = PruneReport(cfg.method, cfg.keep, cfg.progressive, cfg.scope, num_tokens(batches), results)
    record_pruning(model, report, cfg)
    return report


@torch.no_grad()
def prune_layer(
    lay: int, view: MoeLayerView, xs: Sequence[Tensor], zs: Sequence[Tensor], r: int, cfg: ExpertPruneConfig
) -> LayerPruneResult:
    """Choose ``r`` experts of one layer on its calibration activations and apply it in place.

    The per-layer step of Lu et al.'s layer-by-layer pruning: ``xs`` are the block inputs (through
    the layers already pruned when progressive), ``zs`` the original block outputs, one ``(T_b, d)``
    tensor per batch. Shared by :func:`prune_experts` (whole model in memory) and the layer-streamed
    pruning of checkpoints larger than memory, so both choose the same experts.
    """
    where = f"layer {lay}"
    if cfg.method == "merge":
        num_e = view.num_experts
        kept, clusters = merge_layer(view, xs, r, cfg.merge)
        # the merged layer with all its experts: the same loss as the other methods report
        loss = reconstruction_loss(view, xs, zs, range(view.num_experts))
        how = f"merge ({cfg.merge.distance}, router {cfg.merge.router})"
        logger.info(
            "%s: merged %d experts into clusters %s (%s, loss %.6g)", where, num_e, clusters, how, loss
        )
        return LayerPruneResult(lay, num_e, kept, loss, how, 1, clusters)
    if cfg.method == "enumerate":
        choice = search_layer(view, xs, zs, r, cfg.enumeration, where=where)
        kept, loss, how, evaluated = choice.kept, choice.loss, choice.how, choice.evaluated
    else:
        kept = top_experts(saliency_scores(view, xs, cfg.method), r)
        loss, how, evaluated = reconstruction_loss(view, xs, zs, kept), cfg.method, 1
    result = LayerPruneResult(lay, view.num_experts, kept, loss, how, evaluated)
    logger.info("%s: kept experts %s of %d (%s, loss %.6g)", where, kept, view.num_experts, how, loss)
    view.keep(kept)
    return result


def _keep_counts(views: list[tuple[int, MoeLayerView]], io: dict, cfg: ExpertPruneConfig) -> dict[int, int]:
    if cfg.scope == "layer":
        return {lay: cfg.keep for lay, _ in views}
    check_global_scope(views)
    scores = {lay: saliency_scores(view, io[lay][0], "expert_drop") for lay, view in views}
    return global_keep_counts(scores, cfg.keep, {lay: view.top_k for lay, view in views})


def check_global_scope(views: list[tuple[int, MoeLayerView]]) -> None:
    """Refuse global expert drop where the output cannot hold per-layer expert counts."""
    if model_kind_of_views(views) == "hf":
        raise UnsupportedModelError(
            "global expert drop keeps different counts per layer, which stock transformers configs cannot hold",
            fix="use scope=layer for Mixtral/Qwen/OLMoE checkpoints",
        )


def model_kind_of_views(views: list[tuple[int, MoeLayerView]]) -> str:
    return "hf" if all(v.kind == "hf" for _, v in views) else "moe-app"


def record_pruning(model: nn.Module, report: PruneReport, cfg: ExpertPruneConfig) -> None:
    """Record the pruning in the moe-app spec (``pruning.experts``, appended to its history)."""
    spec = spec_of(model)
    if spec is None:
        return
    slot = dict(spec.pruning or {})
    entry = report.to_dict()
    entry["enumeration"] = asdict(cfg.enumeration) if cfg.method == "enumerate" else None
    if cfg.method == "merge":
        entry["merge"] = asdict(cfg.merge)
    slot.setdefault("experts", [])
    slot["experts"] = [*slot["experts"], entry]
    spec.pruning = slot
    adapters = spec.adapters
    if (
        isinstance(adapters, dict)
        and isinstance(adapters.get("config"), dict)
        and "num_experts" in adapters["config"]
    ):
        counts = {v.num_experts for _, v in moe_layer_views(model)}
        if len(counts) != 1:
            raise UnsupportedModelError(
                "PESC checkpoints hold one expert count for all layers", fix="use scope=layer for PESC models"
            )
        adapters["config"]["num_experts"] = counts.pop()
        top_ks = {v.top_k for _, v in moe_layer_views(model)}
        if "top_k" in adapters["config"] and len(top_ks) == 1:
            adapters["config"]["top_k"] = top_ks.pop()


__all__ = [
    "PRUNE_METHODS",
    "ExpertPruneConfig",
    "LayerPruneResult",
    "PruneReport",
    "check_global_scope",
    "check_prunable",
    "keep_experts",
    "prune_experts",
    "prune_layer",
    "reconstruction_loss",
    "record_pruning",
    "sync_expert_count",
]
