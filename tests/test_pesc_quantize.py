"""QLoRA on CPU: 4-bit NF4 base (bitsandbytes CPU backend) under PESC trains adapters, routers and LoRA."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from moe_app.checkpoint.pesc import load_pesc_model, save_pesc_adapters, save_pesc_full
from moe_app.core.pesc.config import PescConfig
from moe_app.core.pesc.quantize import is_4bit, quantize_base_4bit, resolve_compute_dtype
from moe_app.core.pesc.surgery import build_pesc
from moe_app.core.utils.params import count_parameters
from moe_app.errors import ConfigError, UnsupportedModelError

pytest.importorskip("bitsandbytes")

IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _qlora_model(path):
    cfg = PescConfig(
        num_experts=4,
        adapter_dim=8,
        quantize_4bit=True,
        peft_lora={"enabled": True, "rank": 4, "dropout": 0.0},
    )
    return build_pesc(AutoModelForCausalLM.from_pretrained(path), cfg)


def test_quantize_keeps_head_embeddings_and_pesc_parts_in_full_precision(tiny_llama_dir):
    model = build_pesc(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), PescConfig(num_experts=4, adapter_dim=8)
    )
    replaced = quantize_base_4bit(model)
    assert "lm_head" not in replaced and len(replaced) == 2 * 7  # q,k,v,o + shared gate,up,down per layer
    block = model.model.layers[0].mlp
    assert is_4bit(block.ffn.gate_proj) and is_4bit(model.model.layers[1].self_attn.o_proj)
    assert block.ffn.gate_proj.weight.quant_state.nested  # double quantisation
    assert block.ffn.gate_proj.weight.quant_state.quant_type == "nf4"
    assert (
        model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    )
    assert block.adapters.up.dtype == torch.float32 and block.router.weight.dtype == torch.float32
    assert resolve_compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_compute_dtype("auto", torch.device("cuda")) == torch.bfloat16
    # the logical parameter count is unchanged by packing
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    extra = sum(
        p.numel() for n, p in model.named_parameters() if ".mlp.router." in n or ".mlp.adapters." in n
    )
    assert count_parameters(model).total == count_parameters(dense).total + extra


def test_qlora_forward_backward_on_cpu_reaches_adapters_router_and_lora(tiny_llama_dir):
    model = _qlora_model(tiny_llama_dir).train()
    with torch.no_grad():  # as after some training: non-zero U and LoRA B, so gradients reach everything
        for name, p in model.named_parameters():
            if name.endswith("adapters.up") or "lora_B" in name:
                p.normal_(std=0.05)
    out = model(input_ids=IDS, labels=IDS)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for marker in (
        ".mlp.adapters.down",
        ".mlp.adapters.up",
        ".mlp.router.weight",
        "q_proj.lora_A",
        "ffn.up_proj.lora_B",
    ):
        assert any(marker in n and g.abs().sum() > 0 for n, g in grads.items()), marker
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt.step()


def test_qlora_adapter_checkpoint_round_trip_requantises_identically(tiny_llama_dir, tmp_path):
    model = _qlora_model(tiny_llama_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    save_pesc_adapters(model, tmp_path / "a", base_model=tiny_llama_dir)
    back = load_pesc_model(tmp_path / "a")
    with torch.no_grad():
        assert_close(back(input_ids=IDS).logits, expected, rtol=0, atol=0)


def test_full_checkpoint_of_a_4bit_model_is_refused(tiny_llama_dir, tmp_path):
    model = _qlora_model(tiny_llama_dir)
    with pytest.raises(ConfigError, match="adapter-only checkpoint"):
        save_pesc_full(model, tmp_path / "full")


def test_quantising_twice_is_refused(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    quantize_base_4bit(model)
    with pytest.raises(UnsupportedModelError, match=r"no nn\.Linear to quantise"):
        quantize_base_4bit(model)
