"""Lineage (order, UTC times, one store per dir), init_from checks of PESC dirs, truncated weights."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import lightning as L
import pytest
import torch

import moe_app
from conftest import cpu_trainer, tiny_llama_config
from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.checkpoint.names import LINEAGE_FILE, PESC_ADAPTER_FILE, SPEC_FILE
from moe_app.checkpoint.pretrained import read_lineage
from moe_app.core.data.sources import SourceConfig
from moe_app.core.spec import merge_lineage
from moe_app.core.upcycling.config import UpcycleConfig
from moe_app.errors import CheckpointError
from moe_app.lightning.data.instruction import InstructionDataModule
from moe_app.lightning.modules.lm import CausalLMModule, ModelSource
from moe_app.lightning.modules.moe import MoeLMModule
from moe_app.lightning.modules.post import check_init_from


def _data() -> InstructionDataModule:
    src = [SourceConfig(name="arithmetic", builtin="arithmetic", builtin_train_size=32, builtin_eval_size=8)]
    return InstructionDataModule(sources=src, max_length=48, batch_size=8)


def _utc(entry: dict) -> datetime:
    t = datetime.fromisoformat(entry["time"])
    assert t.tzinfo is not None and t.utcoffset() == timedelta(0), entry["time"]
    return t


# ---------------------------------------------------------------------------- order and time format


def test_dense_then_upcycle_lineage_is_in_stage_order_with_utc_times(suite_dense_dir: Path, tmp_path: Path):
    """Dense training, then an upcycle stage: the dense entry comes first, every time is UTC + zone."""
    L.seed_everything(0)
    dense = CausalLMModule(source=ModelSource(pretrained=str(suite_dense_dir)))
    cpu_trainer(tmp_path / "dense", 1).fit(dense, datamodule=_data())
    dense_dir = tmp_path / "dense" / "model"
    # A plain HF dir: its lineage lives in LINEAGE_FILE only (no moe_app.json, which marks MoE dirs).
    assert (dense_dir / LINEAGE_FILE).is_file() and not (dense_dir / SPEC_FILE).exists()
    dense_lineage = read_lineage(dense_dir)
    assert [e["stage"] for e in dense_lineage] == ["CausalLMModule"]

    up = MoeLMModule(
        source=ModelSource(pretrained=str(dense_dir)),
        upcycle=UpcycleConfig(method="copy", num_experts=2, top_k=1),
    )
    cpu_trainer(tmp_path / "up", 1).fit(up, datamodule=_data())
    up_dir = tmp_path / "up" / "model"
    lineage = json.loads((up_dir / SPEC_FILE).read_text())["lineage"]
    assert [e["stage"] for e in lineage] == ["CausalLMModule", "upcycle", "upcycle:copy"]
    _utc(dense_lineage[0])
    times = [_utc(e) for e in lineage]
    assert times == sorted(times)
    assert not (up_dir / LINEAGE_FILE).exists()  # moe_app.json is the MoE dir's only lineage store
    assert read_lineage(up_dir) == lineage


def test_merge_lineage_orders_by_time_dedupes_and_normalises_legacy_times():
    base = {"stage": "dense", "time": "2024-05-01T03:11:07+00:00", "config": {}}
    legacy = {"stage": "older", "time": "2024-05-01T01:00:00"}  # zone-less: read as local time
    surgery = {"stage": "upcycle", "time": "2024-05-01T03:11:31.250+00:00", "config": {"k": 1}}
    own = {"stage": "upcycle:copy", "time": "2024-05-01T05:11:40.000+02:00"}
    merged = merge_lineage([surgery], [legacy, base, own], [dict(base)])
    assert [e["stage"] for e in merged] == ["older", "dense", "upcycle", "upcycle:copy"]
    for e in merged:
        _utc(e)
    assert merged[-1]["time"] == "2024-05-01T03:11:40.000+00:00"


# ---------------------------------------------------------------------------- PESC init_from


@pytest.fixture
def pesc_adapter_dir(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from moe_app.checkpoint.pesc import save_pesc_adapters
    from moe_app.core.pesc.config import PescConfig
    from moe_app.core.pesc.surgery import build_pesc

    model = build_pesc(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), PescConfig(num_experts=2, adapter_dim=4)
    )
    lineage = [{"stage": "pesc", "time": "2024-05-01T03:00:00+00:00"}]
    return save_pesc_adapters(model, tmp_path / "adapters", base_model=tiny_llama_dir, lineage=lineage)


def test_init_from_accepts_a_pesc_adapter_dir_and_reads_its_lineage(pesc_adapter_dir: Path):
    config = check_init_from(pesc_adapter_dir, expect_architecture="LlamaForCausalLM", requires_stage="pesc")
    assert config["architectures"] == ["LlamaForCausalLM"]  # the base's config
    assert [e["stage"] for e in read_lineage(pesc_adapter_dir)] == ["pesc"]


def test_init_from_refuses_an_incomplete_pesc_adapter_dir(pesc_adapter_dir: Path, tiny_llama_dir: Path):
    (pesc_adapter_dir / PESC_ADAPTER_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"incomplete: {PESC_ADAPTER_FILE} missing") as err:
        check_init_from(pesc_adapter_dir)
    assert "re-run the PESC stage" in str(err.value)


def test_init_from_refuses_a_pesc_dir_whose_base_is_gone(pesc_adapter_dir: Path, tiny_llama_dir: Path):
    import shutil

    shutil.rmtree(tiny_llama_dir)
    with pytest.raises(CheckpointError, match=r"PESC base model named in pesc\.json: directory not found"):
        check_init_from(pesc_adapter_dir)


# ---------------------------------------------------------------------------- truncated safetensors


def _truncated_moe_dir(tmp_path: Path) -> tuple[Path, Path]:
    from upcycling_helpers import build, upcycled

    moe = upcycled(build(tiny_llama_config()), UpcycleConfig(method="copy", num_experts=2, top_k=1))
    ckpt = save_moe_checkpoint(moe, tmp_path / "ckpt", max_shard_size="40KB")
    shard = sorted(ckpt.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return ckpt, shard


def test_export_of_a_truncated_checkpoint_is_a_user_error(tmp_path: Path, capsys):
    from moe_app.cli.main import main

    ckpt, shard = _truncated_moe_dir(tmp_path)
    out = tmp_path / "hf"
    rc = main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert shard.name in err and "truncated" in err and "Fix:" in err
    assert "Traceback" not in err and "internal error" not in err
    assert not out.exists()


def test_load_model_of_truncated_weights_names_the_file(tmp_path: Path):
    ckpt, shard = _truncated_moe_dir(tmp_path)
    with pytest.raises(CheckpointError, match=shard.name):
        moe_app.load_model(ckpt)
    with pytest.raises(CheckpointError, match=shard.name):
        moe_app.load_model(ckpt, dtype=torch.float32)  # the weight-loading path, not only the dtype probe


def test_load_model_of_a_truncated_plain_hf_dir_names_the_file(tiny_llama_dir: Path):
    shard = next(tiny_llama_dir.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=shard.name):
        moe_app.load_model(tiny_llama_dir)


def test_lineage_times_are_utc_now():
    from moe_app.core.spec import utc_now

    t = datetime.fromisoformat(utc_now())
    assert t.tzinfo is not None and abs(datetime.now(timezone.utc) - t) < timedelta(minutes=1)


@pytest.mark.parametrize("streaming", [True, False])
def test_upcycle_command_keeps_the_dense_lineage_first(tiny_llama_dir: Path, tmp_path: Path, streaming: bool):
    from moe_app.checkpoint.pretrained import write_lineage_file
    from moe_app.cli.main import main

    dense = {"stage": "CausalLMModule", "time": "2026-01-02T03:04:05.000+00:00", "config": {}, "data": None}
    write_lineage_file(tiny_llama_dir, [dense])
    out = tmp_path / "moe"
    args = ["upcycle", "--model", str(tiny_llama_dir), "--out", str(out), "--method", "copy"]
    args += ["--num_experts", "4", "--top_k", "2", "--streaming", "on" if streaming else "off"]
    assert main(args) == 0
    lineage = read_lineage(out)
    assert [e["stage"] for e in lineage] == ["CausalLMModule", "upcycle"]
    assert lineage[0]["time"] == dense["time"]


# ---------------------------------------------------------------------------- stock outputs


def test_stock_outputs_record_their_lineage(suite_dense_dir: Path, tmp_path: Path):
    """`upcycle --format mixtral` and `export` (streaming and in memory) write stock dirs that still
    say which stages produced them, in ``moe_app_lineage.json`` (stock transformers ignores it)."""
    from moe_app.checkpoint.export import export_checkpoint
    from moe_app.cli.main import main

    common = ["upcycle", "--model", str(suite_dense_dir), "--method", "copy", "--num_experts", "2"]
    common += ["--top_k", "1"]
    assert main([*common, "--out", str(tmp_path / "one"), "--format", "mixtral"]) == 0
    (entry,) = read_lineage(tmp_path / "one")
    assert entry["stage"] == "upcycle" and _utc(entry)
    assert entry["config"]["format"] == "mixtral" and entry["config"]["num_experts"] == 2
    assert not (tmp_path / "one" / SPEC_FILE).exists()
    pruned = tmp_path / "pruned"
    prune = [
        "prune",
        "--ckpt",
        str(tmp_path / "one"),
        "--out",
        str(pruned),
        "--keep",
        "1",
        "--method",
        "frequency",
    ]
    assert main([*prune, "--calib_samples", "4", "--max_length", "16"]) == 0
    assert [e["stage"] for e in read_lineage(pruned)] == ["upcycle", "prune"]

    mid = tmp_path / "mid"
    assert main([*common, "--out", str(mid)]) == 0
    before = read_lineage(mid)
    assert before and before[0]["stage"] == "upcycle"
    assert main(["export", "--ckpt", str(mid), "--out", str(tmp_path / "two"), "--format", "mixtral"]) == 0
    in_memory = export_checkpoint(moe_app.load_model(mid), tmp_path / "three", "mixtral").path
    for out in (tmp_path / "two", in_memory):
        lineage = read_lineage(out)
        assert lineage[:-1] == before, out
        assert lineage[-1]["stage"] == "export" and lineage[-1]["config"] == {"format": "mixtral"}
        assert _utc(lineage[-1]) >= _utc(before[-1])
