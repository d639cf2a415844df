"""Attention MoE (LLaMA-MoE v2) with default options reproduces the dense model exactly.

Defaults select all ``G`` KV groups; the softmax weights sum to one over them, so the default
scale is ``G`` and the default attention router starts at zero (every multiplier ``G * 1/G = 1``).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import moe_app
from conftest import save_tiny_model, tiny_llama_config
from moe_app.core.moe.attention import AttentionMoe
from moe_app.core.upcycling import UpcycleConfig
from upcycling_helpers import build, logits, tokens, upcycled

TOL = dict(rtol=1e-5, atol=1e-5)


def _attention_blocks(model) -> list[AttentionMoe]:
    return [m for m in model.modules() if isinstance(m, AttentionMoe)]


@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize(
    "options",
    [
        dict(method="attention"),
        dict(method="attention", rule="softmax_topk"),
        dict(method="copy", num_experts=2, top_k=1, attention_moe=True),
    ],
    ids=["attention", "attention-no-renorm", "copy+attention"],
)
def test_default_attention_moe_equals_dense(kv_heads, options):
    dense = build(tiny_llama_config(num_key_value_heads=kv_heads))
    ids = tokens()
    moe = upcycled(dense, UpcycleConfig(**options))
    blocks = _attention_blocks(moe)
    assert len(blocks) == 2
    for b in blocks:
        assert b.router.top_k == kv_heads and b.scale == kv_heads
        assert torch.count_nonzero(b.router.weight) == 0
    assert_close(logits(moe, ids), logits(dense, ids), **TOL)


def test_explicit_choices_are_kept():
    dense = build(tiny_llama_config(num_key_value_heads=4))
    # fewer groups than G: the attention router follows router_init (a zero router would send
    # every token to the same groups); the scale stays G (G / k per selected group at init)
    moe = upcycled(dense, UpcycleConfig(method="attention", attention_top_k=2))
    for b in _attention_blocks(moe):
        assert b.router.top_k == 2 and b.scale == 4.0 and torch.count_nonzero(b.router.weight) > 0
    # LLaMA-MoE v2-style explicit values
    moe = upcycled(
        dense,
        UpcycleConfig(
            method="attention", attention_top_k=3, attention_scale=2.5, attention_router_init="normal"
        ),
    )
    for b in _attention_blocks(moe):
        assert b.router.top_k == 3 and b.scale == 2.5 and torch.count_nonzero(b.router.weight) > 0
    # an explicit attention router init at k = G is honoured (and then the model is not dense)
    moe = upcycled(dense, UpcycleConfig(method="attention", attention_router_init="normal"))
    assert all(torch.count_nonzero(b.router.weight) > 0 for b in _attention_blocks(moe))


def test_cli_default_attention_upcycle_equals_dense(tmp_path, capsys):
    from moe_app.cli.main import main

    src = save_tiny_model(tiny_llama_config(), tmp_path / "src")
    out = tmp_path / "moe"
    rc = main(["upcycle", "--model", str(src), "--out", str(out), "--method", "attention"])
    assert rc == 0, capsys.readouterr().err
    ids = tokens()
    dense = build(tiny_llama_config())  # same seed as save_tiny_model
    moe = moe_app.load_model(out).eval()
    assert len(_attention_blocks(moe)) == 2
    assert_close(logits(moe, ids), logits(dense, ids), **TOL)
