"""A callback the DDP tests add through the CLI: each rank records what it saw and what it holds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch


class RankProbe(L.Callback):
    """Writes ``<root>/probe_rank{r}.json``: hashes of the batches this rank drew and its final weights."""

    def __init__(self) -> None:
        self.batches: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ids = batch["input_ids"].cpu().numpy().tobytes()
        self.batches.append(hashlib.sha1(ids).hexdigest())

    def on_train_end(self, trainer, pl_module) -> None:
        params = {
            name: float(p.detach().double().sum())
            for name, p in pl_module.model.named_parameters()
            if p.requires_grad
        }
        out = Path(trainer.default_root_dir) / f"probe_rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"rank": trainer.global_rank, "batches": self.batches, "params": params}))
        torch.distributed.barrier() if torch.distributed.is_initialized() else None
