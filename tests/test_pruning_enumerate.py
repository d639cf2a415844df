"""Expert views, enumeration pruning and saliency scores (Lu et al. 2024; He et al. 2024; REAP)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.testing import assert_close

from conftest import tiny_llama_config
from moe_app.core.models.views import clone_model
from moe_app.core.pruning import (
    EnumerationConfig,
    ExpertPruneConfig,
    keep_experts,
    moe_layer_views,
    prune_experts,
    saliency_scores,
    search_layer,
    subset_losses,
    subset_losses_naive,
)
from moe_app.core.pruning.calibration import capture_block_io, normalize_batches
from moe_app.core.pruning.enumerate import all_subsets, sample_subsets
from moe_app.core.pruning.experts import reconstruction_loss
from moe_app.core.pruning.saliency import top_experts
from moe_app.core.spec import spec_of
from moe_app.core.upcycling import UpcycleConfig
from upcycling_helpers import build, logits, tokens, upcycled


def _moe(num_experts=6, top_k=2, dtype=torch.float64, rule="softmax_topk_renorm", seed=0, **kw):
    dense = build(tiny_llama_config(), seed=seed).to(dtype)
    cfg = UpcycleConfig(
        method="noise", num_experts=num_experts, top_k=top_k, noise_std=0.5, rule=rule, seed=seed, **kw
    )
    return upcycled(dense, cfg)


def _batches(n=2, seq=16):
    return normalize_batches([tokens(seq=seq, seed=s) for s in range(n)])


def _io(model, batches):
    views = moe_layer_views(model)
    return views, capture_block_io(model, {lay: v.module for lay, v in views}, batches)


def _hf_moe(kind: str, dtype=torch.float64):
    from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    base = dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        num_experts_per_tok=2,
    )
    if kind == "mixtral":
        cfg = MixtralConfig(**base, intermediate_size=16, num_local_experts=6)
    elif kind == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            **base, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
            num_experts=6, norm_topk_prob=False,
        )  # fmt: skip
    elif kind == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            **base, intermediate_size=64, moe_intermediate_size=16, num_experts=6, head_dim=8
        )
    else:
        cfg = OlmoeConfig(**base, intermediate_size=16, num_experts=6, norm_topk_prob=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").to(dtype).eval()
    with torch.no_grad():  # spread the router logits so that top-k choices are far from ties
        for _, view in moe_layer_views(model):
            view.router_weight.normal_(0.0, 0.5)
    return model


HF_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def test_views_cover_every_block_kind():
    kinds = {v.kind for _, v in moe_layer_views(_moe())}
    assert kinds == {"moe-app"}
    for k in HF_KINDS:
        views = moe_layer_views(_hf_moe(k))
        assert len(views) == 2 and all(
            v.kind == "hf" and v.num_experts == 6 and v.top_k == 2 for _, v in views
        )
    rules = {k: moe_layer_views(_hf_moe(k))[0][1].rule for k in HF_KINDS}
    assert rules["mixtral"] == "softmax_topk_renorm" and rules["olmoe"] == "softmax_topk"


@pytest.mark.parametrize("kind", ("moe-app", *HF_KINDS))
def test_view_reconstructs_the_block_output(kind):
    model = _moe() if kind == "moe-app" else _hf_moe(kind)
    _, view = moe_layer_views(model)[0]
    x = torch.randn(10, 32, dtype=torch.float64)
    w, idx = view.routing(view.router_logits(x))
    outs = view.expert_outputs(x)  # (E, T, d)
    y = view.base_output(x) if view.base_output(x) is not None else torch.zeros_like(x)
    for j in range(view.top_k):
        y = y + (w[:, j : j + 1] * view.weight_scale).double() * outs[idx[:, j], torch.arange(10)]
    with torch.no_grad():
        assert_close(y, view.forward(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ("moe-app", *HF_KINDS))
def test_keeping_all_experts_is_the_identity(kind):
    model = _moe() if kind == "moe-app" else _hf_moe(kind)
    ids = tokens()
    before = logits(model, ids)
    keep_experts(model, {lay: list(range(v.num_experts)) for lay, v in moe_layer_views(model)})
    assert_close(logits(model, ids), before, rtol=0, atol=0)


def test_keep_slices_experts_and_router_rows():
    model = _moe()
    _, view = moe_layer_views(model)[0]
    w = view.router_weight.detach().clone()
    up = view.module.experts.gate_up_proj.detach().clone()
    view.keep([1, 4])
    assert view.num_experts == 2 and view.module.experts.num_experts == 2
    assert_close(view.router_weight, w[[1, 4]])
    assert_close(view.module.experts.gate_up_proj, up[[1, 4]])
    with pytest.raises(ValueError, match="top-2"):
        view.keep([0])


@pytest.mark.parametrize(
    ("impl", "rule"),
    [("gram", "softmax_topk_renorm"), ("gram", "softmax_topk"), ("direct", "softmax_topk_renorm")],
)
def test_vectorised_enumeration_matches_the_naive_oracle(impl, rule):
    model = _moe(rule=rule)
    views, io = _io(model, _batches())
    cfg = EnumerationConfig(impl=impl, chunk_tokens=7, memory_mb=1)  # exercise token and subset chunking
    lay, view = views[1]  # the second layer: its input went through the first MoE block
    xs, zs = io[lay]
    subsets = all_subsets(view.num_experts, 3)
    fast = subset_losses(view, xs, zs, subsets, cfg)
    naive = subset_losses_naive(view, xs, zs, subsets)
    assert int(fast.argmin()) == int(naive.argmin())
    assert_close(fast, naive, rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", ("qwen2_moe", "mixtral"))
def test_vectorised_enumeration_matches_the_oracle_on_hf_blocks(kind):
    model = _hf_moe(kind)
    views, io = _io(model, _batches())
    lay, view = views[1]
    xs, zs = io[lay]
    subsets = all_subsets(6, 4)
    assert_close(
        subset_losses(view, xs, zs, subsets), subset_losses_naive(view, xs, zs, subsets), rtol=1e-9, atol=0
    )


def test_progressive_pruning_uses_inputs_of_the_pruned_layers():
    batches = _batches()
    a, b = _moe(), _moe()
    ra = prune_experts(a, batches, ExpertPruneConfig(keep=3))
    rb = prune_experts(b, batches, ExpertPruneConfig(keep=3, progressive=True))
    assert ra.layers[0].kept == rb.layers[0].kept  # the first layer sees the same input
    assert ra.layers[1].loss != rb.layers[1].loss  # the second one sees the pruned first layer's output
    assert all(v.num_experts == 3 for _, v in moe_layer_views(b))


def test_large_search_samples_subsets_and_says_so(caplog):
    model = _moe(num_experts=8)
    views, io = _io(model, _batches(n=1))
    lay, view = views[0]
    xs, zs = io[lay]
    with caplog.at_level(logging.WARNING, logger="moe_app.core.pruning"):
        choice = search_layer(view, xs, zs, 4, EnumerationConfig(max_subsets=10))
    assert choice.how == "sample" and choice.evaluated == 10
    assert "sampled subsets" in caplog.text
    full = search_layer(view, xs, zs, 4)
    assert full.how == "enumerate" and full.evaluated == 70
    # The full search sees every sampled subset, so it is at least as good. The two searches batch
    # subsets differently, so the same subset's float64 loss may differ in the last ulp: compare with
    # a relative tolerance far below any real difference between subsets (which are ~1e-3 apart).
    assert full.loss <= choice.loss * (1 + 1e-12)
    freq = top_experts(saliency_scores(view, xs, "frequency"), 4)
    assert choice.loss <= reconstruction_loss(view, xs, zs, freq) * (1 + 1e-12)  # saliency choices included
    with caplog.at_level(logging.WARNING, logger="moe_app.core.pruning"):
        fb = search_layer(view, xs, zs, 4, EnumerationConfig(max_subsets=10, fallback="reap"))
    assert fb.how == "reap" and "using reap saliency" in caplog.text


def test_sample_subsets_distinct_and_seeded():
    a = sample_subsets(16, 8, 50, seed=3, include=[[0, 1, 2, 3, 4, 5, 6, 7]])
    assert a.shape == (50, 8) and a[0].tolist() == list(range(8))
    assert len({tuple(r) for r in a.tolist()}) == 50
    assert torch.equal(a, sample_subsets(16, 8, 50, seed=3, include=[[0, 1, 2, 3, 4, 5, 6, 7]]))


def test_saliency_scores_definitions():
    model = _moe()
    views, io = _io(model, _batches())
    lay, view = views[0]
    xs = io[lay][0]
    freq = saliency_scores(view, xs, "frequency")
    drop = saliency_scores(view, xs, "expert_drop")
    reap = saliency_scores(view, xs, "reap")
    assert_close(freq.sum(), torch.tensor(2.0, dtype=torch.float64))  # k slots per token
    assert_close(drop.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    x = torch.cat(xs)
    w, idx = view.routing(view.router_logits(x))
    outs = view.expert_outputs(x)
    e = int(idx[0, 0])
    mask = (idx == e).any(-1)
    g = (w * (idx == e)).sum(-1).double()
    expect = (g * outs[e].norm(dim=-1))[mask].mean()
    assert_close(reap[e], expect, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def trained_moe():
    """A tiny 8-expert top-2 MoE trained for a few dozen steps on random tokens (plain torch)."""
    torch.manual_seed(0)
    model = _moe(num_experts=8, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        ids = torch.randint(3, 40, (8, 16), generator=g)  # a small sub-vocabulary: learnable
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_enumeration_beats_saliency_on_a_trained_moe(trained_moe):
    batches = normalize_batches([torch.randint(3, 40, (4, 16), generator=torch.Generator().manual_seed(9))])
    losses = {}
    for method in ("enumerate", "frequency", "reap", "expert_drop"):
        model = clone_model(trained_moe)
        report = prune_experts(model, batches, ExpertPruneConfig(keep=4, method=method))
        losses[method] = [r.loss for r in report.layers]
        assert all(v.num_experts == 4 for _, v in moe_layer_views(model))
    for method in ("frequency", "reap", "expert_drop"):
        for enum_loss, other in zip(losses["enumerate"], losses[method]):
            assert enum_loss <= other + 1e-9, (method, losses)


def test_global_expert_drop_keeps_a_total_budget():
    model = _moe(num_experts=6)
    report = prune_experts(model, _batches(), ExpertPruneConfig(keep=3, method="expert_drop", scope="global"))
    counts = [len(r.kept) for r in report.layers]
    assert sum(counts) == 6 and all(c >= 2 for c in counts)
    assert spec_of(model).pruning["experts"][-1]["scope"] == "global"


@pytest.mark.parametrize("variant", ("adapter", "lora"))
def test_pesc_blocks_view_oracle_and_keep(variant):
    from moe_app.core.pesc.config import PescConfig
    from moe_app.core.pesc.surgery import build_pesc

    model = build_pesc(
        build(tiny_llama_config()).double(), PescConfig(variant=variant, num_experts=4, top_k=2)
    )
    torch.manual_seed(1)
    with torch.no_grad():  # adapters / LoRA B start at zero (dense function): give the experts content
        for name, p in model.named_parameters():
            if name.endswith(("adapters.up", "_B", "router.weight")):
                p.normal_(0.0, 0.3)
    model.eval()
    views, io = _io(model, _batches(n=1))
    assert {v.kind for _, v in views} == {"pesc" if variant == "adapter" else "lora-experts"}
    lay, view = views[0]
    xs, zs = io[lay]
    subsets = all_subsets(4, 3)
    assert_close(
        subset_losses(view, xs, zs, subsets), subset_losses_naive(view, xs, zs, subsets), rtol=1e-9, atol=0
    )
    ids = tokens()
    before = logits(model, ids)
    keep_experts(model, {lay: list(range(4)) for lay, _ in views})
    assert_close(logits(model, ids), before, rtol=0, atol=0)
    report = prune_experts(model, _batches(n=1), ExpertPruneConfig(keep=3))
    assert all(len(r.kept) == 3 for r in report.layers) and all(
        v.num_experts == 3 for _, v in moe_layer_views(model)
    )
    assert torch.isfinite(logits(model, ids)).all()
