"""MoE training and two-stage post-training: init_from checks, lineage, exact hand-over of weights."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from conftest import cpu_trainer
from moe_app.core.data.sources import SourceConfig
from moe_app.core.upcycling.config import UpcycleConfig
from moe_app.errors import CheckpointError
from moe_app.lightning.data.instruction import InstructionDataModule
from moe_app.lightning.modules.lm import ModelSource
from moe_app.lightning.modules.moe import MoeLMModule
from moe_app.lightning.modules.post import PostTrainModule, check_init_from


@pytest.fixture(scope="module")
def dense_dir(suite_dense_dir: Path) -> Path:
    return suite_dense_dir


def _data() -> InstructionDataModule:
    src = [SourceConfig(name="arithmetic", builtin="arithmetic", builtin_train_size=64, builtin_eval_size=8)]
    return InstructionDataModule(sources=src, max_length=48, batch_size=8)


@pytest.fixture(scope="module")
def stage1_dir(dense_dir: Path, tmp_path_factory) -> Path:
    """Upcycle (copy, 4 experts top-2) and run a short post-training stage 1."""
    root = tmp_path_factory.mktemp("runs")
    L.seed_everything(0)
    up = MoeLMModule(
        source=ModelSource(pretrained=str(dense_dir)),
        upcycle=UpcycleConfig(method="copy", num_experts=4, top_k=2),
    )
    cpu_trainer(root / "upcycle", 2).fit(up, datamodule=_data())
    stage1 = PostTrainModule(init_from=str(root / "upcycle" / "model"), stage="post_stage1")
    cpu_trainer(root / "stage1", 3).fit(stage1, datamodule=_data())
    return root / "stage1" / "model"


def test_lineage_records_every_stage_with_its_data(stage1_dir: Path):
    spec = json.loads((stage1_dir / "moe_app.json").read_text())
    stages = [e["stage"] for e in spec["lineage"]]
    assert stages[-2:] == ["upcycle:copy", "post_stage1"]
    last = spec["lineage"][-1]
    assert last["global_step"] == 3
    assert last["init_from"].endswith("upcycle/model")
    assert last["data"] == {
        "class": "InstructionDataModule",
        "sources": [{"name": "arithmetic", "from": "arithmetic"}],
    }


def test_lineage_records_the_final_mixture_weights(stage1_dir: Path, tmp_path: Path):
    """A stage trained on a dynamic mixture records the weights in force when the model was written."""
    from moe_app.core.mixing.config import MixtureConfig
    from moe_app.lightning.data.mixture import MixtureDataModule

    sources = [
        SourceConfig(name=n, builtin=n, builtin_train_size=32, builtin_eval_size=8)
        for n in ("arithmetic", "strings", "sorting")
    ]
    dm = MixtureDataModule(
        sources=sources,
        max_length=48,
        batch_size=4,
        mixture=MixtureConfig(strategy="dynamic", update_every=1, probe_size=4, eta=20.0, plot=False),
    )
    stage2 = PostTrainModule(init_from=str(stage1_dir), stage="post_stage2", requires_stage="post_stage1")
    cpu_trainer(tmp_path, 3).fit(stage2, datamodule=dm)
    lineage = json.loads((tmp_path / "model" / "moe_app.json").read_text())["lineage"]
    assert [e["stage"] for e in lineage][-3:] == ["upcycle:copy", "post_stage1", "post_stage2"]
    data = lineage[-1]["data"]
    final = dm.named_weights()
    assert data["strategy"] == "dynamic" and data["sources"] == ["arithmetic", "strings", "sorting"]
    assert data["updates"] >= 1 and data["updates"] == len(dm.history) - 1
    assert data["weights"] == final
    assert len(set(final.values())) > 1  # dynamic: the updates moved the weights off uniform


def test_stage2_starts_from_exactly_stage1_weights(stage1_dir: Path):
    stage2 = PostTrainModule(init_from=str(stage1_dir), stage="post_stage2", requires_stage="post_stage1")
    stage2.configure_model()
    saved = {}
    for f in stage1_dir.glob("*.safetensors"):
        saved.update(load_file(f))
    live = stage2.model.state_dict()
    assert set(saved) <= set(live)
    for key, value in saved.items():
        assert torch.equal(live[key], value), key
    assert stage2.model.training  # ready to train, not left in eval mode by from_pretrained


def test_stage2_refuses_missing_directory(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist") as err:
        check_init_from(tmp_path / "nope")
    assert "pipeline.py --list" in str(err.value)


def test_stage2_refuses_missing_config_and_missing_shards(stage1_dir: Path, tmp_path: Path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(stage1_dir, broken)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing config\.json") as err:
        check_init_from(broken)
    assert "point init_from at the `model` directory" in str(err.value)
    broken2 = tmp_path / "broken2"
    shutil.copytree(stage1_dir, broken2)
    for f in broken2.glob("model-*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"shard file\(s\) .* are missing"):
        check_init_from(broken2)


def test_stage2_refuses_dense_model_and_wrong_architecture(dense_dir: Path, stage1_dir: Path):
    with pytest.raises(CheckpointError, match="dense model, but post-training needs a Mixture-of-Experts"):
        check_init_from(dense_dir)
    with pytest.raises(CheckpointError, match="does not match the expected 'Qwen2ForCausalLM'"):
        check_init_from(stage1_dir, expect_architecture="Qwen2ForCausalLM")


def test_stage2_refuses_a_stock_moe_with_the_reason(stage1_dir: Path, tmp_path: Path):
    from moe_app.checkpoint.export import export_checkpoint

    stock = export_checkpoint(stage1_dir, tmp_path / "mixtral", "mixtral").path
    with pytest.raises(
        CheckpointError, match="is a stock transformers MoE: post-training continues a moe-app"
    ) as err:
        check_init_from(stock)
    assert "exported from" in str(err.value)


def test_stage2_refuses_a_model_that_skipped_stage1(dense_dir: Path, stage1_dir: Path, tmp_path: Path):
    upcycled = stage1_dir.parent.parent / "upcycle" / "model"
    with pytest.raises(CheckpointError, match="not produced by stage 'post_stage1'"):
        check_init_from(upcycled, requires_stage="post_stage1")


def test_moe_module_refuses_dense_source_without_upcycle(dense_dir: Path):
    from moe_app.errors import ConfigError

    module = MoeLMModule(source=ModelSource(pretrained=str(dense_dir)))
    with pytest.raises(ConfigError, match="is a dense model and no upcycle section"):
        module.configure_model()


def test_router_freezing_freezes_only_routers(stage1_dir: Path):
    from moe_app.lightning.modules.moe import FreezeConfig

    module = PostTrainModule(init_from=str(stage1_dir), freeze=FreezeConfig(router=True))
    module.configure_model()
    frozen = {n for n, p in module.model.named_parameters() if not p.requires_grad}
    assert frozen and all(".router." in n for n in frozen)
    assert any("gate_up_proj" in n for n, p in module.model.named_parameters() if p.requires_grad)
