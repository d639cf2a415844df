"""Callback used by ``benchmarks/strategies.py``: what one rank spent and stored while training."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import lightning as L
import torch


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
        }
        out = Path(trainer.default_root_dir) / f"strategy_rank{trainer.global_rank}.json"
        out.write_text(json.dumps(record))
