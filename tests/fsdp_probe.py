"""MoE modules the FSDP tests train through the CLI (``--model.class_path tests.fsdp_probe...``).

The ``Probed*`` modules (MoE, post-training, PESC, LoRA) record, per rank, how often they loaded the
base model, how many bytes of real (non-meta) parameter storage their model held right after
``configure_model`` (before the strategy shards it), and the training losses.
``EagerMoeLMModule`` builds the model the way FSDP did before sharded loading: every rank loads
and upcycles the whole model, then shards it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_app.lightning.modules.lora import LoraModule
from moe_app.lightning.modules.moe import MoeLMModule
from moe_app.lightning.modules.pesc import PescModule
from moe_app.lightning.modules.post import PostTrainModule


class _Probe:
    """The recording, mixed in before a module class (no ``__init__``: the CLI reads the module's)."""

    def load_base_model(self) -> torch.nn.Module:
        self._probe_base_loads = getattr(self, "_probe_base_loads", 0) + 1
        return super().load_base_model()

    def configure_model(self) -> None:
        super().configure_model()
        params = list(self.model.parameters())
        self._probe_built = {
            "base_loads": getattr(self, "_probe_base_loads", 0),
            "real_param_bytes": sum(p.numel() * p.element_size() for p in params if not p.is_meta),
            "meta_param_bytes": sum(p.numel() * p.element_size() for p in params if p.is_meta),
        }

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self._probe_losses = [*getattr(self, "_probe_losses", []), float(loss.detach())]
        return loss

    def on_train_end(self) -> None:
        super().on_train_end()
        out = Path(self.trainer.default_root_dir) / f"built_rank{self.global_rank}.json"
        out.write_text(json.dumps({**self._probe_built, "losses": getattr(self, "_probe_losses", [])}))


class ProbedMoeLMModule(_Probe, MoeLMModule):
    pass


class ProbedPostTrainModule(_Probe, PostTrainModule):
    pass


class ProbedPescModule(_Probe, PescModule):
    pass


class ProbedLoraModule(_Probe, LoraModule):
    pass


class EagerMoeLMModule(ProbedMoeLMModule):
    def build_model(self) -> torch.nn.Module:  # not marked rebuildable: the pre-sharded-loading path
        return super().build_model()
