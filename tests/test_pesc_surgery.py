"""PESC surgery on a tiny LLaMA: dense equivalence, freezing, checkpoints, merge + Mixtral export, errors."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import moe_app
from moe_app.checkpoint.pesc import load_pesc_model, save_pesc_adapters, save_pesc_full
from moe_app.core.moe.pesc import LoraExpertsMoeBlock, PescMoeBlock
from moe_app.core.pesc.config import PescConfig, is_pesc_trainable
from moe_app.core.pesc.merge import merge_pesc
from moe_app.core.pesc.surgery import build_pesc, pesc_blocks
from moe_app.errors import ConfigError, UnsupportedModelError

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _perturb(model, std=0.05, seed=5):
    """Give every trainable tensor non-zero values (as if trained), so round trips are meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("variant", ["adapter", "lora"])
def test_pesc_model_reproduces_dense_logits_at_init(tiny_llama_dir, variant):
    dense = _logits(_load(tiny_llama_dir))
    model = build_pesc(
        _load(tiny_llama_dir), PescConfig(variant=variant, num_experts=4, top_k=2, adapter_dim=8)
    )
    assert len(pesc_blocks(model)) == 2
    assert_close(_logits(model), dense, rtol=0, atol=1e-5)
    with torch.no_grad():  # a very different router changes nothing either
        for _, block in pesc_blocks(model):
            block.router.weight.normal_(std=3.0)
    assert_close(_logits(model), dense, rtol=0, atol=1e-5)


def test_only_pesc_parameters_train_and_layer_selection(tiny_llama_dir):
    model = build_pesc(_load(tiny_llama_dir), PescConfig(num_experts=4, adapter_dim=8, layers=[1]))
    assert isinstance(model.model.layers[1].mlp, PescMoeBlock)
    assert not isinstance(model.model.layers[0].mlp, PescMoeBlock)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "model.layers.1.mlp.router.weight",
        "model.layers.1.mlp.adapters.down",
        "model.layers.1.mlp.adapters.up",
    }


def test_peft_lora_adds_trainable_lora_and_keeps_the_block_working(tiny_llama_dir):
    dense = _logits(_load(tiny_llama_dir))
    cfg = PescConfig(num_experts=4, adapter_dim=8, peft_lora={"enabled": True, "rank": 4})
    model = build_pesc(_load(tiny_llama_dir), cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(is_pesc_trainable(n) for n in trainable)
    assert any(".self_attn.q_proj.lora_A." in n for n in trainable)
    assert any(".mlp.ffn.down_proj.lora_B." in n for n in trainable)  # shared QLoRA on the frozen FFN
    assert any(".mlp.adapters.up" in n for n in trainable)
    assert_close(_logits(model), dense, rtol=0, atol=1e-5)  # LoRA B and adapter U start at zero


@pytest.mark.parametrize("variant", ["adapter", "lora"])
def test_optimizer_step_leaves_every_base_parameter_bit_identical(tiny_llama_dir, variant):
    model = build_pesc(
        _load(tiny_llama_dir), PescConfig(variant=variant, num_experts=4, adapter_dim=8, lora_rank=4)
    )
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        if is_pesc_trainable(name):
            continue
        assert p.grad is None, name
        assert torch.equal(p, before[name]), name
    zero_init = ".mlp.adapters.up" if variant == "adapter" else ".mlp.expert_lora.gate_B"
    moved = [n for n, p in model.named_parameters() if zero_init in n and p.abs().sum() > 0]
    assert len(moved) == 2  # the zero-initialised tensors left zero after one step in both layers


@pytest.mark.parametrize("variant", ["adapter", "lora"])
def test_adapter_only_checkpoint_round_trip(tiny_llama_dir, tmp_path, variant):
    cfg = PescConfig(
        variant=variant, num_experts=4, adapter_dim=8, lora_rank=4, peft_lora={"enabled": True, "rank": 4}
    )
    model = build_pesc(_load(tiny_llama_dir), cfg)
    _perturb(model)
    model.eval()
    expected = _logits(model)
    out = save_pesc_adapters(model, tmp_path / "adapters", base_model=tiny_llama_dir)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["pesc.json", "pesc_adapters.safetensors"]
    back = load_pesc_model(out)
    assert torch.equal(_logits(back), expected)


def test_full_checkpoint_round_trip(tiny_llama_dir, tmp_path):
    model = build_pesc(_load(tiny_llama_dir), PescConfig(num_experts=4, adapter_dim=8))
    _perturb(model)
    model.eval()
    expected = _logits(model)
    save_pesc_full(model, tmp_path / "full", source=str(tiny_llama_dir))
    back = moe_app.load_model(tmp_path / "full")
    assert torch.equal(_logits(back), expected)


def test_merged_lora_experts_export_to_stock_mixtral(tiny_llama_dir, tmp_path):
    from transformers import MixtralForCausalLM

    from moe_app import load_model
    from moe_app.checkpoint.export import export_checkpoint

    cfg = PescConfig(
        variant="lora", num_experts=4, top_k=2, lora_rank=4, peft_lora={"enabled": True, "rank": 4}
    )
    model = build_pesc(_load(tiny_llama_dir), cfg)
    _perturb(model, std=0.1)
    model.eval()
    expected = _logits(model)
    merge_pesc(model)
    assert not pesc_blocks(model)
    assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    # the merged model is a plain moe-app MoE: save it, reload it, export the directory (the CLI path)
    save_pesc_full(model, tmp_path / "merged", source=str(tiny_llama_dir))
    assert_close(_logits(load_model(tmp_path / "merged")), expected, rtol=1e-5, atol=1e-5)
    result = export_checkpoint(tmp_path / "merged", tmp_path / "mixtral", "mixtral")
    stock = AutoModelForCausalLM.from_pretrained(result.path).eval()
    assert isinstance(stock, MixtralForCausalLM)
    assert_close(_logits(stock), expected, rtol=1e-4, atol=1e-4)


def test_adapter_variant_refuses_merge(tiny_llama_dir):
    model = build_pesc(_load(tiny_llama_dir), PescConfig(num_experts=4, adapter_dim=8))
    with pytest.raises(UnsupportedModelError, match="do not merge"):
        merge_pesc(model)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"adapter_dim": 0}, r"PescConfig.adapter_dim: adapter_dim=0 must be > 0"),
        ({"top_k": 9, "num_experts": 8}, r"PescConfig.top_k: top_k=9 is not in \[1, num_experts=8\]"),
        ({"variant": "moe"}, r"unknown variant 'moe'.*Fix: choose one of adapter, lora"),
        ({"dropout": 1.0}, r"dropout=1.0 not in \[0, 1\)"),
        ({"layers": "0,x"}, r"bad layer selection"),
        ({"peft_lora": {"enabled": True, "rank": 0}}, r"PescConfig.peft_lora"),
    ],
)
def test_bad_config_is_rejected_with_the_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PescConfig(**kwargs)


def test_base_without_swiglu_mlp_is_rejected_naming_the_module(tiny_llama_dir):
    model = _load(tiny_llama_dir)
    del model.model.layers[0].mlp.gate_proj
    with pytest.raises(UnsupportedModelError, match=r"`model.layers.0.mlp.gate_proj` not found"):
        build_pesc(model, PescConfig(num_experts=4, adapter_dim=8))


def test_layer_out_of_range_and_double_surgery_are_rejected(tiny_llama_dir):
    with pytest.raises(ConfigError, match=r"out of range for a 2-layer model"):
        build_pesc(_load(tiny_llama_dir), PescConfig(layers=[5]))
    model = build_pesc(_load(tiny_llama_dir), PescConfig(num_experts=4, adapter_dim=8))
    with pytest.raises(ConfigError, match="already has PESC blocks"):
        build_pesc(model, PescConfig())


def test_qwen2_and_mistral_bases_work(tiny_qwen2_dir, tiny_mistral_dir):
    for path in (tiny_qwen2_dir, tiny_mistral_dir):
        dense = _logits(_load(path))
        model = build_pesc(_load(path), PescConfig(variant="lora", num_experts=4, lora_rank=4))
        assert isinstance(model.model.layers[0].mlp, LoraExpertsMoeBlock)
        assert_close(_logits(model), dense, rtol=0, atol=1e-5)


def test_surgery_is_deterministic_per_seed(tiny_llama_dir):
    path = tiny_llama_dir
    a = build_pesc(_load(path), PescConfig(num_experts=4, adapter_dim=8, seed=3))
    b = build_pesc(_load(path), PescConfig(num_experts=4, adapter_dim=8, seed=3))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
