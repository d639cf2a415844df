"""Per-expert low-rank modules with a sort-by-expert dispatch: PESC adapters and LoRA experts.

Two kinds of "expert" that are small deltas on a shared frozen FFN, stored stacked so one dispatch
serves all experts of a layer:

* :class:`BottleneckAdapters` (PESC, Wu et al. 2024, "Parameter-Efficient Sparsity Crafting from
  Dense to Mixture-of-Experts for Instruction Tuning on General Tasks", arXiv 2401.02731): expert
  ``i`` is ``A_i(h) = U_i gelu(D_i dropout(h))`` with ``D_i: d -> r`` and ``U_i: r -> d``, no bias.
  ``U`` starts at zero, so every adapter is the zero function at initialisation and the PESC model
  equals the dense model exactly (ALGORITHMS.md section 5).
* :class:`LoraExperts` (MixLoRA, Li et al. 2024, arXiv 2404.15159): expert ``i`` carries its own
  LoRA pairs ``(A_i, B_i)`` on ``W_gate``, ``W_up`` and ``W_down`` (Hu et al. 2021), ``B`` zero at
  initialisation. The LoRA experts block (:mod:`moe_app.core.moe.pesc`) uses the low-rank products here.

Dispatch (no Python loop over tokens): :func:`sort_by_expert` flattens the ``(T, k)`` routing
assignments, drops skipped slots (``-1``), stably sorts them by expert and returns the permutation,
the token of each sorted slot and the per-expert counts. :func:`grouped_linear` then applies one
weight per expert to the contiguous sorted buffer, with ``F.grouped_mm`` where the shapes allow it
and otherwise a loop over *experts* (never tokens) on slices of the buffer. The sort lives in
:mod:`moe_app.core.moe.dispatch` and is shared with :class:`moe_app.core.moe.experts.SwiGLUExperts`; here
several projections per expert reuse one sort.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_app.core.moe.dispatch import ExpertDispatch, sort_by_expert
from moe_app.core.moe.experts import grouped_mm_supported

__all__ = ["IMPLS", "BottleneckAdapters", "ExpertDispatch", "LoraExperts", "grouped_linear", "sort_by_expert"]

IMPLS = ("auto", "grouped_mm", "loop")


def grouped_linear(xs: Tensor, weight: Tensor, dispatch: ExpertDispatch, impl: str = "auto") -> Tensor:
    """Per-expert ``x W_e^T`` on the sorted buffer: ``xs`` ``(N, in)``, ``weight`` ``(E, out, in)`` -> ``(N, out)``."""
    weight = weight.to(xs.dtype)
    out_f, in_f = weight.shape[1], weight.shape[2]
    if impl != "loop" and xs.shape[0] > 0:
        ok = grouped_mm_supported(xs.dtype, in_f, out_f)
        if impl == "grouped_mm" and not ok:
            raise ValueError(
                f"impl='grouped_mm' needs fp32/bf16/fp16 and 16-byte aligned rows; got {xs.dtype}, "
                f"in={in_f}, out={out_f}. Use impl='auto' to fall back to the per-expert loop."
            )
        if ok:
            return F.grouped_mm(xs.contiguous(), weight.transpose(1, 2), offs=dispatch.offsets)  # (N, out)
    parts = [xe @ weight[e].T for e, xe in enumerate(xs.split(dispatch.counts_list))]  # (n_e, out) each
    return torch.cat(parts) if parts else xs.new_zeros(0, out_f)  # (N, out)


def kaiming_uniform_stacked_(weight: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``nn.Linear``'s default init (kaiming-uniform, ``a = sqrt 5``) for each expert of ``(E, out, in)``.

    ``nn.init.kaiming_uniform_`` would take ``out * in`` of a 3-D tensor as the fan-in; the fan-in of
    one expert is ``in``, which gives the bound ``1 / sqrt(in)``.
    """
    bound = 1.0 / math.sqrt(weight.shape[-1])
    with torch.no_grad():
        sample = torch.rand(weight.shape, generator=generator, dtype=torch.float32)  # (E, out, in)
        weight.copy_((sample * 2.0 - 1.0) * bound)
    return weight


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}.")


class BottleneckAdapters(nn.Module):
    """``E`` PESC bottleneck adapters ``A_i(h) = U_i gelu(D_i dropout(h))`` stored stacked.

    ``down`` ``(E, r, d)`` holds ``D_i``, ``up`` ``(E, d, r)`` holds ``U_i`` (``nn.Linear`` layout).
    """

    def __init__(
        self, num_experts: int, hidden_size: int, adapter_dim: int, dropout: float = 0.1, impl: str = "auto"
    ) -> None:
        super().__init__()
        _check_impl(impl)
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.adapter_dim = adapter_dim
        self.impl = impl
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Parameter(torch.empty(num_experts, adapter_dim, hidden_size))
        self.up = nn.Parameter(torch.zeros(num_experts, hidden_size, adapter_dim))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        kaiming_uniform_stacked_(self.down, generator)
        with torch.no_grad():
            self.up.zero_()

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, adapter_dim={self.adapter_dim}, impl={self.impl}"

    def expert_forward(self, e: int, h: Tensor) -> Tensor:
        """Adapter ``e`` on ``h`` ``(n, d)`` -> ``(n, d)`` (used by the naive reference)."""
        z = F.gelu(self.dropout(h) @ self.down[e].to(h.dtype).T)  # (n, r)
        return z @ self.up[e].to(h.dtype).T  # (n, d)

    def forward(self, h: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """``sum_j weights[t, j] * A_{indices[t, j]}(h_t)``: ``h`` ``(T, d)`` -> ``(T, d)``."""
        dispatch = sort_by_expert(indices, self.num_experts)
        hs = self.dropout(dispatch.gather(h))  # (N, d); an independent dropout mask per slot
        z = F.gelu(grouped_linear(hs, self.down, dispatch, self.impl))  # (N, r)
        ys = grouped_linear(z, self.up, dispatch, self.impl)  # (N, d)
        return dispatch.combine(ys, weights, h.shape[0])  # (T, d)


class LoraExperts(nn.Module):
    """Per-expert LoRA pairs on the three SwiGLU projections, stored stacked.

    For projection ``p`` in (gate, up, down) with ``W_p`` ``(out, in)``: ``{p}_A`` ``(E, r, in)``
    (kaiming-uniform like peft) and ``{p}_B`` ``(E, out, r)`` (zeros); expert ``i``'s weight is
    ``W_p + (alpha / r) B_i A_i``.
    """

    PROJECTIONS = ("gate", "up", "down")

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        _check_impl(impl)
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.rank = rank
        self.alpha = float(alpha)
        self.impl = impl
        self.dropout = nn.Dropout(dropout)
        d, f = hidden_size, intermediate_size
        shapes = {"gate": (f, d), "up": (f, d), "down": (d, f)}
        for p, (out_f, in_f) in shapes.items():
            self.register_parameter(f"{p}_A", nn.Parameter(torch.empty(num_experts, rank, in_f)))
            self.register_parameter(f"{p}_B", nn.Parameter(torch.zeros(num_experts, out_f, rank)))
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for p in self.PROJECTIONS:
            kaiming_uniform_stacked_(getattr(self, f"{p}_A"), generator)
            with torch.no_grad():
                getattr(self, f"{p}_B").zero_()

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
            f"rank={self.rank}, alpha={self.alpha}, impl={self.impl}"
        )

    def delta(self, proj: str, xs: Tensor, dispatch: ExpertDispatch) -> Tensor:
        """``(alpha / r) B_e A_e dropout(x)`` for each sorted row: ``(N, in)`` -> ``(N, out)``."""
        a = grouped_linear(self.dropout(xs), getattr(self, f"{proj}_A"), dispatch, self.impl)  # (N, r)
        return grouped_linear(a, getattr(self, f"{proj}_B"), dispatch, self.impl) * self.scaling  # (N, out)

    def expert_delta(self, proj: str, e: int, x: Tensor) -> Tensor:
        """Expert ``e``'s LoRA delta on ``x`` ``(n, in)`` (used by the naive reference)."""
        a = self.dropout(x) @ getattr(self, f"{proj}_A")[e].to(x.dtype).T  # (n, r)
        return a @ getattr(self, f"{proj}_B")[e].to(x.dtype).T * self.scaling  # (n, out)

    def merged_weight(self, proj: str, base: Tensor) -> Tensor:
        """``W + (alpha / r) B_e A_e`` for every expert: ``base`` ``(out, in)`` -> ``(E, out, in)``, fp32 math."""
        a = getattr(self, f"{proj}_A").detach().float()  # (E, r, in)
        b = getattr(self, f"{proj}_B").detach().float()  # (E, out, r)
        return (base.detach().float().unsqueeze(0) + torch.bmm(b, a) * self.scaling).to(base.dtype)


__all__ = [
    "IMPLS",
    "BottleneckAdapters",
    "ExpertDispatch",
    "LoraExperts",
    "grouped_linear",
    "kaiming_uniform_stacked_",
    "sort_by_expert",
]
