"""Layer drop and block drop (He et al. 2024, "Demystifying the Compression of Mixture-of-Experts
Through a Unified Framework", arXiv 2406.02500).

* **Layer drop** removes whole MoE sublayers. Score of the MoE sublayer of decoder layer ``l``:
  ``mean_t cos(h_t, h_t + MoE(LN(h_t)))`` with ``h`` the residual stream entering the sublayer;
  the most similar sublayers change the stream least and are dropped.
* **Block drop** removes whole decoder blocks. Score of block ``i``: ``mean_t cos(h_i, h_{i+1})``
  between the block's input and output; the most similar blocks are dropped.

Scores are computed once on the unmodified model (as the paper does), over non-padding tokens.

How a dropped MoE sublayer is stored. In a moe-app model (one carrying a ``MoeSpec``) the sublayer
is removed, as in the paper: ``layer.mlp`` becomes the parameter-free
:class:`~moe_app.core.models.dropped.DroppedMlp` (returns zeros, so ``h + mlp(norm(h)) == h``
exactly) and, where the decoder layer's ``forward`` uses ``post_attention_layernorm`` only as the
MLP's input (the LLaMA / Mistral / Qwen / Mixtral / OLMoE layout), that norm becomes a
parameter-free identity too; elsewhere it keeps running (see :mod:`moe_app.core.models.dropped`
for why: skipping it would need patching transformers). The layer's ``LayerSpec`` records
``mlp_dropped`` (and ``mlp_norm_dropped``), the checkpoint holds no tensors for the removed
modules, and ``load_model`` rebuilds the same parameter-free modules. ``pruning.dropped_mlp_layers``
lists the layers for information.

Stock transformers checkpoints (Mixtral, Qwen2/3-MoE, OLMoE) have no "no MLP here" option (Qwen's
``mlp_only_layers`` means a *dense* MLP), so for a stock model without a spec the default keeps the
sublayer and makes it add exactly zero instead (``how="zero_norm"``): the
``post_attention_layernorm`` weight is zeroed, the RMSNorm outputs 0, and a bias-free MoE block maps
0 to 0. That checkpoint loads anywhere unchanged but keeps the weights and the compute;
:func:`replace_dropped_mlps` removes them in memory for inference. Exporting a moe-app model with
removed MLPs to a stock format is refused for the same reason (``checkpoint/export.py``).

Block drop removes whole decoder layers: they are deleted and the config's ``num_hidden_layers``,
``layer_types``, Qwen's ``mlp_only_layers`` / ``decoder_sparse_step`` and the attention
``layer_idx`` (KV-cache slot) are renumbered, so the result is a plain smaller model of the same
architecture (removed MLPs move with their layers).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moe_app.core.models.dropped import DroppedMlp, norm_dropped, remove_mlp
from moe_app.core.models.layers import find_decoder_layers
from moe_app.core.models.views import moe_layer_views
from moe_app.core.pruning.calibration import normalize_batches, run_model
from moe_app.core.spec import LayerSpec, spec_of
from moe_app.errors import ConfigError, UnsupportedModelError

logger = logging.getLogger("moe_app.core.pruning")

NORM_NAMES = ("post_attention_layernorm",)


ZeroMlp = DroppedMlp
"""Former name of :class:`~moe_app.core.models.dropped.DroppedMlp`."""

DROP_MODES = ("auto", "remove", "zero_norm")


def _mean_cos(a: Tensor, b: Tensor) -> tuple[float, int]:
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)  # (T,)
    return float(cos.sum()), cos.shape[0]


def mean_scores(acc: dict[int, list[float]]) -> dict[int, float]:
    """``{key: sum cos / count}`` of what the score hooks accumulated, by key."""
    return {k: s / max(n, 1) for k, (s, n) in sorted(acc.items())}


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
    return mean_scores(acc)


def _accumulate(current: dict[str, Any], key: int, a: Tensor, b: Tensor) -> None:
    s, n = _mean_cos(a, b)
    tot = current["acc"].setdefault(key, [0.0, 0])
    tot[0] += s
    tot[1] += n


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


def layer_drop_hooks(layer: nn.Module, lay: int, where: str, current: dict[str, Any]) -> list[Any]:
    """Hooks on decoder layer ``lay`` adding ``cos(h, h + MoE(LN(h)))`` over the tokens of
    ``current["mask"]`` to ``current["acc"][lay]`` on every forward (``h``: the residual stream
    entering the MoE sublayer). Shared by :func:`layer_drop_scores` and the layer-streamed pruning."""
    norm = _norm_of(layer, where)

    def pre(mod, args):
        current[("h", lay)] = args[0]

    def post(mod, args, out):
        h = current.pop(("h", lay))
        h = h.reshape(-1, h.shape[-1])[current["mask"]]  # (T, d)
        m = (out[0] if isinstance(out, tuple) else out).reshape(-1, h.shape[-1])[current["mask"]]  # (T, d)
        _accumulate(current, lay, h, h + m)

    return [norm.register_forward_pre_hook(pre), layer.mlp.register_forward_hook(post)]


def block_drop_hook(layer: nn.Module, i: int, current: dict[str, Any]) -> Any:
    """A hook on decoder block ``i`` adding ``cos(h_i, h_{i+1})`` (its input and output) over the
    tokens of ``current["mask"]`` to ``current["acc"][i]`` on every forward. Shared by
    :func:`block_drop_scores` and the layer-streamed pruning."""

    def post(mod, args, kwargs, out):
        h_in = args[0] if args else kwargs["hidden_states"]
        h_out = out[0] if isinstance(out, tuple) else out
        d = h_in.shape[-1]
        _accumulate(current, i, h_in.reshape(-1, d)[current["mask"]], h_out.reshape(-1, d)[current["mask"]])

    return layer.register_forward_hook(post, with_kwargs=True)


def layer_drop_scores(model: nn.Module, batches: Sequence[Any]) -> dict[int, float]:
    """``{layer: mean cos(h, h + MoE(LN(h)))}`` for every MoE sublayer."""
    path, layers = find_decoder_layers(model)
    lays = [lay for lay, _ in moe_layer_views(model)]
    if not lays:
        raise UnsupportedModelError(
            "the model has no MoE layers to drop", fix="layer drop applies to MoE models"
        )

    def hooks(current):
        return [h for lay in lays for h in layer_drop_hooks(layers[lay], lay, f"{path}.{lay}", current)]

    return _score(model, batches, hooks)


def block_drop_scores(model: nn.Module, batches: Sequence[Any]) -> dict[int, float]:
    """``{block: mean cos(h_i, h_{i+1})}`` between every decoder block's input and output."""
    _, layers = find_decoder_layers(model)
    return _score(
        model, batches, lambda current: [block_drop_hook(lay, i, current) for i, lay in enumerate(layers)]
    )


def drop_entry(what: str, scores: dict[int, float], drop: list[int]) -> dict[str, Any]:
    """The prune report's entry for a drop (``what``: e.g. ``"removed decoder blocks"``), logged."""
    logger.info("%s %s (cos %s)", what, drop, [round(scores[i], 4) for i in drop])
    return {"scores": {str(k): v for k, v in scores.items()}, "dropped": drop}


def layer_drop_how(model: nn.Module) -> str:
    """How :func:`drop_mlp_layers` (``how="auto"``) drops a sublayer of ``model``, in words."""
    if spec_of(model) is not None:
        return "removed"
    return "zeroed (a stock checkpoint cannot record a missing MLP)"


def most_similar(scores: dict[int, float], n: int) -> list[int]:
    """The ``n`` keys with the highest similarity (ties: lower index), sorted."""
    return sorted(sorted(scores, key=lambda k: (-scores[k], k))[:n])


def check_mlp_drop(model: nn.Module, how: str = "auto") -> str:
    """The drop mode ``how`` resolves to for ``model`` (see :func:`drop_mlp_layers`), refusing the
    impossible ones before any scoring: callers check this first, so a checkpoint larger than memory
    is not scored (one pass per layer) only to be refused at the end."""
    if how not in DROP_MODES:
        raise ConfigError(f"unknown layer-drop mode {how!r}", fix=f"choose one of {', '.join(DROP_MODES)}")
    spec = spec_of(model)
    if how == "auto":
        how = "remove" if spec is not None else "zero_norm"
    if how == "remove" and spec is None:
        raise ConfigError(
            "removing MLP sublayers needs a moe-app model: a stock transformers checkpoint cannot record "
            "a missing MLP, and saving one would leave its weights to be re-initialised at random",
            fix="use how='zero_norm' (exact, keeps the weights) or replace_dropped_mlps (in memory, inference only)",
        )
    if how == "remove" and spec.adapters:
        raise ConfigError(
            "cannot remove MLP sublayers of a model with adapters (PESC): moe_app.json rebuilds the adapters "
            "on every layer they were built on",
            fix="merge the adapters first (moe_app.core.pesc.merge.merge_pesc), or use how='zero_norm'",
        )
    return how


@torch.no_grad()
def drop_mlp_layers(model: nn.Module, drop: Sequence[int], how: str = "auto") -> nn.Module:
    """Drop the MoE sublayers of decoder layers ``drop`` (see the module doc).

    ``how``: ``remove`` (moe-app models: the MLP and, where the layout allows, its norm replaced by
    parameter-free modules and recorded in the spec), ``zero_norm`` (the sublayer kept but made to
    add exactly zero: what a stock checkpoint can store), or ``auto`` (``remove`` if the model
    carries a ``MoeSpec``, else ``zero_norm``).
    """
    how = check_mlp_drop(model, how)
    path, layers = find_decoder_layers(model)
    spec = spec_of(model)
    moe = {lay for lay, _ in moe_layer_views(model)}
    gone = sorted({int(i) for i in drop})
    for lay in gone:
        if lay not in moe:
            raise ConfigError(f"layer {lay} has no MoE sublayer to drop", fix=f"choose among {sorted(moe)}")
    if how == "zero_norm":
        for lay in gone:
            zero_mlp_norm(layers[lay], f"{path}.{lay}")
    else:
        for lay in gone:
            remove_mlp(layers[lay])
            old = spec.layers[lay] if lay < len(spec.layers) else None
            spec.layers[lay] = LayerSpec(
                index=lay,
                attention=old.attention if old is not None else None,
                mlp_dropped=True,
                mlp_norm_dropped=norm_dropped(layers[lay]),
            )
            spec.skipping.pop(lay, None)
    if spec is not None:
        slot = dict(spec.pruning or {})
        slot["dropped_mlp_layers"] = sorted(set(slot.get("dropped_mlp_layers", [])) | set(gone))
        spec.pruning = slot
    return model


def zero_mlp_norm(layer: nn.Module, where: str) -> None:
    """Zero the post-attention norm of ``layer`` so its bias-free MoE sublayer adds exactly 0
    (what ``how="zero_norm"`` does to each dropped layer; raises where the MLP has biases)."""
    norm = _norm_of(layer, where)
    norm.weight.zero_()
    probe = torch.zeros(1, 1, norm.weight.shape[0], dtype=norm.weight.dtype, device=norm.weight.device)
    was_training = layer.mlp.training
    layer.mlp.eval()
    out = layer.mlp(probe)
    layer.mlp.train(was_training)
    out = out[0] if isinstance(out, tuple) else out
    if torch.count_nonzero(out) != 0:
        raise UnsupportedModelError(
            f"`{where}.mlp` does not map 0 to 0 (it has biases), so zeroing its input norm does not drop it",
            fix="layer drop supports bias-free MoE blocks",
        )


def replace_dropped_mlps(model: nn.Module, drop: Sequence[int]) -> nn.Module:
    """Swap the MLPs of layers ``drop`` for :class:`DroppedMlp`, keeping their norms (inference use:
    e.g. a stock model dropped with ``zero_norm``, to save the compute and memory).

    A stock model changed this way can no longer be saved as a checkpoint of its original structure.
    """
    _, layers = find_decoder_layers(model)
    for lay in drop:
        remove_mlp(layers[lay], norm=False)
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
    "DroppedMlp",
    "ZeroMlp",
    "block_drop_hook",
    "block_drop_scores",
    "check_mlp_drop",
    "drop_blocks",
    "drop_entry",
    "drop_mlp_layers",
    "layer_drop_hooks",
    "layer_drop_how",
    "layer_drop_scores",
    "mean_scores",
    "most_similar",
    "replace_dropped_mlps",
    "zero_mlp_norm",
]
