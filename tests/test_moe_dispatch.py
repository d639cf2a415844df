"""Sort-by-expert dispatch: the sorted layout, and the experts' fused forward/backward against the
reference per-expert loop at small per-expert token counts (empty experts, one-token experts,
skipped slots), values and gradients."""

from __future__ import annotations

import pytest
import torch

from moe_app.core.moe.dispatch import sort_by_expert
from moe_app.core.moe.experts import SwiGLUExperts, _gmm_weight_grad, experts_forward_naive
from moe_app.core.moe.segments import ExpertSegments


def test_sort_by_expert_layout_is_stable_and_drops_skipped_slots():
    indices = torch.tensor([[2, 0], [0, -1], [2, 3], [-1, -1], [0, 2]])  # (T=5, k=2), expert 1 unused
    disp = sort_by_expert(indices, num_experts=4)
    assert disp.counts.tolist() == [3, 0, 3, 1]
    assert disp.offsets.tolist() == [3, 3, 6, 7] and disp.offsets.dtype == torch.int32
    # Flat slot ids grouped by expert, each group in token order (stable sort).
    assert disp.order.tolist() == [1, 2, 8, 0, 4, 9, 5]
    assert disp.token_of.tolist() == [0, 1, 4, 0, 2, 4, 2]
    assert disp.num_rows == 7 and disp.counts_list == [3, 0, 3, 1]
    weights = torch.arange(10, dtype=torch.float32).view(5, 2)
    assert disp.slot_weights(weights).tolist() == [1.0, 2.0, 8.0, 0.0, 4.0, 9.0, 5.0]


def test_combine_sums_weighted_rows_per_token():
    indices = torch.tensor([[1, 0], [1, -1], [0, 1]])
    disp = sort_by_expert(indices, num_experts=2)
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]])
    ys = torch.arange(disp.num_rows, dtype=torch.float32).unsqueeze(-1) + 1.0  # (N, 1) row r holds r + 1
    out = disp.combine(ys, weights, num_tokens=3)
    # sorted rows: expert 0 -> slots (t0, s1), (t2, s0); expert 1 -> (t0, s0), (t1, s0), (t2, s1)
    expected = torch.tensor([[0.75 * 1 + 0.25 * 3], [1.0 * 4], [0.5 * 2 + 0.5 * 5]])
    torch.testing.assert_close(out, expected)


def _small_counts_case(impl: str, E: int = 8, d: int = 16, F: int = 24):
    """9 tokens, top-2, 8 experts: counts 0-5 per expert, one-token experts, experts 5..7 empty."""
    torch.manual_seed(3)
    experts = SwiGLUExperts(E, d, F, impl=impl)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.3)
        experts.down_proj.normal_(std=0.3)
    indices = torch.tensor([[0, 2], [2, 0], [0, -1], [3, 0], [0, 2], [4, 2], [2, 0], [1, 2], [0, 2]])
    x = torch.randn(indices.shape[0], d)
    weights = torch.rand(indices.shape)
    return experts, x, indices, weights


def _values_and_grads(fn, experts, x, indices, weights):
    x = x.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    y = fn(x, indices, weights)
    probe = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * probe).sum().backward()
    return y.detach(), x.grad, weights.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()


@pytest.mark.parametrize("impl", ["grouped_mm", "loop", "onednn"])
def test_small_per_expert_counts_match_reference_loop_values_and_grads(impl):
    experts, x, indices, weights = _small_counts_case(impl)
    counts = torch.bincount(indices[indices >= 0], minlength=8)
    assert (counts[5:] == 0).all() and (counts == 1).any()  # empty and one-token experts present
    fast = _values_and_grads(experts, experts, x, indices, weights)
    ref = _values_and_grads(lambda *a: experts_forward_naive(experts, *a), experts, x, indices, weights)
    for name, a, b in zip(("y", "dx", "dweights", "dgate_up", "ddown"), fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert fast[3][5:].abs().max() == 0 and fast[4][5:].abs().max() == 0  # empty experts: exact zeros
    assert fast[2][2, 1] == 0  # the skipped slot's weight gets no gradient


def test_loop_weight_grad_zeroes_empty_segments_in_reused_memory():
    # The loop's weight gradient starts from uninitialised memory; empty segments must still be 0.
    torch.manual_seed(0)
    a, b = torch.randn(5, 4), torch.randn(5, 8)  # 16-byte rows, so grouped_mm can check it too
    counts = [2, 0, 3, 0]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    for _ in range(3):  # let the allocator hand back freed, non-zero blocks
        torch.full((4, 4, 8), float("nan"))
    out = _gmm_weight_grad(a, b, offs, ExpertSegments.from_counts(counts))
    torch.testing.assert_close(out[0], a[:2].t() @ b[:2])
    torch.testing.assert_close(out[2], a[2:].t() @ b[2:])
    assert out[1].abs().max() == 0 and out[3].abs().max() == 0
    torch.testing.assert_close(out, torch.nn.functional.grouped_mm(a.t(), b, offs=offs))
