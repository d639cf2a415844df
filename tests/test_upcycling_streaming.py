"""Streaming conversion == in-memory surgery; the `moe-app upcycle` command."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

import moe_app
from conftest import save_tiny_model, tiny_llama_config
from moe_app.checkpoint.hub import load_hf_causal_lm
from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.checkpoint.shards import load_all, shard_files
from moe_app.checkpoint.streaming import StreamingUnsupported, upcycle_checkpoint_streaming
from moe_app.core.spec import SPEC_FILE, spec_of
from moe_app.core.upcycling import UpcycleConfig, upcycle
from upcycling_helpers import logits, tokens


@pytest.fixture
def sharded_llama(tmp_path):
    """A 3-layer LLaMA saved in several shards (so layers straddle shard boundaries)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=3))
    path = tmp_path / "src"
    model.save_pretrained(path, max_shard_size="20KB")
    return path


@pytest.mark.parametrize(
    "cfg",
    [
        UpcycleConfig(method="copy", num_experts=2, top_k=1, layers="0,2"),
        UpcycleConfig(method="noise", num_experts=3, top_k=2, noisy_gating=True),
        UpcycleConfig(method="drop", num_experts=4, top_k=2, drop_ratio=0.5, seed=3),
        UpcycleConfig(method="partition", split="random", num_experts=3, top_k=2, shared_experts=1),
        UpcycleConfig(method="partition", split="clustering", num_experts=4, top_k=2, router_init="zeros"),
    ],
    ids=["copy", "noise", "drop", "partition-random-shared", "partition-clustering"],
)
def test_streaming_equals_in_memory(sharded_llama, tmp_path, cfg):
    assert len(shard_files(sharded_llama)) > 1
    upcycle_checkpoint_streaming(sharded_llama, tmp_path / "stream", cfg, max_shard_size="30KB")
    model = upcycle(load_hf_causal_lm(sharded_llama), cfg)
    save_moe_checkpoint(model, tmp_path / "mem", max_shard_size="1MB")
    a, b = load_all(tmp_path / "stream"), load_all(tmp_path / "mem")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    sa = json.loads((tmp_path / "stream" / SPEC_FILE).read_text())
    sb = json.loads((tmp_path / "mem" / SPEC_FILE).read_text())
    assert sa["layers"] == sb["layers"]
    ids = tokens()
    assert_close(
        logits(moe_app.load_model(tmp_path / "stream"), ids), logits(model.eval(), ids), rtol=0, atol=0
    )


def test_streaming_refuses_data_driven_methods(sharded_llama, tmp_path):
    cfg = UpcycleConfig(method="partition", split="importance", num_experts=4, top_k=2)
    with pytest.raises(StreamingUnsupported, match="calibration"):
        upcycle_checkpoint_streaming(sharded_llama, tmp_path / "o", cfg)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------- the CLI command
def _cli(*argv) -> int:
    from moe_app.cli.main import main

    return main([str(a) for a in argv])


def test_cli_upcycle_streaming_and_load(sharded_llama, tmp_path, capsys):
    out = tmp_path / "moe"
    rc = _cli(
        "upcycle",
        "--model",
        sharded_llama,
        "--out",
        out,
        "--method",
        "drop",
        "--num_experts",
        4,
        "--top_k",
        2,
        "--layers",
        "0,2",
        "--max_shard_size",
        "50KB",
    )
    assert rc == 0
    assert "(streaming)" in capsys.readouterr().out
    model = moe_app.load_model(out)
    assert spec_of(model).moe_layers() == [0, 2]


def test_cli_upcycle_bad_input_exit_2_nothing_written(sharded_llama, tmp_path, capsys):
    out = tmp_path / "moe"
    cases = [
        (["--num_experts", 4, "--top_k", 5], "top_k=5 is not in [1, num_experts=4]"),
        (["--method", "partition", "--num_experts", 3, "--top_k", 1], "d_ff=64 is not divisible"),
        (
            ["--method", "partition", "--split", "importance", "--num_experts", 4, "--top_k", 2],
            "--calibration",
        ),
    ]
    for extra, message in cases:
        rc = _cli("upcycle", "--model", sharded_llama, "--out", out, *extra)
        err = capsys.readouterr().err
        assert rc == 2 and message in err, err
        assert "Traceback" not in err
        assert not out.exists()
    rc = _cli("upcycle", "--model", tmp_path / "missing", "--out", out)
    assert rc == 2 and "directory not found" in capsys.readouterr().err


def test_cli_upcycle_gpt2_is_unsupported(tmp_path, capsys):
    from transformers import GPT2Config

    src = save_tiny_model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64), tmp_path / "gpt2")
    rc = _cli("upcycle", "--model", src, "--out", tmp_path / "o", "--num_experts", 2, "--top_k", 1)
    err = capsys.readouterr().err
    assert rc == 2 and "mlp.gate_proj` not found" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_upcycle_importance_with_file_calibration(tmp_path, capsys):
    """In-memory path with calibration text from a .jsonl file and the model's own tokenizer."""
    from moe_app.core.data.tokenizer import suite_tokenizer

    tok = suite_tokenizer(cache_dir=str(tmp_path / "tokcache"))
    src = save_tiny_model(tiny_llama_config(vocab_size=len(tok)), tmp_path / "src")
    tok.save_pretrained(src)
    calib = tmp_path / "calib.jsonl"
    calib.write_text(
        "\n".join(json.dumps({"text": f"The number {i} plus {i} is {2 * i}."}) for i in range(40))
    )
    out = tmp_path / "moe"
    rc = _cli(
        "upcycle",
        "--model",
        src,
        "--out",
        out,
        "--method",
        "partition",
        "--split",
        "importance",
        "--num_experts",
        4,
        "--top_k",
        2,
        "--router_init",
        "kmeans",
        "--calibration",
        calib,
        "--seq_len",
        32,
    )
    assert rc == 0, capsys.readouterr().err
    assert "(in-memory)" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file()
    spec = json.loads((out / SPEC_FILE).read_text())
    assert spec["lineage"][0]["data"]["calibration"] == str(calib)
    moe_app.load_model(out)


def test_builtin_calibration_comes_from_the_offline_suite():
    """`upcycle --calibration builtin` reads like `prune --data builtin`: instructions + pre-training text."""
    from moe_app.core.pruning.calibration import calibration_examples

    examples = calibration_examples("builtin", 200)
    assert len(examples) == 200
    assert any(e.messages for e in examples) and any(e.messages is None and e.text for e in examples)
