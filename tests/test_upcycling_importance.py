"""Importance scores (LLaMA-MoE, ALGORITHMS.md section 3) use the full gradient dL/dh at W_down's input.

``h`` of layer i reaches the loss through every later layer, their MLPs included; hooking all
selected layers in one pass must not cut those paths (re-rooting ``h`` at every hooked W_down
input did, for every layer but the last).
"""

from __future__ import annotations

import torch
from torch.testing import assert_close

from conftest import tiny_llama_config
from moe_app.core.upcycling.calibration import neuron_importance, normalize_batches
from moe_app.core.upcycling.partition import split_neurons
from upcycling_helpers import build

GROUPS = 4
LAYERS = [0, 1, 2]


def _model():
    # A wider init than HF's 0.02 so later MLPs carry a sizeable part of dL/dh.
    cfg = tiny_llama_config(num_hidden_layers=3, hidden_size=32, intermediate_size=128, initializer_range=0.2)
    return build(cfg, seed=0).double()


def _batches():
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(3, 128, (2, 12), generator=g) for _ in range(3)]
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding in one row
    return normalize_batches([(ids[0], mask), ids[1], ids[2]])


def _labels(n: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return {i: torch.randint(0, GROUPS, (n,), generator=g) for i in LAYERS}


def _reference(model, layer: int, batches, labels: torch.Tensor) -> torch.Tensor:
    """True autograd: dL/dh of this layer's W_down input with every path intact, one layer at a time."""
    down = model.model.layers[layer].mlp.down_proj
    sums = torch.zeros(GROUPS, down.in_features, dtype=torch.float64)
    start = 0
    seen: list[torch.Tensor] = []
    for b in batches:
        ids, mask = b["input_ids"], b["attention_mask"]
        seen.clear()
        handle = down.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        finally:
            handle.remove()
        (h,) = seen
        (g,) = torch.autograd.grad(loss, h)
        score = (h * g).abs().reshape(-1, h.shape[-1])[mask.reshape(-1).bool()].detach()
        sums.index_add_(0, labels[start : start + score.shape[0]], score)
        start += score.shape[0]
    counts = torch.bincount(labels, minlength=GROUPS).clamp_min(1).double()
    return sums / counts[:, None]


def test_importance_all_layers_hooked_equals_true_gradient_per_layer():
    model = _model()
    batches = _batches()
    n = sum(int(b["attention_mask"].sum()) for b in batches)
    labels = _labels(n)
    got = neuron_importance(model, LAYERS, batches, labels, GROUPS, max_tokens=n)
    for i in LAYERS:
        ref = _reference(model, i, batches, labels[i])
        assert_close(got[i].double(), ref, rtol=1e-5, atol=1e-9, msg=lambda m, i=i: f"layer {i}: {m}")
        # ... and so the partition built from them is the reference's.
        _, a = split_neurons("importance", GROUPS, ref.shape[-1], importance=got[i])
        _, b = split_neurons("importance", GROUPS, ref.shape[-1], importance=ref)
        assert torch.equal(a, b), f"layer {i}"
        top = set(got[i].sum(0).topk(32).indices.tolist())
        assert top == set(ref.sum(0).topk(32).indices.tolist()), f"layer {i}"


def test_importance_on_a_frozen_model():
    """No parameter needs a gradient (frozen / quantised bases): same scores, nothing in ``.grad``."""
    model = _model()
    batches = _batches()
    n = sum(int(b["attention_mask"].sum()) for b in batches)
    labels = _labels(n)
    ref = neuron_importance(model, LAYERS, batches, labels, GROUPS, max_tokens=n)
    model.requires_grad_(False)
    got = neuron_importance(model, LAYERS, batches, labels, GROUPS, max_tokens=n)
    for i in LAYERS:
        assert_close(got[i], ref[i], rtol=1e-6, atol=0)
    assert all(p.grad is None for p in model.parameters())
