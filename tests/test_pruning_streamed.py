"""Layer-streamed pruning (``moe-app prune --streaming``) == in-memory pruning, one layer in memory at a time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import moe_app
from conftest import load_stock_quantized, tiny_llama_config
from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.checkpoint.prune_streaming import prune_checkpoint_streaming, streaming_problems
from moe_app.checkpoint.pruning import PruneJob, prune_checkpoint
from moe_app.cli.main import main
from moe_app.core.pruning import CalibrationConfig, ExpertPruneConfig, moe_layer_views
from moe_app.core.pruning.slim import SlimConfig
from moe_app.core.spec import SPEC_FILE
from moe_app.core.upcycling import UpcycleConfig
from moe_app.errors import MoeAppError
from upcycling_helpers import build, upcycled

CALIB = CalibrationConfig(data="builtin:arithmetic", num_samples=6, max_length=24, batch_size=3)


@pytest.fixture(scope="module")
def tok():
    from moe_app.core.data.tokenizer import suite_tokenizer

    return suite_tokenizer()


def _stock_config(kind: str, vocab: int, experts: int = 8, **over):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    base = dict(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=False, num_experts_per_tok=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    inter = over.pop("intermediate_size", 16)
    base.update(over)
    if kind == "mixtral":
        return MixtralConfig(**base, intermediate_size=inter, num_local_experts=experts)
    if kind == "qwen2_moe":
        return Qwen2MoeConfig(
            **base, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
            num_experts=experts,
        )  # fmt: skip
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(
            **base, intermediate_size=64, moe_intermediate_size=16, num_experts=experts, head_dim=8
        )
    return OlmoeConfig(**base, intermediate_size=16, num_experts=experts)


def _save_stock(kind: str, path: Path, tok, **over) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_stock_config(kind, len(tok), **over))
    with torch.no_grad():
        for _, view in moe_layer_views(model):
            view.router_weight.normal_(0.0, 0.5)  # routers that prefer some experts
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _ids(tok):
    return torch.tensor([tok("12+35=47 and 8*3=24").input_ids])


def _pair(src: Path, tmp_path: Path, job: PruneJob, **streamed) -> tuple[dict, dict, Path, Path]:
    mem, out = tmp_path / "in-memory", tmp_path / "streamed"
    a = prune_checkpoint(src, mem, job, streaming="off")
    b = prune_checkpoint_streaming(src, out, job, **streamed)
    return a, b, mem, out


@pytest.mark.parametrize("progressive", [False, True], ids=["layer-wise", "progressive"])
def test_streamed_mixtral_equals_in_memory_pruning(tmp_path, tok, progressive):
    """r = 6 of 8 by enumeration: same experts, same losses, same logits in stock transformers,
    with the carried hidden states on disk (activation budget 0)."""
    from transformers import AutoModelForCausalLM

    src = _save_stock("mixtral", tmp_path / "src", tok)
    job = PruneJob(experts=ExpertPruneConfig(keep=6, progressive=progressive), calibration=CALIB)
    a, b, mem, out = _pair(src, tmp_path, job, activation_budget=0)
    assert b["mode"] == "streaming" and b["kind"] == "hf"
    assert b["experts"] == a["experts"]  # kept sets, reconstruction losses, search details
    assert b["eval_loss_before"] == a["eval_loss_before"] and b["eval_loss_after"] == a["eval_loss_after"]
    assert not [p for p in tmp_path.iterdir() if "hidden" in p.name]  # the spill dir is gone
    streamed, ref = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (out, mem))
    assert streamed.config.num_local_experts == 6 and streamed.config.num_experts_per_tok == 2
    with torch.no_grad():
        assert_close(streamed(input_ids=_ids(tok)).logits, ref(input_ids=_ids(tok)).logits, rtol=0, atol=0)
    lineage = json.loads((out / "moe_app_lineage.json").read_text())["lineage"]
    assert lineage[-1]["stage"] == "prune" and lineage[-1]["config"]["streaming"] is True
    assert (out / "tokenizer.json").is_file() and not (out / SPEC_FILE).exists()


@pytest.mark.parametrize(
    ("kind", "method", "progressive"),
    [
        ("qwen2_moe", "reap", False),
        # progressive: layer 1's loss goes through the pruned shared expert, whose weights
        # transformers leaves in the mapped file unless the in-memory path copies them (alignment)
        ("qwen2_moe", "enumerate", True),
        ("qwen3_moe", "frequency", False),
        ("olmoe", "expert_drop", False),
    ],
)
def test_streamed_stock_families_equal_in_memory(tmp_path, tok, kind, method, progressive):
    """Same report to the bit (kept experts and reconstruction losses), tensors and logits."""
    from transformers import AutoModelForCausalLM

    src = _save_stock(kind, tmp_path / "src", tok, tie_word_embeddings=kind == "olmoe")
    keep = 6 if progressive else 4
    cfg = ExpertPruneConfig(keep=keep, method=method, progressive=progressive)
    job = PruneJob(experts=cfg, calibration=CALIB, eval_before_after=False)
    a, b, mem, out = _pair(src, tmp_path, job)
    _same_result(a, b, mem, out, tok, lambda d: AutoModelForCausalLM.from_pretrained(d).eval())
    assert AutoModelForCausalLM.from_pretrained(out).config.num_experts == keep


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tok) -> Path:
    dense = build(tiny_llama_config(vocab_size=len(tok)))
    moe = upcycled(dense, UpcycleConfig(method="noise", num_experts=6, top_k=2, noise_std=0.5))
    return save_moe_checkpoint(moe, tmp_path_factory.mktemp("moe") / "ckpt", tokenizer=tok)


@pytest.mark.parametrize("method", ["reap", "merge"])
def test_streamed_moe_app_checkpoint_with_skipping_equals_in_memory(moe_dir, tmp_path, tok, method):
    job = PruneJob(
        experts=ExpertPruneConfig(keep=4, method=method, progressive=True), skipping=True, calibration=CALIB
    )
    a, b, mem, out = _pair(moe_dir, tmp_path, job)
    assert list(b) == [*a, "mode"]  # the same report, in the same order
    for key in ("experts", "skipping", "eval_loss_before", "eval_loss_after"):
        assert b[key] == a[key], key
    streamed, ref = moe_app.load_model(out), moe_app.load_model(mem)
    with torch.no_grad():
        assert_close(streamed(input_ids=_ids(tok)).logits, ref(input_ids=_ids(tok)).logits, rtol=0, atol=0)
    spec_a, spec_b = (json.loads((d / SPEC_FILE).read_text()) for d in (mem, out))
    assert spec_b["layers"] == spec_a["layers"] and spec_b["skipping"] == spec_a["skipping"]
    assert spec_b["pruning"] == spec_a["pruning"]
    assert spec_b["lineage"][-1]["stage"] == "prune"


def _same_result(a: dict, b: dict, mem: Path, out: Path, tok, load) -> None:
    """The streamed run's report, output tensors and logits are the in-memory run's, exactly."""
    from safetensors.torch import load_file

    assert list(b) == [*a, "mode"]  # the same report, in the same order
    for key in a:
        if key != "out":
            assert b[key] == a[key], key
    streamed, ref = load(out), load(mem)
    with torch.no_grad():
        assert_close(streamed(input_ids=_ids(tok)).logits, ref(input_ids=_ids(tok)).logits, rtol=0, atol=0)
    ta = {k: v for f in sorted(mem.glob("*.safetensors")) for k, v in load_file(f).items()}
    tb = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(tb) == sorted(ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_streamed_expert_pruning_drops_slimming_and_skipping_equal_in_memory(tmp_path, tok):
    """--keep, --block_drop, --layer_drop, --slim and --skipping in one job on a 4-layer moe-app
    checkpoint, hidden states on disk: the experts go to a temporary checkpoint first, each drop is
    scored in a pass of its own, the last pass slims and calibrates; same scores, same dropped block
    and MLP, same zeros, same tensors, spec and logits."""
    dense = build(tiny_llama_config(vocab_size=len(tok), num_hidden_layers=4))
    moe = upcycled(dense, UpcycleConfig(method="noise", num_experts=6, top_k=2, noise_std=0.5))
    src = save_moe_checkpoint(moe, tmp_path / "src", tokenizer=tok)
    job = PruneJob(
        experts=ExpertPruneConfig(keep=4, method="frequency"),
        block_drop=1,
        layer_drop=1,
        slim=SlimConfig(method="wanda", sparsity=0.5),
        skipping=True,
        calibration=CALIB,
    )
    a, b, mem, out = _pair(src, tmp_path, job, activation_budget=0)
    assert len(b["block_drop"]["scores"]) == 4 and len(b["layer_drop"]["scores"]) == 3
    assert len(b["slim"]["layers"]) == 2 and b["slim"]["expert_sparsity"] == pytest.approx(0.5, abs=0.01)
    _same_result(a, b, mem, out, tok, moe_app.load_model)
    spec_a, spec_b = (json.loads((d / SPEC_FILE).read_text()) for d in (mem, out))
    for key in ("layers", "skipping", "pruning"):
        assert spec_b[key] == spec_a[key], key
    assert [s["stage"] for s in spec_b["lineage"]] == [s["stage"] for s in spec_a["lineage"]]
    assert sum(lay.get("mlp_dropped", False) for lay in spec_b["layers"]) == 1
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in-memory", "src", "streamed"]  # scratch gone


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_streamed_block_and_layer_drop_of_stock_checkpoints_equal_in_memory(tmp_path, tok, kind):
    """Stock layouts: kept layers renamed under their new index (Qwen2-MoE's sparse-layer pattern
    renumbered), the dropped MoE sublayer zeroed through its norm; reloads in stock transformers."""
    from transformers import AutoModelForCausalLM

    src = _save_stock(kind, tmp_path / "src", tok, num_hidden_layers=4)
    job = PruneJob(block_drop=1, layer_drop=1, calibration=CALIB)
    a, b, mem, out = _pair(src, tmp_path, job)
    assert b["kind"] == "hf" and len(b["layer_drop"]["scores"]) == 3
    _same_result(a, b, mem, out, tok, lambda d: AutoModelForCausalLM.from_pretrained(d).eval())
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (mem, out))
    assert cfg_b["num_hidden_layers"] == cfg_a["num_hidden_layers"] == 3
    if kind == "qwen2_moe":
        assert (cfg_b["mlp_only_layers"], cfg_b["decoder_sparse_step"]) == (cfg_a["mlp_only_layers"], 1)
    lineage = json.loads((out / "moe_app_lineage.json").read_text())["lineage"]
    assert [s["stage"] for s in lineage] == ["prune"]


@pytest.mark.parametrize(
    ("method", "experts"),
    [("2:4", ExpertPruneConfig(keep=4, method="reap", progressive=True)), ("sparsegpt", None)],
    ids=["progressive-reap+2:4", "sparsegpt-only"],
)
def test_streamed_slimming_in_one_pass_equals_in_memory(moe_dir, tmp_path, tok, method, experts):
    """Without drops, one pass prunes, slims and calibrates each layer: progressive pruning reads
    the states through the pruned layers *before* slimming (as in memory, where every layer is
    pruned before any is slimmed), slimming through the slimmed ones."""
    cfg = SlimConfig(method=method, sparsity=0.5 if method == "sparsegpt" else None)
    job = PruneJob(experts=experts, slim=cfg, skipping=True, calibration=CALIB)
    a, b, mem, out = _pair(moe_dir, tmp_path, job, activation_budget=0)
    assert b["slim"]["expert_sparsity"] == pytest.approx(0.5, abs=0.01)
    _same_result(a, b, mem, out, tok, moe_app.load_model)
    spec_a, spec_b = (json.loads((d / SPEC_FILE).read_text()) for d in (mem, out))
    assert spec_b["skipping"] == spec_a["skipping"] and spec_b["pruning"] == spec_a["pruning"]


def test_streamed_slimming_of_a_stock_mixtral_equals_in_memory(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    src = _save_stock("mixtral", tmp_path / "src", tok)
    job = PruneJob(slim=SlimConfig(method="wanda", sparsity=0.25), calibration=CALIB)
    a, b, mem, out = _pair(src, tmp_path, job)
    assert b["slim"]["expert_sparsity"] == pytest.approx(0.25, abs=0.01)
    _same_result(a, b, mem, out, tok, lambda d: AutoModelForCausalLM.from_pretrained(d).eval())


def test_streamed_global_expert_drop_equals_in_memory(tmp_path, tok):
    """He et al.'s global expert drop keeps different counts per layer: the scores of every layer
    come from a pass of their own over the original model, then one pass prunes each layer to its
    count; with progressive pruning and skipping on top."""
    dense = build(tiny_llama_config(vocab_size=len(tok), num_hidden_layers=4))
    torch.manual_seed(1)
    moe = upcycled(dense, UpcycleConfig(method="noise", num_experts=6, top_k=2, noise_std=0.5))
    with torch.no_grad():
        for _, view in moe_layer_views(moe):
            view.router_weight.normal_(0.0, 2.0)  # uneven routers: the global ranking is uneven too
    src = save_moe_checkpoint(moe, tmp_path / "src", tokenizer=tok)
    cfg = ExpertPruneConfig(keep=3, method="expert_drop", scope="global", progressive=True)
    job = PruneJob(experts=cfg, skipping=True, calibration=CALIB)
    a, b, mem, out = _pair(src, tmp_path, job)
    kept = [len(k) for k in b["experts"]["kept"].values()]
    assert sum(kept) == 4 * 3 and len(set(kept)) > 1  # 12 experts in all, unevenly spread
    _same_result(a, b, mem, out, tok, moe_app.load_model)


@pytest.mark.parametrize(
    ("scheme", "extra", "over"),
    [
        ("nf4", {"block_drop": 1, "slim": SlimConfig(method="wanda", sparsity=0.5)}, {}),
        ("int8", {}, {"mlp_only_layers": [1]}),  # a dense layer: nothing to quantise there
        # odd-sized int8 state between float tensors: the shards must keep the floats aligned, or
        # stock transformers' reload gives other logits from the same tensors
        ("int8", {"layer_drop": 1}, {}),
    ],
    ids=["nf4-drop-slim", "int8-dense-layer", "int8-layer-drop"],
)
def test_streamed_quantisation_equals_in_memory(tmp_path, tok, scheme, extra, over):
    """--quantize streams: each layer's shared-expert linears are quantised as it is written (the
    steps of transformers' loader), so the shards hold the in-memory run's tensors, the config the same
    ``quantization_config``, and the quantised loss (a stream through the quantised layers) is the
    in-memory quantised model's; the output loads in stock transformers as bitsandbytes modules."""
    from transformers import AutoModelForCausalLM

    src = _save_stock("qwen2_moe", tmp_path / "src", tok, num_hidden_layers=3, **over)
    job = PruneJob(experts=ExpertPruneConfig(keep=6), quantize=scheme, calibration=CALIB, **extra)
    a, b, mem, out = _pair(src, tmp_path, job, activation_budget=0)
    assert b["eval_loss_quantized"] != b["eval_loss_after"]  # something was quantised
    _same_result(a, b, mem, out, tok, load_stock_quantized)
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (mem, out))
    assert cfg_b == cfg_a and cfg_b["quantization_config"]["quant_method"] == "bitsandbytes"
    stages = [
        json.loads((d / "moe_app_lineage.json").read_text())["lineage"][-1]["config"] for d in (mem, out)
    ]
    assert stages[1].pop("streaming") is True and stages[1] == stages[0]
    want = "Linear4bit" if scheme == "nf4" else "Linear8bitLt"
    layers = AutoModelForCausalLM.from_pretrained(out).model.layers
    kinds = [{type(m).__name__ for m in layer.mlp.modules()} for layer in layers]
    assert [want in k for k in kinds] == [True, not over, True][: len(layers)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in-memory", "src", "streamed"]  # scratch gone


def test_streamed_tensors_are_read_aligned_so_reports_match_to_the_bit(tmp_path, tok):
    """A source whose routers already skip (betas from an earlier prune): with safetensors'
    8-byte-aligned buffers the last layer's reconstruction loss came out ~1e-8 off the in-memory
    one (BLAS picks its code path by alignment); the streamed path reads into 64-byte-aligned
    tensors, and the reports are equal to the bit."""
    from moe_app.checkpoint.safetensors_io import read_header, read_tensor

    dense = build(tiny_llama_config(vocab_size=len(tok), num_hidden_layers=5))
    moe = upcycled(dense, UpcycleConfig(method="noise", num_experts=6, top_k=2, noise_std=0.5))
    with torch.no_grad():
        torch.manual_seed(3)
        for _, view in moe_layer_views(moe):
            view.router_weight.normal_(0.0, 2.0)
    first = save_moe_checkpoint(moe, tmp_path / "first", tokenizer=tok)
    src = tmp_path / "src"
    prune_checkpoint(first, src, PruneJob(skipping=True, calibration=CALIB), streaming="off")
    stored = next(iter(read_header(next(src.glob("*.safetensors")))[0].values()))
    assert read_tensor(stored).data_ptr() % 64 == 0
    job = PruneJob(experts=ExpertPruneConfig(keep=4, method="frequency"), calibration=CALIB)
    a, b, mem, out = _pair(src, tmp_path, job)
    _same_result(a, b, mem, out, tok, moe_app.load_model)


def test_streaming_refusals_name_the_option_and_write_nothing(moe_dir, tmp_path, tok):
    out = tmp_path / "out"
    job = PruneJob(experts=ExpertPruneConfig(keep=4), quantize="nf4", calibration=CALIB)
    assert streaming_problems(job) == []
    with pytest.raises(MoeAppError, match="moe-app checkpoint's experts are fused"):
        prune_checkpoint(moe_dir, out, job, streaming="on")  # the in-memory path's refusal, before any pass
    job = PruneJob(experts=ExpertPruneConfig(keep=4, method="expert_drop", scope="global"), calibration=CALIB)
    assert streaming_problems(job) == []
    stock = _save_stock("mixtral", tmp_path / "stock", tok)
    with pytest.raises(MoeAppError, match="stock transformers configs cannot hold"):
        prune_checkpoint(stock, out, job, streaming="on")  # refused before any pass
    shutil.rmtree(stock)
    with pytest.raises(MoeAppError, match="nothing to prune"):  # the in-memory path's own checks hold
        prune_checkpoint(
            moe_dir, out, PruneJob(experts=ExpertPruneConfig(keep=6), calibration=CALIB), streaming="on"
        )
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_auto_streams_above_the_memory_budget_and_cli_flag(moe_dir, tmp_path, capsys):
    job = PruneJob(
        experts=ExpertPruneConfig(keep=4, method="frequency"), calibration=CALIB, eval_before_after=False
    )
    small = prune_checkpoint(moe_dir, tmp_path / "a", job, memory_budget="1KB")
    assert small["mode"] == "streaming"
    assert "mode" not in prune_checkpoint(moe_dir, tmp_path / "b", job)  # far below half the free memory
    args = [
        "prune",
        "--ckpt",
        str(moe_dir),
        "--out",
        str(tmp_path / "c"),
        "--keep",
        "4",
        "--method",
        "frequency",
    ]
    args += [
        "--data",
        "builtin:arithmetic",
        "--calib_samples",
        "8",
        "--max_length",
        "32",
        "--streaming",
        "on",
    ]
    assert main(args) == 0
    assert "moe-app checkpoint, streaming" in capsys.readouterr().out
    assert main([*args[:-1], "on", "--out", str(tmp_path / "d"), "--quantize", "nf4"]) == 2
    assert "moe-app checkpoint's experts are fused" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import transformers.models.mixtral.modeling_mixtral  # noqa: F401
    from moe_app.checkpoint.hub import load_tokenizer
    from moe_app.checkpoint.prune_streaming import prune_checkpoint_streaming
    from moe_app.checkpoint.pruning import PruneJob
    from moe_app.core.pruning import CalibrationConfig, ExpertPruneConfig, calibration_batches

    calib = CalibrationConfig(data="builtin:arithmetic", num_samples=4, max_length=32, batch_size=4)
    job = PruneJob(experts=ExpertPruneConfig(keep=6, method="frequency"), calibration=calib, eval_before_after=False)
    calibration_batches(load_tokenizer(sys.argv[1]), calib)  # imports, data and tokenizer are not the pruning's
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prune_checkpoint_streaming(sys.argv[1], sys.argv[2], job, max_shard_size="8MB")
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """
)


def test_peak_memory_of_the_streamed_path_stays_far_below_the_checkpoint(tmp_path, tok):
    """A 16-layer random bf16 Mixtral (~110 MB, ~7 MB per layer): pruning it grows the process's
    peak RSS by a fraction of the checkpoint (about two layers plus bookkeeping), not by its size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = _stock_config("mixtral", len(tok), hidden_size=256, num_hidden_layers=16, intermediate_size=512)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device="cpu")  # random values written directly: faster than the init functions
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if name.endswith("mlp.gate.weight") else 0.05, generator=gen)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    del model
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    run = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    grown = int(run.stdout.strip().splitlines()[-1])
    assert size > 100e6
    assert grown < size / 2, f"peak RSS grew by {grown / 1e6:.1f} MB for a {size / 1e6:.1f} MB checkpoint"
    assert AutoConfig.from_pretrained(tmp_path / "out").num_local_experts == 6
