"""What the Lightning layer may ask of a data module that mixes sources (typed, not probed).

The mixture callback (:mod:`moe_app.lightning.callbacks.mixture`) schedules the updates of an
adaptive mixture and the post-training stages record its weights in the lineage (the test
report's domain list is :class:`moe_app.core.data.protocols.DomainNames`). Each need is a
:class:`typing.Protocol` declared here, in the lower layer, and implemented explicitly by the data
modules, so a missing method is a type error and an ``isinstance`` check, never a ``getattr`` that
silently returns ``None``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from moe_app.core.mixing.config import MixtureConfig
from moe_app.core.mixing.sampler import MixtureSampler


@runtime_checkable
class MixtureLineage(Protocol):
    """A data module that can say which sources it mixed and with which final weights."""

    def describe(self) -> dict[str, Any]:
        """``{"sources": [...], "strategy": ..., "weights": {name: w}}``: JSON-ready, for lineage."""
        ...


@runtime_checkable
class AdaptiveMixture(MixtureLineage, Protocol):
    """The state an adaptive mixture exposes to the callback that schedules its updates."""

    mixture: MixtureConfig
    names: list[str]
    history: list[dict[str, Any]]
    reference: Tensor | None
    apply_delay: int
    started_batches: int
    start_measured: bool

    @property
    def weights(self) -> Tensor: ...

    def named(self, values: Tensor) -> dict[str, float]: ...

    def named_weights(self) -> dict[str, float]: ...

    def probe_batches(self, rank: int = 0, world_size: int = 1) -> list[dict[str, Tensor]]: ...

    def set_reference(self, losses: Tensor) -> None: ...

    def start_tracking(self) -> None: ...

    def stop_tracking(self) -> None: ...

    def note_batch_started(self) -> None: ...

    def update_due(self, step: int) -> bool: ...

    def compute_update(
        self, counts: list[Tensor], dev_losses: Tensor | None, embeddings: Tensor | None = None
    ) -> tuple[Tensor, Tensor]: ...

    def set_start_weights(self, weights: Tensor, delta: Tensor | None = None) -> None: ...

    def stage_starts_at(self, batch: int) -> bool: ...

    def apply_update(self, step: int, weights: Tensor, delta: Tensor | None = None) -> int: ...

    def sampler(self) -> MixtureSampler: ...
