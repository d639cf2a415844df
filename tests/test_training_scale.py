"""Scale options that run on CPU: activation checkpointing, bf16 autocast, gradient accumulation."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import cpu_trainer
from moe_app.core.upcycling.config import UpcycleConfig
from moe_app.lightning.modules.lm import ModelSource
from moe_app.lightning.modules.moe import MoeLMModule


def _module(dense: Path, checkpointing: bool) -> MoeLMModule:
    module = MoeLMModule(
        source=ModelSource(pretrained=str(dense), activation_checkpointing=checkpointing),
        upcycle=UpcycleConfig(method="copy", num_experts=4, top_k=2, seed=0),
    )
    module.configure_model()
    return module


def _grads(
    module: MoeLMModule, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    lm, extras = module._step(batch)  # the training loss without Lightning's logging
    loss = lm + sum(extras.values())
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None
    }


def test_activation_checkpointing_gives_the_same_loss_and_gradients(suite_dense_dir: Path):
    torch.manual_seed(0)
    ids = torch.randint(3, 600, (2, 24))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    plain = _module(suite_dense_dir, checkpointing=False)
    ckpt = _module(suite_dense_dir, checkpointing=True)
    ckpt.model.load_state_dict(plain.model.state_dict())
    assert ckpt.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    loss_a, grads_a = _grads(plain, batch)
    loss_b, grads_b = _grads(ckpt, batch)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


def _fit_upcycled(dense: Path, root: Path, precision: str, **trainer_kwargs) -> tuple[L.Trainer, MoeLMModule]:
    """3 optimiser steps of a 4-expert copy-upcycled model on the sorting domain; the model
    directory is written to ``root / "model"``."""
    from moe_app.core.data.sources import SourceConfig
    from moe_app.lightning.data.instruction import InstructionDataModule

    src = [SourceConfig(name="sorting", builtin="sorting", builtin_train_size=64, builtin_eval_size=4)]
    module = MoeLMModule(
        source=ModelSource(pretrained=str(dense)),
        upcycle=UpcycleConfig(method="copy", num_experts=4, top_k=2),
        save_dir="model",
    )
    trainer = cpu_trainer(root, 3, precision=precision, **trainer_kwargs)
    trainer.fit(module, datamodule=InstructionDataModule(sources=src, max_length=48, batch_size=4))
    return trainer, module


@pytest.mark.slow
def test_bf16_mixed_and_gradient_accumulation_train_on_cpu(suite_dense_dir: Path, tmp_path: Path):
    trainer, module = _fit_upcycled(suite_dense_dir, tmp_path, "bf16-mixed", accumulate_grad_batches=2)
    assert trainer.global_step == 3  # optimiser steps, each from 2 micro-batches
    assert module.model.dtype == torch.float32  # mixed precision keeps fp32 master weights
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


@pytest.mark.slow
def test_bf16_true_trains_bf16_weights_and_saves_them(suite_dense_dir: Path, tmp_path: Path):
    from distributed_helpers import load_safetensors

    trainer, module = _fit_upcycled(suite_dense_dir, tmp_path, "bf16-true")
    assert trainer.global_step == 3
    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}
    saved = load_safetensors(tmp_path / "model")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    router = "model.layers.0.mlp.router.weight"
    torch.testing.assert_close(saved[router], dict(module.model.named_parameters())[router].detach())
