"""PescModule: a few Lightning steps on a tiny base, router losses without padding, saved checkpoints."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader

import moe_app
from conftest import cpu_trainer, repackable_llama_config, save_tiny_model
from moe_app.checkpoint.pesc import load_pesc_model
from moe_app.core.moe.losses import load_balancing_loss
from moe_app.core.pesc.config import PescConfig, is_pesc_trainable
from moe_app.core.pesc.surgery import pesc_blocks
from moe_app.errors import ConfigError
from moe_app.lightning.modules.lm import ModelSource
from moe_app.lightning.modules.optim import OptimConfig
from moe_app.lightning.modules.pesc import PescModule


def _batches(n: int = 4, bsz: int = 2, seq: int = 12):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (bsz, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -4:] = 0  # right padding in the first row
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _module(base, **pesc) -> PescModule:
    cfg = PescConfig(num_experts=4, top_k=2, adapter_dim=8, **pesc)
    return PescModule(
        ModelSource(pretrained=str(base), tokenizer="builtin"),
        pesc=cfg,
        optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"),
    )


def _trainer(tmp_path, steps: int = 3) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )


@pytest.mark.parametrize("save_full", [False, True])
def test_fit_trains_only_pesc_params_and_saves_a_reloadable_model(tiny_llama_dir, tmp_path, save_full):
    module = _module(tiny_llama_dir, router_losses={"balance": 0.01, "z": 0.0})
    module.save_full = save_full
    trainer = _trainer(tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader(_batches(), batch_size=None))
    assert trainer.global_step == 3
    model = module.model.eval()
    assert all(is_pesc_trainable(n) == p.requires_grad for n, p in model.named_parameters())
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("adapters.up"))
    ids = _batches(1)[0]["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = tmp_path / "model"
    back = moe_app.load_model(out) if save_full else load_pesc_model(out)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, expected)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(is_pesc_trainable(k) for k in state)  # the frozen base is not in the .ckpt


def test_validating_a_qlora_fit_changes_nothing_it_trains(tmp_path, bnb_sees_avx512bf16):
    """Sanity-check validation and validation after every step run the 4-bit base in eval mode; the
    trained weights are those of the same fit without validation, bit for bit. bitsandbytes is told
    the CPU has AVX512-BF16, where it would otherwise repack the base at the first eval forward and
    then drop gradients through it (``pin_4bit_layout``)."""
    base = save_tiny_model(repackable_llama_config(), tmp_path / "base")
    trained = []
    for validate in (False, True):
        L.seed_everything(0)
        module = _module(base, quantize_4bit=True, dropout=0.0)
        trainer = cpu_trainer(
            tmp_path / f"run-{validate}",
            3,
            num_sanity_val_steps=2 if validate else 0,
            limit_val_batches=2 if validate else 0,
            val_check_interval=1,
        )
        val = DataLoader(_batches(2), batch_size=None) if validate else None
        trainer.fit(module, train_dataloaders=DataLoader(_batches(), batch_size=None), val_dataloaders=val)
        assert trainer.global_step == 3
        trained.append({n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad})
    plain, validated = trained
    assert plain and sorted(validated) == sorted(plain)
    assert any(n.endswith("adapters.up") and p.abs().sum() > 0 for n, p in plain.items())
    for name, p in validated.items():
        assert_close(p, plain[name], rtol=0, atol=0, msg=name)


def test_balance_loss_excludes_padding_and_reaches_the_router(tiny_llama_dir):
    module = _module(tiny_llama_dir, router_losses={"balance": 0.5, "z": 0.1})
    module.configure_model()
    batch = _batches(1)[0]
    module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    losses = module.extra_losses(batch)
    assert set(losses) == {"balance_loss", "z_loss"}
    mask = batch["attention_mask"].reshape(-1)
    per_layer = [
        load_balancing_loss(b.last_routing.probs, b.last_routing.indices, 4, mask)
        for _, b in pesc_blocks(module.model)
    ]
    assert_close(losses["balance_loss"], 0.5 * torch.stack(per_layer).mean())
    unmasked = [
        load_balancing_loss(b.last_routing.probs, b.last_routing.indices, 4)
        for _, b in pesc_blocks(module.model)
    ]
    assert not torch.allclose(torch.stack(per_layer), torch.stack(unmasked))
    losses["balance_loss"].backward()
    router = module.model.model.layers[0].mlp.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_no_router_loss_by_default(tiny_llama_dir):
    module = _module(tiny_llama_dir)
    assert module.extra_losses(_batches(1)[0]) == {}


def test_adapter_only_save_needs_a_base_checkpoint():
    with pytest.raises(ConfigError, match="adapter-only checkpoint needs a base"):
        PescModule(ModelSource(arch={"hidden_size": 32}), pesc=PescConfig())


def test_fit_start_prints_parameter_counts(tiny_llama_dir, tmp_path, caplog):
    module = _module(tiny_llama_dir)
    module.save_dir = None
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, steps=1).fit(module, train_dataloaders=DataLoader(_batches(1), batch_size=None))
    text = caplog.text
    assert "active per token" in text and "trainable" in text
    assert "PESC (adapter, E=4, k=2" in text and "routers" in text


def test_trainable_only_lightning_checkpoint_restores_and_checks_keys(tiny_llama_dir, tmp_path):
    from moe_app.errors import CheckpointError

    module = _module(tiny_llama_dir)
    module.save_dir = None
    trainer = _trainer(tmp_path, steps=2)
    trainer.fit(module, train_dataloaders=DataLoader(_batches(2), batch_size=None))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["_class_path"] == "moe_app.lightning.modules.pesc.PescModule"
    fresh = _module(tiny_llama_dir)
    fresh.configure_model()
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=False)
    ids = _batches(1)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(
            fresh.model.eval()(input_ids=ids).logits, module.model.eval()(input_ids=ids).logits
        )
    ckpt["state_dict"].pop(next(iter(ckpt["state_dict"])))
    with pytest.raises(CheckpointError, match="lacks 1 trainable PESC tensors"):
        fresh.on_load_checkpoint(ckpt)
