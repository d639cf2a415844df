"""Neuron partition (LLaMA-MoE): exactness, splits, importance, k-means router init, balanced k-means."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import tiny_llama_config
from moe_app.core.spec import spec_of
from moe_app.core.upcycling import UpcycleConfig
from moe_app.core.upcycling.kmeans import balanced_assign, balanced_kmeans
from moe_app.core.upcycling.partition import split_neurons
from moe_app.core.upcycling.rng import layer_generator
from moe_app.errors import ConfigError
from upcycling_helpers import build, logits, qwen2_config, tokens, upcycled

TOL = dict(rtol=1e-5, atol=1e-5)


def _exact_cfg(split: str, e: int = 4, **kw) -> UpcycleConfig:
    # k = E, zero router (w_i = 1/E) and scale = E: every multiplier s * w_i = 1.
    return UpcycleConfig(
        method="partition", split=split, num_experts=e, top_k=e, router_init="zeros", scale=e, **kw
    )


@pytest.mark.parametrize("split", ["sequential", "random", "clustering"])
def test_partition_all_experts_unit_multipliers_equals_dense(split):
    dense = build(tiny_llama_config())
    ids = tokens()
    moe = upcycled(dense, _exact_cfg(split))
    assert moe.model.layers[0].mlp.experts.intermediate_size == 16
    assert_close(logits(moe, ids), logits(dense, ids), **TOL)


def test_partition_with_shared_expert_equals_dense_on_qwen2():
    dense = build(qwen2_config())
    ids = tokens()
    moe = upcycled(dense, _exact_cfg("random", e=3, shared_experts=1))
    block = moe.model.layers[1].mlp
    assert block.shared_expert.intermediate_size == 16 and block.experts.intermediate_size == 16
    assert_close(logits(moe, ids), logits(dense, ids), **TOL)


def test_partition_default_scale_is_e_over_k():
    assert UpcycleConfig(method="partition", num_experts=16, top_k=2).resolved_scale == 8.0
    assert UpcycleConfig(method="partition", num_experts=16, top_k=4).resolved_scale == 4.0
    assert UpcycleConfig(method="copy", num_experts=16, top_k=4).resolved_scale == 1.0


@pytest.mark.parametrize("split", ["sequential", "random", "clustering"])
def test_splits_are_disjoint_covers(split):
    w_up = torch.randn(64, 8)
    shared = 1 if split != "clustering" else 0
    shared_idx, groups = split_neurons(split, 3 if shared else 4, 64, w_up=w_up, shared=shared, seed=1)
    parts = [groups.flatten()] + ([shared_idx] if shared_idx is not None else [])
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(64))
    assert all(torch.equal(row, row.sort().values) for row in groups)


def test_clustering_groups_similar_rows():
    # 4 well-separated directions, 16 noisy rows each: clustering must recover them.
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4, 8) * 10
    labels = torch.arange(64) % 4
    w_up = centers[labels] + 0.1 * torch.randn(64, 8, generator=g)
    _, groups = split_neurons("clustering", 4, 64, w_up=w_up, seed=0)
    for row in groups:
        assert len(set(labels[row].tolist())) == 1


def test_balanced_kmeans_sizes_and_assign():
    x = torch.randn(103, 5, generator=torch.Generator().manual_seed(0))
    lab, cent = balanced_kmeans(x, 4, iters=10, generator=torch.Generator().manual_seed(0))
    sizes = torch.bincount(lab, minlength=4)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 103
    assert_close(cent.norm(dim=-1), torch.ones(4))
    # lower cost wins contested slots
    cost = torch.tensor([[0.0, 1.0], [0.1, 1.0], [0.2, 0.0]])
    assert balanced_assign(cost, torch.tensor([1, 2])).tolist() == [0, 1, 1]


def _calibration(n: int = 4, seq: int = 16):
    g = torch.Generator().manual_seed(2)
    return [torch.randint(3, 128, (2, seq), generator=g) for _ in range(n)]


def test_importance_split_is_a_valid_partition_and_tracks_importance():
    dense = build(tiny_llama_config())
    cfg = UpcycleConfig(method="partition", split="importance", num_experts=4, top_k=2, router_init="kmeans")
    moe = upcycled(dense, cfg, calibration=_calibration())
    mlp = dense.model.layers[0].mlp
    ex = moe.model.layers[0].mlp.experts
    # Recover which dense neuron each expert row came from: rows are exact copies.
    src = mlp.gate_proj.weight  # (F, d)
    owners = []
    for e in range(4):
        rows = ex.gate_up_proj[e, :16]  # (16, d)
        match = (rows[:, None, :] == src[None]).all(-1).float().argmax(-1)  # (16,)
        owners.append(match)
    assert torch.equal(torch.cat(owners).sort().values, torch.arange(64))
    spec = spec_of(moe).layers[0].mlp
    assert spec.split == "importance" and spec.method == "partition"


def test_importance_shared_variant_and_exactness():
    dense = build(tiny_llama_config())
    ids = tokens()
    cfg = _exact_cfg("importance", e=3, shared_experts=1)
    moe = upcycled(dense, cfg, calibration=_calibration())
    assert moe.model.layers[0].mlp.shared_expert.intermediate_size == 16
    assert_close(logits(moe, ids), logits(dense, ids), **TOL)


def test_importance_shared_takes_neurons_important_for_all_groups():
    g = torch.Generator().manual_seed(0)
    f = torch.arange(40)
    imp = 0.01 * torch.rand(3, 40, generator=g)
    imp[f % 3, f] += 1.0  # neuron j matters for group j % 3 only ...
    imp[:, [5, 17, 33]] += 10  # ... except these, which matter for every group
    shared, groups = split_neurons("importance", 3, 40, importance=imp, shared=1)
    assert shared.numel() == 10 and {5, 17, 33} <= set(shared.tolist())
    # the routed neurons go to the group they matter for (capacities permitting)
    home = sum(int((groups[e] % 3 == e).sum()) for e in range(3))
    assert home >= 0.8 * groups.numel()


def test_kmeans_router_init_points_at_hidden_state_clusters():
    dense = build(tiny_llama_config())
    calib = _calibration()
    cfg = UpcycleConfig(method="copy", num_experts=4, top_k=1, router_init="kmeans", router_std=0.02)
    moe = upcycled(dense, cfg, calibration=calib)
    w = moe.model.layers[1].mlp.router.weight  # (E, d)
    assert_close(w.norm(dim=-1), torch.full((4,), 0.02 * 32**0.5), **TOL)
    # the router sends each captured hidden state to its nearest (cosine) centroid
    from moe_app.core.upcycling.calibration import capture_inputs, normalize_batches

    x = capture_inputs(dense, [1], normalize_batches(calib), 10_000)[1]
    lab, cent = balanced_kmeans(x, 4, cfg.kmeans_iters, generator=layer_generator(0, 1, "kmeans"))
    assert_close(F.normalize(w, dim=-1), cent, **TOL)
    agree = ((F.normalize(x, dim=-1) @ w.T).argmax(-1) == lab).float().mean()
    assert agree > 0.6


def test_data_driven_methods_need_calibration():
    dense = build(tiny_llama_config())
    with pytest.raises(ConfigError, match="needs calibration data"):
        upcycled(dense, UpcycleConfig(method="partition", split="importance", num_experts=4, top_k=2))
    with pytest.raises(ConfigError, match="calibration item 0"):
        upcycled(
            dense, UpcycleConfig(router_init="kmeans", num_experts=2, top_k=1), calibration=[torch.rand(2, 3)]
        )
