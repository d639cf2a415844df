"""What a LightningModule may ask of the callbacks it runs with (typed, not probed with getattr)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class NonFiniteLossHandler(Protocol):
    """A callback that stops the run on a non-finite loss itself (after a diagnostic checkpoint).

    When one is present and ``handles_nonfinite_loss`` is true, the module leaves a NaN/Inf loss to
    it instead of raising (and, under DDP, instead of agreeing on the decision across ranks).
    """

    handles_nonfinite_loss: bool


__all__ = ["NonFiniteLossHandler"]
