"""Expert slimming (Wanda / SparseGPT / 2:4 inside every expert) and expert quantisation, ``moe-app prune``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import moe_app
from conftest import load_stock_quantized, tiny_llama_config
from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.checkpoint.pruning import PruneJob, prune_checkpoint
from moe_app.cli.main import main
from moe_app.core.pruning import CalibrationConfig, ExpertPruneConfig, moe_layer_views
from moe_app.core.pruning.slim import (
    SlimConfig,
    expert_weight_sparsity,
    nm_prune_mask,
    sparsegpt_prune,
    wanda_prune,
)
from moe_app.core.upcycling import UpcycleConfig
from moe_app.errors import MoeAppError
from test_pruning_checkpoint import _save_hf
from upcycling_helpers import build, upcycled

CALIB = CalibrationConfig(data="builtin:arithmetic", num_samples=8, max_length=32, batch_size=4)
CALIB_ARGS = [
    "--data",
    "builtin:arithmetic",
    "--calib_samples",
    "8",
    "--max_length",
    "32",
    "--batch_size",
    "4",
]


@pytest.fixture(scope="module")
def tok():
    from moe_app.core.data.tokenizer import suite_tokenizer

    return suite_tokenizer()


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tok) -> Path:
    dense = build(tiny_llama_config(vocab_size=len(tok)))
    moe = upcycled(dense, UpcycleConfig(method="noise", num_experts=6, top_k=2, noise_std=0.5))
    return save_moe_checkpoint(moe, tmp_path_factory.mktemp("moe") / "ckpt", tokenizer=tok)


def _layer(seed: int = 0, rows: int = 12, cols: int = 32, tokens: int = 200):
    """A weight and correlated, unevenly scaled inputs (where the activation-aware scores matter)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scale = torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    x = (torch.randn(tokens, cols, generator=g) @ mix) * scale  # (T, in)
    return w, x


def _ids(tok):
    return torch.tensor([tok("12+35=47 and 8*3=24").input_ids])


# ------------------------------------------------------------------------------------------- one matrix
def test_wanda_exact_row_sparsity_and_keeps_the_largest_scores():
    w, x = _layer()
    norms = x.norm(dim=0)
    got = wanda_prune(w, norms, 0.4)
    k = int(32 * 0.4)  # 12 pruned per row
    assert ((got == 0).sum(dim=1) == k).all()
    for r in range(w.shape[0]):  # a direct reimplementation, one row at a time, in Python
        scores = [abs(float(w[r, j])) * float(norms[j]) for j in range(32)]
        keep = sorted(range(32), key=lambda j: scores[j], reverse=True)[: 32 - k]
        expect = torch.zeros(32)
        expect[keep] = w[r, keep]
        assert_close(got[r], expect, rtol=0, atol=0)


def test_two_four_keeps_the_two_best_of_every_four():
    w, x = _layer(seed=1)
    norms = x.norm(dim=0)
    mask = nm_prune_mask(w.abs() * norms, 2, 4)
    got = wanda_prune(w, norms, None, nm=(2, 4))
    assert ((got.reshape(12, 8, 4) == 0).sum(-1) == 2).all()  # exactly 2 of every 4
    assert_close(got, w.masked_fill(mask, 0), rtol=0, atol=0)
    scores = (w.abs() * norms).reshape(12, 8, 4)
    kept = (got.reshape(12, 8, 4) != 0).float()
    # every kept score beats every pruned one within its group of 4
    low_kept = (scores + (1 - kept) * 1e9).amin(-1)
    high_pruned = (scores - kept * 1e9).amax(-1)
    assert (low_kept >= high_pruned).all()


def _correlated_layer(seed: int, rank: int = 8, rows: int = 12, cols: int = 32, tokens: int = 200):
    """Inputs close to a rank-``rank`` subspace (as real activations are): where OBS compensation pays."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    return w, x + 0.1 * torch.randn(tokens, cols, generator=g)  # (T, in)


@pytest.mark.parametrize("seed", range(4))
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(seed):
    w, x = _correlated_layer(seed)
    ref = x @ w.T  # (T, out)

    def err(wp):
        return float((ref - x @ wp.T).norm())

    h = x.double().T @ x.double()
    wanda = wanda_prune(w, x.norm(dim=0), 0.5)
    magnitude = wanda_prune(w, torch.ones(32), 0.5)
    for blocksize in (8, 128):  # several blocks (lazy updates across blocks) and one
        sgpt = sparsegpt_prune(w, h, 0.5, blocksize=blocksize)
        assert ((sgpt == 0).sum(dim=1) == 16).all() and ((wanda == 0).sum(dim=1) == 16).all()
        assert err(sgpt) < 0.9 * min(err(wanda), err(magnitude)), (blocksize, err(sgpt), err(wanda))
    # nothing to prune: the weight comes back as it was (the OBS updates are exact no-ops)
    assert_close(sparsegpt_prune(w, h, 0.01), w, rtol=0, atol=1e-5)


def test_sparsegpt_equals_the_naive_sequential_obs_update():
    """The blocked Cholesky form == pruning column by column with the inverse of the remaining H."""
    w, x = _layer(seed=3, rows=6, cols=20)
    h = x.double().T @ x.double()
    got = sparsegpt_prune(w, h, 0.5, blocksize=7, damp=0.01)
    h = h + 0.01 * torch.diagonal(h).mean() * torch.eye(20, dtype=torch.float64)
    ref, mask = w.double().clone(), got == 0
    for j in range(20):  # OBS: zero w_j if masked, spread its error over the columns not yet fixed
        hinv = torch.linalg.inv(h[j:, j:])
        q = ref[:, j].masked_fill(mask[:, j], 0.0)
        ref[:, j:] -= ((ref[:, j] - q) / hinv[0, 0]).unsqueeze(1) * hinv[0].unsqueeze(0)
        ref[:, j] = q
    assert_close(got.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "wanda", "sparsity": 1.0}, "strictly between 0 and 1"),
        ({"method": "sparsegpt", "sparsity": 0.0}, "strictly between 0 and 1"),
        ({"method": "wanda"}, "needs the fraction"),
        ({"method": "2:4", "sparsity": 0.5}, "fixes the sparsity at 0.5"),
        ({"method": "magnitude", "sparsity": 0.5}, "unknown slimming method"),
    ],
)
def test_slim_config_refuses_bad_values(kwargs, match):
    with pytest.raises(MoeAppError, match=match):
        SlimConfig(**kwargs)


# ------------------------------------------------------------------------------------------- checkpoints
def test_cli_wanda_on_a_moe_app_checkpoint_reloads_with_the_asked_sparsity(moe_dir, tmp_path, tok, capsys):
    out = tmp_path / "slim"
    args = ["prune", "--ckpt", str(moe_dir), "--out", str(out), "--slim", "wanda", "--sparsity", "0.5"]
    assert main([*args, *CALIB_ARGS, "--report", str(tmp_path / "r.json")]) == 0
    assert "expert sparsity 0.500 (wanda)" in capsys.readouterr().out
    model = moe_app.load_model(out)
    assert expert_weight_sparsity(model) == 0.5
    for _, view in moe_layer_views(model):  # every expert row: exactly half zeros
        ex = view.module.experts
        assert ((ex.gate_up_proj == 0).sum(-1) == 16).all() and ((ex.down_proj == 0).sum(-1) == 32).all()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["slim"]["calibration_tokens"] > 0
    assert sum(report["slim"]["layers"]["0"]["tokens_per_expert"]) == 2 * report["slim"]["calibration_tokens"]
    spec = json.loads((out / "moe_app.json").read_text())
    assert spec["lineage"][-1]["config"]["slim"]["method"] == "wanda"
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_ids(tok)).logits).all()


def test_keep_layer_drop_and_two_four_compose(moe_dir, tmp_path):
    out = tmp_path / "combo"
    job = PruneJob(
        experts=ExpertPruneConfig(keep=4, method="frequency"),
        layer_drop=1,
        slim=SlimConfig(method="2:4"),
        calibration=CALIB,
        eval_before_after=False,
    )
    report = prune_checkpoint(moe_dir, out, job)
    dropped = report["layer_drop"]["dropped"]
    assert len(dropped) == 1
    model = moe_app.load_model(out)
    views = moe_layer_views(model)
    assert [lay for lay, _ in views] == [i for i in (0, 1) if i not in dropped]
    for _, view in views:
        ex = view.module.experts
        assert ex.num_experts == 4
        assert ((ex.gate_up_proj.reshape(4, 128, 8, 4) == 0).sum(-1) == 2).all()
        assert ((ex.down_proj.reshape(4, 32, 16, 4) == 0).sum(-1) == 2).all()


def test_sparsegpt_on_stock_mixtral_reloads_in_stock_transformers(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    src = _save_hf("mixtral", tmp_path / "src", tok)
    out = tmp_path / "slim"
    args = ["prune", "--ckpt", str(src), "--out", str(out), "--slim", "sparsegpt", "--sparsity", "0.5"]
    report_file = tmp_path / "r.json"
    assert (
        main(
            [
                *args,
                *CALIB_ARGS,
                "--keep",
                "4",
                "--layer_drop",
                "1",
                "--no_eval",
                "--report",
                str(report_file),
            ]
        )
        == 0
    )
    report = json.loads(report_file.read_text())
    (dropped,) = report["layer_drop"]["dropped"]  # zeroed in a stock checkpoint: its experts see only zeros
    assert report["slim"]["layers"][str(dropped)]["skipped"] == "no non-zero input"
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert stock.config.num_local_experts == 4
    ex = stock.model.layers[1 - dropped].mlp.experts
    assert ((ex.gate_up_proj == 0).sum(-1) == 16).all() and ((ex.down_proj == 0).sum(-1) == 8).all()
    assert report["slim"]["layers"][str(1 - dropped)]["sparsity"] == 0.5
    assert not (stock.model.layers[dropped].mlp.experts.gate_up_proj == 0).any()  # left as it was
    with torch.no_grad():
        assert torch.isfinite(stock(input_ids=_ids(tok)).logits).all()


@pytest.mark.parametrize("scheme", ("nf4", "int8"))
def test_quantized_qwen2_moe_loads_in_stock_transformers_close_to_float(scheme, tmp_path, tok):
    from transformers import AutoModelForCausalLM

    src = _save_hf("qwen2_moe", tmp_path / "src", tok)
    out = tmp_path / "q"
    report = prune_checkpoint(
        src, out, PruneJob(quantize=scheme, calibration=CALIB, eval_before_after=scheme == "nf4")
    )
    if scheme == "nf4":  # the loss of the quantised model is measured and close to the float one
        assert abs(report["eval_loss_quantized"] - report["eval_loss_after"]) < 0.01
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (
        cfg["quant_method"] == "bitsandbytes" and cfg["load_in_4bit" if scheme == "nf4" else "load_in_8bit"]
    )
    assert "self_attn.q_proj" in cfg["llm_int8_skip_modules"] and "lm_head" in cfg["llm_int8_skip_modules"]
    stock = load_stock_quantized(out)
    kinds = {n: type(m).__name__ for n, m in stock.named_modules()}
    want = "Linear4bit" if scheme == "nf4" else "Linear8bitLt"
    assert kinds["model.layers.0.mlp.shared_expert.up_proj"] == want
    assert kinds["model.layers.0.self_attn.q_proj"] == "Linear"  # only experts are quantised
    assert kinds["model.layers.0.mlp.shared_expert_gate"] == "Linear"
    assert not list(tmp_path.glob(".q.float-*"))  # the scratch float copy is gone
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        got, want_logits = stock(input_ids=_ids(tok)).logits, ref(input_ids=_ids(tok)).logits
    assert_close(got, want_logits, rtol=0, atol=0.05)
    assert not torch.equal(got, want_logits)  # something was really quantised


def test_keep_slim_and_nf4_compose_on_qwen2_moe(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    src = _save_hf("qwen2_moe", tmp_path / "src", tok)
    out = tmp_path / "combo"
    args = ["prune", "--ckpt", str(src), "--out", str(out), "--keep", "4", "--method", "frequency"]
    assert (
        main([*args, "--slim", "wanda", "--sparsity", "0.25", "--quantize", "nf4", "--no_eval", *CALIB_ARGS])
        == 0
    )
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    mlp = stock.model.layers[1].mlp
    assert (
        mlp.experts.gate_up_proj.shape[0] == 4 and type(mlp.shared_expert.down_proj).__name__ == "Linear4bit"
    )
    assert ((mlp.experts.gate_up_proj == 0).sum(-1) == 8).all()
    lineage = json.loads((out / "moe_app_lineage.json").read_text())["lineage"]
    assert lineage[-1]["config"]["quantize"] == "nf4" and lineage[-1]["config"]["slim"]["sparsity"] == 0.25


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("extra", "kind", "match"),
    [
        (["--slim", "wanda", "--sparsity", "1.5"], "moe-app", "strictly between 0 and 1"),
        (["--slim", "2:4", "--sparsity", "0.5"], "moe-app", "fixes the sparsity at 0.5"),
        (["--slim", "sparsegpt"], "moe-app", "needs the fraction"),
        (["--sparsity", "0.5"], "moe-app", "--sparsity without --slim"),
        (["--quantize", "nf4"], "moe-app", "moe-app checkpoint's experts are fused"),
        (["--quantize", "int8", "--keep", "4"], "mixtral", "nothing to quantise"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    extra, kind, match, moe_dir, tmp_path, tok, capsys
):
    src = moe_dir if kind == "moe-app" else _save_hf(kind, tmp_path / "src", tok)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["prune", "--ckpt", str(src), "--out", str(out), *extra, *CALIB_ARGS]) == 2
    # one line from moe-app (transformers' own "Loading weights" bar may precede it)
    lines = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.strip() and "Loading weights" not in line
    ]
    assert len(lines) == 1 and lines[0].startswith("moe-app: error:") and match in lines[0], lines
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before
