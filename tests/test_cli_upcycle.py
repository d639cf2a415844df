"""`moe-app upcycle --method pesc|pesc_lora`, calibration files of any format, and the option parsing."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

import moe_app
from conftest import save_tiny_model, tiny_llama_config
from moe_app.checkpoint.hub import load_hf_causal_lm
from upcycling_helpers import logits, tokens


def _cli(*argv) -> int:
    from moe_app.cli.main import main

    return main([str(a) for a in argv])


@pytest.fixture
def dense_dir(tmp_path):
    return save_tiny_model(tiny_llama_config(num_hidden_layers=3), tmp_path / "dense")


# ------------------------------------------------------------------------- PESC
def test_pesc_checkpoint_equals_dense(dense_dir, tmp_path, capsys):
    out = tmp_path / "pesc"
    rc = _cli(
        "upcycle", "--model", dense_dir, "--out", out, "--method", "pesc",
        "--num_experts", 4, "--top_k", 2, "--adapter_dim", 8, "--layers", "0,2",
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "PESC layers [0, 2]" in capsys.readouterr().out
    spec = json.loads((out / "moe_app.json").read_text())
    assert spec["adapters"]["kind"] == "pesc"
    cfg = spec["adapters"]["config"]
    assert (cfg["variant"], cfg["num_experts"], cfg["top_k"], cfg["adapter_dim"], cfg["layers"]) == (
        "adapter", 4, 2, 8, [0, 2],
    )  # fmt: skip
    from moe_app.core.moe.pesc import PescMoeBlock

    model = moe_app.load_model(out)
    blocks = [m for m in model.modules() if isinstance(m, PescMoeBlock)]
    assert len(blocks) == 2 and blocks[0].experts.num_experts == 4
    assert all(torch.count_nonzero(b.experts.up) == 0 for b in blocks)  # identity adapters at init
    ids = tokens()
    dense = load_hf_causal_lm(dense_dir).eval()
    assert_close(logits(model, ids), logits(dense, ids), rtol=0, atol=1e-6)


def test_pesc_lora_exports_to_a_stock_mixtral_equal_to_dense(dense_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out, hf = tmp_path / "pesc-lora", tmp_path / "mixtral"
    rc = _cli(
        "upcycle", "--model", dense_dir, "--out", out, "--method", "pesc_lora",
        "--num_experts", 4, "--top_k", 2, "--lora_rank", 4,
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    ids = tokens()
    dense = logits(load_hf_causal_lm(dense_dir).eval(), ids)
    assert_close(logits(moe_app.load_model(out), ids), dense, rtol=1e-5, atol=1e-5)
    rc = _cli("export", "--ckpt", out, "--out", hf, "--format", "mixtral")
    assert rc == 0, capsys.readouterr().err
    mixtral = AutoModelForCausalLM.from_pretrained(hf).eval()
    assert mixtral.config.model_type == "mixtral"
    assert (mixtral.config.num_local_experts, mixtral.config.num_experts_per_tok) == (4, 2)
    assert_close(logits(mixtral, ids), dense, rtol=1e-5, atol=1e-5)


def test_pesc_option_errors_are_one_line_exit_2(dense_dir, tmp_path, capsys):
    out = tmp_path / "o"
    cases = [
        (["--method", "pesc", "--top_k", 5, "--num_experts", 4], "top_k=5"),
        (["--method", "pesc", "--adapter_dim", 0], "--adapter_dim"),
        (["--method", "pesc", "--split", "random"], "--split do(es) not apply to --method pesc"),
        (["--method", "copy", "--lora_rank", 4], "--lora_rank do(es) not apply to --method copy"),
        (["--method", "pesq"], "--method: Expected a typing.Literal"),
        (["--num_experts", "four"], "--num_experts: Expected"),
    ]
    for extra, message in cases:
        rc = _cli("upcycle", "--model", dense_dir, "--out", out, *extra)
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (extra, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
        assert not out.exists()


def test_help_comes_from_the_config_docstrings(capsys):
    with pytest.raises(SystemExit) as exc:
        _cli_help()
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in (
        "--method",
        "pesc_lora",
        "Drop-Upcycling",  # UpcycleConfig.method's docstring
        "--adapter_dim",
        "bottleneck width",  # PescConfig.adapter_dim's docstring
        "--calibration",
        "--overwrite",
    ):
        assert needle in text, needle


def _cli_help():
    from moe_app.cli.commands import upcycle
    from moe_app.cli.commands._options import make_parser

    parser = make_parser("moe-app upcycle")
    upcycle.build_parser(parser)
    parser.parse_args(["--help"])


# ------------------------------------------------------------------------- calibration files
@pytest.mark.slow
def test_parquet_and_jsonl_calibration_give_the_same_checkpoint(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moe_app.checkpoint.shards import load_all
    from moe_app.core.data.tokenizer import suite_tokenizer

    tok = suite_tokenizer(cache_dir=str(tmp_path / "tokcache"))
    src = save_tiny_model(tiny_llama_config(vocab_size=len(tok)), tmp_path / "src")
    tok.save_pretrained(src)
    rows = [{"text": f"The number {i} plus {i} is {2 * i}."} for i in range(40)]
    jsonl, parquet = tmp_path / "calib.jsonl", tmp_path / "calib.parquet"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    outs = {}
    for calib in (jsonl, parquet):
        out = outs[calib.suffix] = tmp_path / f"moe{calib.suffix}"
        rc = _cli(
            "upcycle", "--model", src, "--out", out, "--method", "partition", "--split", "importance",
            "--router_init", "kmeans", "--num_experts", 4, "--top_k", 2, "--calibration", calib,
            "--seq_len", 32,
        )  # fmt: skip
        assert rc == 0, capsys.readouterr().err
        assert "(in-memory)" in capsys.readouterr().out
        spec = json.loads((out / "moe_app.json").read_text())
        assert spec["lineage"][0]["data"]["calibration"] == str(calib)
        assert spec["lineage"][0]["data"]["tokens"] > 0
    a, b = load_all(outs[".jsonl"]), load_all(outs[".parquet"])
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = tokens(vocab=len(tok))
    assert_close(
        logits(moe_app.load_model(outs[".jsonl"]), ids),
        logits(moe_app.load_model(outs[".parquet"]), ids),
        rtol=0,
        atol=0,
    )


def test_calibration_reader_is_the_prune_one(tmp_path):
    """Records the old upcycle-only reader did not know (alpaca, parquet) work; a missing file is a user error."""
    from moe_app.cli.commands.upcycle import calibration_batches
    from moe_app.core.data.tokenizer import suite_tokenizer
    from moe_app.errors import MoeAppError

    tok = suite_tokenizer(cache_dir=str(tmp_path / "tokcache"))
    f = tmp_path / "alpaca.jsonl"
    f.write_text(
        "\n".join(
            json.dumps({"instruction": f"Add {i} and 1", "input": "", "output": str(i + 1)}) for i in range(9)
        )
    )
    batches = calibration_batches(str(f), tok, seq_len=16, max_tokens=10_000)
    assert sum(int(b["attention_mask"].sum()) for b in batches) > 9
    assert all(b["input_ids"].shape[1] <= 16 for b in batches)
    few = calibration_batches("builtin:arithmetic", tok, seq_len=64, max_tokens=50)
    assert 50 <= sum(int(b["attention_mask"].sum()) for b in few) < 50 + 8 * 64
    with pytest.raises(MoeAppError):
        calibration_batches(str(tmp_path / "missing.parquet"), tok, seq_len=16, max_tokens=100)
