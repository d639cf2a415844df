"""Export to stock Mixtral / Qwen2-MoE / Qwen3-MoE: stock transformers reproduces moe-app's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

import moe_app
from conftest import tiny_llama_config
from moe_app.checkpoint.export import export_checkpoint
from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.checkpoint.shards import INDEX_FILE, shard_files
from moe_app.core.upcycling import UpcycleConfig
from moe_app.errors import UnsupportedModelError
from upcycling_helpers import build, logits, qwen2_config, qwen3_config, tokens, upcycled

TOL = dict(rtol=1e-5, atol=1e-5)


def _stock(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _keys(path):
    out = set()
    for f in shard_files(path):
        with safe_open(str(f), framework="pt") as h:
            out.update(h.keys())
    return out


def _check(moe, tmp_path, fmt, expect_format, arch):
    res = export_checkpoint(moe, tmp_path / "hf", fmt, max_shard_size="60KB")
    assert res.format == expect_format
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    assert (tmp_path / "hf" / INDEX_FILE).is_file()
    stock = _stock(tmp_path / "hf")
    assert type(stock).__name__ == arch
    ids = tokens()
    assert_close(logits(stock, ids), logits(moe, ids), **TOL)
    return stock, cfg


def test_stock_layouts_match_our_keymaps(tmp_path):
    """The legacy per-expert names we write are what stock save_pretrained writes."""
    from moe_app.checkpoint.keymaps import MIXTRAL, QWEN_MOE

    small = dict(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    for cfg, km in [
        (MixtralConfig(**small, intermediate_size=8, num_local_experts=2), MIXTRAL),
        (
            Qwen2MoeConfig(
                **small, moe_intermediate_size=8, shared_expert_intermediate_size=8, num_experts=2
            ),
            QWEN_MOE,
        ),
        (Qwen3MoeConfig(**small, moe_intermediate_size=8, num_experts=2, head_dim=8), QWEN_MOE),
    ]:
        path = tmp_path / cfg.model_type
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        keys = _keys(path)
        for name in ("router", "expert_gate_proj", "expert_up_proj", "expert_down_proj"):
            assert km[name].format(i=0, j=1) in keys, (cfg.model_type, name)
        if cfg.model_type == "qwen2_moe":
            assert km["shared_expert_gate"].format(i=0) in keys


def test_export_mixtral_from_llama_with_scale_noise_and_dense_layer(tmp_path):
    dense = build(tiny_llama_config(num_hidden_layers=3))
    moe = upcycled(
        dense, UpcycleConfig(method="noise", num_experts=4, top_k=2, noise_std=0.2, scale=1.5, layers="0,2")
    )
    _, cfg = _check(moe, tmp_path, "auto", "mixtral", "MixtralForCausalLM")
    assert cfg["num_local_experts"] == 4 and cfg["num_experts_per_tok"] == 2
    keys = _keys(tmp_path / "hf")
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys  # dense layer -> E copies


def test_export_mixtral_from_mistral_via_checkpoint_dir_and_cli(tiny_mistral_dir, tmp_path, capsys):
    from moe_app.cli.main import main

    dense = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir).eval()
    moe = upcycled(dense, UpcycleConfig(method="drop", num_experts=4, top_k=2))
    save_moe_checkpoint(moe, tmp_path / "ckpt")
    rc = main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    assert rc == 0 and "as mixtral" in capsys.readouterr().out
    ids = tokens()
    assert_close(
        logits(_stock(tmp_path / "hf"), ids), logits(moe_app.load_model(tmp_path / "ckpt"), ids), **TOL
    )


def test_export_qwen2_moe_from_qwen2_with_shared_expert_and_dense_layer(tmp_path):
    dense = build(qwen2_config(num_hidden_layers=3))
    cfg = UpcycleConfig(
        method="partition",
        split="random",
        num_experts=3,
        top_k=2,
        shared_experts=1,
        layers="0,1",
        router_init="normal",
        router_std=0.5,
    )
    moe = upcycled(dense, cfg)
    stock, hf = _check(moe, tmp_path, "auto", "qwen2_moe", "Qwen2MoeForCausalLM")
    assert hf["mlp_only_layers"] == [2] and hf["norm_topk_prob"] is True and hf["qkv_bias"] is True
    assert hf["shared_expert_intermediate_size"] == 16
    gate = stock.model.layers[0].mlp.shared_expert_gate.weight
    assert torch.count_nonzero(gate) == 0  # sigmoid(0) = 1/2, compensated exactly in W_down


def test_export_qwen2_moe_from_llama_without_renorm(tmp_path):
    dense = build(tiny_llama_config())
    moe = upcycled(
        dense, UpcycleConfig(method="partition", num_experts=4, top_k=2, rule="softmax_topk", router_std=0.5)
    )
    _, hf = _check(moe, tmp_path, "auto", "qwen2_moe", "Qwen2MoeForCausalLM")
    assert (
        hf["norm_topk_prob"] is False
        and hf["qkv_bias"] is False
        and hf["shared_expert_intermediate_size"] == 0
    )


def test_export_qwen3_moe_from_qwen3(tmp_path):
    dense = build(qwen3_config(num_hidden_layers=3, tie_word_embeddings=True))
    moe = upcycled(
        dense, UpcycleConfig(method="partition", num_experts=4, top_k=2, layers="1,2", router_std=0.5)
    )
    _, hf = _check(moe, tmp_path, "auto", "qwen3_moe", "Qwen3MoeForCausalLM")
    assert hf["mlp_only_layers"] == [0] and hf["head_dim"] == 8 and hf["tie_word_embeddings"] is True


def test_refusals_name_the_reason(tmp_path):
    llama = build(tiny_llama_config())
    copy_moe = upcycled(llama, UpcycleConfig(num_experts=2, top_k=1))
    with pytest.raises(UnsupportedModelError, match="q/k RMSNorms, which only a Qwen3 base has"):
        export_checkpoint(copy_moe, tmp_path / "a", "qwen3_moe")

    shared = upcycled(llama, UpcycleConfig(method="partition", num_experts=3, top_k=2, shared_experts=1))
    with pytest.raises(UnsupportedModelError, match=r"Mixtral has no shared expert \(use qwen2_moe\)"):
        export_checkpoint(shared, tmp_path / "b", "mixtral")

    attn = upcycled(llama, UpcycleConfig(num_experts=2, top_k=1, attention_moe=True))
    with pytest.raises(UnsupportedModelError, match="attention MoE"):
        export_checkpoint(attn, tmp_path / "c", "auto")

    qwen2 = upcycled(build(qwen2_config()), UpcycleConfig(num_experts=2, top_k=1))
    with pytest.raises(UnsupportedModelError, match="attention biases"):
        export_checkpoint(qwen2, tmp_path / "d", "mixtral")

    skipping = upcycled(llama, UpcycleConfig(num_experts=4, top_k=2))
    skipping.model.layers[0].mlp.router.skip_beta = 0.3
    with pytest.raises(UnsupportedModelError, match="dynamic expert skipping"):
        export_checkpoint(skipping, tmp_path / "e")
    assert not any(p.name != "src" for p in tmp_path.iterdir())  # nothing written


def test_cli_export_refusal_exit_code_2(tmp_path, capsys):
    from moe_app.cli.main import main

    moe = upcycled(build(tiny_llama_config()), UpcycleConfig(num_experts=2, top_k=1, attention_moe=True))
    save_moe_checkpoint(moe, tmp_path / "ckpt")
    rc = main(
        ["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--format", "mixtral"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "attention MoE" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()
    rc = main(["export", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "hf")])
    assert rc == 2


@pytest.mark.parametrize("streaming", [True, False])
def test_training_only_router_noise_is_dropped_with_a_note(tmp_path, caplog, streaming):
    """Noisy gating and jitter act only in training: the export leaves them out, says so, and the
    stock model's (eval) logits equal moe-app's."""
    import logging

    dense = build(tiny_llama_config(num_hidden_layers=2))
    cfg = UpcycleConfig(method="copy", num_experts=4, top_k=2, noisy_gating=True, jitter=0.01)
    moe = upcycled(dense, cfg)
    with torch.no_grad():  # a trained noise projection: non-zero, yet irrelevant in eval mode
        for layer in moe.model.layers:
            layer.mlp.router.noise_weight.normal_()
    save_moe_checkpoint(moe, tmp_path / "ckpt")
    src = tmp_path / "ckpt" if streaming else moe_app.load_model(tmp_path / "ckpt")
    with caplog.at_level(logging.INFO, logger="moe_app.checkpoint.export"):
        export_checkpoint(src, tmp_path / "hf", "mixtral")
    notes = [r.getMessage() for r in caplog.records if "act only in training" in r.getMessage()]
    assert len(notes) == 2 and "noisy gating and jitter 0.01" in notes[0]
    ids = tokens()
    assert_close(logits(_stock(tmp_path / "hf"), ids), logits(moe.eval(), ids), **TOL)
