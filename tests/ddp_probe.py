"""A callback the distributed tests add through the CLI: each rank records what it saw and holds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch


class RankProbe(L.Callback):
    """Writes ``<root>/probe_rank{r}.json``: hashes of the batches this rank drew, the sums of its
    final trainable weights, and the fraction of all parameter elements this rank stores locally
    (1.0 under DDP, about ``1 / world_size`` under FSDP)."""

    def __init__(self) -> None:
        self.batches: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ids = batch["input_ids"].cpu().numpy().tobytes()
        self.batches.append(hashlib.sha1(ids).hexdigest())

    def on_train_end(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        params, local, total = {}, 0, 0
        for name, p in pl_module.model.named_parameters():
            sharded = isinstance(p, DTensor)
            local += p.to_local().numel() if sharded else p.numel()
            total += p.numel()
            if p.requires_grad:
                full = p.full_tensor() if sharded else p  # a collective under FSDP: every rank runs it
                params[name] = float(full.detach().double().sum())
        out = Path(trainer.default_root_dir) / f"probe_rank{trainer.global_rank}.json"
        record = {"rank": trainer.global_rank, "batches": self.batches, "params": params}
        record["local_fraction"] = local / total
        out.write_text(json.dumps(record))
        torch.distributed.barrier() if torch.distributed.is_initialized() else None
