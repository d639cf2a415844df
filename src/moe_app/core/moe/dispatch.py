"""Sort-by-expert dispatch shared by every stacked-experts module (SwiGLU experts, PESC adapters,
LoRA experts).

The ``(T, k)`` routing assignments are flattened, skipped slots (``-1``, dynamic skipping) dropped,
and the rest stably sorted by expert, so each expert's rows are one contiguous segment of a
gathered buffer: one ``F.grouped_mm`` (or a loop over *experts*, never tokens) computes every
expert, and ``index_add`` scatters the weighted results back. The stable sort keeps each expert's
rows in token order, so the sums are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass
class ExpertDispatch:
    """The ``(token, slot)`` assignments of one routing decision, sorted by expert."""

    order: Tensor  # (N,) int64: flat slot id (token * k + slot) of each sorted row
    token_of: Tensor  # (N,) int64: token index of each sorted row
    counts: Tensor  # (E,) int64: rows per expert, in expert order
    num_experts: int

    @property
    def num_rows(self) -> int:
        return self.order.shape[0]

    @cached_property
    def offsets(self) -> Tensor:
        """Cumulative end offsets ``(E,)`` int32, as ``F.grouped_mm`` wants them (computed once:
        a LoRA-experts block runs six grouped matmuls on one dispatch)."""
        return self.counts.cumsum(0).to(torch.int32)

    @cached_property
    def counts_list(self) -> list[int]:
        """Counts as Python ints (one host sync, cached) for the per-expert loop."""
        return self.counts.tolist()

    def gather(self, x: Tensor) -> Tensor:
        """Rows of ``x`` ``(T, ...)`` in sorted-slot order ``(N, ...)``."""
        return x.index_select(0, self.token_of)

    def slot_weights(self, weights: Tensor) -> Tensor:
        """Combine weights ``(T, k)`` in sorted-slot order ``(N,)``."""
        return weights.reshape(-1).index_select(0, self.order)

    def combine(self, ys: Tensor, weights: Tensor, num_tokens: int) -> Tensor:
        """``out_t = sum_{rows r of t} w_r ys_r``: ``(N, d)`` -> ``(T, d)``."""
        w = self.slot_weights(weights).to(ys.dtype)  # (N,)
        out = ys.new_zeros(num_tokens, ys.shape[-1])  # (T, d)
        return out.index_add(0, self.token_of, ys * w.unsqueeze(-1))


def sort_by_expert(indices: Tensor, num_experts: int) -> ExpertDispatch:
    """Sort the routing assignments ``indices`` ``(T, k)`` (``-1`` = skipped slot) by expert."""
    k = indices.shape[-1]
    flat = indices.reshape(-1)  # (T*k,)
    # Stable sort keeps each expert's tokens in sequence order (deterministic sums); the -1 slots
    # sort first and are cut off, so skipped experts cost nothing.
    _, order = flat.sort(stable=True)  # (T*k,)
    counts = torch.bincount(flat + 1, minlength=num_experts + 1)  # (E+1,)
    n_skip = int(counts[0])
    order = order[n_skip:]  # (N,)
    return ExpertDispatch(order=order, token_of=order // k, counts=counts[1:], num_experts=num_experts)
