"""Per-expert low-rank modules with a sort-by-expert dispatch: PESC adapters and LoRA experts.

Two kinds of "expert" that are small deltas on a shared frozen FFN, stored stacked so one dispatch
serves all experts of a layer:

* :class:`BottleneckAdapters` (PESC, Wu et al. 2024, "Parameter-Efficient Sparsity Crafting from
  Dense to Mixture-of-Experts for Instruction Tuning on General Tasks", arXiv 2401.02731): expert
  ``i`` is ``A_i(h) = U_i gelu(D_i dropout(h))`` with ``D_i: d -> r`` and ``U_i: r -> d``, no bias.
  ``U`` starts at zero, so every adapter is the zero function at initialisation and the PESC model
  equals the dense model exactly (ALGORITHMS.md section 5).

  *SparseAdapter* option (He et al. 2022, "SparseAdapter: An Easy Approach for Improving the
  Parameter-Efficiency of Adapters", arXiv 2210.04284, the "Large-Sparse" setting): with
  ``sparsity`` ``s > 0`` each expert's ``D_i`` and ``U_i`` carry a fixed boolean mask chosen once at
  initialisation, keeping exactly ``round((1 - s) r d)`` entries per expert and tensor; the forward
  uses ``W * mask``, so masked entries get exactly zero gradient and stay zero. A widened bottleneck
  ``r' = r / (1 - s)`` then has the trainable non-zeros of a dense width-``r`` adapter. The masks are
  buffers (``down_mask``, ``up_mask``), saved with the adapters. Scores: ``magnitude`` ranks
  ``|D_i|`` (pruning at initialisation by magnitude, one of the paper's criteria; SNIP / GraSP need
  data and gradients and are not offered); ``U`` starts at zero, so its mask is always drawn from a
  seeded random score. ``random`` draws seeded random scores for both.
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

IMPLS = ("auto", "grouped_mm", "loop")

MASK_SCORES = ("magnitude", "random")
"""How a sparse adapter's fixed mask is chosen at initialisation (see :class:`BottleneckAdapters`)."""


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


def kept_per_expert(numel: int, sparsity: float) -> int:
    """Entries one expert keeps of a ``numel``-entry weight at ``sparsity``: ``round((1 - s) numel)``, >= 1."""
    return numel if sparsity == 0 else max(1, min(numel, round((1.0 - sparsity) * numel)))


def topk_mask(score: Tensor, keep: int) -> Tensor:
    """Boolean mask of the ``keep`` highest scores of each expert (dim 0) of ``score`` ``(E, ...)``."""
    flat = score.reshape(score.shape[0], -1)  # (E, n)
    idx = flat.topk(keep, dim=1).indices  # (E, keep): exactly `keep` per expert, ties included
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device).scatter_(1, idx, True)
    return mask.reshape(score.shape)


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}.")


class BottleneckAdapters(nn.Module):
    """``E`` PESC bottleneck adapters ``A_i(h) = U_i gelu(D_i dropout(h))`` stored stacked.

    ``down`` ``(E, r, d)`` holds ``D_i``, ``up`` ``(E, d, r)`` holds ``U_i`` (``nn.Linear`` layout).

    With ``sparsity`` ``s > 0`` (SparseAdapter, module docstring) the boolean buffers ``down_mask``
    ``(E, r, d)`` and ``up_mask`` ``(E, d, r)`` are fixed by :meth:`reset_parameters` from its
    generator (``mask``: ``magnitude`` or ``random`` scores), masked entries of ``down`` / ``up`` are
    set to zero, and every forward uses ``down * down_mask`` / ``up * up_mask``. With ``s == 0`` there
    are no masks and nothing changes (same parameters, same random draws, same state-dict keys).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        adapter_dim: int,
        dropout: float = 0.1,
        impl: str = "auto",
        sparsity: float = 0.0,
        mask: str = "magnitude",
    ) -> None:
        super().__init__()
        _check_impl(impl)
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity} not in [0, 1).")
        if mask not in MASK_SCORES:
            raise ValueError(f"unknown mask {mask!r}; choose one of {', '.join(MASK_SCORES)}.")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.adapter_dim = adapter_dim
        self.impl = impl
        self.sparsity = float(sparsity)
        self.mask = mask
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Parameter(torch.empty(num_experts, adapter_dim, hidden_size))
        self.up = nn.Parameter(torch.zeros(num_experts, hidden_size, adapter_dim))
        self.down_mask: Tensor | None
        self.up_mask: Tensor | None
        if self.sparse:
            self.register_buffer("down_mask", torch.ones(self.down.shape, dtype=torch.bool))
            self.register_buffer("up_mask", torch.ones(self.up.shape, dtype=torch.bool))
        else:
            self.down_mask = self.up_mask = None
        self.reset_parameters()

    @property
    def sparse(self) -> bool:
        return self.sparsity > 0.0

    @property
    def kept_per_expert(self) -> int:
        """Non-zero (trainable) entries per expert in each of ``down`` and ``up``."""
        return kept_per_expert(self.adapter_dim * self.hidden_size, self.sparsity)

    def trainable_nonzeros(self) -> int:
        """Trainable adapter entries ``2 E kept_per_expert`` (``2 E r d`` when dense); the stored tensors stay ``(E, r, d)``."""
        return 2 * self.num_experts * self.kept_per_expert

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        kaiming_uniform_stacked_(self.down, generator)
        with torch.no_grad():
            self.up.zero_()
        if self.sparse:
            self.reset_masks(generator)

    @torch.no_grad()
    def reset_masks(self, generator: torch.Generator | None = None) -> None:
        """Choose the fixed masks (call after ``down`` is initialised) and zero the masked weights.

        ``magnitude``: keep the largest ``|D_i|``; ``up`` (zero at initialisation, nothing to rank) and
        ``random`` use uniform scores from ``generator``. Exactly :attr:`kept_per_expert` per expert.
        """
        assert self.down_mask is not None and self.up_mask is not None
        keep = self.kept_per_expert
        if self.mask == "magnitude":
            down_score = self.down.detach().float().abs()  # (E, r, d)
        else:
            down_score = torch.rand(self.down.shape, generator=generator, dtype=torch.float32)  # (E, r, d)
        up_score = torch.rand(self.up.shape, generator=generator, dtype=torch.float32)  # (E, d, r)
        self.down_mask.copy_(topk_mask(down_score, keep))
        self.up_mask.copy_(topk_mask(up_score, keep))
        self.down.mul_(self.down_mask)
        self.up.mul_(self.up_mask)

    def effective_down(self) -> Tensor:
        """``D`` as the forward uses it: ``down * down_mask`` (``down`` itself when dense)."""
        return self.down if self.down_mask is None else self.down * self.down_mask

    def effective_up(self) -> Tensor:
        """``U`` as the forward uses it: ``up * up_mask`` (``up`` itself when dense)."""
        return self.up if self.up_mask is None else self.up * self.up_mask

    def extra_repr(self) -> str:
        sparse = f", sparsity={self.sparsity}, mask={self.mask}" if self.sparse else ""
        return (
            f"experts={self.num_experts}, hidden={self.hidden_size}, adapter_dim={self.adapter_dim}, "
            f"impl={self.impl}{sparse}"
        )

    def expert_forward(self, e: int, h: Tensor) -> Tensor:
        """Adapter ``e`` on ``h`` ``(n, d)`` -> ``(n, d)`` (used by the naive reference)."""
        z = F.gelu(self.dropout(h) @ self.effective_down()[e].to(h.dtype).T)  # (n, r)
        return z @ self.effective_up()[e].to(h.dtype).T  # (n, d)

    def forward(self, h: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """``sum_j weights[t, j] * A_{indices[t, j]}(h_t)``: ``h`` ``(T, d)`` -> ``(T, d)``."""
        dispatch = sort_by_expert(indices, self.num_experts)
        hs = self.dropout(dispatch.gather(h))  # (N, d); an independent dropout mask per slot
        z = F.gelu(grouped_linear(hs, self.effective_down(), dispatch, self.impl))  # (N, r)
        ys = grouped_linear(z, self.effective_up(), dispatch, self.impl)  # (N, d)
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
    "MASK_SCORES",
    "BottleneckAdapters",
    "ExpertDispatch",
    "LoraExperts",
    "grouped_linear",
    "kaiming_uniform_stacked_",
    "kept_per_expert",
    "sort_by_expert",
    "topk_mask",
]
