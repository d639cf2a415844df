"""`moe-app upcycle --format mixtral|qwen2_moe|qwen3_moe`: one streaming pass to a stock checkpoint.

The result loads with stock transformers, reproduces the dense model's logits (copy upcycling is
function-preserving) and equals `upcycle` (moe-app format) + `moe-app export` tensor for tensor.
Constructions the format cannot express are refused before anything is written (exit 2).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, Qwen3Config

from conftest import save_tiny_model, tiny_llama_config
from moe_app.checkpoint.shards import INDEX_FILE, shard_files
from upcycling_helpers import logits, tokens

TOL = dict(rtol=1e-5, atol=1e-5)


def _cli(*argv) -> int:
    from moe_app.cli.main import main

    return main([str(a) for a in argv])


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in shard_files(path):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return out


def _assert_same_files(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    for c in (ca, cb):
        c.pop("transformers_version", None)
    assert ca == cb


def _one_and_two_pass(dense_dir, tmp_path, fmt, *options, capsys=None):
    one, mid, two = tmp_path / f"one-{fmt}", tmp_path / f"mid-{fmt}", tmp_path / f"two-{fmt}"
    common = ["--model", dense_dir, *options, "--max_shard_size", "40KB"]
    assert _cli("upcycle", *common, "--out", one, "--format", fmt) == 0
    if capsys is not None:
        assert f"(streaming, stock {fmt})" in capsys.readouterr().out
    assert not (one / "moe_app.json").exists()
    assert (one / INDEX_FILE).is_file()
    assert _cli("upcycle", *common, "--out", mid) == 0
    assert _cli("export", "--ckpt", mid, "--out", two, "--format", fmt) == 0
    _assert_same_files(one, two)
    return one


@pytest.mark.parametrize(
    ("fmt", "arch", "options"),
    [
        ("mixtral", "MixtralForCausalLM", ()),
        ("qwen2_moe", "Qwen2MoeForCausalLM", ()),
        ("mixtral", "MixtralForCausalLM", ("--keep_first_dense", 1, "--scale", 1.0)),
        # not renormalised: not the dense function any more, but the moe-app model's (norm_topk_prob=False)
        ("qwen2_moe", "Qwen2MoeForCausalLM", ("--rule", "softmax_topk", "--keep_last_dense", 1)),
    ],
)
def test_one_pass_equals_dense_and_two_pass(tiny_llama_dir, tmp_path, capsys, fmt, arch, options):
    import moe_app

    one = _one_and_two_pass(
        tiny_llama_dir,
        tmp_path,
        fmt,
        "--method", "copy", "--num_experts", 4, "--top_k", 2, *options,
        capsys=capsys,
    )  # fmt: skip
    stock = AutoModelForCausalLM.from_pretrained(one).eval()
    assert type(stock).__name__ == arch
    ids = tokens()
    ours = moe_app.load_model(tmp_path / f"mid-{fmt}").eval()
    assert_close(logits(stock, ids), logits(ours, ids), **TOL)
    if "softmax_topk" not in options:
        dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        assert_close(logits(stock, ids), logits(dense, ids), **TOL)
    assert (one / "generation_config.json").is_file()


def test_partition_with_shared_expert_to_qwen2_moe(tiny_llama_dir, tmp_path):
    """Neuron partition + shared expert maps onto Qwen2-MoE's gated shared expert (gate 0, W_down x2)."""
    _one_and_two_pass(
        tiny_llama_dir,
        tmp_path,
        "qwen2_moe",
        "--method", "partition", "--num_experts", 3, "--top_k", 2, "--shared_experts", 1,
    )  # fmt: skip


def test_qwen3_base_to_qwen3_moe(tmp_path):
    dense_dir = save_tiny_model(
        Qwen3Config(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=False,
        ),
        tmp_path / "qwen3",
    )  # fmt: skip
    one = _one_and_two_pass(
        dense_dir, tmp_path, "qwen3_moe", "--method", "copy", "--num_experts", 4, "--top_k", 2
    )
    stock = AutoModelForCausalLM.from_pretrained(one).eval()
    assert type(stock).__name__ == "Qwen3MoeForCausalLM"
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    ids = tokens()
    assert_close(logits(stock, ids), logits(dense, ids), **TOL)


def test_tied_embeddings(tmp_path):
    dense_dir = save_tiny_model(tiny_llama_config(tie_word_embeddings=True), tmp_path / "tied")
    _one_and_two_pass(dense_dir, tmp_path, "mixtral", "--num_experts", 2, "--top_k", 1)


@pytest.mark.parametrize(
    ("fmt", "options", "reason"),
    [
        ("mixtral", ("--method", "partition", "--num_experts", 3, "--shared_experts", 1), "no shared expert"),
        ("mixtral", ("--rule", "softmax_topk"), "renormalises the top-k"),
        ("qwen3_moe", (), "q/k RMSNorms"),
        ("mixtral", ("--noisy_gating", "true"), "noisy gating"),
        ("qwen2_moe", ("--jitter", 0.1), "jitter"),
        ("mixtral", ("--attention_moe", "true"), "attention MoE"),
        (
            "mixtral",
            ("--method", "partition", "--num_experts", 2, "--keep_first_dense", 1),
            "Mixtral has no dense layers",
        ),
    ],
)
def test_refusals_exit_2_and_write_nothing(tiny_llama_dir, tmp_path, capsys, fmt, options, reason):
    out = tmp_path / "out"
    rc = _cli(
        "upcycle", "--model", tiny_llama_dir, "--out", out, "--format", fmt,
        "--num_experts", 4, "--top_k", 2, *options,
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert reason in err and "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]


def test_pesc_refuses_format(tiny_llama_dir, tmp_path, capsys):
    rc = _cli(
        "upcycle", "--model", tiny_llama_dir, "--out", tmp_path / "o", "--method", "pesc_lora",
        "--format", "mixtral",
    )  # fmt: skip
    assert rc == 2 and "--format" in capsys.readouterr().err


def test_in_memory_path_equals_streaming(tiny_llama_dir, tmp_path):
    """--streaming off (upcycle in memory, then export the live model) writes the same checkpoint."""
    args = ["--model", tiny_llama_dir, "--format", "mixtral", "--num_experts", 4, "--top_k", 2]
    assert _cli("upcycle", *args, "--out", tmp_path / "s") == 0
    assert _cli("upcycle", *args, "--out", tmp_path / "m", "--streaming", "off") == 0
    _assert_same_files(tmp_path / "s", tmp_path / "m")
