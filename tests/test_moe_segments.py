"""The experts' per-segment matmuls on CPU: oneDNN for the token-row products, MKL for the rest."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from moe_app.core.moe.experts import SwiGLUExperts
from moe_app.core.moe.segments import ONEDNN_MIN_WEIGHT, ExpertSegments, onednn_available

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")

COUNTS = [37, 0, 1, 90, 5, 64, 0, 3]  # empty, one-row, larger; oneDNN pads to 8 rows, bar the last


def _operands(k: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(sum(COUNTS), k, generator=g)  # (N, K)
    b = torch.randn(len(COUNTS), k, m, generator=g)  # (E, K, M)
    return a, b


@pytest.mark.parametrize("transposed", [False, True])
def test_onednn_products_equal_mkl_to_rounding_and_each_expert_alone(transposed):
    # Shapes where oneDNN runs its blocked kernels (K, M >= 128); the weight given as the
    # transpose of a stored (E, M, K) tensor (the forward) or as stored (the input gradient).
    a, b = _operands(160, 384)
    if transposed:
        b = b.transpose(1, 2).contiguous().transpose(1, 2)
    fast = ExpertSegments.from_counts(COUNTS, onednn=True).mm(a, b)
    mkl = ExpertSegments.from_counts(COUNTS, onednn=False).mm(a, b)
    torch.testing.assert_close(fast, mkl, rtol=1e-5, atol=1e-5)
    start = 0
    for e, n in enumerate(COUNTS):
        torch.testing.assert_close(
            fast[start : start + n],
            a[start : start + n].double() @ b[e].double(),
            check_dtype=False,
            rtol=1e-5,
            atol=1e-4,
        )
        start += n


def test_onednn_products_do_not_depend_on_the_thread_count():
    a, b = _operands(160, 384, seed=1)
    seg = ExpertSegments.from_counts(COUNTS, onednn=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = seg.mm(a, b)
        torch.set_num_threads(2)
        two = seg.mm(a, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_weight_grad_zeroes_empty_experts_and_matches_per_expert_products():
    g = torch.Generator().manual_seed(2)
    a, c = torch.randn(sum(COUNTS), 24, generator=g), torch.randn(sum(COUNTS), 40, generator=g)
    for _ in range(3):  # let the allocator hand back freed, non-zero blocks
        torch.full((8, 24, 40), float("nan"))
    out = ExpertSegments.from_counts(COUNTS, onednn=True).weight_grad(a, c)  # (E, 24, 40)
    start = 0
    for e, n in enumerate(COUNTS):
        torch.testing.assert_close(out[e], a[start : start + n].t() @ c[start : start + n])
        start += n
    assert out[1].abs().max() == 0 and out[6].abs().max() == 0


def _experts_case(impl: str) -> tuple[SwiGLUExperts, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    experts = SwiGLUExperts(8, 128, 192, impl=impl)
    x = torch.randn(150, 128)
    indices = torch.stack([torch.randperm(7)[:2] for _ in range(150)])  # expert 7 never chosen
    weights = torch.rand(150, 2)
    return experts, x, indices, weights


def test_auto_takes_onednn_for_fp32_on_cpu_unless_tiny_and_grouped_mm_for_bf16():
    big = SwiGLUExperts(4, 256, ONEDNN_MIN_WEIGHT // 256)  # the smallest experts auto runs on oneDNN
    x = torch.randn(3, 256)
    assert big.matmul_mode(x) == "onednn"
    assert big.to(torch.bfloat16).matmul_mode(x.bfloat16()) == "grouped_mm"
    tiny = SwiGLUExperts(4, 256, ONEDNN_MIN_WEIGHT // 256 - 4)
    assert tiny.matmul_mode(x) == "grouped_mm"
    tiny.impl = "onednn"  # asked for explicitly, it runs whatever the size
    assert tiny.matmul_mode(x) == "onednn"


def test_explicit_onednn_refuses_what_it_cannot_run():
    experts, x, indices, weights = _experts_case("onednn")
    experts = experts.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"impl='onednn' needs fp32 .* got params torch.bfloat16"):
        experts(x.bfloat16(), indices, weights.bfloat16())


def test_training_step_runs_the_token_row_products_through_onednn_and_matches_grouped_mm():
    results = {}
    for impl in ("onednn", "grouped_mm"):
        experts, x, indices, weights = _experts_case(impl)
        x.requires_grad_()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = experts(x, indices, weights)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        calls = {ev.key: ev.count for ev in prof.key_averages()}
        results[impl] = (y.detach(), x.grad, experts.gate_up_proj.grad, experts.down_proj.grad, calls)
    calls = results["onednn"][-1]
    # 7 experts with rows: 2 forward products and 2 input-gradient products each.
    assert calls.get("mkldnn::_linear_pointwise") == 4 * 7
    assert "mkldnn::_linear_pointwise" not in results["grouped_mm"][-1]
    for name, a, b in zip(
        ("y", "dx", "dgate_up", "ddown"), results["onednn"][:4], results["grouped_mm"][:4], strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert results["onednn"][2][7].abs().max() == 0 and results["onednn"][3][7].abs().max() == 0
