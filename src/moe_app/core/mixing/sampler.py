"""The mixture sampler: each training example's source drawn i.i.d. with the weights in force.

Why it is built this way (the pitfalls of ALGORITHMS.md section 7, Zhu et al. arXiv 2406.11256):

* **Counter-based randomness.** The examples of training batch ``b`` (counted from the start of
  the run, on this rank) are a pure function of ``(seed, rank, b)`` and the weights in force for
  ``b``: a generator seeded with a hash of the three draws the sources (inverse CDF of the
  weights) and then an example uniformly within each source. So there is no RNG stream to save:
  resuming at batch ``b`` reproduces exactly the draws of the uninterrupted run, ranks draw
  different examples (the rank is in the seed), and the same batch is drawn the same way twice.
  Examples within a source are drawn with replacement (i.i.d., like the source choice), which is
  what makes every batch independent of the ones before it.
* **A weight schedule by batch index, not "whatever the sampler sees now".** A data loader draws
  ahead of training (Lightning prefetches one batch, worker processes ``prefetch_factor`` batches
  each), so weights set "now" would apply to a timing-dependent set of batches. An update
  computed while batch ``b`` starts takes effect from batch ``b + apply_delay``, where
  ``apply_delay`` exceeds the loader's lead. The schedule (``from_batch -> weights``) is part of
  the checkpoint, so a resumed run applies every update to the same batches. The sampler refuses
  to draw past the point where the weights are known (``horizon``) instead of silently drawing
  with stale weights.
* **Sampling happens in the main process.** A map-style dataset's sampler is iterated by the
  main process and only indices travel to data-loader workers, so workers need no copy of the
  weights and always materialise what the current schedule chose (the reference samples inside
  an iterable dataset, where workers keep stale copies).
* **Not wrapped under DDP.** It subclasses :class:`~torch.utils.data.DistributedSampler`, which
  tells Lightning (with the default ``use_distributed_sampler=True``) not to wrap it in another
  distributed sampler that would split its indices between ranks.

Epochs: an epoch is ``batches_per_epoch`` batches; an iterator started at batch ``b`` (a resumed
run, or a new epoch) yields up to the end of ``b``'s epoch, so Lightning's epoch boundaries stay
where they were in the uninterrupted run.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler


class WeightSchedule:
    """Sampling weights in force per training batch: sorted ``(from_batch, weights (n,) float64)``."""

    def __init__(self, weights: Sequence[float] | Tensor) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64).clone()
        self._starts: list[int] = [0]
        self._weights: list[Tensor] = [w]
        self._cdfs: list[Tensor] = [_cdf(w)]

    @property
    def num_sources(self) -> int:
        return self._weights[0].numel()

    @property
    def latest(self) -> Tensor:
        return self._weights[-1].clone()

    @property
    def last_start(self) -> int:
        return self._starts[-1]

    def add(self, from_batch: int, weights: Sequence[float] | Tensor) -> None:
        """Weights for batches ``>= from_batch`` (replaces a schedule entry starting at the same batch)."""
        w = torch.as_tensor(weights, dtype=torch.float64).clone()
        if w.shape != self._weights[0].shape:
            raise ValueError(f"weights of shape {tuple(w.shape)}, expected {tuple(self._weights[0].shape)}")
        if from_batch < self._starts[-1]:
            raise ValueError(f"schedule entries must not go back in time ({from_batch} < {self._starts[-1]})")
        if from_batch == self._starts[-1]:
            self._weights[-1], self._cdfs[-1] = w, _cdf(w)
            return
        self._starts.append(int(from_batch))
        self._weights.append(w)
        self._cdfs.append(_cdf(w))

    def _entry(self, batch: int) -> int:
        return bisect.bisect_right(self._starts, batch) - 1

    def weights_at(self, batch: int) -> Tensor:
        return self._weights[self._entry(batch)].clone()

    def cdf_at(self, batch: int) -> Tensor:
        return self._cdfs[self._entry(batch)]

    def state_dict(self) -> list[list]:
        """Plain types: ``[[from_batch, [w_1, ..., w_n]], ...]`` (floats are float64, exact)."""
        return [[s, w.tolist()] for s, w in zip(self._starts, self._weights)]

    @classmethod
    def from_state(cls, state: Sequence[Sequence]) -> WeightSchedule:
        first = state[0]
        if int(first[0]) != 0:
            raise ValueError("a weight schedule starts at batch 0")
        sched = cls(first[1])
        for start, w in state[1:]:
            sched.add(int(start), w)
        return sched


def _cdf(w: Tensor) -> Tensor:
    """Cumulative weights with the last entry exactly 1.0 (so ``u in [0, 1)`` never falls off the end)."""
    c = torch.cumsum(w, dim=0)  # (n,)
    return c / c[-1]


def batch_seed(seed: int, rank: int, batch: int) -> int:
    """A 63-bit seed for ``(seed, rank, batch)``; hashed so nearby batches get unrelated streams."""
    digest = hashlib.sha256(f"moe-app-mixture|{seed}|{rank}|{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class MixtureSampler(DistributedSampler):
    """Indices into the concatenated training rows of ``n`` sources, drawn by the weight schedule.

    Args:
        source_sizes: training rows per source; source ``i``'s rows are
            ``offsets[i] .. offsets[i] + size_i - 1`` in the dataset.
        batch_size: rows per batch (the DataLoader's ``batch_size``).
        schedule: weights in force per batch (shared with the data module, which updates it).
        seed: base seed; combined with ``rank`` and the batch index.
        rank, num_replicas: this process's place in data-parallel training.
        batches_per_epoch: length of an epoch in batches.
    """

    def __init__(
        self,
        source_sizes: Sequence[int],
        batch_size: int,
        schedule: WeightSchedule,
        seed: int = 0,
        rank: int = 0,
        num_replicas: int = 1,
        batches_per_epoch: int = 1,
    ) -> None:
        # DistributedSampler.__init__ needs a dataset and an initialised process group; only the
        # type (so Lightning leaves this sampler alone) and its public attributes are wanted.
        self.dataset = None
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.drop_last = False
        self.shuffle = False
        self.seed = seed
        if any(s < 1 for s in source_sizes):
            raise ValueError(f"every source needs at least one training row, got sizes {list(source_sizes)}")
        if schedule.num_sources != len(source_sizes):
            raise ValueError(f"{schedule.num_sources} weights for {len(source_sizes)} sources")
        self.sizes = torch.tensor(list(source_sizes), dtype=torch.float64)  # (n,)
        self.offsets = torch.tensor([0, *itertools.accumulate(source_sizes)][:-1])  # (n,) first row of each
        self.batch_size = batch_size
        self.schedule = schedule
        self.batches_per_epoch = max(1, int(batches_per_epoch))
        self.num_samples = self.batches_per_epoch * batch_size
        self.total_size = self.num_samples * num_replicas
        self.started: int | None = None
        """Batches handed to training so far (set by the data module's callback); ``None``: not
        tracked, and each new iterator continues where the previous one stopped drawing."""
        self.cursor = 0
        """The next batch the sampler would draw."""
        self.horizon: int | None = None
        """Batches ``< horizon`` have final weights; drawing beyond it is refused (``None``: no check)."""
        self.record = False
        self.drawn: dict[int, list[int]] = {}
        """With ``record``: batch index -> drawn row indices (tests and the DDP rank dumps)."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # positions are global batch indices; the epoch changes nothing

    def __len__(self) -> int:
        return self.num_samples

    def batch_indices(self, batch: int) -> list[int]:
        """Row indices of training batch ``batch``: a pure function of (seed, rank, batch, weights)."""
        g = torch.Generator()
        g.manual_seed(batch_seed(self.seed, self.rank, batch))
        u = torch.rand(self.batch_size, generator=g, dtype=torch.float64)  # (B,)
        cdf = self.schedule.cdf_at(batch)  # (n,)
        src = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1)  # (B,)
        v = torch.rand(self.batch_size, generator=g, dtype=torch.float64)  # (B,)
        size = self.sizes[src]  # (B,)
        item = torch.minimum((v * size).floor(), size - 1).long()  # (B,)
        return (self.offsets[src] + item).tolist()

    def sources_of(self, indices: Sequence[int]) -> list[int]:
        """Source index of each row index."""
        pos = torch.searchsorted(self.offsets, torch.as_tensor(list(indices)), right=True) - 1
        return pos.tolist()

    def __iter__(self) -> Iterator[int]:
        # A generator: the start is read when the loader first asks for an index, i.e. after every
        # batch before it has been handed to training.
        start = self.started if self.started is not None else self.cursor
        end = (start // self.batches_per_epoch + 1) * self.batches_per_epoch
        for b in range(start, end):
            if self.horizon is not None and b >= self.horizon:
                raise RuntimeError(
                    f"the mixture sampler was asked for batch {b} while weights are final only up to batch "
                    f"{self.horizon - 1}: the data loader reads further ahead than data.mixture.apply_delay "
                    "allows. Fix: raise data.mixture.apply_delay (default 2 + 2 * num_workers)."
                )
            indices = self.batch_indices(b)
            self.cursor = b + 1
            if self.record:
                self.drawn[b] = indices
            yield from indices


__all__ = ["MixtureSampler", "WeightSchedule", "batch_seed"]
