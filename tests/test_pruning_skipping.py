"""Dynamic skipping (Lu et al. 2024): beta = median w2/w1, ~50% skip rate, stored in the checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import moe_app
from conftest import tiny_llama_config
from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.core.pruning import apply_skipping, calibrate_skipping, moe_layer_views, skip_rates
from moe_app.core.pruning.calibration import normalize_batches
from moe_app.core.spec import spec_of
from moe_app.core.upcycling import UpcycleConfig
from moe_app.errors import MoeAppError
from upcycling_helpers import build, logits, tokens, upcycled


def _moe():
    dense = build(tiny_llama_config())
    return upcycled(
        dense, UpcycleConfig(method="noise", num_experts=6, top_k=2, noise_std=0.5, router_std=0.3)
    )


def _calib():
    g = torch.Generator().manual_seed(5)
    return normalize_batches([torch.randint(3, 128, (4, 32), generator=g) for _ in range(2)])


def test_beta_zero_changes_nothing():
    model = _moe()
    ids = tokens()
    before = logits(model, ids)
    apply_skipping(model, {0: 0.0, 1: 0.0})
    assert_close(logits(model, ids), before, rtol=0, atol=0)
    assert skip_rates(model, _calib())["all"] == 0.0


def test_calibrated_beta_skips_about_half_and_round_trips(tmp_path):
    model = _moe()
    calib = _calib()
    betas = calibrate_skipping(model, calib)
    assert set(betas) == {0, 1} and all(0.0 < b <= 1.0 for b in betas.values())
    ids = tokens()
    before = logits(model, ids)
    apply_skipping(model, betas)
    rates = skip_rates(model, calib)
    assert 0.45 <= rates["L0"] <= 0.55  # the median: half of the calibration tokens (ties aside)
    assert 0.3 <= rates["L1"] <= 0.7  # its inputs moved with layer 0's skipping
    after = logits(model, ids)
    assert not torch.equal(after, before)
    out = save_moe_checkpoint(model, tmp_path / "skip")
    loaded = moe_app.load_model(out)
    assert {lay: v.skip_beta for lay, v in moe_layer_views(loaded)} == pytest.approx(betas)
    assert spec_of(loaded).skipping == pytest.approx(betas)
    assert_close(logits(loaded, ids), after, rtol=0, atol=0)


def test_betas_are_calibrated_on_unskipped_routing():
    model = _moe()
    calib = _calib()
    betas = calibrate_skipping(model, calib)
    apply_skipping(model, betas)
    assert calibrate_skipping(model, calib) == pytest.approx(betas)


def test_stock_hf_models_cannot_store_skipping():
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).eval()
    betas = calibrate_skipping(model, _calib())  # the betas can still be measured
    with pytest.raises(MoeAppError, match="cannot be stored in a stock MixtralSparseMoeBlock"):
        apply_skipping(model, betas)
