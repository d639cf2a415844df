"""TopKRouter: routing rules, float32 routing, noisy gating and dynamic skipping."""

from __future__ import annotations

import torch

from moe_app.core.moe.router import TopKRouter


def _router(**kw):
    torch.manual_seed(0)
    r = TopKRouter(16, 6, kw.pop("top_k", 2), **kw)
    with torch.no_grad():
        r.weight.normal_(std=0.5)  # spread-out probabilities
    return r


def test_renorm_weights_sum_to_one():
    r = _router(rule="softmax_topk_renorm").eval()
    out = r(torch.randn(20, 16))
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(20))
    # Equal to the softmax over the k selected logits.
    torch.testing.assert_close(out.weights, out.logits.gather(1, out.indices).softmax(-1))


def test_softmax_topk_equals_gathered_probs():
    r = _router(rule="softmax_topk").eval()
    out = r(torch.randn(20, 16))
    torch.testing.assert_close(out.weights, out.probs.gather(1, out.indices))
    assert (out.weights.sum(-1) < 1).all()
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(20))


def test_router_is_float32_under_bf16_input():
    r = _router().to(torch.bfloat16).eval()
    x = torch.randn(20, 16, dtype=torch.bfloat16)
    out = r(x)
    for t in (out.logits, out.probs, out.weights):
        assert t.dtype == torch.float32
    assert out.indices.dtype == torch.int64
    torch.testing.assert_close(out.logits, x.float() @ r.weight.float().T)


def test_noisy_gating_only_in_train_mode():
    r = _router(noisy_gating=True)
    x = torch.randn(20, 16)
    r.eval()
    torch.testing.assert_close(r(x).logits, x @ r.weight.T)
    torch.testing.assert_close(r(x).logits, r(x).logits)  # deterministic
    r.train()
    torch.manual_seed(1)
    assert not torch.allclose(r(x).logits, x @ r.weight.T)


def test_skip_beta_zero_is_no_op():
    x = torch.randn(30, 16)
    base = _router(top_k=3).eval()(x)
    skip = _router(top_k=3, skip_beta=0.0).eval()(x)
    assert torch.equal(skip.indices, base.indices)
    torch.testing.assert_close(skip.weights, base.weights)


def test_skip_beta_above_one_drops_every_second_choice():
    x = torch.randn(30, 16)
    r = _router(top_k=2, skip_beta=1.5).eval()
    out = r(x)
    assert (out.indices[:, 0] >= 0).all() and (out.indices[:, 1] == -1).all()
    torch.testing.assert_close(out.weights[:, 0], torch.ones(30))  # renormalised onto the kept one
    assert (out.weights[:, 1] == 0).all()
    r.train()  # skipping is an inference-time decision
    assert (r(x).indices >= 0).all()
