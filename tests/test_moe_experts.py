"""SwiGLUExperts: the sorted grouped dispatch equals the naive per-expert loop, values and gradients."""

from __future__ import annotations

import pytest
import torch

from moe_app.core.moe import experts as experts_module
from moe_app.core.moe.experts import SwiGLUExperts, experts_forward_naive, grouped_mm_supported


def _case(T=24, d=16, F=32, E=4, k=2, seed=0, dtype=torch.float32, impl="auto", act="silu"):
    torch.manual_seed(seed)
    experts = SwiGLUExperts(E, d, F, act=act, impl=impl).to(dtype)
    with torch.no_grad():  # larger weights than the init so the test is not dominated by rounding
        experts.gate_up_proj.normal_(std=0.3)
        experts.down_proj.normal_(std=0.3)
    x = torch.randn(T, d, dtype=dtype)
    # Distinct experts per token, expert E-1 never chosen: a zero-token expert.
    indices = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)])  # (T, k)
    indices[::5, -1] = -1  # skipped slots
    weights = torch.rand(T, k, dtype=dtype)
    return experts, x, indices, weights


def _run(fn, experts, x, indices, weights):
    x = x.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    y = fn(x, indices, weights)
    probe = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)  # a non-uniform upstream grad
    (y * probe).sum().backward()
    return y.detach(), x.grad, weights.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()


@pytest.mark.parametrize("impl", ["grouped_mm", "loop", "onednn"])
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_dispatch_matches_naive_values_and_grads(impl, act):
    experts, x, indices, weights = _case(impl=impl, act=act)
    fast = _run(experts, experts, x, indices, weights)
    naive = _run(lambda *a: experts_forward_naive(experts, *a), experts, x, indices, weights)
    for name, a, b in zip(("y", "dx", "dweights", "dgate_up", "ddown"), fast, naive):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # The unused expert gets exactly zero gradient, the skipped slots' weights too.
    assert fast[3][-1].abs().max() == 0 and fast[4][-1].abs().max() == 0
    assert fast[2][indices < 0].abs().max() == 0


def test_grouped_mm_and_loop_agree():
    experts, x, indices, weights = _case(T=40, E=6, k=3)
    y_gmm = experts(x, indices, weights)
    experts.impl = "loop"
    torch.testing.assert_close(experts(x, indices, weights), y_gmm, rtol=1e-6, atol=1e-6)


def test_non_aligned_sizes_fall_back_to_loop(monkeypatch):
    monkeypatch.setattr(experts_module, "onednn_available", lambda: False)  # a torch without oneDNN
    experts, x, indices, weights = _case(d=6, F=10)
    assert not grouped_mm_supported(x.dtype, 6, 10)
    assert experts.matmul_mode(x) == "loop"
    fast = _run(experts, experts, x, indices, weights)
    naive = _run(lambda *a: experts_forward_naive(experts, *a), experts, x, indices, weights)
    for a, b in zip(fast, naive):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    experts.impl = "grouped_mm"
    with pytest.raises(ValueError, match="impl='auto'"):
        experts(x, indices, weights)


def test_bf16_grouped_mm_close_to_fp32_naive():
    experts, x, indices, weights = _case(d=16, F=24, dtype=torch.bfloat16)
    assert experts.matmul_mode(x) == "grouped_mm"
    y = experts(x, indices, weights)
    assert y.dtype == torch.bfloat16
    ref = experts_forward_naive(experts.float(), x.float(), indices, weights.float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_all_slots_skipped_gives_zeros_and_grad():
    experts, x, indices, weights = _case()
    x.requires_grad_()
    y = experts(x, torch.full_like(indices, -1), weights)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_all_experts_forward_matches_expert_forward():
    experts, x, _, _ = _case()
    every = experts.all_experts_forward(x)  # (E, T, d)
    assert every.shape == (experts.num_experts, *x.shape)
    for e in range(experts.num_experts):
        torch.testing.assert_close(every[e], experts.expert_forward(e, x), rtol=1e-5, atol=1e-6)


def test_contract_layout_and_validation():
    experts = SwiGLUExperts(3, 8, 12)
    assert experts.gate_up_proj.shape == (3, 24, 8) and experts.down_proj.shape == (3, 8, 12)
    # Rows [0, F) are W_gate, [F, 2F) W_up.
    x = torch.randn(5, 8)
    gate, up = experts.gate_up_proj[1, :12], experts.gate_up_proj[1, 12:]
    ref = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ experts.down_proj[1].T
    torch.testing.assert_close(experts.expert_forward(1, x), ref)
    with pytest.raises(ValueError, match="impl"):
        SwiGLUExperts(2, 8, 8, impl="fast")


def test_input_cast_to_parameter_dtype_and_autocast():
    experts, x, indices, weights = _case(d=16, F=24)
    ref = experts_forward_naive(experts, x, indices, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autograd path, autocast casts per op
        y = experts(x, indices, weights)
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    experts_bf16 = experts.to(torch.bfloat16)
    y = experts_bf16(x, indices, weights)  # fp32 input, bf16 parameters: cast in, cast back
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=5e-2, atol=5e-2)
