"""Used by ``benchmarks/strategies.py`` and ``benchmarks/fsdp_memory.py``: what one rank spent and
stored while training (a callback), and MoE modules trained with plain SGD (no optimiser state),
so that a model too big for two AdamW replicas on one host can still be compared across strategies.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import lightning as L
import torch

from moe_app.lightning.modules.moe import MoeLMModule


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class StrategyProbe(L.Callback):
    """Writes ``<root>/strategy_rank{r}.json``: step wall times and the bytes this rank holds in
    parameters, gradients and optimiser state (local shards under FSDP), plus its peak RSS."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self._t0 = 0.0
        self.grad_bytes = 0

    def on_train_start(self, trainer, pl_module) -> None:
        # the peak so far is the loading peak: model built (and sharded), optimiser made
        self.load_peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grad_bytes = _bytes(p.grad for p in pl_module.parameters() if p.grad is not None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(time.perf_counter() - self._t0)

    def on_train_end(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        state = [v for s in opt.state.values() for v in s.values()]
        record = {
            "steps_s": self.steps,
            "param_bytes": _bytes(pl_module.parameters()),
            "grad_bytes": self.grad_bytes,
            "optimizer_bytes": _bytes(state),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load_peak_rss_mb": getattr(self, "load_peak_rss_mb", None),
        }
        out = Path(trainer.default_root_dir) / f"strategy_rank{trainer.global_rank}.json"
        out.write_text(json.dumps(record))


class SgdMoeLMModule(MoeLMModule):
    """``MoeLMModule`` with SGD without momentum (no optimiser state) at a constant learning rate."""

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=self.optim.lr, momentum=0.0)


class EagerSgdMoeLMModule(SgdMoeLMModule):
    """The same, with the loading FSDP had before sharded loading: every rank builds and upcycles
    the whole model, then shards it (a ``build_model`` override is not ``rebuildable``)."""

    def build_model(self) -> torch.nn.Module:
        return super().build_model()
