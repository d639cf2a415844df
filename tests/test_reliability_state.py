"""The resume state pieces on their own: data-loader position and the training RNG stream.

Both go into Lightning checkpoints, which are loaded with ``weights_only=True``: their state must
survive ``torch.save`` / ``torch.load(weights_only=True)`` and restore exactly.
"""

from __future__ import annotations

import io

import torch

from moe_app.core.data.collate import SeededShuffleSampler
from moe_app.lightning.callbacks.rng import TrainingRNG
from moe_app.lightning.data.resumable import ResumableDataLoader


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def loader(n: int = 10, epoch: int = 1) -> ResumableDataLoader:
    sampler = SeededShuffleSampler(n, seed=3)
    sampler.set_epoch(epoch)
    return ResumableDataLoader(list(range(n)), batch_size=3, sampler=sampler)


def batches(dl) -> list[list[int]]:
    return [b.tolist() for b in dl]


def test_loader_resumes_mid_epoch_where_it_stopped():
    full = batches(loader())
    first = loader()
    it = iter(first)
    seen = [next(it).tolist(), next(it).tolist()]
    state = roundtrip(first.state_dict())
    assert state == {"batches_served": 2, "num_batches": 4}

    resumed = loader()
    resumed.load_state_dict(state)
    rest = batches(resumed)
    assert seen + rest == full
    assert resumed.state_dict()["batches_served"] == 4
    assert batches(resumed) == full, "only the first epoch after a resume skips"


def test_loader_state_at_the_end_of_an_epoch_starts_the_next_from_the_beginning():
    dl = loader()
    batches(dl)
    nxt = loader(epoch=2)
    nxt.load_state_dict(dl.state_dict())
    assert batches(nxt) == batches(loader(epoch=2))


def test_loader_len_is_unchanged_by_a_pending_skip():
    dl = loader()
    dl.load_state_dict({"batches_served": 2})
    assert len(dl) == 4


def test_training_rng_stream_roundtrips_through_a_weights_only_checkpoint():
    torch.manual_seed(123)
    cb = TrainingRNG()
    cb.on_train_start(None, None)
    cb.on_train_batch_start(None, None)
    torch.rand(5)  # a step draws
    cb.on_train_batch_end(None, None)
    state = roundtrip(cb.state_dict())

    cb.on_train_batch_start(None, None)
    expected_next = torch.rand(4)
    cb.on_train_batch_end(None, None)

    torch.manual_seed(999)  # the resumed process's global state is unrelated
    resumed = TrainingRNG()
    resumed.load_state_dict(state)
    resumed.on_train_start(None, None)
    resumed.on_train_batch_start(None, None)
    assert torch.equal(torch.rand(4), expected_next)
    resumed.on_train_batch_end(None, None)


def test_training_rng_isolates_steps_from_draws_between_them():
    torch.manual_seed(0)
    a = TrainingRNG()
    a.on_train_start(None, None)
    draws_a = []
    for _ in range(3):
        a.on_train_batch_start(None, None)
        draws_a.append(torch.rand(2))
        a.on_train_batch_end(None, None)

    torch.manual_seed(0)
    b = TrainingRNG()
    b.on_train_start(None, None)
    draws_b = []
    for _ in range(3):
        torch.rand(7)  # e.g. validation or a data-loader iterator drawing a seed
        b.on_train_batch_start(None, None)
        draws_b.append(torch.rand(2))
        b.on_train_batch_end(None, None)
    assert all(torch.equal(x, y) for x, y in zip(draws_a, draws_b))
