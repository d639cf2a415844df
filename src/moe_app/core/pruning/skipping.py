"""Dynamic expert skipping: drop a token's second expert when its weight is small relative to the first.

Lu et al. 2024 (arXiv 2402.14800), section 3.2. For top-2 routing with weights ``w_1 >= w_2``, the
second expert is skipped at inference when ``w_2 < beta * w_1`` and the kept weight renormalised
(under the layer's rule). ``beta`` is calibrated per layer as the **median** over calibration tokens
of ``w_2 / w_1``, so by construction about half of the calibration tokens skip their second expert
(the paper reports ~1.2-1.3x decoding speed-up with little loss).

The threshold lives in the moe-app router (``TopKRouter.skip_beta``, applied in eval mode only); it
is stored in ``moe_app.json``'s ``skipping`` slot ``{layer: beta}`` (read back from the routers when
the checkpoint is saved) and re-applied by ``moe_app.load_model``.

Stock transformers MoE routers have no such threshold, so a Mixtral / Qwen-MoE / OLMoE checkpoint
cannot carry skipping: :func:`apply_skipping` refuses with that reason (the betas can still be
calibrated and reported). Writing a stock checkpoint that silently ignores the thresholds, or a
custom-code checkpoint, would both break the "writes the same kind of checkpoint it read" contract.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moe_app.core.models.views import MoeLayerView, moe_layer_views
from moe_app.core.pruning.calibration import capture_block_io, normalize_batches, run_model
from moe_app.core.spec import spec_of
from moe_app.errors import UnsupportedModelError

logger = logging.getLogger("moe_app.core.pruning")


@torch.no_grad()
def weight_ratios(view: MoeLayerView, xs: Sequence[Tensor]) -> Tensor:
    """``w_2 / w_1`` per token (no skipping applied): ``(T,)`` float32. The rule does not change it."""
    dev, dtype = view.router_weight.device, view.router_weight.dtype
    out = []
    for x in xs:
        probs = view.router_logits(x.to(dev, dtype)).softmax(dim=-1)  # (T, E)
        top = probs.topk(2, dim=-1).values  # (T, 2)
        out.append((top[:, 1] / top[:, 0].clamp_min(torch.finfo(top.dtype).tiny)).cpu())
    return torch.cat(out)


@torch.no_grad()
def calibrate_skipping(model: nn.Module, batches: Sequence[Any]) -> dict[int, float]:
    """``{layer: beta}``: the median ``w_2 / w_1`` of every MoE layer with ``top_k >= 2``."""
    batches = normalize_batches(batches)
    views = [(lay, v) for lay, v in moe_layer_views(model) if v.top_k >= 2]
    if not views:
        raise UnsupportedModelError(
            "no MoE layer with top_k >= 2: there is no second expert to skip",
            fix="dynamic skipping applies to top-2 (or larger) routing",
        )
    was_training = model.training
    model.eval()
    saved = {lay: v.skip_beta for lay, v in views}
    try:
        for _, v in views:  # calibrate on the unskipped routing
            if v.skip_beta is not None:
                v.skip_beta = None
        io = capture_block_io(model, {lay: v.module for lay, v in views}, batches, outputs=False)
    finally:
        for lay, v in views:
            if saved[lay] is not None:
                v.skip_beta = saved[lay]
        model.train(was_training)
    return {lay: float(weight_ratios(v, io[lay][0]).median()) for lay, v in views}


def apply_skipping(model: nn.Module, betas: dict[int, float | None]) -> nn.Module:
    """Set the routers' thresholds (``None`` disables); refuses on stock HF MoE blocks."""
    views = dict(moe_layer_views(model))
    for lay, beta in betas.items():
        view = views.get(lay)
        if view is None:
            raise UnsupportedModelError(
                f"layer {lay} has no MoE block to skip experts in", fix="check the layer index"
            )
        view.skip_beta = beta  # the HF view raises with the reason
    spec = spec_of(model)
    if spec is not None:
        spec.skipping = {lay: float(b) for lay, b in betas.items() if b is not None}
    return model


@torch.no_grad()
def skip_rates(model: nn.Module, batches: Sequence[Any]) -> dict[str, float]:
    """Measured fraction of tokens whose 2nd expert is skipped, per layer (``"L3"``) and ``"all"``.

    Runs the model in eval mode (where skipping is active) and reads each block's ``last_routing``.
    """
    batches = normalize_batches(batches)
    views = [
        (lay, v) for lay, v in moe_layer_views(model) if v.top_k >= 2 and hasattr(v.module, "last_routing")
    ]
    skipped = dict.fromkeys((lay for lay, _ in views), 0)
    total = 0
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            mask = b["attention_mask"].reshape(-1).bool()  # (B*S,)
            run_model(model, [b])
            total += int(mask.sum())
            for lay, v in views:
                idx = v.module.last_routing.indices.cpu()  # (B*S, k)
                skipped[lay] += int((idx[mask][:, 1] < 0).sum())
    finally:
        model.train(was_training)
    rates = {f"L{lay}": skipped[lay] / max(total, 1) for lay, _ in views}
    rates["all"] = sum(skipped.values()) / max(total * len(views), 1)
    return rates


__all__ = ["apply_skipping", "calibrate_skipping", "skip_rates", "weight_ratios"]
