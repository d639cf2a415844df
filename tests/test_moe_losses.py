"""Router losses and statistics: values, gradients, padding exclusion, model-level averaging."""

from __future__ import annotations

import math

import torch

from moe_app.core.moe.block import SparseMoeBlock
from moe_app.core.moe.experts import SwiGLUExperts
from moe_app.core.moe.losses import (
    collect_routing,
    cv_squared_loss,
    load_balancing_loss,
    model_router_losses,
    router_z_loss,
    routing_stats,
)
from moe_app.core.moe.router import TopKRouter


def test_balance_loss_is_one_under_uniform_routing():
    E, T = 4, 8
    probs = torch.full((T, E), 1 / E)
    indices = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])  # every expert 4 of 16 slots
    torch.testing.assert_close(load_balancing_loss(probs, indices, E), torch.tensor(1.0))


def test_balance_loss_has_router_gradient():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 2)
    with torch.no_grad():
        router.weight.normal_(std=1.0)
    out = router(torch.randn(32, 8))
    loss = load_balancing_loss(out.probs, out.indices, 4)
    assert loss > 1.0
    loss.backward()
    assert router.weight.grad.abs().sum() > 0  # the reference code's variant has exactly zero here


def test_balance_loss_ignores_skipped_slots():
    probs = torch.full((2, 2), 0.5)
    indices = torch.tensor([[0, -1], [1, -1]])
    torch.testing.assert_close(load_balancing_loss(probs, indices, 2), torch.tensor(1.0))


def test_z_loss_hand_example():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4 -> mean of squares.
    expected = torch.tensor((math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2)
    torch.testing.assert_close(router_z_loss(logits), expected)
    torch.testing.assert_close(router_z_loss(logits, torch.tensor([1, 0])), torch.tensor(math.log(2.0) ** 2))


def test_cv_squared_loss_zero_when_balanced_and_grad_otherwise():
    indices = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    weights = torch.full((4, 2), 0.5)
    assert cv_squared_loss(weights, indices, None, 4).abs() < 1e-6
    weights = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.9, 0.1], [0.5, 0.5]], requires_grad=True)
    loss = cv_squared_loss(weights, indices, None, 4)
    assert loss > 0
    loss.backward()
    assert weights.grad.abs().sum() > 0


def _moe_model(E=4, d=8, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(2):
        router = TopKRouter(d, E, 2)
        with torch.no_grad():
            router.weight.normal_(std=1.0)
        layers.append(SparseMoeBlock(router, SwiGLUExperts(E, d, 8)))
    return torch.nn.Sequential(*layers)


def test_padding_tokens_do_not_change_losses_or_stats():
    model = _moe_model()
    B, S, d = 2, 5, 8
    x = torch.randn(B, S, d)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[1, -1] = 0  # right padding
    flat = mask.reshape(-1)
    model(x)
    losses = model_router_losses(model, flat, kinds=("balance", "z", "cv"))
    stats = routing_stats(collect_routing(model)[0][1], flat)
    x2 = x.clone()
    x2[mask == 0] = torch.randn(int((mask == 0).sum()), d) * 10  # padded states changed
    model(x2)
    losses2 = model_router_losses(model, flat, kinds=("balance", "z", "cv"))
    stats2 = routing_stats(collect_routing(model)[0][1], flat)
    for kind in losses:
        torch.testing.assert_close(losses[kind], losses2[kind])
    for key in stats:
        torch.testing.assert_close(stats[key], stats2[key])
    # Without the mask the padded tokens do count.
    model(x)
    assert not torch.allclose(model_router_losses(model, None)["z"], losses["z"])


def test_routing_stats_and_model_average():
    model = _moe_model()
    model(torch.randn(3, 4, 8))
    routings = collect_routing(model)
    assert [name for name, _ in routings] == ["0", "1"]
    stats = routing_stats(routings[0][1])
    assert stats["tokens_per_expert"].sum() == 12 * 2
    torch.testing.assert_close(stats["load"].sum(), torch.tensor(1.0))
    assert 0 < stats["entropy"] <= math.log(4) + 1e-6
    losses = model_router_losses(model, None)
    expected = sum(load_balancing_loss(r.probs, r.indices, 4) for _, r in routings) / 2
    torch.testing.assert_close(losses["balance"], expected)
    assert set(losses) == {"balance", "z"}
    # No MoE layer ran: zero losses, so callers can always add them.
    assert model_router_losses(torch.nn.Linear(2, 2), None)["balance"] == 0
