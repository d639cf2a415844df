"""SparseMoeBlock: copy-upcycled experts with renormalised routing reproduce the dense FFN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_app.core.moe.block import SparseMoeBlock, find_moe_blocks
from moe_app.core.moe.experts import SwiGLUExperts
from moe_app.core.moe.router import TopKRouter


def _dense_swiglu(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def _copy_upcycled(E=4, k=2, d=16, ff=24, seed=0):
    torch.manual_seed(seed)
    w_gate, w_up, w_down = torch.randn(ff, d) * 0.2, torch.randn(ff, d) * 0.2, torch.randn(d, ff) * 0.2
    experts = SwiGLUExperts(E, d, ff)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.cat([w_gate, w_up]).expand(E, -1, -1))
        experts.down_proj.copy_(w_down.expand(E, -1, -1))
    router = TopKRouter(d, E, k, rule="softmax_topk_renorm")
    with torch.no_grad():
        router.weight.normal_(std=1.0)  # a random, far from uniform router
    return SparseMoeBlock(router, experts), (w_gate, w_up, w_down)


def test_identical_experts_with_renorm_equal_dense():
    block, dense_w = _copy_upcycled()
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(block(x), _dense_swiglu(x, *dense_w), rtol=1e-5, atol=1e-6)
    assert block.last_routing.indices.shape == (14, 2)


def test_shared_expert_and_gate_are_added():
    block, _ = _copy_upcycled()
    torch.manual_seed(1)
    shared = nn.Linear(16, 16, bias=False)
    shared_gate = nn.Linear(16, 1, bias=False)
    x = torch.randn(2, 7, 16)
    routed = block(x)
    block.shared_expert = shared
    torch.testing.assert_close(block(x), routed + shared(x))
    block.shared_gate = shared_gate
    torch.testing.assert_close(block(x), routed + shared_gate(x).sigmoid() * shared(x))


def test_scale_multiplies_routed_output_and_block_is_found():
    block, _ = _copy_upcycled()
    x = torch.randn(3, 16)
    y = block(x)
    block.scale = 2.5
    torch.testing.assert_close(block(x), 2.5 * y)
    model = nn.Sequential(nn.Identity(), block)
    assert [name for name, _ in find_moe_blocks(model)] == ["1"]
