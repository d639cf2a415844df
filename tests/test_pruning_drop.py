"""Layer drop and block drop (He et al. 2024): scores, exact zeroing, loadable checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

import moe_app
from conftest import tiny_llama_config
from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.core.models.views import clone_model
from moe_app.core.pruning import (
    block_drop_scores,
    drop_blocks,
    drop_mlp_layers,
    layer_drop_scores,
    moe_layer_views,
    replace_dropped_mlps,
)
from moe_app.core.pruning.calibration import normalize_batches
from moe_app.core.pruning.drop import most_similar
from moe_app.core.spec import SPEC_FILE, spec_of
from moe_app.core.upcycling import UpcycleConfig
from moe_app.errors import MoeAppError
from upcycling_helpers import build, logits, tokens, upcycled


def _moe(layers=3):
    dense = build(tiny_llama_config(num_hidden_layers=layers))
    return upcycled(dense, UpcycleConfig(method="noise", num_experts=4, top_k=2, noise_std=0.5, layers="0,2"))


def _calib():
    g = torch.Generator().manual_seed(3)
    return normalize_batches([torch.randint(3, 128, (2, 16), generator=g)])


def test_layer_drop_scores_and_exact_zeroing(tmp_path):
    model = _moe()
    scores = layer_drop_scores(model, _calib())
    assert set(scores) == {0, 2} and all(-1.0 <= s <= 1.0 for s in scores.values())
    drop = most_similar(scores, 1)
    ids = tokens()
    reference = replace_dropped_mlps(clone_model(model), drop)  # the sublayer really removed
    drop_mlp_layers(model, drop)
    assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=0)
    out = save_moe_checkpoint(model, tmp_path / "ld")
    loaded = moe_app.load_model(out)
    assert_close(logits(loaded, ids), logits(reference, ids), rtol=0, atol=0)
    assert json.loads((out / SPEC_FILE).read_text())["pruning"]["dropped_mlp_layers"] == drop
    with pytest.raises(MoeAppError, match="no MoE sublayer"):
        drop_mlp_layers(model, [1])


def test_layer_drop_on_stock_mixtral_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = tokens()
    reference = replace_dropped_mlps(clone_model(model), [1])
    drop_mlp_layers(model, [1])
    model.save_pretrained(tmp_path / "m")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert stock.config.num_hidden_layers == 2
    assert_close(logits(stock, ids), logits(reference, ids), rtol=0, atol=0)


def test_block_drop_moe_app_checkpoint(tmp_path):
    model = _moe(layers=3)
    scores = block_drop_scores(model, _calib())
    assert set(scores) == {0, 1, 2}
    drop_blocks(model, [1])
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [lay.index for lay in spec_of(model).layers] == [0, 1]
    assert [a.self_attn.layer_idx for a in model.model.layers] == [0, 1]
    ids = tokens()
    out = save_moe_checkpoint(model, tmp_path / "bd")
    loaded = moe_app.load_model(out)
    assert loaded.config.num_hidden_layers == 2 and len(moe_layer_views(loaded)) == 2
    assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    gen = loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)  # KV cache over 2 layers
    assert gen.shape == (1, 7)
    with pytest.raises(MoeAppError, match="cannot drop blocks"):
        drop_blocks(model, [0, 1])


def test_block_drop_stock_qwen2_moe_keeps_the_sparse_pattern(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    cfg = Qwen2MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert [lay for lay, _ in moe_layer_views(model)] == [1, 3]
    drop_blocks(model, [0])
    assert [lay for lay, _ in moe_layer_views(model)] == [0, 2]
    assert model.config.mlp_only_layers == [1] and model.config.num_hidden_layers == 3
    assert len(model.config.layer_types) == 3
    model.save_pretrained(tmp_path / "q")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert [lay for lay, _ in moe_layer_views(stock)] == [0, 2]
    ids = tokens()
    assert_close(logits(stock, ids), logits(model, ids), rtol=0, atol=0)
