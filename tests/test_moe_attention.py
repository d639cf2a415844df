"""Attention MoE over GQA groups: all groups with unit multipliers == dense attention; the sparse
computation (only the selected groups) == the masked dense formulation it replaced, for every k."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaModel

from conftest import tiny_config, tiny_llama_config
from moe_app.core.moe.attention import AttentionMoe, _attention_fn, _rope_fn
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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are overhead-bound: one intra-op thread is as fast and immune to CPU oversubscription
    (as in tests/test_generation_cache.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class MaskedAttentionMoe(AttentionMoe):
    """The oracle: the former implementation. Every head of every token is computed with the model's
    own kernel; the routing enters as a per-group ``(B, H, S, S)`` key mask and a per-head gate
    before ``o_proj``. No KV cache (it never could decode with groups dropped)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        kwargs.pop(self._cache_arg, None)
        attn = self.attention
        B, S, d = hidden_states.shape
        G, H, hd = self.num_groups, self.num_heads, attn.head_dim
        routing = self.route(hidden_states.reshape(-1, d))
        hit = routing.indices.unsqueeze(-1) == torch.arange(G)  # (T, k, G)
        member = hit.any(dim=1).view(B, S, G)
        gate = (routing.weights.unsqueeze(-1) * hit).sum(dim=1) * self.scale  # (T, G)
        shape = (B, S, -1, hd)
        q = self._norm(attn, "q_norm", attn.q_proj(hidden_states).view(shape)).transpose(1, 2)
        k = self._norm(attn, "k_norm", attn.k_proj(hidden_states).view(shape)).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = _rope_fn(attn)(q, k, *position_embeddings)
        if not bool(member.all()):
            attention_mask = _group_mask(attention_mask, member, H, attn)
        impl = attn.config._attn_implementation
        out, weights = _attention_fn(impl)(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling)
        head_gate = gate.view(B, S, G, 1, 1).expand(B, S, G, H // G, 1).reshape(B, S, H, 1)
        out = out * head_gate.to(out.dtype)
        return attn.o_proj(out.reshape(B, S, -1)), weights


def _group_mask(base, member, H, attn):
    """The model's mask restricted per group to routed keys (a query always sees its own key)."""
    _, S, G = member.shape
    if base is None:
        i, j = torch.arange(S).unsqueeze(-1), torch.arange(S)
        allowed = j <= i
        window = getattr(attn, "sliding_window", None)
        if window is not None:
            allowed = allowed & (j > i - window)
        allowed = allowed.view(1, 1, S, S)
    elif base.dtype == torch.bool:
        allowed = base
    else:
        allowed = base > torch.finfo(base.dtype).min / 2
    routed = member.permute(0, 2, 1).unsqueeze(2) | torch.eye(S, dtype=torch.bool)  # (B, G, S, S)
    grouped = allowed & routed.repeat_interleave(H // G, dim=1)
    grouped = torch.where(grouped.any(dim=-1, keepdim=True), grouped, allowed)
    if base is None or base.dtype == torch.bool:
        return grouped
    return torch.where(grouped, base, torch.finfo(base.dtype).min)


def _pair(model_cls, cfg, top_k, scale, seed=0, router_std=1.0):
    """The same model twice: one with the sparse ``AttentionMoe``, one with the masked oracle."""
    torch.manual_seed(seed)
    dense = model_cls(cfg).eval()
    sparse, masked = copy.deepcopy(dense), copy.deepcopy(dense)
    for i, layer in enumerate(dense.layers):
        router = TopKRouter(cfg.hidden_size, cfg.num_key_value_heads, top_k, rule="softmax_topk_renorm")
        torch.nn.init.normal_(
            router.weight, std=router_std, generator=torch.Generator().manual_seed(seed + i)
        )
        sparse.layers[i].self_attn = AttentionMoe(layer.self_attn, copy.deepcopy(router), scale=scale)
        masked.layers[i].self_attn = MaskedAttentionMoe(copy.deepcopy(layer.self_attn), router, scale=scale)
    return sparse.eval(), masked.eval()


def _assert_same_outputs_and_gradients(a, b, ids, mask):
    """Outputs on the real (non-padding) tokens and every parameter's gradient agree."""
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    outs = []
    for model in (a, b):
        model.zero_grad()
        out = model(ids, attention_mask=mask).last_hidden_state
        assert torch.isfinite(out).all()
        out[real].pow(2).mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0][real], outs[1][real], rtol=1e-5, atol=1e-5)
    grads_b = dict(b.named_parameters())
    for name, p in a.named_parameters():
        torch.testing.assert_close(
            p.grad, grads_b[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


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
    """Changing a token routed only to group 1 leaves the (group-0-only) other tokens unchanged."""
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
    layer.self_attn.register_forward_hook(lambda m, i, o: captured.append(o[0][0]))  # (S, d)
    with torch.no_grad():
        model(seq_a)
        model(seq_b)
    a, b = captured
    assert [layer.self_attn.last_routing.indices[:, 0].tolist()] == [[0, 1, 0, 0]]
    group0 = [0, 2, 3]  # positions routed (only) to group 0; one layer, so their inputs are unchanged
    torch.testing.assert_close(a[group0], b[group0])
    assert not torch.allclose(a[1], b[1])


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mask", [None, PADDED], ids=["unpadded", "left-padded"])
def test_cached_decoding_with_dropped_groups_equals_uncached(attn_impl, mask):
    """Groups dropped (top-1 of 2): prefill, then one token at a time == the whole sequence at once."""
    _, moe = _models(attn_impl, top_k=1, zero_router=False, scale=1.0)
    with torch.no_grad():
        full = moe(BATCH, attention_mask=mask).last_hidden_state
        m = None if mask is None else mask[:, :3]
        out = moe(BATCH[:, :3], attention_mask=m, use_cache=True)
        steps = [out.last_hidden_state]
        for t in range(3, BATCH.shape[1]):
            m = None if mask is None else mask[:, : t + 1]
            out = moe(
                BATCH[:, t : t + 1], attention_mask=m, past_key_values=out.past_key_values, use_cache=True
            )
            steps.append(out.last_hidden_state)
    routed = moe.layers[0].self_attn.last_routing.indices
    assert routed.shape == (2, 1) and routed.unique().numel() == 2  # the last step splits the batch
    real = torch.ones_like(BATCH, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], rtol=1e-5, atol=1e-5)


def test_cache_marks_the_groups_a_token_skipped():
    """The cache keeps a NaN key where a token skipped a group (never computed), a real key elsewhere."""
    _, moe = _models("sdpa", top_k=1, zero_router=False, scale=1.0)
    with torch.no_grad():
        out = moe(BATCH, use_cache=True)
    keys = out.past_key_values.layers[0].keys  # (B, G, S, hd)
    routed = moe.layers[0].self_attn.last_routing.indices.view(2, -1)  # (B, S) the one group per token
    skipped = torch.isnan(keys).all(dim=-1)  # (B, G, S)
    expected = torch.arange(2).view(1, 2, 1) != routed.unsqueeze(1)
    assert torch.equal(skipped, expected)
    assert torch.isfinite(keys[~skipped]).all()


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


# Four groups (8 query heads, 4 KV heads): k = 1..4 of G = 4.
WIDE = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_sparse_equals_masked_reference(attn_impl, top_k, scale):
    """Only the selected groups computed == every group computed and masked: outputs and gradients."""
    cfg = tiny_llama_config(**WIDE)
    cfg._attn_implementation = attn_impl
    sparse, masked = _pair(LlamaModel, cfg, top_k, scale)
    # sdpa: no mask (the causal fast path) and a padding mask (bool); eager always gets an additive one.
    for mask in (None, PADDED) if attn_impl == "sdpa" else (PADDED,):
        _assert_same_outputs_and_gradients(sparse, masked, BATCH, mask)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral-window"])
def test_sparse_equals_masked_reference_other_families(family):
    """Projection biases (Qwen2), per-head q/k RMSNorm (Qwen3), a window shorter than the sequence."""
    from transformers import MistralConfig, MistralModel, Qwen2Config, Qwen2Model, Qwen3Config, Qwen3Model

    model_cls, cfg = {
        "qwen2": (Qwen2Model, tiny_config(Qwen2Config, **WIDE)),
        "qwen3": (Qwen3Model, tiny_config(Qwen3Config, head_dim=8, **WIDE)),
        "mistral-window": (MistralModel, tiny_config(MistralConfig, sliding_window=3, **WIDE)),
    }[family]
    cfg._attn_implementation = "sdpa"
    sparse, masked = _pair(model_cls, cfg, top_k=2, scale=2.0)
    for mask in (None, PADDED):
        _assert_same_outputs_and_gradients(sparse, masked, BATCH, mask)


def test_qwen3_all_groups_equal_dense():
    """Qwen3 normalises queries and keys per head before RoPE; the wrapper must too."""
    from transformers import Qwen3Config, Qwen3Model

    cfg = tiny_config(Qwen3Config, head_dim=8)
    torch.manual_seed(0)
    dense = Qwen3Model(cfg).eval()
    moe = copy.deepcopy(dense)
    for layer in moe.layers:
        router = TopKRouter(cfg.hidden_size, cfg.num_key_value_heads, 2, rule="softmax_topk_renorm")
        torch.nn.init.zeros_(router.weight)  # w_g = 1/2, scale 2: unit multipliers
        layer.self_attn = AttentionMoe(layer.self_attn, router, scale=2.0)
    with torch.no_grad():
        torch.testing.assert_close(moe(BATCH).last_hidden_state, dense(BATCH).last_hidden_state)


def test_lora_projections_are_not_sliced():
    """peft LoRA on q/k/v/o (not plain ``nn.Linear``): the per-group slices come from the wrapped
    modules' outputs, so the LoRA deltas count exactly as in the masked reference."""
    from peft import LoraConfig, get_peft_model

    cfg = tiny_llama_config(**WIDE)
    cfg._attn_implementation = "sdpa"
    models = []
    for model in _pair(LlamaModel, cfg, top_k=2, scale=2.0):
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        torch.manual_seed(7)  # the same LoRA A init for both models
        model = get_peft_model(model, lora)
        with torch.no_grad():
            g = torch.Generator().manual_seed(3)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)  # B starts at zero: give it content
        models.append(model.eval())
    sparse, masked = models
    assert type(sparse.base_model.model.layers[0].self_attn.attention.q_proj) is not torch.nn.Linear
    _assert_same_outputs_and_gradients(sparse, masked, BATCH, PADDED)


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_greedy_generation_with_dropped_groups_same_with_and_without_cache(cache_implementation):
    """Left-padded prompts, 1 of 4 groups per token: the markers survive a preallocated (static) cache too."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config(**WIDE, initializer_range=0.2)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    for i, layer in enumerate(model.model.layers):
        router = TopKRouter(cfg.hidden_size, cfg.num_key_value_heads, 1)
        torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(i))
        layer.self_attn = AttentionMoe(layer.self_attn, router)
    prompts, mask = BATCH * PADDED, PADDED  # pad id 0 where the mask is 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(prompts, use_cache=True, cache_implementation=cache_implementation, **kw)
        full = model.generate(prompts, use_cache=False, **kw)
    assert all(row.unique().numel() > 1 for row in full[:, BATCH.shape[1] :])
    assert torch.equal(cached, full)
