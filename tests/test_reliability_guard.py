"""NumericalGuard: a NaN loss or gradient stops the run with step, value and stage, after a checkpoint.

NaNs are injected by tiny test-only subclasses of the real training module (a poisoned gradient
after backward, a poisoned auxiliary loss), trained in-process for a few steps; the CLI path
(exit code 2, one line) is run in-process through ``moe_app.cli.main.main`` with an absurd learning rate.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import TINY_DECODER
from moe_app.errors import MoeAppError
from moe_app.lightning.callbacks.guard import NonFiniteError, NumericalGuard
from moe_app.lightning.modules.lm import CausalLMModule, ModelSource
from moe_app.lightning.modules.optim import OptimConfig
from reliability_helpers import ARCH, CONFIGS, FAST, build_cache, cache_env

POISONED = "model.model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("moe_app_cache"))


@pytest.fixture(autouse=True)
def _cache_env(cache):
    with cache_env(cache):
        yield


@pytest.fixture(scope="module")
def dm(cache):
    """One data module for all runs here: its tokenised rows are built once."""
    from moe_app.lightning.data.instruction import InstructionDataModule

    return InstructionDataModule(
        tokenizer="builtin", batch_size=4, max_length=48, max_eval_examples_per_source=2
    )


class NaNGradAt(CausalLMModule):
    """Poisons one gradient element after backward at ``poison_step``."""

    poison_step = 2

    def on_after_backward(self) -> None:
        if self.global_step == self.poison_step:
            dict(self.named_parameters())[POISONED].grad[0, 0] = float("nan")


class NaNLossAt(CausalLMModule):
    """Adds a NaN auxiliary loss at ``poison_step`` (as a broken router loss would)."""

    poison_step = 1

    def extra_losses(self, batch):
        if self.global_step == self.poison_step:
            return {"poison": torch.tensor(float("nan"))}
        return {}


def module(cls=CausalLMModule, lr: float = 1e-3) -> CausalLMModule:
    arch = {k: v for k, v in TINY_DECODER.items() if k != "vocab_size"}  # the suite tokenizer sizes it
    return cls(
        source=ModelSource(tokenizer="builtin", arch=arch),
        optim=OptimConfig(lr=lr, warmup_steps=0, schedule="constant"),
        save_dir=None,
    )


def fit(tmp_path: Path, dm, model: CausalLMModule, callbacks: list, max_steps: int = 4) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=dm)
    return trainer


def finite_weights(ckpt: Path) -> bool:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_nan_gradient_stops_before_the_update_with_a_diagnostic_checkpoint(tmp_path, dm):
    with pytest.raises(NonFiniteError) as info:
        fit(tmp_path, dm, module(NaNGradAt), [NumericalGuard()])
    err = info.value
    msg = str(err)
    assert err.step == 2 and err.kind == "gradient" and math.isnan(err.value)
    assert "non-finite gradient (nan)" in msg and "global step 2" in msg and "NaNGradAt" in msg
    assert POISONED in msg and "Fix:" in msg
    ckpt = tmp_path / "checkpoints" / "nonfinite-step2.ckpt"
    assert err.checkpoint == str(ckpt) and str(ckpt) in msg
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2
    assert finite_weights(ckpt), "the diagnostic checkpoint holds the weights before the bad update"


def test_without_the_guard_a_nan_gradient_poisons_every_weight(tmp_path, dm):
    """Why the guard exists: with clipping on, one NaN gradient turns all weights into NaN."""
    model = module(NaNGradAt)
    with pytest.raises(MoeAppError, match="non-finite training loss"):
        fit(tmp_path, dm, model, [])
    assert all(bool(torch.isnan(p).all()) for p in model.parameters())


def test_nan_loss_names_step_value_and_stage(tmp_path, dm):
    with pytest.raises(NonFiniteError) as info:
        fit(tmp_path, dm, module(NaNLossAt), [NumericalGuard()])
    msg = str(info.value)
    assert info.value.kind == "loss" and info.value.step == 1
    assert "non-finite loss (nan) in the training loss at global step 1, stage NaNLossAt" in msg
    assert (tmp_path / "checkpoints" / "nonfinite-step1.ckpt").exists()
    assert finite_weights(tmp_path / "checkpoints" / "nonfinite-step1.ckpt")


def test_module_own_loss_check_still_saves_the_diagnostic_checkpoint(tmp_path, dm):
    """With the guard's loss check off, the module's own check raises; the guard still saves."""
    with pytest.raises(MoeAppError, match="non-finite training loss"):
        fit(tmp_path, dm, module(NaNLossAt), [NumericalGuard(check_loss=False)])
    assert (tmp_path / "checkpoints" / "nonfinite-step1.ckpt").exists()


def test_cli_reports_non_finite_loss_in_one_line_with_exit_code_2(tmp_path, capsys):
    from moe_app.cli.main import main

    rc = main(
        [
            "fit",
            "-c",
            str(CONFIGS / "dense.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.max_steps",
            "6",
            "--trainer.logger",
            "false",
            "--model.init_args.optim.lr",
            "1e30",
            *FAST,
            *ARCH,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("moe-app: error:")]
    assert len(lines) == 1, err[-3000:]
    assert "non-finite" in lines[0] and "global step" in lines[0] and "CausalLMModule" in lines[0]
    assert "nonfinite-step" in lines[0] and "Fix:" in lines[0]
    assert "Traceback" not in err
    assert list((tmp_path / "checkpoints").glob("nonfinite-step*.ckpt"))
    assert not (tmp_path / "model").exists()
