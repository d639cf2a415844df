"""What the Lightning layer may ask of a data module about its rows (typed, not probed).

Declared here, in the lower layer, and implemented explicitly by the data modules, so a missing
method is a type error and an ``isinstance`` check, never a ``getattr`` that silently returns
``None``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class DomainNames(Protocol):
    """A data module whose test rows carry a domain, in an order fixed before any batch is seen.

    The per-domain test report (:class:`moe_app.lightning.modules.report.DomainReport`) indexes its
    metric states by position in this list, and those states are summed across ranks by position:
    the list must therefore be the same on every rank, whatever shard of the test set a rank gets.
    """

    def domain_names(self) -> list[str]:
        """Every domain of the test split, sorted; the same list on every rank."""
        ...


__all__ = ["DomainNames"]
