"""Active-per-token parameter counts for moe-app and stock HF MoE models."""

from __future__ import annotations

from tests.conftest import tiny_llama_config
from transformers import AutoModelForCausalLM, MixtralConfig

from moe_app.core.upcycling import upcycle
from moe_app.core.upcycling.config import UpcycleConfig
from moe_app.core.utils.params import count_parameters, human


def test_stock_mixtral_counts_k_of_e_experts_as_active():
    cfg = MixtralConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    counts = count_parameters(model)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.total - counts.active == experts * (4 - 2) // 4


def test_upcycled_model_active_equals_dense_plus_routers_for_copy_top2_of_8():
    dense = AutoModelForCausalLM.from_config(tiny_llama_config())
    dense_total = count_parameters(dense).total
    ffn = sum(p.numel() for n, p in dense.named_parameters() if ".mlp." in n)
    moe = upcycle(dense, UpcycleConfig(method="copy", num_experts=8, top_k=2))
    counts = count_parameters(moe)
    routers = sum(p.numel() for n, p in moe.named_parameters() if ".router." in n)
    assert counts.total == dense_total + 7 * ffn + routers
    assert counts.active == dense_total + ffn + routers  # two half-weighted copies = 2 FFNs active
    for p in moe.parameters():
        p.requires_grad_(False)
    assert count_parameters(moe).trainable == 0


def test_human_readable_counts():
    assert human(1_234_567) == "1.23M" and human(999) == "999" and human(2_500_000_000) == "2.50B"
