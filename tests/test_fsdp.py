"""moe-app's FSDP (FSDP2 on decoder layers) in real 2-process CPU fits, checked against DDP.

FSDP and DDP both average the gradients of the two ranks' batches, so from the same seed and data
they must reach the same weights (up to float summation order). On top of that each rank must
really hold only its shard during training, the saved model directory must be the full model
(gathered, not rank 0's shard), and a resume from a mid-run FSDP checkpoint must be bitwise.
Loading is sharded too: only rank 0 loads (and upcycles, layer by layer), rank 1's model is on the
meta device until the strategy fills its shards, and the fit equals the old every-rank-loads path.
Post-training reads a pruned MoE checkpoint on rank 0 one layer at a time; PESC and LoRA load the
base on rank 0 only (tests/test_fsdp_rebuild.py checks every rebuilt structure in one process).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distributed_helpers import check_ranks, fit_two_processes, load_safetensors, probes, test_two_processes

FSDP = "fsdp"  # the bare name resolves to moe_app.lightning.strategies.fsdp.DecoderLayerFSDPStrategy
PROBED = ("--model.class_path", "tests.fsdp_probe.ProbedMoeLMModule")  # MoeLMModule + what each rank built
EAGER = ("--model.class_path", "tests.fsdp_probe.EagerMoeLMModule")  # every rank builds the whole model


@pytest.fixture(scope="module")
def fsdp_upcycle_run(suite_dense_dir: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp-upcycle")
    fit_two_processes("upcycle", FSDP, root, suite_dense_dir, *PROBED)
    return root


def _built(root: Path) -> list[dict]:
    return [json.loads((root / f"built_rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_fsdp_loads_on_rank0_only_and_trains_like_every_rank_loading(
    fsdp_upcycle_run: Path, suite_dense_dir: Path, tmp_path: Path
):
    eager_root = tmp_path / "eager"
    fit_two_processes("upcycle", FSDP, eager_root, suite_dense_dir, *EAGER)
    new, eager = _built(fsdp_upcycle_run), _built(eager_root)
    # before: every rank loaded the dense model and held the whole upcycled model before sharding
    assert [b["base_loads"] for b in eager] == [1, 1]
    full_bytes = eager[0]["real_param_bytes"]
    assert full_bytes > 0 and eager[1]["real_param_bytes"] == full_bytes
    # now: no rank loads the dense model whole (rank 0 reads and upcycles it one layer at a time
    # while the shards fill); the model the strategy receives has no parameter storage on any
    # rank, and the same shapes on both
    assert [b["base_loads"] for b in new] == [0, 0]
    assert [b["real_param_bytes"] for b in new] == [0, 0]
    assert [b["meta_param_bytes"] for b in new] == [full_bytes, full_bytes]
    # and it trains exactly as before: the same losses on each rank, the same saved weights
    for a, b in zip(new, eager, strict=True):
        assert len(a["losses"]) == 4
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-6)
    saved, before = load_safetensors(fsdp_upcycle_run / "model"), load_safetensors(eager_root / "model")
    assert saved.keys() == before.keys()
    for name in saved:
        torch.testing.assert_close(saved[name], before[name], rtol=1e-6, atol=1e-7, msg=name)


def _assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.slow
def test_fsdp_upcycle_shards_and_matches_ddp(fsdp_upcycle_run: Path, ddp_upcycle_run: Path, suite_dense_dir):
    saved = load_safetensors(fsdp_upcycle_run / "model")
    check_ranks(fsdp_upcycle_run, saved)
    fsdp_probes, ddp_probes = probes(fsdp_upcycle_run), probes(ddp_upcycle_run)
    # each rank stored about half of the parameters while training (DDP stores all of them)
    for p in fsdp_probes:
        assert p["local_fraction"] == pytest.approx(0.5, abs=0.02)
    # the same data shards as DDP, step by step
    assert [p["batches"] for p in fsdp_probes] == [p["batches"] for p in ddp_probes]
    reference = load_safetensors(ddp_upcycle_run / "model")
    _assert_same_model(saved, reference)
    # ...and training moved the weights far more than the FSDP/DDP difference
    from moe_app import load_model

    model = load_model(fsdp_upcycle_run / "model")  # the real loader reads the gathered directory
    start = load_safetensors(suite_dense_dir)
    moved = saved["model.layers.0.mlp.experts.down_proj"][0] - start["model.layers.0.mlp.down_proj.weight"]
    assert moved.abs().max() > 1e-3
    torch.testing.assert_close(
        dict(model.named_parameters())["model.layers.0.mlp.experts.down_proj"].detach(),
        saved["model.layers.0.mlp.experts.down_proj"],
    )


@pytest.mark.slow
def test_fsdp_pruning_callback_prunes_the_gathered_model_like_ddp(
    fsdp_upcycle_run: Path, ddp_upcycle_run: Path
):
    fsdp_dir, ddp_dir = fsdp_upcycle_run / "model_pruned_r2", ddp_upcycle_run / "model_pruned_r2"
    pruned = load_safetensors(fsdp_dir)
    assert pruned["model.layers.0.mlp.experts.down_proj"].shape[0] == 2  # 4 experts -> 2
    _assert_same_model(pruned, load_safetensors(ddp_dir))
    import json

    fsdp_spec, ddp_spec = (json.loads((d / "moe_app.json").read_text()) for d in (fsdp_dir, ddp_dir))
    kept = fsdp_spec["pruning"]["experts"][0]["kept"]
    assert kept == ddp_spec["pruning"]["experts"][0]["kept"]  # the same experts were kept in every layer
    assert sorted(kept) == ["0", "1"] and all(len(v) == 2 for v in kept.values())


@pytest.mark.slow
def test_fsdp_test_command_generates_in_lockstep_and_reports_like_ddp(
    fsdp_upcycle_run: Path, ddp_upcycle_run: Path, suite_dense_dir: Path, tmp_path: Path
):
    # With sharded weights every decoding step is a collective. Greedy answers end at different
    # steps on the two ranks (synced generation keeps the finished rank stepping), and with one
    # test row per batch, three plain-text rows then conversations, rank 0 holds a text row (no
    # prompt) while rank 1 holds a conversation at the second step: rank 0 must generate too.
    ckpt = "checkpoints/epoch=0-step=4.ckpt"
    data = (
        "--data.init_args.sources",
        '[{"name": "pretrain", "builtin": "pretrain"}, {"name": "arithmetic", "builtin": "arithmetic"}]',
        "--data.init_args.max_eval_examples_per_source",
        "3",
        "--data.init_args.eval_batch_size",
        "1",
    )
    fsdp = test_two_processes(
        "upcycle", FSDP, tmp_path / "fsdp", suite_dense_dir, fsdp_upcycle_run / ckpt, *data
    )
    ddp = test_two_processes(
        "upcycle", "ddp", tmp_path / "ddp", suite_dense_dir, ddp_upcycle_run / ckpt, *data
    )
    rows = {r["domain"]: r for r in fsdp["rows"]}
    assert rows.keys() == {r["domain"] for r in ddp["rows"]} == {"pretrain", "arithmetic", "ALL"}
    for ref in ddp["rows"]:
        row = rows[ref["domain"]]
        assert row["n"] == ref["n"] and row["accuracy"] == ref["accuracy"], ref["domain"]
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-4), ref["domain"]


@pytest.mark.slow
def test_fsdp_second_pruning_callback_gets_the_trained_model(fsdp_upcycle_run: Path, ddp_upcycle_run: Path):
    skip_dir = fsdp_upcycle_run / "model_skip"
    skipped = load_safetensors(skip_dir)
    assert skipped["model.layers.0.mlp.experts.down_proj"].shape[0] == 4  # not the pruned copy
    _assert_same_model(skipped, load_safetensors(ddp_upcycle_run / "model_skip"))


@pytest.mark.slow
def test_fsdp_resume_from_a_mid_run_checkpoint_is_bitwise(
    fsdp_upcycle_run: Path, suite_dense_dir: Path, tmp_path: Path
):
    ckpt = fsdp_upcycle_run / "checkpoints" / "epoch=0-step=2.ckpt"
    fit_two_processes("upcycle", FSDP, tmp_path / "resumed", suite_dense_dir, "--ckpt_path", str(ckpt))
    full = load_safetensors(fsdp_upcycle_run / "model")
    resumed = load_safetensors(tmp_path / "resumed" / "model")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


@pytest.fixture(scope="module")
def fsdp_pesc_run(suite_dense_dir: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp-pesc")
    fit_two_processes(
        "pesc", FSDP, root, suite_dense_dir, "--model.class_path", "tests.fsdp_probe.ProbedPescModule"
    )
    return root


def _loaded_on_rank0_only(root: Path) -> None:
    """Rank 0 loaded the base whole (once) and rank 1 not at all; the model each handed the
    strategy held no parameter storage (rank 0's weights wait in its weight source)."""
    built = _built(root)
    assert [b["base_loads"] for b in built] == [1, 0]
    assert [b["real_param_bytes"] for b in built] == [0, 0]
    assert built[0]["meta_param_bytes"] == built[1]["meta_param_bytes"] > 0


@pytest.mark.slow
def test_fsdp_pesc_frozen_base_and_trainable_experts_match_ddp(fsdp_pesc_run: Path, ddp_pesc_run: Path):
    _loaded_on_rank0_only(fsdp_pesc_run)
    saved = load_safetensors(fsdp_pesc_run / "model")
    check_ranks(fsdp_pesc_run, saved)
    assert all(p["local_fraction"] == pytest.approx(0.5, abs=0.02) for p in probes(fsdp_pesc_run))
    _assert_same_model(saved, load_safetensors(ddp_pesc_run / "model"))
    # the adapter directory loads onto the frozen base through the real loader
    from moe_app.checkpoint.pesc import load_pesc_model

    model = load_pesc_model(fsdp_pesc_run / "model")
    params = dict(model.named_parameters())
    for name, value in saved.items():
        torch.testing.assert_close(params[name].detach(), value, msg=name)


@pytest.mark.slow
def test_fsdp_pesc_resume_from_the_adapter_only_checkpoint_is_bitwise(
    fsdp_pesc_run: Path, suite_dense_dir: Path, tmp_path: Path
):
    # The .ckpt holds only the trainable tensors; the strategy loads them itself and the module
    # still checks their names (a resume with another PescConfig is refused).
    ckpt = fsdp_pesc_run / "checkpoints" / "epoch=0-step=2.ckpt"
    fit_two_processes("pesc", FSDP, tmp_path / "resumed", suite_dense_dir, "--ckpt_path", str(ckpt))
    full, resumed = (
        load_safetensors(fsdp_pesc_run / "model"),
        load_safetensors(tmp_path / "resumed" / "model"),
    )
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_pesc_checks_the_tensor_names_the_fsdp_loader_passes_on(suite_dense_dir: Path):
    # Under FSDP the strategy loads the tensors itself and hands the module only their names
    # (state_dict_keys): a checkpoint from another PescConfig is still refused.
    from moe_app.core.pesc.config import PescConfig, is_pesc_trainable
    from moe_app.errors import CheckpointError
    from moe_app.lightning.modules.lm import ModelSource
    from moe_app.lightning.modules.pesc import PescModule

    module = PescModule(
        source=ModelSource(pretrained=str(suite_dense_dir)), pesc=PescConfig(num_experts=2, adapter_dim=4)
    )
    module.configure_model()
    names = [n for n, _ in module.named_parameters() if is_pesc_trainable(n)]
    module.on_load_checkpoint({"state_dict_keys": names})
    with pytest.raises(CheckpointError, match=r"lacks 1 trainable PESC tensors"):
        module.on_load_checkpoint({"state_dict_keys": names[1:]})
    module.on_load_checkpoint({})  # a sharded checkpoint directory: its own loader checked it


@pytest.mark.slow
def test_fsdp_lora_saves_the_merged_full_model_like_ddp(suite_dense_dir: Path, tmp_path: Path):
    fsdp, ddp = tmp_path / "fsdp-lora", tmp_path / "ddp-lora"
    fit_two_processes(
        "lora", FSDP, fsdp, suite_dense_dir, "--model.class_path", "tests.fsdp_probe.ProbedLoraModule"
    )
    fit_two_processes("lora", "ddp", ddp, suite_dense_dir)
    _loaded_on_rank0_only(fsdp)
    p0, p1 = probes(fsdp)
    assert p0["params"] == p1["params"] and all("lora_" in n for n in p0["params"])
    assert p0["local_fraction"] == pytest.approx(0.5, abs=0.02)
    merged = load_safetensors(fsdp / "model")
    assert not any("lora" in k for k in merged)  # an ordinary dense checkpoint
    _assert_same_model(merged, load_safetensors(ddp / "model"))
    start = load_safetensors(suite_dense_dir)
    assert merged.keys() == start.keys()
    moved = max((merged[k] - start[k]).abs().max().item() for k in merged)
    assert moved > 1e-4  # the adapters were trained and merged in


@pytest.mark.slow
def test_fsdp_gathers_a_tied_embedding_model_into_the_same_checkpoint_as_ddp(tmp_path: Path):
    # The tiny dense recipe ties lm_head to the embeddings: the gathered replica must come back
    # tied, and one-process FSDP must train what one-process DDP trains (both draw through
    # Lightning's DistributedSampler, so the data order is the same).
    import subprocess
    import sys

    from distributed_helpers import ROOT

    def fit(strategy: str) -> Path:
        root = tmp_path / strategy
        cmd = [sys.executable, "-m", "moe_app", "fit", "-c", "configs/tiny/dense.yaml"]
        cmd += [
            "--trainer.strategy",
            strategy,
            "--trainer.max_steps",
            "3",
            "--trainer.limit_val_batches",
            "0",
        ]
        cmd += ["--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
        cmd += ["--data.init_args.batch_size", "4", "--data.init_args.max_length", "48"]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return root / "model"

    sharded, plain = fit(FSDP), fit("ddp")
    _assert_same_model(load_safetensors(sharded), load_safetensors(plain))
    from moe_app import load_model

    model = load_model(sharded)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reference = load_model(plain)
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)


POST_PROBED = ("--model.class_path", "tests.fsdp_probe.ProbedPostTrainModule")


@pytest.fixture(scope="module")
def pruned_moe_dir(suite_dense_dir: Path, tmp_path_factory) -> Path:
    """What post-training starts from after pruning: the suite model upcycled to 4 experts top-2
    with attention MoE, then 3 and 2 experts kept in layers 0 and 1 and a skipping threshold in
    layer 1 (saved with the suite tokenizer, as a stage's output is)."""
    from moe_app import load_model
    from moe_app.checkpoint.model_dir import save_moe_checkpoint
    from moe_app.core.data.tokenizer import suite_tokenizer
    from moe_app.core.pruning.experts import keep_experts
    from moe_app.core.pruning.skipping import apply_skipping
    from moe_app.core.upcycling import upcycle
    from moe_app.core.upcycling.config import UpcycleConfig

    cfg = UpcycleConfig(method="copy", num_experts=4, top_k=2, attention_moe=True)
    model = upcycle(load_model(suite_dense_dir), cfg)
    keep_experts(model, {0: [0, 1, 3], 1: [1, 2]})
    apply_skipping(model, {1: 0.3})
    out = tmp_path_factory.mktemp("pruned") / "model"
    return save_moe_checkpoint(model, out, tokenizer=suite_tokenizer())


@pytest.mark.slow
def test_fsdp_post_training_reads_a_pruned_checkpoint_on_rank0_only_and_matches_ddp(
    pruned_moe_dir: Path, suite_dense_dir: Path, tmp_path: Path
):
    init = ("--model.init_args.init_from", str(pruned_moe_dir))
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    fit_two_processes("post", FSDP, fsdp, suite_dense_dir, *POST_PROBED, *init)
    fit_two_processes("post", "ddp", ddp, suite_dense_dir, *POST_PROBED, *init)
    new, every_rank = _built(fsdp), _built(ddp)
    # DDP: every rank loaded the whole checkpoint. FSDP: no rank did (rank 0 read it one decoder
    # layer at a time while the shards filled; rank 1 rebuilt the structure on meta)
    assert [b["base_loads"] for b in every_rank] == [1, 1]
    full_bytes = every_rank[0]["real_param_bytes"]
    assert [b["base_loads"] for b in new] == [0, 0]
    assert [b["real_param_bytes"] for b in new] == [0, 0]
    assert [b["meta_param_bytes"] for b in new] == [full_bytes, full_bytes]
    saved = load_safetensors(fsdp / "model")
    check_ranks(fsdp, saved)
    fsdp_probes = probes(fsdp)
    # each rank stores its own part (FSDP2 splits dim 0: layer 0's 3 experts go 2 + 1)
    fractions = [p["local_fraction"] for p in fsdp_probes]
    assert sum(fractions) == pytest.approx(1.0) and max(fractions) < 0.6
    assert [p["batches"] for p in fsdp_probes] == [p["batches"] for p in probes(ddp)]
    for a, b in zip(new, every_rank, strict=True):
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    _assert_same_model(saved, load_safetensors(ddp / "model"))
    start = load_safetensors(pruned_moe_dir)
    assert saved.keys() == start.keys()
    assert max((saved[k] - start[k]).abs().max().item() for k in saved) > 1e-3  # it trained
    spec = json.loads((fsdp / "model" / "moe_app.json").read_text())  # the pruned structure kept
    assert [lay["mlp"]["num_experts"] for lay in spec["layers"]] == [3, 2]
    assert all(lay["attention"] is not None for lay in spec["layers"])
    assert spec["skipping"] == {"1": 0.3}


def test_other_ranks_rebuild_rank0s_upcycled_model_on_meta_from_its_config_and_spec():
    # What rank 1 gets under sharded loading: the structure rank 0 broadcasts as JSON, rebuilt with
    # no parameter storage; names, shapes, dtypes, trainability and module types must all match.
    from conftest import tiny_llama_config
    from moe_app.core.upcycling import upcycle
    from moe_app.core.upcycling.config import UpcycleConfig
    from moe_app.core.utils.weights import meta_copy
    from moe_app.errors import MoeAppError
    from moe_app.lightning.strategies.fsdp import _structure, rebuild_on_meta
    from upcycling_helpers import build

    cfg = UpcycleConfig(method="copy", num_experts=4, top_k=2, attention_moe=True, layers=[1], jitter=0.1)
    model = upcycle(build(tiny_llama_config()), cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(".experts." in name)
    structure = json.loads(json.dumps(_structure(meta_copy(model))))
    rebuilt = rebuild_on_meta(structure)
    mine, theirs = dict(rebuilt.named_parameters()), dict(model.named_parameters())
    assert list(mine) == list(theirs)
    for name, p in mine.items():
        q = theirs[name]
        assert p.is_meta and (p.shape, p.dtype, p.requires_grad) == (q.shape, q.dtype, q.requires_grad), name
    assert {n: type(m) for n, m in rebuilt.named_modules()} == {n: type(m) for n, m in model.named_modules()}
    assert rebuilt.model.layers[1].mlp.router.jitter == pytest.approx(0.1)
    # a model the config and spec do not describe is refused with a clear error, not mis-sharded
    structure["params"][0][1] = [1, 1]
    with pytest.raises(MoeAppError, match="cannot be rebuilt from its config and MoE spec"):
        rebuild_on_meta(structure)
