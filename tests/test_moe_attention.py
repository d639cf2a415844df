"""Attention MoE over GQA groups: all groups with unit multipliers == dense attention."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaModel

from conftest import tiny_llama_config
from moe_app.core.moe.attention import AttentionMoe
from moe_app.core.moe.block import find_moe_blocks
from moe_app.core.moe.losses import model_router_losses
from moe_app.core.moe.router import TopKRouter
from moe_app.errors import UnsupportedModelError


def _models(attn_impl, top_k, rule="softmax_topk", scale=2.0, zero_router=True, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_llama_config()  # hidden 32, 4 heads, 2 KV heads, 2 layers
    cfg._attn_implementation = attn_impl
    dense = LlamaModel(cfg).eval()
    moe = copy.deepcopy(dense)
    for layer in moe.layers:
        router = TopKRouter(cfg.hidden_size, cfg.num_key_value_heads, top_k, rule=rule)
        if zero_router:
            torch.nn.init.zeros_(router.weight)  # uniform probabilities: w_g = 1/2
        layer.self_attn = AttentionMoe(layer.self_attn, router, scale=scale)
    return dense, moe


BATCH = torch.tensor([[5, 9, 17, 33, 2, 41, 8], [3, 4, 5, 6, 7, 8, 9]])
PADDED = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("rule", ["softmax_topk", "softmax_topk_renorm"])
def test_all_groups_unit_multipliers_equal_dense(attn_impl, rule):
    dense, moe = _models(attn_impl, top_k=2, rule=rule, scale=2.0)  # scale * 1/2 = 1 per group
    for mask in (None, PADDED):
        with torch.no_grad():
            a = dense(BATCH, attention_mask=mask).last_hidden_state
            b = moe(BATCH, attention_mask=mask).last_hidden_state
        real = torch.ones_like(BATCH, dtype=torch.bool) if mask is None else mask.bool()
        torch.testing.assert_close(b[real], a[real], rtol=1e-5, atol=1e-5)
    assert len(list(find_moe_blocks(moe))) == 2


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_top1_differs_and_router_gets_gradient(attn_impl):
    dense, moe = _models(attn_impl, top_k=1, rule="softmax_topk_renorm", scale=1.0, zero_router=False)
    moe.train()
    out = moe(BATCH, attention_mask=PADDED, use_cache=False).last_hidden_state
    assert torch.isfinite(out).all()
    with torch.no_grad():
        ref = dense(BATCH, attention_mask=PADDED).last_hidden_state
    assert not torch.allclose(out, ref, atol=1e-3)
    losses = model_router_losses(moe, PADDED.reshape(-1))
    (out.pow(2).mean() + 0.01 * losses["balance"]).backward()
    for layer in moe.layers:
        assert layer.self_attn.router.weight.grad.abs().sum() > 0
        assert layer.self_attn.last_routing.indices.shape == (BATCH.numel(), 1)


def test_sdpa_and_eager_agree_with_partial_routing():
    _, moe_sdpa = _models("sdpa", top_k=1, zero_router=False, scale=1.0)
    _, moe_eager = _models("eager", top_k=1, zero_router=False, scale=1.0)
    with torch.no_grad():
        a = moe_sdpa(BATCH, attention_mask=PADDED).last_hidden_state
        b = moe_eager(BATCH, attention_mask=PADDED).last_hidden_state
    real = PADDED.bool()
    torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)


def test_group_attends_only_to_routed_keys():
    """Changing a token routed to neither of group 0's queries' keys leaves group 0 unchanged."""
    torch.manual_seed(0)
    cfg = tiny_llama_config(num_hidden_layers=1)
    cfg._attn_implementation = "eager"
    model = LlamaModel(cfg).eval()
    layer = model.layers[0]
    router = TopKRouter(cfg.hidden_size, 2, 1)
    layer.self_attn = AttentionMoe(layer.self_attn, router)
    emb = model.embed_tokens.weight
    with torch.no_grad():
        # Route by the sign of one coordinate of the normed input, which we control per token.
        router.weight.zero_()
        router.weight[0, 0], router.weight[1, 0] = 50.0, -50.0
        emb[5, 0], emb[6, 0], emb[7, 0] = 1.0, -1.0, -1.0  # token 5 -> group 0, tokens 6, 7 -> group 1
    seq_a = torch.tensor([[5, 6, 5, 5]])
    seq_b = torch.tensor([[5, 7, 5, 5]])  # the group-1 token changed
    captured = []
    layer.self_attn.attention.o_proj.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    with torch.no_grad():
        model(seq_a)
        model(seq_b)
    heads_a, heads_b = captured[0].view(4, 4, -1), captured[1].view(4, 4, -1)  # (S, H, hd)
    group0 = [0, 2, 3]  # positions routed to group 0; heads 0-1 belong to group 0
    torch.testing.assert_close(heads_a[group0, :2], heads_b[group0, :2])
    assert not torch.allclose(heads_a[1, 2:], heads_b[1, 2:])


def test_decoding_with_cache_refused_when_groups_dropped():
    _, moe = _models("sdpa", top_k=1, zero_router=False, scale=1.0)
    with torch.no_grad():
        out = moe(BATCH[:, :4], use_cache=True)  # prefill is fine
        with pytest.raises(NotImplementedError, match="use_cache=False"):
            moe(BATCH[:, 4:5], past_key_values=out.past_key_values, use_cache=True)
    _, dense_like = _models("sdpa", top_k=2)
    with torch.no_grad():  # every group selected: decoding is dense attention and works
        out = dense_like(BATCH[:, :4], use_cache=True)
        dense_like(BATCH[:, 4:5], past_key_values=out.past_key_values, use_cache=True)


def test_router_size_must_match_kv_heads():
    cfg = tiny_llama_config()
    model = LlamaModel(cfg)
    with pytest.raises(ValueError, match="KV heads"):
        AttentionMoe(model.layers[0].self_attn, TopKRouter(cfg.hidden_size, 4, 1))


def test_unknown_attention_signature_is_refused_when_the_block_is_built():
    """The wrapper follows the decoder layer's private call signature: check it at build time."""
    cfg = tiny_llama_config()

    class RenamedCache(torch.nn.Module):  # a future transformers renaming the cache argument again
        config = cfg

        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, kv_store=None):
            return hidden_states, None

    router = TopKRouter(cfg.hidden_size, cfg.num_key_value_heads, 1)
    with pytest.raises(
        UnsupportedModelError,
        match=r"forward\(self, hidden_states, position_embeddings, attention_mask, kv_store\) is not a signature",
    ):
        AttentionMoe(RenamedCache(), router)


def test_cache_under_an_unknown_name_is_an_error_not_ignored():
    _, moe = _models("sdpa", top_k=2)
    with torch.no_grad():
        out = moe(BATCH[:, :4], use_cache=True)
    block = moe.layers[0].self_attn
    hidden = torch.randn(2, 1, 32)
    cos_sin = moe.rotary_emb(hidden, torch.tensor([[4], [4]]))
    with pytest.raises(TypeError, match="would be silently ignored"):
        block(hidden, cos_sin, None, legacy_cache=out.past_key_values)


def test_cached_decoding_with_every_group_equals_uncached():
    """Regression: transformers 5.24 passes the cache as ``cache=``; dropping it made decoding wrong."""
    _, moe = _models("sdpa", top_k=2, zero_router=False)
    with torch.no_grad():
        full = moe(BATCH).last_hidden_state
        out = moe(BATCH[:, :4], use_cache=True)
        assert out.past_key_values.get_seq_length() == 4
        step = moe(BATCH[:, 4:5], past_key_values=out.past_key_values, use_cache=True).last_hidden_state
    torch.testing.assert_close(step[:, 0], full[:, 4], rtol=1e-5, atol=1e-5)
