"""MoE modules the FSDP tests train through the CLI (``--model.class_path tests.fsdp_probe...``).

``ProbedMoeLMModule`` records, per rank, how often it loaded the base model, how many bytes of real
(non-meta) parameter storage its model held right after ``configure_model`` (before the strategy
shards it), and the training losses. ``EagerMoeLMModule`` builds the model the way FSDP did before
sharded loading: every rank loads and upcycles the whole model, then shards it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_app.lightning.modules.moe import MoeLMModule


class ProbedMoeLMModule(MoeLMModule):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.base_loads = 0
        self.losses: list[float] = []
        self.built: dict = {}

    def load_base_model(self) -> torch.nn.Module:
        self.base_loads += 1
        return super().load_base_model()

    def configure_model(self) -> None:
        super().configure_model()
        params = list(self.model.parameters())
        self.built = {
            "base_loads": self.base_loads,
            "real_param_bytes": sum(p.numel() * p.element_size() for p in params if not p.is_meta),
            "meta_param_bytes": sum(p.numel() * p.element_size() for p in params if p.is_meta),
        }

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(float(loss.detach()))
        return loss

    def on_train_end(self) -> None:
        super().on_train_end()
        out = Path(self.trainer.default_root_dir) / f"built_rank{self.global_rank}.json"
        out.write_text(json.dumps({**self.built, "losses": self.losses}))


class EagerMoeLMModule(ProbedMoeLMModule):
    def build_model(self) -> torch.nn.Module:  # not marked rebuildable: the pre-sharded-loading path
        return super().build_model()
