"""Layer drop and block drop (He et al. 2024, "Demystifying the Compression of Mixture-of-Experts
Through a Unified Framework", arXiv 2406.02500).

* **Layer drop** removes whole MoE sublayers. Score of the MoE sublayer of decoder layer ``l``:
  ``mean_t cos(h_t, h_t + MoE(LN(h_t)))`` with ``h`` the residual stream entering the sublayer;
  the most similar sublayers change the stream least and are dropped.
* **Block drop** removes whole decoder blocks. Score of block ``i``: ``mean_t cos(h_i, h_{i+1})``
  between the block's input and output; the most similar blocks are dropped.

Scores are computed once on the unmodified model (as the paper does), over non-padding tokens.

How a dropped MoE sublayer is stored. The sublayer's contribution must become exactly zero in a
checkpoint that still loads as the same kind: stock transformers configs have no "no MLP here"
option (Qwen's ``mlp_only_layers`` means a *dense* MLP, Mixtral has nothing), and moe-app's spec
rebuilds the base layer's MLP for a non-MoE layer. So the layer's ``post_attention_layernorm``
weight is set to zero: the RMSNorm then outputs 0 for every token, and every MoE block here maps 0
to 0 (bias-free SwiGLU experts and shared experts, bias-free adapters; the router's uniform weights
multiply zero outputs), so the sublayer adds exactly 0 and the checkpoint loads anywhere unchanged.
The cost: the sublayer's weights stay in the file and it still runs. moe-app checkpoints also list
the layers in ``moe_app.json`` (``pruning.dropped_mlp_layers``) so a loader can replace them by
:class:`ZeroMlp` and save the compute (:func:`replace_dropped_mlps`). Block drop has none of these
issues: the decoder layers are deleted and the config's ``num_hidden_layers``, ``layer_types``,
Qwen's ``mlp_only_layers`` / ``decoder_sparse_step`` and the attention ``layer_idx`` (KV-cache slot)
are renumbered, so the result is a plain smaller model of the same architecture.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moe_app.core.models.layers import find_decoder_layers
from moe_app.core.models.views import moe_layer_views
from moe_app.core.pruning.calibration import normalize_batches, run_model
from moe_app.core.spec import spec_of
from moe_app.errors import ConfigError, UnsupportedModelError

logger = logging.getLogger("moe_app.core.pruning")

NORM_NAMES = ("post_attention_layernorm",)


class ZeroMlp(nn.Module):
    """An MLP sublayer that adds nothing: ``x -> 0`` (a dropped MoE sublayer at inference)."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        return torch.zeros_like(hidden_states)


def _mean_cos(a: Tensor, b: Tensor) -> tuple[float, int]:
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)  # (T,)
    return float(cos.sum()), cos.shape[0]


@torch.no_grad()
def _score(model: nn.Module, batches: Sequence[Any], hooks) -> dict[int, float]:
    """Run ``batches`` with ``hooks(current) -> handles`` collecting ``{key: (sum cos, count)}``."""
    batches = normalize_batches(batches)
    acc: dict[int, list[float]] = {}
    current: dict[str, Any] = {"acc": acc}
    handles = hooks(current)
    was_training = model.training
    model.eval()
    try:
        run_model(model, batches, current)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: s / max(n, 1) for k, (s, n) in sorted(acc.items())}


def _norm_of(layer: nn.Module, where: str) -> nn.Module:
    for name in NORM_NAMES:
        norm = getattr(layer, name, None)
        if norm is not None and isinstance(getattr(norm, "weight", None), Tensor):
            if getattr(norm, "bias", None) is not None:
                break
            return norm
    raise UnsupportedModelError(
        f"`{where}` has no bias-free `post_attention_layernorm` before its MLP",
        fix="layer drop supports pre-norm decoders (LLaMA, Mistral, Qwen, Mixtral, OLMoE)",
    )


def layer_drop_scores(model: nn.Module, batches: Sequence[Any]) -> dict[int, float]:
    """``{layer: mean cos(h, h + MoE(LN(h)))}`` for every MoE sublayer."""
    path, layers = find_decoder_layers(model)
    lays = [lay for lay, _ in moe_layer_views(model)]
    if not lays:
        raise UnsupportedModelError(
            "the model has no MoE layers to drop", fix="layer drop applies to MoE models"
        )

    def hooks(current):
        handles = []
        for lay in lays:
            layer = layers[lay]
            norm = _norm_of(layer, f"{path}.{lay}")

            def pre(mod, args, lay=lay):
                current[("h", lay)] = args[0]

            def post(mod, args, out, lay=lay):
                h = current.pop(("h", lay))
                h = h.reshape(-1, h.shape[-1])[current["mask"]]  # (T, d)
                m = (out[0] if isinstance(out, tuple) else out).reshape(-1, h.shape[-1])[
                    current["mask"]
                ]  # (T, d)
                s, n = _mean_cos(h, h + m)
                tot = current["acc"].setdefault(lay, [0.0, 0])
                tot[0] += s
                tot[1] += n

            handles.append(norm.register_forward_pre_hook(pre))
            handles.append(layer.mlp.register_forward_hook(post))
        return handles

    return _score(model, batches, hooks)


def block_drop_scores(model: nn.Module, batches: Sequence[Any]) -> dict[int, float]:
    """``{block: mean cos(h_i, h_{i+1})}`` between every decoder block's input and output."""
    _, layers = find_decoder_layers(model)

    def hooks(current):
        handles = []
        for i, layer in enumerate(layers):

            def post(mod, args, kwargs, out, i=i):
                h_in = args[0] if args else kwargs["hidden_states"]
                h_out = out[0] if isinstance(out, tuple) else out
                d = h_in.shape[-1]
                s, n = _mean_cos(
                    h_in.reshape(-1, d)[current["mask"]],  # (T, d)
                    h_out.reshape(-1, d)[current["mask"]],  # (T, d)
                )
                tot = current["acc"].setdefault(i, [0.0, 0])
                tot[0] += s
                tot[1] += n

            handles.append(layer.register_forward_hook(post, with_kwargs=True))
        return handles

    return _score(model, batches, hooks)


def most_similar(scores: dict[int, float], n: int) -> list[int]:
    """The ``n`` keys with the highest similarity (ties: lower index), sorted."""
    return sorted(sorted(scores, key=lambda k: (-scores[k], k))[:n])


@torch.no_grad()
def drop_mlp_layers(model: nn.Module, drop: Sequence[int]) -> nn.Module:
    """Make the MoE sublayers of ``drop`` add exactly zero (zeroed post-attention norm, see module doc)."""
    path, layers = find_decoder_layers(model)
    moe = {lay for lay, _ in moe_layer_views(model)}
    for lay in drop:
        if lay not in moe:
            raise ConfigError(f"layer {lay} has no MoE sublayer to drop", fix=f"choose among {sorted(moe)}")
        norm = _norm_of(layers[lay], f"{path}.{lay}")
        norm.weight.zero_()
        probe = torch.zeros(1, 1, norm.weight.shape[0], dtype=norm.weight.dtype, device=norm.weight.device)
        was_training = layers[lay].mlp.training
        layers[lay].mlp.eval()
        out = layers[lay].mlp(probe)
        layers[lay].mlp.train(was_training)
        out = out[0] if isinstance(out, tuple) else out
        if torch.count_nonzero(out) != 0:
            raise UnsupportedModelError(
                f"`{path}.{lay}.mlp` does not map 0 to 0 (it has biases), so zeroing its input norm does not drop it",
                fix="layer drop supports bias-free MoE blocks",
            )
    spec = spec_of(model)
    if spec is not None:
        slot = dict(spec.pruning or {})
        slot["dropped_mlp_layers"] = sorted(set(slot.get("dropped_mlp_layers", [])) | {int(i) for i in drop})
        spec.pruning = slot
    return model


def replace_dropped_mlps(model: nn.Module, drop: Sequence[int]) -> nn.Module:
    """Swap the dropped sublayers for :class:`ZeroMlp` (inference only: saves their compute and memory).

    A model changed this way can no longer be saved as a checkpoint of its original structure.
    """
    _, layers = find_decoder_layers(model)
    for lay in drop:
        layers[lay].mlp = ZeroMlp()
    return model


def _renumber(values: Sequence[int], drop: set[int]) -> list[int]:
    """Old layer indices -> new ones, for the kept layers among ``values``."""
    return [v - sum(1 for d in drop if d < v) for v in values if v not in drop]


@torch.no_grad()
def drop_blocks(model: nn.Module, drop: Sequence[int]) -> nn.Module:
    """Delete decoder blocks ``drop`` in place; renumber the config, KV-cache indices and moe-app spec."""
    path, layers = find_decoder_layers(model)
    n = len(layers)
    gone = {int(i) for i in drop}
    if not gone or min(gone) < 0 or max(gone) >= n or len(gone) >= n:
        raise ConfigError(
            f"cannot drop blocks {sorted(gone)} of a {n}-layer model",
            fix=f"drop between 1 and {n - 1} blocks",
        )
    kept = [i for i in range(n) if i not in gone]
    cfg = model.config
    # Qwen-MoE decide per layer index whether a layer is sparse: make the pattern explicit first.
    if hasattr(cfg, "mlp_only_layers") and hasattr(cfg, "decoder_sparse_step"):
        dense = [
            i
            for i in range(n)
            if i in (cfg.mlp_only_layers or [])
            or not (getattr(cfg, "num_experts", 0) > 0 and (i + 1) % cfg.decoder_sparse_step == 0)
        ]
        cfg.mlp_only_layers = _renumber(dense, gone)
        cfg.decoder_sparse_step = 1
    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new_i, layer in enumerate(new_layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx") and isinstance(mod.layer_idx, int):
                mod.layer_idx = new_i
    parent = model
    for name in path.split(".")[:-1]:
        parent = getattr(parent, name)
    setattr(parent, path.split(".")[-1], new_layers)
    cfg.num_hidden_layers = len(kept)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    if getattr(cfg, "max_window_layers", None) is not None:
        cfg.max_window_layers = min(int(cfg.max_window_layers), len(kept))
    spec = spec_of(model)
    if spec is not None:
        spec.layers = [spec.layers[i] for i in kept]
        for new_i, lay in enumerate(spec.layers):
            lay.index = new_i
        spec.skipping = {kept.index(k): v for k, v in spec.skipping.items() if k in kept}
        slot = dict(spec.pruning or {})
        if slot.get("dropped_mlp_layers"):
            slot["dropped_mlp_layers"] = _renumber(slot["dropped_mlp_layers"], gone)
        slot["dropped_blocks"] = [*slot.get("dropped_blocks", []), sorted(gone)]
        spec.pruning = slot
    return model


__all__ = [
    "ZeroMlp",
    "block_drop_scores",
    "drop_blocks",
    "drop_mlp_layers",
    "layer_drop_scores",
    "most_similar",
    "replace_dropped_mlps",
]
