"""The mixture sampler: frequencies follow the weights, draws are pure functions of (seed, rank, batch),
schedules switch at their batch, and it refuses to draw ahead of final weights."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from moe_app.core.mixing.sampler import MixtureSampler, WeightSchedule


def _sampler(weights, sizes=(100, 50, 200), bs=64, seed=0, rank=0, epoch_batches=1000):
    return MixtureSampler(
        list(sizes), bs, WeightSchedule(weights), seed=seed, rank=rank, batches_per_epoch=epoch_batches
    )


def test_source_frequencies_follow_the_weights():
    w = [0.5, 0.2, 0.3]
    s = _sampler(w)
    batches = 200  # 12800 draws
    sources = torch.tensor([src for b in range(batches) for src in s.sources_of(s.batch_indices(b))])
    observed = torch.bincount(sources, minlength=3).double()
    expected = torch.tensor(w, dtype=torch.float64) * sources.numel()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 13.8  # 2 degrees of freedom, p = 0.001


def test_examples_within_a_source_are_uniform():
    s = _sampler([0.0, 1.0, 0.0], sizes=(3, 10, 4))
    items = torch.tensor([i for b in range(100) for i in s.batch_indices(b)]) - 3  # source 1 starts at row 3
    assert items.min() >= 0 and items.max() <= 9
    observed = torch.bincount(items, minlength=10).double()
    expected = torch.full((10,), items.numel() / 10, dtype=torch.float64)
    assert float(((observed - expected) ** 2 / expected).sum()) < 27.9  # 9 dof, p = 0.001


def test_zero_weight_sources_are_never_drawn_even_last():
    s = _sampler([0.3, 0.7, 0.0])
    assert set(s.sources_of([i for b in range(50) for i in s.batch_indices(b)])) == {0, 1}


def test_draws_are_pure_functions_of_seed_rank_and_batch():
    a, b = _sampler([0.5, 0.2, 0.3]), _sampler([0.5, 0.2, 0.3])
    assert a.batch_indices(7) == b.batch_indices(7)
    assert a.batch_indices(7) != a.batch_indices(8)
    assert _sampler([0.5, 0.2, 0.3], rank=1).batch_indices(7) != a.batch_indices(7)
    assert _sampler([0.5, 0.2, 0.3], seed=1).batch_indices(7) != a.batch_indices(7)


def test_schedule_switches_at_its_batch_and_round_trips():
    sched = WeightSchedule([1.0, 0.0, 0.0])
    sched.add(3, [0.0, 0.0, 1.0])
    s = MixtureSampler([5, 5, 5], 8, sched, batches_per_epoch=6)
    got = list(s)
    per_batch = [set(s.sources_of(got[i : i + 8])) for i in range(0, len(got), 8)]
    assert per_batch == [{0}, {0}, {0}, {2}, {2}, {2}]
    again = WeightSchedule.from_state(sched.state_dict())
    assert again.state_dict() == sched.state_dict() == [[0, [1.0, 0.0, 0.0]], [3, [0.0, 0.0, 1.0]]]


def test_iterator_resumes_at_started_and_stops_at_the_epoch_end():
    s = _sampler([0.5, 0.2, 0.3], bs=4, epoch_batches=5)
    full = list(s)
    assert len(full) == 20 == len(s)
    s.started = 3  # e.g. restored from a checkpoint after 3 batches
    assert list(s) == full[12:]
    s.started = 5  # at the epoch boundary: the whole next epoch
    assert list(s) == [i for b in range(5, 10) for i in s.batch_indices(b)]


def test_refuses_to_draw_past_the_horizon():
    s = _sampler([0.5, 0.2, 0.3], bs=4)
    s.started, s.horizon = 0, 2
    it = iter(s)
    for _ in range(8):
        next(it)
    with pytest.raises(RuntimeError, match=r"raise data\.mixture\.apply_delay"):
        next(it)


def test_is_a_distributed_sampler_so_lightning_does_not_wrap_it():
    assert isinstance(_sampler([1.0, 1.0, 1.0]), DistributedSampler)
