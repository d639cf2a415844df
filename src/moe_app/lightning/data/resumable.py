"""A DataLoader whose position within the epoch is part of Lightning's checkpoint.

Lightning 2.6 resumes a mid-epoch checkpoint by restoring its loop counters, then iterating the
training loader *from the start of the epoch* unless the loader is stateful (has ``state_dict`` /
``load_state_dict``; it warns "your dataloader is not resumable"). With a seeded shuffle the
resumed run would then retrain the epoch's first batches and end with a different model.

:class:`ResumableDataLoader` counts the batches its current iterator has handed out; the count
goes into the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and, on resume, the next
iterator skips that many batches *of indices* (no row is loaded or collated for them). The
sampler's epoch is set by Lightning (``set_epoch``) from the restored epoch counter, so the
skipped prefix is exactly the order the uninterrupted run used.

The count is of batches yielded to Lightning, which equals batches trained on because Lightning
does not pre-fetch from loaders with a length (map-style datasets; all moe-app training data).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader


class _SkipFirst:
    """The loader's index batches, with the first ``loader._skip`` dropped at the next iteration."""

    def __init__(self, batches: Iterable[Any], loader: ResumableDataLoader) -> None:
        self.batches = batches
        self.loader = loader

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        # A generator: the sampler is iterated only when the first batch is asked for, i.e. after
        # Lightning's ``set_epoch``.
        skip, self.loader._skip = self.loader._skip, 0
        it = iter(self.batches)
        for _ in range(skip):
            if next(it, None) is None:
                return
        yield from it


class ResumableDataLoader(DataLoader):
    """``DataLoader`` plus ``state_dict`` / ``load_state_dict`` of the position within the epoch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        """Batches the current iterator has yielded (counting the ones skipped on resume)."""
        self._skip = 0
        """Batches the next iterator skips (set by ``load_state_dict``)."""

    @property
    def _index_sampler(self) -> Any:  # what DataLoader iterators draw index batches from
        return _SkipFirst(super()._index_sampler, self)

    def __iter__(self) -> Iterator[Any]:
        self._served = self._skip
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_served": int(self._served), "num_batches": len(self)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        served = int(state_dict.get("batches_served", 0))
        # At the end of an epoch the next one starts from its beginning.
        self._skip = served if 0 < served < len(self) else 0


__all__ = ["ResumableDataLoader"]
