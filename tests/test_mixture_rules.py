"""The pure mixture update rules (moe_app.core.mixing.rules) against hand-computed numbers, and config errors."""

from __future__ import annotations

import math

import pytest
import torch

from moe_app.core.mixing.rules import (
    check_hyperparameters,
    check_weights,
    initial_weights,
    layered_redundancy_scores,
    normalize_loads,
    redundancy_scores,
    reference_loss_scores,
    update_weights,
)
from moe_app.errors import ConfigError


def test_dynamic_update_matches_hand_computed_example():
    # Gate loads (top-k assignment counts, E = 2) of three sources; the first two look alike.
    counts = torch.tensor([[3.0, 1.0], [6.0, 2.0], [1.0, 3.0]])
    # O = [[.75, .25], [.75, .25], [.25, .75]]
    # delta_12 = 0, delta_13 = delta_23 = sqrt(.5^2 + .5^2) = sqrt(0.5) = 0.70710678...
    # Delta = [sqrt(.5)/3, sqrt(.5)/3, 2 sqrt(.5)/3]
    w, eta, c = [0.5, 0.3, 0.2], 2.0, 0.1
    # alpha_i = w_i exp(eta Delta_i) / Z = [0.44624983, 0.26774990, 0.28600027]
    # w'_i = 0.9 alpha_i + 0.1 / 3, already summing to 1.
    assert normalize_loads(counts).tolist() == [[0.75, 0.25], [0.75, 0.25], [0.25, 0.75]]
    delta = redundancy_scores(counts)
    s = math.sqrt(0.5)
    assert delta.tolist() == pytest.approx([s / 3, s / 3, 2 * s / 3], abs=1e-12)
    assert delta.tolist() == pytest.approx(
        [0.23570226039551587, 0.23570226039551587, 0.47140452079103173], abs=1e-6
    )
    new = update_weights(w, delta, eta, c)
    assert new.dtype == torch.float64
    assert new.tolist() == pytest.approx(
        [0.43495818272367925, 0.27430824296754086, 0.2907335743087799], abs=1e-6
    )
    assert float(new.sum()) == pytest.approx(1.0, abs=1e-15)
    # The distinct source gained weight relative to its start, the two look-alikes lost it.
    assert new[2] > w[2] and new[0] < w[0] and new[1] < w[1]


def test_identical_loads_give_identical_scores_and_move_weight_to_the_distinct_source():
    counts = torch.tensor([[10.0, 0.0, 5.0, 5.0], [10.0, 0.0, 5.0, 5.0], [0.0, 10.0, 5.0, 5.0]])
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    for _ in range(3):  # compounding
        w = update_weights(w, redundancy_scores(counts), eta=10.0, c=0.05)
    assert w[0] == w[1]
    assert w[2] > 0.5


def test_all_loads_equal_leaves_weights_unchanged_up_to_smoothing():
    counts = torch.ones(4, 3)
    w = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    assert update_weights(w, redundancy_scores(counts), 10.0, 0.0).tolist() == pytest.approx(
        w.tolist(), abs=1e-15
    )
    smoothed = update_weights(w, redundancy_scores(counts), 10.0, 0.2)
    assert smoothed.tolist() == pytest.approx((0.8 * w + 0.05).tolist(), abs=1e-15)


def test_layered_scores_average_per_layer_scores():
    a = torch.tensor([[3.0, 1.0], [3.0, 1.0], [1.0, 3.0]])
    b = torch.tensor([[1.0, 1.0], [2.0, 0.0], [1.0, 1.0]])
    got = layered_redundancy_scores(torch.stack([a, b]))
    assert got.tolist() == pytest.approx(
        ((redundancy_scores(a) + redundancy_scores(b)) / 2).tolist(), abs=1e-15
    )


def test_reference_loss_update():
    delta = reference_loss_scores([2.0, 3.0], [1.5, 1.5])  # excess loss 0.5, 1.5
    assert delta.tolist() == [0.5, 1.5]
    new = update_weights([0.5, 0.5], delta, eta=1.0, c=1e-4)
    a2 = math.exp(1.5) / (math.exp(0.5) + math.exp(1.5))
    assert new.tolist() == pytest.approx(
        [(1 - 1e-4) * (1 - a2) + 0.5e-4, (1 - 1e-4) * a2 + 0.5e-4], abs=1e-12
    )


def test_zero_weight_stays_zero_without_smoothing_and_recovers_with_it():
    w = [0.0, 0.5, 0.5]
    delta = [1.0, 0.0, 0.0]
    assert update_weights(w, delta, 10.0, 0.0)[0] == 0.0
    assert update_weights(w, delta, 10.0, 0.05)[0] == pytest.approx(0.05 / 3)


def test_initial_weights():
    names = ["a", "b", "c"]
    assert initial_weights("uniform", names).tolist() == pytest.approx([1 / 3] * 3)
    assert initial_weights("size", names, sizes={"a": 1, "b": 1, "c": 2}).tolist() == [0.25, 0.25, 0.5]
    assert initial_weights("static", names, weights={"a": 2, "b": 1, "c": 1}).tolist() == [0.5, 0.25, 0.25]
    assert initial_weights("dynamic", names).tolist() == pytest.approx([1 / 3] * 3)
    assert initial_weights("dynamic", names, weights={"a": 0, "b": 1, "c": 1}).tolist() == [0.0, 0.5, 0.5]


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"a": 1.0, "typo": 1.0}, r"unknown source name\(s\) \['typo'\].*Fix: use the `name`"),
        ({"a": 1.0}, r"no weight for source\(s\) \['b'\].*Fix: give every source a weight"),
        ({"a": -1.0, "b": 1.0}, r"weight of source 'a' is -1.0; weights must be finite and >= 0"),
        ({"a": 0.0, "b": 0.0}, r"all weights are 0.*Fix: give at least one source a positive weight"),
        ({"a": float("nan"), "b": 1.0}, r"weight of source 'a' is nan"),
    ],
)
def test_bad_weights(weights, message):
    with pytest.raises(ConfigError, match=message):
        check_weights(weights, ["a", "b"])


@pytest.mark.parametrize(
    ("eta", "c", "message"),
    [
        (0.0, 0.05, r"eta must be a finite number > 0, got 0.0.*Fix: use the paper's eta"),
        (-1.0, 0.05, r"eta must be a finite number > 0"),
        (float("inf"), 0.05, r"eta must be a finite number > 0"),
        (10.0, 1.0, r"c \(uniform smoothing\) must be in \[0, 1\), got 1.0.*Fix: use the paper's c"),
        (10.0, -0.1, r"c \(uniform smoothing\) must be in \[0, 1\)"),
    ],
)
def test_bad_hyperparameters(eta, c, message):
    with pytest.raises(ConfigError, match=message):
        check_hyperparameters(eta, c)
