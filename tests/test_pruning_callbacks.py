"""Pruning callbacks: run at the end of a (tiny) fit, write loadable models next to the trained one."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

import moe_app
from conftest import tiny_llama_config
from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.core.data.sources import SourceConfig
from moe_app.core.pruning import CalibrationConfig, moe_layer_views
from moe_app.core.upcycling import UpcycleConfig
from moe_app.errors import MoeAppError
from moe_app.lightning.callbacks.pruning import BlockDrop, ExpertPruning, ExpertSkipping, LayerDrop
from moe_app.lightning.data.instruction import InstructionDataModule
from moe_app.lightning.modules.lm import ModelSource
from moe_app.lightning.modules.moe import MoeLMModule
from moe_app.lightning.modules.optim import OptimConfig
from upcycling_helpers import build, upcycled


def test_callbacks_prune_skip_and_drop_after_fit(tmp_path):
    from moe_app.core.data.tokenizer import suite_tokenizer

    tok = suite_tokenizer()
    dense = build(tiny_llama_config(vocab_size=len(tok)))
    moe = upcycled(dense, UpcycleConfig(method="noise", num_experts=6, top_k=2, noise_std=0.5))
    ckpt = save_moe_checkpoint(moe, tmp_path / "moe", tokenizer=tok)
    source = SourceConfig(name="arith", builtin="arithmetic", builtin_train_size=32, builtin_eval_size=8)
    calib = CalibrationConfig(data="builtin:arithmetic", num_samples=8, max_length=32, batch_size=4)
    callbacks = [
        ExpertPruning(keep=3, calib_batches=2, eval_batches=1),  # calibrates on the data module
        ExpertSkipping(calibration=calib, eval_batches=1),
        LayerDrop(num_layers=1, source=source, eval_batches=1),
        BlockDrop(num_blocks=1, calibration=calib, eval_batches=0),
    ]
    module = MoeLMModule(
        ModelSource(pretrained=str(ckpt), tokenizer="builtin"),
        optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
    )
    dm = InstructionDataModule(sources=[source], max_length=32, batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path / "run"),
        callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    run = tmp_path / "run"
    assert all(v.num_experts == 6 for _, v in moe_layer_views(module.model))  # the trained model is untouched

    pruned = moe_app.load_model(run / "model_pruned_r3")
    assert [v.num_experts for _, v in moe_layer_views(pruned)] == [3, 3]
    report = json.loads((run / "model_pruned_r3.json").read_text())
    assert report["val_loss_before"] > 0 and report["val_loss_after"] > 0
    assert callbacks[0].result["experts"]["keep"] == 3

    skip = moe_app.load_model(run / "model_skip")
    assert all(v.skip_beta is not None for _, v in moe_layer_views(skip))
    assert 0.0 < callbacks[1].result["skipping"]["skip_rate"]["all"] < 1.0

    dropped = json.loads((run / "model_layer_drop1" / "moe_app.json").read_text())["pruning"][
        "dropped_mlp_layers"
    ]
    assert len(dropped) == 1
    blocks = moe_app.load_model(run / "model_block_drop1")
    assert blocks.config.num_hidden_layers == 1
    with torch.no_grad():
        assert torch.isfinite(blocks(input_ids=torch.tensor([[1, 5, 9]])).logits).all()


def test_callback_arguments_are_validated():
    with pytest.raises(MoeAppError, match="keep must be >= 1"):
        ExpertPruning(keep=0)
    with pytest.raises(MoeAppError, match="unknown when"):
        ExpertSkipping(when="later")
    with pytest.raises(MoeAppError, match="unknown pruning method"):
        ExpertPruning(keep=2, method="magic")
