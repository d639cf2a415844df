"""``MixtureWeightsCallback``: the scheduler of adaptive data-mixture updates (it needs the model).

Dynamic data mixing (Zhu et al., arXiv 2406.11256; ALGORITHMS.md section 7) and its DoReMi-like
reference-loss baseline measure the model on fixed dev probe sets every ``update_every`` steps.
This callback is a thin scheduler over the core: it runs :func:`moe_app.core.mixing.probe.probe_model`
(moe-app blocks' ``last_routing`` or stock HF MoE router logits) on this rank's shard of the probe
rows, all-reduces the statistics, computes the new weights with
:mod:`moe_app.core.mixing.rules` in float64 on the CPU, broadcasts them from rank 0 (so every rank holds
bitwise the same weights) and hands them to the :class:`~moe_app.lightning.data.mixture.MixtureDataModule`,
which owns all state (so the checkpoint has it). The update runs in ``on_train_batch_start``,
before the step's forward, so the training module still reads its own routing after the forward.
``sentence_embedding`` is scheduled like ``dynamic`` (its probe reads the mean last hidden states
instead of the gate loads). ``static_gate_load`` is measured once, in ``on_fit_start``: Lightning
creates the training iterator (and its prefetch draws batch 0) before ``on_train_start``, so the
one-shot weights must be in force earlier; a resumed run keeps the checkpoint's.

Outputs: one logged scalar per source (``mixture/<name>``) at every update (written to the
loggers directly, not subject to ``log_every_n_steps``); ``<default_root_dir>/mixture_weights.json``
(``{"history": [{"step", "weights", ...}], ...}``, rewritten at every update) and, at the end of
fit, ``mixture_weights.png`` and the final weights printed. ``MixtureDataModule.setup`` adds this
callback when it is not configured, so a config needs only the data module.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from moe_app.core.mixing.probe import count_moe_layers, probe_model, select_layers
from moe_app.core.mixing.protocols import AdaptiveMixture
from moe_app.core.mixing.rules import GATE_LOAD, mean_embeddings
from moe_app.core.mixing.sampler import MixtureSampler
from moe_app.core.utils.atomic import atomic_write_text
from moe_app.errors import ConfigError

JSON_NAME = "mixture_weights.json"
PNG_NAME = "mixture_weights.png"


class MixtureWeightsCallback(L.Callback):
    """Adaptive mixture updates, logging and the weight history of a ``MixtureDataModule``."""

    def __init__(self) -> None:
        super().__init__()
        self.updates_this_run = 0
        self.update_seconds: list[float] = []
        """Wall time of each update in this run (probe + reduce + rule), for the overhead benchmark."""

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _dm(trainer: L.Trainer) -> AdaptiveMixture:
        dm = trainer.datamodule
        if not isinstance(dm, AdaptiveMixture):
            raise ConfigError(
                f"MixtureWeightsCallback needs a MixtureDataModule, got {type(dm).__name__}",
                where="trainer.callbacks",
                fix="use data: class_path: moe_app.lightning.data.mixture.MixtureDataModule, or remove the callback.",
            )
        return dm

    @staticmethod
    def _model(pl_module: L.LightningModule) -> torch.nn.Module:
        model = getattr(pl_module, "model", None)
        return model if isinstance(model, torch.nn.Module) else pl_module

    def _probe(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        dm: Any,
        *,
        counts: bool,
        loss: bool,
        embeddings: bool = False,
    ):
        batches = dm.probe_batches(int(trainer.global_rank), int(trainer.world_size))
        stats = probe_model(
            self._model(pl_module),
            batches,
            len(dm.names),
            dm.mixture.layer,
            need_counts=counts,
            need_loss=loss,
            need_embeddings=embeddings,
            forward_context=trainer.precision_plugin.forward_context,
        )
        if trainer.world_size > 1:  # one all-reduce of exact integer counts and float64 loss sums
            flat = stats.flat().to(pl_module.device)
            flat = trainer.strategy.reduce(flat, reduce_op="sum")
            stats = stats.with_flat(flat)
        return stats

    def _root(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir)

    def _write_json(self, trainer: L.Trainer, dm: Any) -> None:
        if not trainer.is_global_zero:
            return

        m = dm.mixture
        payload = {
            "strategy": m.strategy,
            "sources": dm.names,
            "eta": m.resolved_eta if m.measured else None,
            "c": m.resolved_c if m.measured else None,
            "update_every": m.update_every if m.adaptive else None,
            "layer": m.layer if m.strategy in GATE_LOAD else None,
            "apply_delay": dm.apply_delay,
            "reference_losses": dm.named(dm.reference) if dm.reference is not None else None,
            "final": dm.named_weights(),
            "history": dm.history,
        }
        root = self._root(trainer)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / JSON_NAME, json.dumps(payload, indent=2))

    def _log(self, trainer: L.Trainer, dm: Any, step: int) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {f"mixture/{n}": w for n, w in dm.named_weights().items()}
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = self._dm(trainer)
        if dm.mixture.strategy in GATE_LOAD:  # fail before training on a dense model or a bad layer
            num = count_moe_layers(self._model(pl_module))
            if num is not None:
                select_layers(num, dm.mixture.layer)
        if dm.mixture.one_shot and not dm.start_measured:
            # Before the training loader exists: Lightning draws batch 0 before on_train_start.
            stats = self._probe(trainer, pl_module, dm, counts=True, loss=False)
            weights, delta = dm.compute_update(stats.counts, None)
            weights, delta = trainer.strategy.broadcast((weights, delta), src=0)
            dm.set_start_weights(weights, delta)
            rank_zero_info(
                f"[moe-app] {dm.mixture.strategy} mixture weights (fixed): "
                + ", ".join(f"{n}={v:.4f}" for n, v in dm.named_weights().items())
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = self._dm(trainer)
        if dm.mixture.strategy == "reference_loss" and dm.reference is None:
            stats = self._probe(trainer, pl_module, dm, counts=False, loss=True)
            ref = trainer.strategy.broadcast(stats.dev_losses(), src=0)
            dm.set_reference(ref)
            rank_zero_info(
                "[moe-app] mixture reference losses: "
                + ", ".join(f"{n}={v:.4f}" for n, v in zip(dm.names, dm.reference.tolist()))
            )
        self._check_loader(trainer, dm)
        dm.start_tracking()
        self._write_json(trainer, dm)

    @staticmethod
    def _check_loader(trainer: L.Trainer, dm: Any) -> None:
        """The training loader must draw with the data module's own sampler (not a wrapped copy)."""

        loaders = trainer.train_dataloader
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        for loader in loaders:
            sampler = getattr(loader, "sampler", None)
            if sampler is not None and not (isinstance(sampler, MixtureSampler) and sampler is dm.sampler()):
                raise ConfigError(
                    f"the training loader samples with {type(sampler).__name__}, not the mixture sampler",
                    where="trainer",
                    fix="do not replace the data module's sampler (leave trainer.use_distributed_sampler at "
                    "its default or false; the mixture sampler is already rank-aware).",
                )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        dm = self._dm(trainer)
        step = int(trainer.global_step)
        if dm.started_batches == 0:
            self._log(trainer, dm, step)  # the starting weights, so curves begin at step 0
        if dm.update_due(step):
            t0 = time.perf_counter()
            strategy = dm.mixture.strategy
            stats = self._probe(
                trainer,
                pl_module,
                dm,
                counts=strategy == "dynamic",
                loss=strategy == "reference_loss",
                embeddings=strategy == "sentence_embedding",
            )
            emb = (
                mean_embeddings(stats.embedding_sum, stats.embedding_rows)
                if stats.embedding_sum is not None and stats.embedding_rows is not None
                else None
            )
            weights, delta = dm.compute_update(stats.counts, stats.dev_losses(), emb)
            # Identical inputs give identical float64 results on every rank; the broadcast makes
            # that a guarantee rather than an assumption (e.g. ranks on different CPU types).
            weights, delta = trainer.strategy.broadcast((weights, delta), src=0)
            dm.apply_update(step, weights, delta)
            self.updates_this_run += 1
            self.update_seconds.append(time.perf_counter() - t0)
            self._log(trainer, dm, step)
            self._write_json(trainer, dm)
        dm.note_batch_started()
        if dm.stage_starts_at(dm.started_batches - 1):  # sequential: a new source's stage begins
            self._log(trainer, dm, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = self._dm(trainer)
        dm.stop_tracking()
        self._write_json(trainer, dm)
        if dm.mixture.dump_rank_files:
            self._dump_rank(trainer, dm)
        if not trainer.is_global_zero:
            return
        if dm.mixture.plot:
            from moe_app.lightning.plots import plot_mixture_weights

            plot_mixture_weights(
                dm.history, self._root(trainer) / PNG_NAME, title=f"mixture weights ({dm.mixture.strategy})"
            )
        updates = len(dm.history) - 1
        table = "  ".join(f"{n}={w:.4f}" for n, w in dm.named_weights().items())
        print(f"[moe-app] final mixture weights ({dm.mixture.strategy}, {updates} update(s)): {table}")

    def _dump_rank(self, trainer: L.Trainer, dm: Any) -> None:

        sampler = dm.sampler()
        draws = {str(b): idx for b, idx in sorted(sampler.drawn.items()) if b < dm.started_batches}
        payload = {
            "rank": int(trainer.global_rank),
            "world_size": int(trainer.world_size),
            "weights": dm.weights.tolist(),
            "weights_hex": [float(w).hex() for w in dm.weights.tolist()],
            "history": dm.history,
            "started_batches": dm.started_batches,
            "draws": draws,
        }
        path = self._root(trainer) / f"mixture_rank{trainer.global_rank}.json"
        atomic_write_text(path, json.dumps(payload))


__all__ = ["MixtureWeightsCallback"]
