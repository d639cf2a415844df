"""Sparse upcycling by copying, noisy copies, Drop-Upcycling, layer selection and refusals."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from conftest import tiny_llama_config
from moe_app.core.moe.block import SparseMoeBlock
from moe_app.core.spec import spec_of
from moe_app.core.upcycling import UpcycleConfig, upcycle
from moe_app.core.upcycling.config import parse_layer_selection
from moe_app.core.upcycling.copy import drop_indices
from moe_app.core.upcycling.rng import layer_generator
from moe_app.errors import ConfigError, UnsupportedModelError
from upcycling_helpers import build, logits, tokens, upcycled

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_mistral_dir", "tiny_qwen2_dir"])
def test_copy_with_renorm_reproduces_dense_for_random_router(fixture, request):
    dense = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture)).eval()
    ids = tokens()
    cfg = UpcycleConfig(method="copy", num_experts=4, top_k=2, router_init="normal", router_std=1.0, seed=3)
    moe = upcycled(dense, cfg)
    blocks = [m for m in moe.modules() if isinstance(m, SparseMoeBlock)]
    assert len(blocks) == 2
    assert blocks[0].router.weight.abs().sum() > 0  # a real, non-uniform router
    assert_close(logits(moe, ids), logits(dense, ids), **TOL)


def test_copy_experts_are_identical_and_noise_breaks_symmetry():
    dense = build(tiny_llama_config())
    copy_moe = upcycled(dense, UpcycleConfig(method="copy", num_experts=3, top_k=1))
    ex = copy_moe.model.layers[0].mlp.experts
    w_gate = dense.model.layers[0].mlp.gate_proj.weight
    assert torch.equal(ex.gate_up_proj[2, :64], w_gate)
    assert torch.equal(ex.down_proj[1], dense.model.layers[0].mlp.down_proj.weight)

    noisy = upcycled(
        dense, UpcycleConfig(method="noise", num_experts=3, top_k=1, noise_std=0.1)
    ).model.layers[0]
    gu = noisy.mlp.experts.gate_up_proj
    assert not torch.equal(gu[0], gu[1])
    rel = (gu[0, :64] - w_gate).std() / w_gate.std()
    assert 0.05 < rel < 0.2  # noise std is relative to the source matrix's std


def test_drop_upcycling_reinitialises_requested_fraction():
    dense = build(tiny_llama_config())
    ratio = 0.25
    moe = upcycled(dense, UpcycleConfig(method="drop", num_experts=4, top_k=2, drop_ratio=ratio, seed=7))
    mlp = dense.model.layers[1].mlp
    ex = moe.model.layers[1].mlp.experts
    f = 64
    changed_sets = []
    for e in range(4):
        gate_changed = (ex.gate_up_proj[e, :f] != mlp.gate_proj.weight).any(dim=1)  # (F,)
        up_changed = (ex.gate_up_proj[e, f:] != mlp.up_proj.weight).any(dim=1)
        down_changed = (ex.down_proj[e] != mlp.down_proj.weight).any(dim=0)
        assert torch.equal(gate_changed, up_changed) and torch.equal(gate_changed, down_changed)
        assert int(gate_changed.sum()) == round(ratio * f)
        expected = drop_indices(f, ratio, layer_generator(7, 1, "drop", e))
        assert torch.equal(gate_changed.nonzero().squeeze(-1), expected)
        changed_sets.append(set(expected.tolist()))
    assert len({frozenset(s) for s in changed_sets}) == 4  # each expert drops different neurons
    # re-initialised rows follow the source statistics
    new = ex.gate_up_proj[0, :f][gate_changed]
    assert abs(new.std() / mlp.gate_proj.weight.std() - 1) < 0.3


def test_layer_selection_forms():
    assert parse_layer_selection("all", 4) == [0, 1, 2, 3]
    assert parse_layer_selection("every:2", 6) == [1, 3, 5]
    assert parse_layer_selection("0,2-3", 4) == [0, 2, 3]
    assert parse_layer_selection([3, 1], 4) == [1, 3]
    cfg = UpcycleConfig(layers="all", keep_first_dense=1, keep_last_dense=1)
    assert cfg.select_layers(5) == [1, 2, 3]
    with pytest.raises(ConfigError, match="out of range"):
        parse_layer_selection("0,7", 4)
    with pytest.raises(ConfigError, match="leaves no MoE layer"):
        UpcycleConfig(layers="0", keep_first_dense=1).select_layers(4)

    dense = build(tiny_llama_config(num_hidden_layers=4))
    moe = upcycled(dense, UpcycleConfig(layers="every:2", num_experts=2, top_k=1))
    kinds = [isinstance(layer.mlp, SparseMoeBlock) for layer in moe.model.layers]
    assert kinds == [False, True, False, True]
    assert spec_of(moe).moe_layers() == [1, 3]


def test_config_refusals():
    with pytest.raises(ConfigError, match=r"top_k=5 is not in \[1, num_experts=4\]"):
        UpcycleConfig(num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="unknown method"):
        UpcycleConfig(method="clone")
    with pytest.raises(ConfigError, match="use method=partition"):
        UpcycleConfig(method="copy", shared_experts=1)
    with pytest.raises(ConfigError, match="drop_ratio"):
        UpcycleConfig(method="drop", drop_ratio=1.5)


def test_partition_d_ff_not_divisible_is_refused_and_model_untouched():
    dense = build(tiny_llama_config())  # d_ff = 64
    cfg = UpcycleConfig(method="partition", num_experts=3, top_k=1)
    with pytest.raises(
        ConfigError, match="d_ff=64 is not divisible by num_experts \\+ shared_experts = 3"
    ) as e:
        upcycle(dense, cfg)
    assert "choose num_experts among" in str(e.value)
    assert not any(isinstance(m, SparseMoeBlock) for m in dense.modules())


def test_unsupported_architecture_names_the_missing_module():
    from transformers import GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(
        UnsupportedModelError, match=r"`transformers.h.0.mlp.gate_proj` not found|mlp.gate_proj"
    ):
        upcycle(gpt2, UpcycleConfig())


def test_mlp_bias_is_refused():
    dense = build(tiny_llama_config(mlp_bias=True))
    with pytest.raises(UnsupportedModelError, match="has a bias"):
        upcycle(dense, UpcycleConfig())


def test_upcycle_is_idempotent_for_same_config_and_refuses_double_surgery():
    dense = build(tiny_llama_config())
    cfg = UpcycleConfig(num_experts=2, top_k=1)
    moe = upcycle(dense, cfg)
    router = moe.model.layers[0].mlp.router
    assert upcycle(moe, cfg) is moe and moe.model.layers[0].mlp.router is router
    with pytest.raises(ConfigError, match="already a Mixture-of-Experts"):
        upcycle(moe, UpcycleConfig(num_experts=4, top_k=1))


def test_routers_differ_per_layer_and_are_reproducible():
    dense = build(tiny_llama_config())
    a = upcycled(dense, UpcycleConfig(num_experts=4, top_k=2, seed=5))
    b = upcycled(dense, UpcycleConfig(num_experts=4, top_k=2, seed=5))
    ra, rb = a.model.layers[0].mlp.router.weight, b.model.layers[0].mlp.router.weight
    assert torch.equal(ra, rb)
    assert not torch.equal(ra, a.model.layers[1].mlp.router.weight)
    assert abs(ra.std().item() - 0.02) < 0.005
