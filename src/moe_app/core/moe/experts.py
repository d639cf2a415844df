"""SwiGLU experts with a sort-by-expert dispatch and a fused forward/backward.

Each expert is the LLaMA feed-forward ``E_e(x) = W_down (act(W_gate x) * (W_up x))`` (Shazeer
2020, "GLU Variants Improve Transformer"). The experts of one layer are stored stacked, gate and
up fused (``gate_up_proj (E, 2F, d)``, ``down_proj (E, d, F)``, the layout of transformers'
Mixtral/Qwen MoE experts), so that upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling") and
splitting (LLaMA-MoE, Zhu et al. 2024) write them with plain slicing, export is a reshape, and the
dispatch runs one grouped GEMM per projection instead of one small GEMM per expert.

Dispatch (no Python loop over tokens, as in megablocks / scattermoe): the ``(T, k)`` assignments
are flattened, sorted by expert (skipped ``-1`` slots sort first and are cut off, so a skipped
expert costs nothing), the token rows gathered once, each projection run as a grouped matmul over
the contiguous per-expert segments, the outputs weighted and scattered back with ``index_add``.

Why a hand-written backward: with the GEMMs equal to a dense FFN's, what is left is memory
traffic, and on CPU every fresh large tensor also pays page faults. Composing the same steps
from autograd ops allocates about twice as many ``(N, F)`` buffers (the activation's backward, the
``chunk`` backward's concatenation, the weighting's two products). :class:`_SwiGLUDispatch` writes
the gate and up gradients straight into one ``(N, 2F)`` buffer and works in place where autograd
cannot, which brings the MoE block to within a few percent of a dense FFN with the same active
parameters (``benchmarks/moe_block.py``). It covers SiLU (every LLaMA / Mistral / Qwen2 model);
other activations take the plain autograd path, which computes the same thing.

At small per-expert token counts (SmolLM2-135M, 4 x 100 tokens, top-2 of 8: ~100 rows per expert)
two costs remain that are not arithmetic: MKL's GEMMs at few rows run slower per FLOP than the
dense FFN's 400-row GEMMs (on CPU the token-row products therefore go through oneDNN,
:mod:`moe_app.core.moe.segments`), and the ``(E, 2F, d)`` weight gradient (57 MB there) is above
glibc's largest mmap threshold (32 MB), so every step gets fresh pages the kernel must zero (about
a quarter of the MoE backward on CPU; ``moe_app.core.utils.allocator`` keeps freed memory during
training; ``benchmarks/moe_train_step.py`` reports faults per phase).

The matmuls (``impl``): on CPU in fp32 a loop over experts with oneDNN for the token-row products
(``onednn``; not for tiny experts, where its per-call cost outweighs it); elsewhere ``torch.nn.functional.grouped_mm`` (fp32/bf16/fp16, row strides 16-byte
aligned, i.e. ``d`` and ``F`` multiples of 4 in fp32 and 8 in bf16); where neither applies, a loop
over experts with ``torch.mm`` (never over tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_app.core.moe.dispatch import sort_by_expert
from moe_app.core.moe.segments import ONEDNN_MIN_WEIGHT, ExpertSegments, onednn_available

IMPLS = ("auto", "grouped_mm", "loop", "onednn")
_FUSED_ACTS = ("silu", "swish")


def grouped_mm_supported(dtype: torch.dtype, hidden_size: int, intermediate_size: int) -> bool:
    """Whether ``F.grouped_mm`` accepts these shapes: its kernels want 16-byte aligned row strides."""
    if not hasattr(F, "grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    per16 = 16 // torch.empty(0, dtype=dtype).element_size()
    return hidden_size % per16 == 0 and intermediate_size % per16 == 0


def _gmm(a: Tensor, b: Tensor, offs: Tensor, plan: ExpertSegments | None) -> Tensor:
    """Segment ``g`` of ``a (N, K)`` times ``b[g] (K, M)`` -> ``(N, M)``; per expert when ``plan`` is given."""
    return F.grouped_mm(a, b, offs=offs) if plan is None else plan.mm(a, b)


def _gmm_weight_grad(a: Tensor, b: Tensor, offs: Tensor, plan: ExpertSegments | None) -> Tensor:
    """Per segment ``a_g^T b_g`` for ``a (N, K)``, ``b (N, M)`` -> ``(G, K, M)``; zero for empty segments."""
    return F.grouped_mm(a.t(), b, offs=offs) if plan is None else plan.weight_grad(a, b)


class _SwiGLUDispatch(torch.autograd.Function):
    """``out = index_add_t(w_i * E_{e(i)}(x_{t(i)}))`` over slots ``i`` sorted by expert, SiLU GLU.

    Inputs: ``x (T, d)``, ``w (N,)`` slot weights, ``gate_up (E, 2F, d)``, ``down (E, d, F)``,
    ``token_of (N,)`` the token of each sorted slot, ``offs (E,)`` int32 segment ends, ``plan``
    the per-expert matmuls (:class:`ExpertSegments`: loop or oneDNN) or ``None`` (grouped_mm).
    Once differentiable.
    """

    @staticmethod
    def forward(ctx, x, w, gate_up, down, token_of, offs, plan):
        inter = down.shape[-1]
        xs = x.index_select(0, token_of)  # (N, d)
        gu = _gmm(xs, gate_up.transpose(1, 2), offs, plan)  # (N, 2F)
        gate, up = gu[:, :inter], gu[:, inter:]  # (N, F) views
        act = F.silu(gate)  # (N, F), kept: recomputing it in backward costs an exp per element
        h = act * up  # (N, F)
        ys = _gmm(h, down.transpose(1, 2), offs, plan)  # (N, d), unweighted: the weight grad needs it
        out = x.new_zeros(x.shape).index_add_(0, token_of, ys * w.unsqueeze(-1))  # (T, d)
        ctx.save_for_backward(xs, w, gate_up, down, token_of, offs, gu, act, h, ys)
        ctx.plan = plan
        ctx.num_tokens = x.shape[0]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        xs, w, gate_up, down, token_of, offs, gu, act, h, ys = ctx.saved_tensors
        plan = ctx.plan
        inter = down.shape[-1]
        need_x, need_w, need_gu, need_down = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_gate_up = grad_down = None

        g = grad_out.index_select(0, token_of)  # (N, d), owned: weighted in place below
        if need_w:
            grad_w = torch.linalg.vecdot(g, ys)  # (N,)
        g.mul_(w.unsqueeze(-1))
        if need_down:
            grad_down = _gmm_weight_grad(g, h, offs, plan)  # (E, d, F)
        if not (need_x or need_gu):
            return grad_x, grad_w, grad_gate_up, grad_down, None, None, None

        gh = _gmm(g, down, offs, plan)  # (N, F) grad of the GLU output
        del g
        gate, up = gu[:, :inter], gu[:, inter:]
        ggu = torch.empty_like(gu)  # (N, 2F): gate grad | up grad, the layout gate_up_proj wants
        torch.mul(act, gh, out=ggu[:, inter:])
        gh.mul_(up)
        torch.ops.aten.silu_backward.grad_input(gh, gate, grad_input=ggu[:, :inter])
        del gh
        if need_gu:
            grad_gate_up = _gmm_weight_grad(ggu, xs, offs, plan)  # (E, 2F, d)
        if need_x:
            gxs = _gmm(ggu, gate_up, offs, plan)  # (N, d)
            grad_x = grad_out.new_zeros(ctx.num_tokens, gxs.shape[1]).index_add_(0, token_of, gxs)  # (T, d)
        return grad_x, grad_w, grad_gate_up, grad_down, None, None, None


class SwiGLUExperts(nn.Module):
    """``num_experts`` SwiGLU feed-forward networks stored as two stacked parameters.

    ``gate_up_proj`` ``(E, 2F, d)``: rows ``[0, F)`` are ``W_gate``, rows ``[F, 2F)`` are ``W_up``.
    ``down_proj`` ``(E, d, F)``. ``impl``: ``"grouped_mm"`` (raises where unsupported), ``"loop"``
    (per-expert matmuls on the sorted buffer), ``"onednn"`` (the same loop with oneDNN for the
    products on token rows: fp32 on CPU, :mod:`moe_app.core.moe.segments`) or ``"auto"`` (onednn
    where it runs and the experts are not tiny, else grouped_mm where supported, else loop).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act: str = "silu",
        impl: str = "auto",
    ) -> None:
        super().__init__()
        from transformers.activations import ACT2FN  # lazy: importing it costs seconds

        if impl not in IMPLS:
            raise ValueError(f"unknown experts impl {impl!r}; choose one of {', '.join(IMPLS)}.")
        if act not in ACT2FN:
            raise ValueError(f"unknown activation {act!r}; use a transformers ACT2FN name such as 'silu'.")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.act_name = act
        self.act_fn = ACT2FN[act]
        self.impl = impl
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, act={self.act_name}, impl={self.impl}"
        )

    def _glu(self, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # (N, F) each
        return self.act_fn(gate) * up

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` on ``x`` ``(N, d)`` -> ``(N, d)``."""
        h = self._glu(F.linear(x, self.gate_up_proj[e]))  # (N, F)
        return F.linear(h, self.down_proj[e])  # (N, d)

    def all_experts_forward(self, x: Tensor) -> Tensor:
        """Every expert on every token: ``(T, d)`` -> ``(E, T, d)`` (scoring, pruning, tests)."""
        gate_up = torch.matmul(x.unsqueeze(0), self.gate_up_proj.transpose(1, 2))  # (E, T, 2F)
        return torch.matmul(self._glu(gate_up), self.down_proj.transpose(1, 2))  # (E, T, d)

    def matmul_mode(self, x: Tensor) -> str:
        """What the dispatch runs for ``x``: ``"grouped_mm"``, ``"onednn"`` or ``"loop"``.

        ``auto`` takes ``onednn`` for fp32 on CPU when an expert's projection has at least
        ``ONEDNN_MIN_WEIGHT`` entries (:mod:`moe_app.core.moe.segments`), else ``grouped_mm`` where
        its kernels take the shapes, else ``loop``. Raises where an explicit
        ``impl`` cannot run."""
        dtype = self.gate_up_proj.dtype  # the input is cast to it
        autocast = torch.is_autocast_enabled(x.device.type)
        if self.impl == "loop":
            return "loop"
        onednn_ok = (
            x.device.type == "cpu" and dtype == self.down_proj.dtype == torch.float32 and not autocast
        ) and onednn_available()
        if self.impl == "onednn" and not onednn_ok:
            raise ValueError(
                "impl='onednn' needs fp32 parameters and input on CPU, no autocast, and a torch build "
                f"with oneDNN; got params {dtype} on {x.device}, autocast {autocast}, oneDNN "
                f"{onednn_available()}. Use impl='auto' (oneDNN, grouped_mm or the loop, whichever runs)."
            )
        if onednn_ok and (
            self.impl == "onednn" or self.hidden_size * self.intermediate_size >= ONEDNN_MIN_WEIGHT
        ):
            return "onednn"
        ok = (
            grouped_mm_supported(dtype, self.hidden_size, self.intermediate_size)
            and self.down_proj.dtype == dtype
            and not autocast
        )
        if self.impl == "grouped_mm" and not ok:
            raise ValueError(
                "impl='grouped_mm' needs fp32/bf16/fp16 parameters, no autocast, and hidden/intermediate "
                "sizes with 16-byte aligned rows; got "
                f"params {dtype}, autocast {autocast}, d={self.hidden_size}, "
                f"F={self.intermediate_size}. Use impl='auto' to fall back to the per-expert loop."
            )
        return "grouped_mm" if ok else "loop"

    def forward(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """``y_t = sum_j weights[t, j] * E_{indices[t, j]}(x_t)``; ``indices == -1`` slots are skipped.

        ``x (T, d)``, ``indices (T, k)`` int64, ``weights (T, k)`` -> ``(T, d)``.
        """
        dispatch = sort_by_expert(indices, self.num_experts)
        if dispatch.num_rows == 0:
            return x * 0.0  # keeps the graph connected to x; every slot was skipped
        token_of = dispatch.token_of  # (N,)
        w = dispatch.slot_weights(weights).to(x.dtype)  # (N,)
        offs = dispatch.offsets  # (E,) segment ends
        mode = self.matmul_mode(x)
        dtype = self.gate_up_proj.dtype
        plan = (
            None
            if mode == "grouped_mm"
            else ExpertSegments.from_counts(dispatch.counts_list, mode == "onednn")
        )
        if torch.is_autocast_enabled(x.device.type) or self.act_name not in _FUSED_ACTS:
            return self._forward_autograd(x, w, token_of, offs, plan)  # autocast casts per op there
        y = _SwiGLUDispatch.apply(
            x.to(dtype), w.to(dtype), self.gate_up_proj, self.down_proj, token_of, offs, plan
        )
        return y.to(x.dtype)

    def _forward_autograd(
        self, x: Tensor, w: Tensor, token_of: Tensor, offs: Tensor, plan: ExpertSegments | None
    ) -> Tensor:
        """The same dispatch from autograd ops, for activations without a fused backward (a loop
        over the experts where ``plan`` is given)."""
        xs = x.index_select(0, token_of)  # (N, d)
        if plan is None:
            h = self._glu(F.grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offs))  # (N, F)
            ys = F.grouped_mm(h, self.down_proj.transpose(1, 2), offs=offs)  # (N, d)
        else:
            parts = [self.expert_forward(e, xs[s:t]) for e, (s, t) in enumerate(plan.bounds) if t > s]
            ys = torch.cat(parts)  # (N, d)
        return torch.zeros_like(x).index_add(0, token_of, ys * w.unsqueeze(-1))  # (T, d)


def experts_forward_naive(experts: SwiGLUExperts, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """Test oracle: loop over experts with boolean masks; same result as ``experts(x, indices, weights)``."""
    out = torch.zeros_like(x)  # (T, d)
    for e in range(experts.num_experts):
        hit = indices == e  # (T, k)
        rows = hit.any(dim=-1)  # (T,)
        if rows.any():
            w = (weights * hit).sum(dim=-1)[rows]  # (n,)
            y = experts.expert_forward(e, x[rows])  # (n, d)
            out = out.index_add(0, rows.nonzero().squeeze(-1), y * w.unsqueeze(-1).to(y.dtype))
    return out
