"""PESC and LoRA-expert blocks: dense equivalence at init, fast dispatch == naive, shared FFN once, merge."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from moe_app.core.moe.adapters import BottleneckAdapters, LoraExperts, grouped_linear, sort_by_expert
from moe_app.core.moe.block import SparseMoeBlock, find_moe_blocks
from moe_app.core.moe.pesc import (
    LoraExpertsMoeBlock,
    PescMoeBlock,
    lora_experts_forward_naive,
    merge_lora_experts,
    pesc_forward_naive,
)
from moe_app.core.moe.router import TopKRouter
from moe_app.core.utils.params import count_parameters

D, FF, E = 32, 64, 8


def _mlp(seed: int = 0) -> LlamaMLP:
    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=FF))


def _pesc(
    k: int = 2, impl: str = "auto", dropout: float = 0.0, scale: float = 1.0, r: int = 16
) -> PescMoeBlock:
    mlp = _mlp()
    return PescMoeBlock(
        mlp, TopKRouter(D, E, k), BottleneckAdapters(E, D, r, dropout, impl=impl), scale=scale
    )


def _lora(k: int = 2, impl: str = "auto", scale: float = 1.0) -> LoraExpertsMoeBlock:
    return LoraExpertsMoeBlock(
        _mlp(), TopKRouter(D, E, k), LoraExperts(E, D, FF, 4, 8.0, 0.0, impl=impl), scale=scale
    )


def _randomize(module: torch.nn.Module, std: float = 0.1, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _x(seed: int = 2, shape=(3, 7, D)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 2, 8])
def test_pesc_block_equals_dense_mlp_at_init_for_any_router(k):
    block = _pesc(k=k, dropout=0.1, scale=0.25).eval()
    x = _x()
    dense = block.ffn(x)
    assert_close(block(x), dense, rtol=0, atol=1e-5)
    _randomize(block.router, std=5.0)  # a very different (sharp) routing
    assert_close(block(x), dense, rtol=0, atol=1e-5)
    assert block.last_routing is not None and block.last_routing.indices.shape == (21, k)


def test_lora_experts_block_equals_dense_mlp_at_init():
    block = _lora().eval()
    x = _x()
    dense = block.ffn(x)
    assert_close(block(x), dense, rtol=0, atol=1e-5)
    _randomize(block.router, std=5.0)
    assert_close(block(x), dense, rtol=0, atol=1e-5)


def _grads(out, params, seed=3):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, params, g)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("k", [1, 2])
def test_pesc_fast_dispatch_matches_naive_outputs_and_grads(impl, k):
    block = _pesc(k=k, impl=impl, scale=0.5)
    _randomize(block.adapters)
    _randomize(block.router, std=0.5, seed=4)
    x = _x().requires_grad_(True)
    params = [x, block.adapters.down, block.adapters.up, block.router.weight]
    fast = block(x)
    naive = pesc_forward_naive(block, x)
    assert_close(fast, naive, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(fast, params), _grads(naive, params)):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_lora_experts_fast_dispatch_matches_naive_outputs_and_grads(impl):
    block = _lora(impl=impl, scale=1.5)
    _randomize(block.expert_lora)
    _randomize(block.router, std=0.5, seed=4)
    x = _x().requires_grad_(True)
    params = [x, block.router.weight, *block.expert_lora.parameters()]
    fast = block(x)
    naive = lora_experts_forward_naive(block, x)
    assert_close(fast, naive, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(fast, params), _grads(naive, params)):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dispatch_skips_minus_one_slots_and_empty_experts():
    idx = torch.tensor([[0, -1], [3, 0], [-1, -1], [3, 1]])  # (T=4, k=2); experts 2, 4.. empty
    d = sort_by_expert(idx, 5)
    assert d.counts.tolist() == [2, 1, 0, 2, 0]
    assert d.token_of.tolist() == [0, 1, 3, 1, 3]
    w = torch.randn(5, 8, 4)
    xs = torch.randn(5, 4)
    ref = torch.stack([xs[i] @ w[e].T for i, e in enumerate([0, 0, 1, 3, 3])])
    for impl in ("loop", "grouped_mm"):
        assert_close(grouped_linear(xs, w, d, impl), ref)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("variant", ["adapter", "lora"])
def test_shared_ffn_runs_once_per_forward_regardless_of_k(k, variant):
    block = _pesc(k=k) if variant == "adapter" else _lora(k=k)
    calls: dict[str, int] = {}

    def hook(name):
        def fn(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            assert inputs[0].shape[0] == 21 or name == "down_proj"

        return fn

    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(block.ffn, name).register_forward_hook(hook(name))
    block.ffn.register_forward_hook(hook("ffn"))
    block(_x())
    assert calls["gate_proj"] == 1 and calls["up_proj"] == 1 and calls["down_proj"] == 1
    assert calls.get("ffn", 0) == (1 if variant == "adapter" else 0)


def test_merge_lora_experts_equals_unmerged():
    block = _lora(scale=1.0)
    _randomize(block.expert_lora, std=0.2)
    _randomize(block.router, std=0.5, seed=4)
    block.eval()
    merged = merge_lora_experts(block)
    assert isinstance(merged, SparseMoeBlock)
    x = _x()
    assert_close(merged(x), block(x), rtol=1e-5, atol=1e-5)


def test_blocks_expose_moe_interface_and_param_accounting():
    block = _pesc(k=2, r=16)
    assert block.num_experts == E and block.top_k == 2 and block.experts is block.adapters
    assert [n for n, _ in find_moe_blocks(torch.nn.ModuleDict({"mlp": block}))] == ["mlp"]
    counts = count_parameters(block)
    adapter_params = 2 * E * 16 * D
    assert counts.total - counts.active == adapter_params * (E - 2) // E
    names = {n for n, _ in block.named_parameters()}
    assert {"adapters.down", "adapters.up", "router.weight", "ffn.gate_proj.weight"} <= names
