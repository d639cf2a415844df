"""Expert slimming: prune the weights *inside* every expert from calibration activations.

He et al. 2024 ("Demystifying the Compression of Mixture-of-Experts Through a Unified Framework",
arXiv 2406.02500) split MoE compression into *expert trimming* (remove experts, MoE sublayers or
whole blocks: :mod:`~moe_app.core.pruning.experts`, :mod:`~moe_app.core.pruning.drop`) and *expert
slimming* (compress each expert's weights: unstructured / semi-structured pruning, quantisation)
and find the two combine. This module is the pruning half of slimming, with three scores:

* ``wanda`` (Sun et al. 2023, arXiv 2306.11695): score ``S_ij = |W_ij| * ||X_j||_2``, ``X_j`` the
  j-th input feature over the calibration tokens that reach the weight; the lowest ``s`` fraction
  of every output row is zeroed (per-output comparison groups, the paper's choice for LLMs). No
  weight update.
* ``2:4`` (semi-structured, the NVIDIA sparse tensor-core pattern): the same Wanda scores, keeping
  the 2 best of every 4 consecutive inputs of each row (sparsity exactly 0.5).
* ``sparsegpt`` (Frantar & Alistarh 2023, arXiv 2301.00774): the OBS reconstruction. With
  ``H = X^T X + lambda I`` (``lambda`` 1% of the mean diagonal) and ``U`` the upper Cholesky factor
  of ``H^-1``, the columns are visited left to right in blocks of 128; inside a block each pruned
  weight's error ``(w - 0) / U_jj`` is spread onto the not-yet-visited columns through row ``j`` of
  ``U``, and the block's accumulated error onto the later blocks at the end. The mask of a block is
  chosen from ``w^2 / U_jj^2`` *per row* (every row ends with exactly ``floor(s * in)`` zeros, as
  Wanda's rows do; the paper picks it over the whole block), so equal sparsity means equal per row.

What "the inputs an expert receives" means for an MoE (ALGORITHMS.md section 8b): for ``W_gate`` /
``W_up`` the MoE block's inputs of the tokens the router sends to that expert (eval routing, top-k
of the layer's rule), for ``W_down`` the expert's own intermediate activations
``act(W_gate x) * (W_up x)`` on those tokens, computed with the *already slimmed* gate/up (so the
down projection compensates the error of the first, as SparseGPT's sequential order does). Layers
are slimmed in order and each layer's inputs are recomputed through the layers already slimmed
(both papers' sequential calibration). An expert no calibration token reached falls back to
magnitude pruning (``||X_j|| = 1``, ``H = I``), and the report says which.

Only the routed experts are slimmed (the layout every supported block shares: fused
``gate_up_proj (E, 2F, d)`` and ``down_proj (E, d, F)``); shared experts, attention and routers are
left dense. PESC / MixLoRA blocks are refused (merge them into full experts first). The zeros are
stored as zeros: a dense checkpoint does not get smaller on disk from unstructured sparsity; the
memory saving needs sparse kernels (2:4) or quantisation (:mod:`moe_app.checkpoint.quantized`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moe_app.core.models.views import MoeLayerView, moe_layer_views
from moe_app.core.pruning.calibration import capture_block_inputs, normalize_batches, num_tokens
from moe_app.core.utils.progress import progress
from moe_app.errors import ConfigError, UnsupportedModelError

logger = logging.getLogger("moe_app.core.pruning")

SLIM_METHODS = ("wanda", "sparsegpt", "2:4")


@dataclass
class SlimConfig:
    """How to slim every expert (He et al. 2024's expert slimming, pruning half)."""

    method: str = "wanda"
    """``wanda`` (``|W| * ||X||``, unstructured), ``sparsegpt`` (OBS reconstruction, unstructured) or
    ``2:4`` (Wanda scores, 2 of every 4 consecutive inputs kept)."""
    sparsity: float | None = None
    """Fraction of each expert weight row set to zero, ``0 < s < 1`` (required for wanda and
    sparsegpt; ``2:4`` fixes it at 0.5 and refuses a value)."""
    blocksize: int = 128
    """SparseGPT: columns per lazy-update block (the paper's 128)."""
    damp: float = 0.01
    """SparseGPT: ``lambda`` as a fraction of the mean diagonal of ``X^T X`` (the paper's 1%)."""

    def __post_init__(self) -> None:
        if self.method not in SLIM_METHODS:
            raise ConfigError(
                f"unknown slimming method {self.method!r}",
                where="--slim",
                fix=f"use one of {', '.join(SLIM_METHODS)}",
            )
        if self.method == "2:4":
            if self.sparsity is not None:
                raise ConfigError(
                    "--slim 2:4 fixes the sparsity at 0.5 (2 of every 4 weights)",
                    where="--sparsity",
                    fix="drop --sparsity, or use --slim wanda|sparsegpt --sparsity S",
                )
        elif self.sparsity is None:
            raise ConfigError(
                f"--slim {self.method} needs the fraction of weights to prune",
                where="--sparsity",
                fix="pass e.g. --sparsity 0.5",
            )
        elif not 0.0 < float(self.sparsity) < 1.0:
            raise ConfigError(
                f"sparsity must be strictly between 0 and 1, got {self.sparsity}",
                where="--sparsity",
                fix="pass e.g. --sparsity 0.5",
            )
        if self.blocksize < 1:
            raise ConfigError(f"blocksize must be >= 1, got {self.blocksize}", fix="use 128")
        if self.damp < 0:
            raise ConfigError(f"damp must be >= 0, got {self.damp}", fix="use 0.01")

    @property
    def target_sparsity(self) -> float:
        """The fraction of zeros each slimmed row ends with (0.5 for 2:4)."""
        return 0.5 if self.method == "2:4" else float(self.sparsity)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- one matrix
def wanda_scores(weight: Tensor, col_norms: Tensor) -> Tensor:
    """``|W_ij| * ||X_j||_2`` for ``weight (out, in)`` and input-feature norms ``col_norms (in,)``."""
    return weight.abs() * col_norms.to(weight.dtype).unsqueeze(0)  # (out, in)


def row_prune_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Boolean mask ``(out, in)`` of the ``floor(sparsity * in)`` lowest scores of every row (True = prune)."""
    k = int(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, True)
    return mask


def nm_prune_mask(scores: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Boolean mask ``(out, in)`` pruning the ``m - n`` lowest of every ``m`` consecutive inputs per row."""
    rows, cols = scores.shape
    if cols % m:
        raise UnsupportedModelError(
            f"{n}:{m} sparsity needs the input size to be a multiple of {m}, got {cols}",
            fix="use --slim wanda --sparsity 0.5 (unstructured) for this model",
        )
    groups = scores.reshape(rows, cols // m, m)  # (out, in/m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(m - n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def wanda_prune(
    weight: Tensor, col_norms: Tensor, sparsity: float | None, nm: tuple[int, int] | None = None
) -> Tensor:
    """Wanda: ``weight`` with the lowest ``|W| * ||X||`` zeroed, per row (``sparsity``) or ``nm`` (``(2, 4)``)."""
    scores = wanda_scores(weight.float(), col_norms.float())
    mask = nm_prune_mask(scores, *nm) if nm is not None else row_prune_mask(scores, float(sparsity or 0.0))
    return weight.masked_fill(mask, 0)


def sparsegpt_prune(
    weight: Tensor, hessian: Tensor, sparsity: float, blocksize: int = 128, damp: float = 0.01
) -> Tensor:
    """SparseGPT (Frantar & Alistarh 2023) on ``weight (out, in)`` with ``hessian = X^T X (in, in)``.

    Computed in float64; returns the pruned and OBS-updated weight (float32, every row with ``floor(sparsity * in)``
    zeros; see the module docstring for the per-row mask choice).
    """
    # float64: H of correlated, outlier-heavy activations is badly conditioned, and the factor of
    # H^-1 is what every update is made of; on the CPU the doubled cost is small next to the capture.
    w = weight.detach().double().clone()  # (out, in)
    h = hessian.detach().double().clone()  # (in, in)
    cols = w.shape[1]
    dead = torch.diagonal(h) == 0  # inputs no token ever set: nothing to reconstruct, weight irrelevant
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    diag = torch.arange(cols)
    h[diag, diag] += damp * torch.diagonal(h).mean()
    # U: upper Cholesky factor of H^-1 (H^-1 = U^T U); row j of U is the OBS update of column j
    # given that columns < j are already fixed.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # (in, in)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()  # (out, B)
        u1 = u[i1:i2, i1:i2]  # (B, B)
        err1 = torch.zeros_like(w1)  # (out, B)
        # cumulative floor keeps every row at exactly floor(sparsity * in) zeros over all blocks
        k = int(sparsity * i2) - int(sparsity * i1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if k > 0:
            score = w1.pow(2) / torch.diagonal(u1).pow(2).unsqueeze(0)  # (out, B)
            mask1.scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
        for j in range(i2 - i1):
            col = w1[:, j]
            q = col.masked_fill(mask1[:, j], 0.0)  # (out,)
            e = (col - q) / u1[j, j]  # (out,)
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            w1[:, j] = q  # exactly zero where pruned (no round-off left behind)
            err1[:, j] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w.float()


def prune_matrix(weight: Tensor, x: Tensor | None, cfg: SlimConfig) -> Tensor:
    """Prune one linear ``weight (out, in)`` from its inputs ``x (T, in)`` (``None``: magnitude)."""
    if cfg.method == "sparsegpt":
        cols = weight.shape[1]
        if x is None:
            h = torch.eye(cols, dtype=torch.float64)
        else:
            xf = x.double()
            h = xf.T @ xf  # (in, in)
        return sparsegpt_prune(weight, h, cfg.target_sparsity, cfg.blocksize, cfg.damp)
    norms = torch.ones(weight.shape[1]) if x is None else x.float().norm(dim=0)  # (in,)
    nm = (2, 4) if cfg.method == "2:4" else None
    return wanda_prune(weight, norms, cfg.sparsity, nm)


# ---------------------------------------------------------------------------------------- a model
@dataclass
class LayerSlimResult:
    """One MoE layer's outcome."""

    layer: int
    tokens: list[int]
    """Calibration tokens routed to each expert (the rows its gate/up statistics came from)."""
    magnitude_fallback: list[int] = field(default_factory=list)
    """Experts no token reached: pruned by magnitude."""
    sparsity: float = 0.0
    """Fraction of zeros in the layer's routed-expert weights afterwards."""
    skipped: str | None = None
    """Why the layer was left as it is (e.g. a dropped sublayer that receives only zeros)."""


@dataclass
class SlimReport:
    """What :func:`slim_experts` did (goes into the prune report and lineage)."""

    method: str
    sparsity: float
    calibration_tokens: int
    layers: list[LayerSlimResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "sparsity": self.sparsity,
            "calibration_tokens": self.calibration_tokens,
            "layers": {
                str(r.layer): {
                    "tokens_per_expert": r.tokens,
                    "magnitude_fallback": r.magnitude_fallback,
                    "sparsity": r.sparsity,
                    **({"skipped": r.skipped} if r.skipped else {}),
                }
                for r in self.layers
            },
            "expert_sparsity": _mean_sparsity(self.layers),
        }


def _mean_sparsity(layers: Sequence[LayerSlimResult]) -> float:
    """Mean zero fraction over the slimmed layers (skipped ones excluded)."""
    done = [r.sparsity for r in layers if r.skipped is None]
    return float(sum(done) / len(done)) if done else 0.0


def check_slimmable(model: nn.Module, where: str = "--slim", cfg: SlimConfig | None = None) -> None:
    """Refuse models whose experts are not full SwiGLU experts (PESC adapters, MixLoRA deltas), and
    2:4 on experts whose input sizes are not multiples of 4 -- before any calibration work."""
    views = moe_layer_views(model)
    odd = sorted({v.kind for _, v in views if v.kind not in ("moe-app", "hf")})
    if odd:
        raise UnsupportedModelError(
            f"expert slimming needs full SwiGLU experts; this model's MoE layers are {', '.join(odd)} blocks "
            "(adapters / LoRA deltas on a shared FFN)",
            where=where,
            fix="merge the experts first (moe_app.core.pesc.merge.merge_pesc) and slim the merged model",
        )
    if cfg is not None and cfg.method == "2:4":
        for layer, view in views:
            ex = _experts(view)
            d, f = ex.gate_up_proj.shape[-1], ex.down_proj.shape[-1]
            if d % 4 or f % 4:
                raise UnsupportedModelError(
                    f"2:4 sparsity needs expert input sizes divisible by 4; layer {layer} has hidden {d}, "
                    f"intermediate {f}",
                    where=where,
                    fix="use --slim wanda --sparsity 0.5 (unstructured) for this model",
                )


def _experts(view: MoeLayerView) -> nn.Module:
    return view.module.experts  # moe-app SwiGLUExperts and stock HF experts share the fused layout


def expert_weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries over every routed expert's ``gate_up_proj`` and ``down_proj``."""
    zeros, total = _zeros_and_size(
        [
            p
            for _, view in moe_layer_views(model)
            for p in (_experts(view).gate_up_proj, _experts(view).down_proj)
        ]
    )
    return zeros / max(total, 1)


def _zeros_and_size(tensors: Sequence[Tensor]) -> tuple[int, int]:
    """Exact zeros and elements in ``tensors``. ``count_nonzero`` reads each tensor once; ``(p == 0).sum()``
    would widen a bool copy to int64 first (8 bytes per weight: 151 MB for the stacked gate/up of
    6 experts at hidden 1024, width 1536)."""
    total = sum(t.numel() for t in tensors)
    return total - sum(int(torch.count_nonzero(t)) for t in tensors), total


@torch.no_grad()
def slim_layer(view: MoeLayerView, x: Tensor, cfg: SlimConfig, layer: int = -1) -> LayerSlimResult:
    """Slim every routed expert of one MoE layer in place, from the block's inputs ``x (T, d)``."""
    ex = _experts(view)
    if x.numel() == 0 or not bool(x.abs().amax() > 0):
        return LayerSlimResult(layer=layer, tokens=[0] * view.num_experts, skipped="no non-zero input")
    _, idx = view.routing(view.router_logits(x.to(view.router_weight.dtype)))  # (T, k)
    inter = ex.down_proj.shape[-1]
    tokens, fallback = [], []
    for e in range(view.num_experts):
        rows = (idx == e).any(dim=-1)  # (T,)
        xe = x[rows].float()  # (T_e, d)
        tokens.append(int(rows.sum()))
        if tokens[-1] == 0:
            fallback.append(e)
        gate_up = prune_matrix(ex.gate_up_proj[e], xe if tokens[-1] else None, cfg)  # (2F, d)
        ex.gate_up_proj[e].copy_(gate_up.to(ex.gate_up_proj.dtype))
        h = None
        if tokens[-1]:
            gu = xe @ ex.gate_up_proj[e].float().T  # (T_e, 2F), the slimmed gate/up
            h = ex.act_fn(gu[:, :inter]) * gu[:, inter:]  # (T_e, F)
        down = prune_matrix(ex.down_proj[e], h, cfg)  # (d, F)
        ex.down_proj[e].copy_(down.to(ex.down_proj.dtype))
    zeros, total = _zeros_and_size((ex.gate_up_proj, ex.down_proj))
    if fallback:
        logger.warning(
            "slim: layer %d experts %s saw no calibration token; pruned by magnitude", layer, fallback
        )
    return LayerSlimResult(layer=layer, tokens=tokens, magnitude_fallback=fallback, sparsity=zeros / total)


@torch.no_grad()
def slim_experts(model: nn.Module, batches: Sequence[Any], cfg: SlimConfig) -> SlimReport:
    """Slim every routed expert of ``model`` in place (layers in order, inputs through the slimmed ones)."""
    check_slimmable(model, cfg=cfg)
    batches = normalize_batches(batches)
    was_training = model.training
    model.eval()
    results = []
    try:
        views = moe_layer_views(model)
        for layer, view in progress(views, desc=f"slim ({cfg.method})", total=len(views), unit="layer"):
            xs = capture_block_inputs(model, view.module, batches)  # recomputed through slimmed layers
            x = torch.cat(xs) if xs else torch.empty(0)  # (T, d)
            res = slim_layer(view, x, cfg, layer)
            results.append(res)
            logger.info(
                "slim: layer %d %s -> expert sparsity %.3f%s",
                layer,
                cfg.method,
                res.sparsity,
                f" (skipped: {res.skipped})" if res.skipped else "",
            )
    finally:
        model.train(was_training)
    return SlimReport(
        method=cfg.method,
        sparsity=cfg.target_sparsity,
        calibration_tokens=num_tokens(batches),
        layers=results,
    )


__all__ = [
    "SLIM_METHODS",
    "LayerSlimResult",
    "SlimConfig",
    "SlimReport",
    "check_slimmable",
    "expert_weight_sparsity",
    "nm_prune_mask",
    "prune_matrix",
    "row_prune_mask",
    "slim_experts",
    "slim_layer",
    "sparsegpt_prune",
    "wanda_prune",
    "wanda_scores",
]
