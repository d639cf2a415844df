"""``prune_checkpoint`` / ``moe-app prune``: same kind of checkpoint out, loadable, refusals write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import moe_app
from conftest import tiny_llama_config
from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.checkpoint.pruning import PruneJob, prune_checkpoint
from moe_app.cli.main import main
from moe_app.core.pruning import (
    CalibrationConfig,
    ExpertPruneConfig,
    calibration_batches,
    moe_layer_views,
    prune_experts,
)
from moe_app.core.spec import SPEC_FILE
from moe_app.core.upcycling import UpcycleConfig
from moe_app.errors import MoeAppError
from upcycling_helpers import build, upcycled

CALIB = CalibrationConfig(data="builtin:arithmetic", num_samples=8, max_length=32, batch_size=4)


@pytest.fixture(scope="module")
def tok():
    from moe_app.core.data.tokenizer import suite_tokenizer

    return suite_tokenizer()


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tok) -> Path:
    dense = build(tiny_llama_config(vocab_size=len(tok)))
    moe = upcycled(dense, UpcycleConfig(method="noise", num_experts=6, top_k=2, noise_std=0.5))
    return save_moe_checkpoint(moe, tmp_path_factory.mktemp("moe") / "ckpt", tokenizer=tok)


def _hf_config(kind: str, vocab: int):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    base = dict(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=False, num_experts_per_tok=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if kind == "mixtral":
        return MixtralConfig(**base, intermediate_size=16, num_local_experts=6)
    if kind == "qwen2_moe":
        return Qwen2MoeConfig(
            **base,
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=6,
        )
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(
            **base, intermediate_size=64, moe_intermediate_size=16, num_experts=6, head_dim=8
        )
    return OlmoeConfig(**base, intermediate_size=16, num_experts=6)


def _save_hf(kind: str, path: Path, tok) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf_config(kind, len(tok)))
    with torch.no_grad():
        for _, view in moe_layer_views(model):
            view.router_weight.normal_(0.0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _ids(tok):
    return torch.tensor([tok("12+35=47 and 8*3=24").input_ids])


def test_moe_app_checkpoint_pruned_loads_with_the_same_logits(moe_dir, tmp_path, tok):
    out = tmp_path / "pruned"
    job = PruneJob(experts=ExpertPruneConfig(keep=3, method="enumerate"), calibration=CALIB)
    report = prune_checkpoint(moe_dir, out, job)
    assert report["kind"] == "moe-app" and report["eval_loss_after"] >= 0
    loaded = moe_app.load_model(out)
    assert all(v.num_experts == 3 and v.top_k == 2 for _, v in moe_layer_views(loaded))
    # the same pruning in memory
    model = moe_app.load_model(moe_dir)
    prune_experts(model, calibration_batches(tok, CALIB), job.experts)
    with torch.no_grad():
        assert_close(loaded(input_ids=_ids(tok)).logits, model(input_ids=_ids(tok)).logits, rtol=0, atol=0)
    spec = json.loads((out / SPEC_FILE).read_text())
    assert [lay["mlp"]["num_experts"] for lay in spec["layers"]] == [3, 3]
    assert [lay["mlp"]["top_k"] for lay in spec["layers"]] == [2, 2]
    entry = spec["pruning"]["experts"][-1]
    assert entry["method"] == "enumerate" and len(entry["kept"]["0"]) == 3
    assert spec["lineage"][-1]["stage"] == "prune"
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("kind", ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"))
def test_stock_hf_checkpoint_pruned_reloads_in_stock_transformers(kind, tmp_path, tok):
    from transformers import AutoModelForCausalLM

    src = _save_hf(kind, tmp_path / "src", tok)
    out = tmp_path / "pruned"
    job = PruneJob(
        experts=ExpertPruneConfig(keep=4, method="enumerate"), calibration=CALIB, eval_before_after=False
    )
    assert prune_checkpoint(src, out, job)["kind"] == "hf"
    assert not (out / SPEC_FILE).exists()
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg = stock.config
    assert getattr(cfg, "num_local_experts", None) == 4 or getattr(cfg, "num_experts", None) == 4
    assert cfg.num_experts_per_tok == 2
    mlp = stock.model.layers[0].mlp
    assert mlp.gate.weight.shape == (4, 32) and mlp.experts.gate_up_proj.shape[0] == 4
    if kind == "qwen2_moe":
        assert mlp.shared_expert is not None
    model = moe_app.load_model(src)
    prune_experts(model, calibration_batches(tok, CALIB), job.experts)
    with torch.no_grad():
        got = stock(input_ids=_ids(tok)).logits
        assert torch.isfinite(got).all()
        assert_close(got, model(input_ids=_ids(tok)).logits, rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    ("keep", "match"),
    [(6, "nothing to prune"), (9, "nothing to prune"), (1, "below layer 0's top_k=2")],
)
def test_bad_keep_is_refused_and_nothing_is_written(moe_dir, tmp_path, keep, match):
    out = tmp_path / "out"
    with pytest.raises(MoeAppError, match=match):
        prune_checkpoint(moe_dir, out, PruneJob(experts=ExpertPruneConfig(keep=keep), calibration=CALIB))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_dense_checkpoint_is_refused(tiny_llama_dir, tmp_path, tok):
    tok.save_pretrained(tiny_llama_dir)
    out = tmp_path / "out"
    with pytest.raises(MoeAppError, match="no MoE layers"):
        prune_checkpoint(tiny_llama_dir, out, PruneJob(experts=ExpertPruneConfig(keep=2), calibration=CALIB))
    assert not out.exists()


def test_empty_calibration_data_is_refused(moe_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    calib = CalibrationConfig(data=str(empty), num_samples=4)
    with pytest.raises(MoeAppError, match=r"no examples|no records|empty"):
        prune_checkpoint(moe_dir, out, PruneJob(experts=ExpertPruneConfig(keep=3), calibration=calib))
    assert not out.exists()


def test_skipping_on_a_stock_checkpoint_is_refused(tmp_path, tok):
    src = _save_hf("mixtral", tmp_path / "src", tok)
    out = tmp_path / "out"
    with pytest.raises(MoeAppError, match="skipping cannot be stored in a stock transformers checkpoint"):
        prune_checkpoint(src, out, PruneJob(skipping=True, calibration=CALIB))
    assert not out.exists()


def test_cli_prune_exit_codes(moe_dir, tmp_path, capsys):
    out = tmp_path / "cli-out"
    assert main(["prune", "--ckpt", str(moe_dir), "--out", str(out), "--keep", "6"]) == 2
    assert "nothing to prune" in capsys.readouterr().err
    assert not out.exists()
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"the cat {i} sat on the mat {i * 7}"}) for i in range(12)))
    args = ["prune", "--ckpt", str(moe_dir), "--out", str(out), "--keep", "4", "--method", "reap"]
    args += ["--data", str(data), "--calib_samples", "8", "--max_length", "32", "--skipping"]
    args += ["--report", str(tmp_path / "report.json")]
    assert main(args) == 0
    assert "pruned" in capsys.readouterr().out
    spec = json.loads((out / SPEC_FILE).read_text())
    assert [lay["mlp"]["num_experts"] for lay in spec["layers"]] == [4, 4]
    assert set(spec["skipping"]) == {"0", "1"}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["experts"]["method"] == "reap" and "skip_rate" in report["skipping"]
