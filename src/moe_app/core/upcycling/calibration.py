"""Calibration passes over the dense model, captured with forward hooks.

Two data-driven parts of LLaMA-MoE v2 (Zhu et al. 2024) need statistics of the dense model:

* ``capture_inputs``: the hidden states entering each selected layer's MLP (after the
  post-attention norm) for non-padding tokens; balanced k-means over them gives the router
  initialisation and the token groups of the importance split.
* ``neuron_importance``: ``I[c, j] = mean over tokens of group c of |h_j * dL/dh_j|``, ``h`` the
  input of W_down (a first-order Taylor estimate of the loss change when neuron ``j`` is removed),
  with ``L`` the language-modelling loss on the calibration text.

Token order is the same in both passes (batches in order, row-major, padding dropped), so the group
labels computed from the first pass index the tokens of the second. Only the first
``max_tokens`` non-padding tokens are used per layer.

Calibration data is an iterable of ``input_ids`` tensors ``(B, S)``, of ``(input_ids,
attention_mask)`` pairs, or of dicts with those keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from moe_app.core.models.layers import find_decoder_layers
from moe_app.errors import ConfigError


def normalize_batches(calibration: Iterable[Any]) -> list[dict[str, Tensor]]:
    """Materialise calibration data as a list of ``{"input_ids", "attention_mask"}`` dicts."""
    out = []
    for i, item in enumerate(calibration):
        if isinstance(item, dict):
            ids, mask = item.get("input_ids"), item.get("attention_mask")
        elif isinstance(item, (tuple, list)):
            ids, mask = item[0], item[1] if len(item) > 1 else None
        else:
            ids, mask = item, None
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.long, torch.int, torch.int32):
            raise ConfigError(
                f"calibration item {i} is not an integer input_ids tensor ({type(ids).__name__})",
                where="calibration",
                fix="pass an iterable of (B, S) int64 input_ids tensors (optionally with attention_mask)",
            )
        ids = ids.long()
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        mask = torch.ones_like(ids) if mask is None else mask.reshape(ids.shape).long()
        out.append({"input_ids": ids, "attention_mask": mask})
    if not out:
        raise ConfigError("calibration data is empty", where="calibration", fix="pass at least one batch")
    return out


class _TokenBudget:
    """Tracks which flattened non-padding tokens of the current batch are within ``max_tokens``."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.seen = 0
        self.mask: Tensor | None = None  # (B*S,) bool: tokens of this batch to use

    def start_batch(self, attention_mask: Tensor) -> tuple[int, int]:
        valid = attention_mask.reshape(-1).bool()  # (B*S,)
        cum = valid.long().cumsum(0) + self.seen  # running index of each valid token (1-based)
        self.mask = valid & (cum <= self.max_tokens)
        start = self.seen
        self.seen = min(self.max_tokens, self.seen + int(valid.sum()))
        return start, self.seen

    @property
    def full(self) -> bool:
        return self.seen >= self.max_tokens


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    layer_ids: list[int],
    batches: list[dict[str, Tensor]],
    max_tokens: int,
    module: str = "mlp",
) -> dict[int, Tensor]:
    """Hidden states entering ``layers[i].<module>`` (``mlp`` or ``self_attn``): ``{i: (N, d) float32}``."""
    _, layers = find_decoder_layers(model)
    budget = _TokenBudget(max_tokens)
    store: dict[int, list[Tensor]] = {i: [] for i in layer_ids}

    def hook_for(i: int):
        def pre_hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            flat = x.reshape(-1, x.shape[-1])  # (B*S, d)
            store[i].append(flat[budget.mask.to(flat.device)].float().cpu())

        return pre_hook

    handles = [
        getattr(layers[i], module).register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in layer_ids
    ]
    was_training = model.training
    model.eval()
    device = _device_of(model)
    try:
        for b in batches:
            budget.start_batch(b["attention_mask"])
            model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
            if budget.full:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {i: torch.cat(v) for i, v in store.items()}


def neuron_importance(
    model: nn.Module,
    layer_ids: list[int],
    batches: list[dict[str, Tensor]],
    labels: dict[int, Tensor],
    num_groups: int,
    max_tokens: int,
) -> dict[int, Tensor]:
    """``{i: I (G, F)}``: mean ``|h * dL/dh|`` at the input of ``layers[i].mlp.down_proj`` per group.

    ``labels[i] (N,)`` gives the group of each of the first ``N`` calibration tokens (same order as
    ``capture_inputs``). ``dL/dh`` is the full gradient: ``h`` of layer ``i`` reaches the loss
    through every later layer, the MLPs of the other hooked layers included, so the captured W_down
    inputs stay in the graph (not detached) and one ``autograd.grad`` over all of them gives every
    layer's true gradient. (Re-rooting ``h`` at each hooked W_down input would cut, for every layer
    but the last, all paths through the later hooked MLPs.) The graph is instead rooted once at the
    input of the first selected decoder layer, upstream of every ``h``: ``dL/dh`` only depends on the
    graph downstream of ``h``, so this needs no parameter gradients (works on frozen or quantised
    bases) and ``autograd.grad`` accumulates nothing in ``.grad``.
    """
    _, layers = find_decoder_layers(model)
    budget = _TokenBudget(max_tokens)
    sums: dict[int, Tensor] = {}
    counts = {i: torch.bincount(labels[i], minlength=num_groups).clamp_min(1).float() for i in layer_ids}
    captured: dict[int, Tensor] = {}

    def hook_for(i: int):
        def pre_hook(module, args):
            captured[i] = args[0]  # in the graph: every path from h to the loss stays intact

        return pre_hook

    def root(module, args, kwargs):
        # Root the graph upstream of every hooked W_down input (no parameter needs requires_grad).
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}

    handles = [layers[i].mlp.down_proj.register_forward_pre_hook(hook_for(i)) for i in layer_ids]
    handles.append(layers[min(layer_ids)].register_forward_pre_hook(root, with_kwargs=True))
    was_training = model.training
    model.eval()
    device = _device_of(model)
    try:
        for b in batches:
            start, end = budget.start_batch(b["attention_mask"])
            if end == start:
                break
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
            lm_labels = ids.masked_fill(mask == 0, -100)
            captured.clear()
            with torch.enable_grad():
                loss = model(input_ids=ids, attention_mask=mask, labels=lm_labels).loss
                hs = [captured[i] for i in layer_ids]
                grads = torch.autograd.grad(loss, hs)
            keep = budget.mask
            for i, h, g in zip(layer_ids, hs, grads):
                score = (h.detach() * g).abs().reshape(-1, h.shape[-1])  # (B*S, F)
                score = score[keep.to(score.device)].float().cpu()  # (n, F)
                acc = sums.setdefault(i, torch.zeros(num_groups, score.shape[-1]))
                acc.index_add_(0, labels[i][start:end], score)
            if budget.full:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {i: sums[i] / counts[i][:, None] for i in layer_ids}
