"""Lightning callbacks that prune, skip or drop after training: thin schedulers over ``moe_app.core.pruning``.

Configured under ``trainer.callbacks`` in YAML (see ``configs/tiny/prune.yaml``)::

    trainer:
      callbacks:
        - class_path: moe_app.lightning.callbacks.pruning.ExpertPruning
          init_args: {keep: 4, method: enumerate}
        - class_path: moe_app.lightning.callbacks.pruning.ExpertSkipping

Each callback runs once, at ``on_fit_end`` (after the LightningModule has written the trained model)
or, with ``when: test_start``, before testing (then the tested model *is* the pruned one). At
``fit_end`` it works on a copy, so the trained model in memory and on disk is untouched. It

1. takes calibration batches from ``calibration`` (``builtin``, ``builtin:<domain>``, a file; or a
   full ``source`` :class:`~moe_app.core.data.sources.SourceConfig`, e.g. a hub dataset) or, when
   neither is given, from the trainer's data module (training batches);
2. applies the core operation (:func:`moe_app.checkpoint.pruning.run_job`);
3. logs the eval loss before and after on the data module's validation batches (and the skip rate);
4. writes the result next to the trained model, ``<default_root_dir>/<out_name>``, as the same kind
   of checkpoint (moe-app or stock HF), with a JSON report beside it (``<out_name>.json``).

Pruning methods: Lu et al. 2024 (arXiv 2402.14800) enumeration and dynamic skipping; He et al.
2024 (arXiv 2406.02500) expert drop, layer drop and block drop; REAP (arXiv 2510.13999).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from moe_app.checkpoint.pruning import PruneJob, run_job, validate_job, write_pruned
from moe_app.core.data.collate import take_batches
from moe_app.core.data.sources import SourceConfig
from moe_app.core.models.views import clone_model, model_kind
from moe_app.core.pruning.calibration import CalibrationConfig, calibration_batches, encode_batches, eval_loss
from moe_app.core.pruning.enumerate import EnumerationConfig
from moe_app.core.pruning.experts import ExpertPruneConfig
from moe_app.errors import ConfigError
from moe_app.lightning.strategies.fsdp import DecoderLayerFSDPStrategy, unsharded_model

WHEN = ("fit_end", "test_start")


class _PruningCallback(L.Callback):
    """Shared plumbing: calibration data, eval before/after, writing, logging."""

    name = "prune"

    def __init__(
        self,
        out_name: str | None = None,
        calibration: CalibrationConfig | None = None,
        source: SourceConfig | None = None,
        calib_batches: int = 8,
        eval_batches: int = 8,
        when: str = "fit_end",
    ) -> None:
        super().__init__()
        out_name = out_name or self.default_out_name()
        if when not in WHEN:
            raise ConfigError(f"unknown when={when!r}", where=type(self).__name__, fix=f"use one of {WHEN}")
        if calib_batches < 1 or eval_batches < 0:
            raise ConfigError("calib_batches must be >= 1 and eval_batches >= 0", where=type(self).__name__)
        if not out_name or "/" in out_name or "\\" in out_name or out_name in (".", ".."):
            raise ConfigError(
                f"bad out_name {out_name!r}", where=type(self).__name__, fix="a plain directory name"
            )
        self.out_name = out_name
        self.calibration = calibration
        self.source = source
        self.calib_batches = calib_batches
        self.eval_batches = eval_batches
        self.when = when
        self.result: dict[str, Any] | None = None

    # ------------------------------------------------------------------ what subclasses provide
    def job(self) -> PruneJob:
        raise NotImplementedError

    def default_out_name(self) -> str:
        """The output dir under ``default_root_dir`` when ``out_name`` is not given."""
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.when == "fit_end":
            self._run(trainer, pl_module, in_place=False)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.when == "test_start" and self.result is None:
            self._run(trainer, pl_module, in_place=True)

    # ------------------------------------------------------------------ the work
    def _calibration(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict[str, torch.Tensor]]:
        cfg = self.calibration or CalibrationConfig()
        if self.source is not None:
            from moe_app.core.pruning.calibration import calibration_examples

            examples = calibration_examples(self.source, cfg.num_samples, cfg.seed)
            return encode_batches(pl_module.tokenizer, examples, cfg.max_length, cfg.batch_size)
        if self.calibration is not None:
            return calibration_batches(pl_module.tokenizer, cfg)
        dm = getattr(trainer, "datamodule", None)
        if dm is None:
            raise ConfigError(
                f"{type(self).__name__} needs calibration data: no `calibration` and no data module",
                fix="set init_args.calibration.data (e.g. builtin) or run with a data section",
            )
        return take_batches(dm.train_dataloader(), self.calib_batches)

    def _eval_batches(self, trainer: L.Trainer) -> list[dict[str, torch.Tensor]]:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or self.eval_batches == 0:
            return []
        loaders = dm.val_dataloader()
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        return take_batches(loader, self.eval_batches) if loader else []

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, in_place: bool) -> None:

        sharded = isinstance(trainer.strategy, DecoderLayerFSDPStrategy)
        if sharded and in_place:
            raise ConfigError(
                f"{type(self).__name__}(when='test_start') prunes the evaluated model in place, which FSDP "
                "holds sharded.",
                where=type(self).__name__,
                fix="prune at fit end (when: fit_end), or test the pruned directory with --trainer.strategy ddp",
            )
        full = unsharded_model(trainer, pl_module.model)  # every rank takes part in the gather
        if not trainer.is_global_zero:
            return
        job = self.job()
        # The gathered FSDP replica is already a private copy; otherwise keep the training model intact.
        model = full if in_place or sharded else clone_model(full)
        kind = model_kind(model)

        validate_job(model, job, type(self).__name__)
        batches = self._calibration(trainer, pl_module)
        evals = self._eval_batches(trainer)
        before = eval_loss(model, evals, use_labels=True) if evals else None
        report = run_job(model, batches, job)
        after = eval_loss(model, evals, use_labels=True) if evals else None
        report.update({"val_loss_before": before, "val_loss_after": after})
        out = Path(trainer.default_root_dir) / self.out_name
        lineage = pl_module.lineage() if hasattr(pl_module, "lineage") else None
        write_pruned(
            model,
            out,
            kind=kind,
            tokenizer=getattr(pl_module, "tokenizer", None),
            stage_config={"callback": type(self).__name__, **_plain(report)},
            lineage=lineage,
        )
        (out.parent / f"{out.name}.json").write_text(json.dumps(_plain(report), indent=2))
        metrics = {f"{self.name}/val_loss_before": before, f"{self.name}/val_loss_after": after}
        if "skipping" in report:
            metrics[f"{self.name}/skip_rate"] = report["skipping"]["skip_rate"]["all"]
        metrics = {k: v for k, v in metrics.items() if v is not None}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"[moe-app] {type(self).__name__}: wrote {out}"
            + (f"; val loss {before:.4f} -> {after:.4f}" if before is not None else "")
            + (f"; skip rate {metrics[f'{self.name}/skip_rate']:.3f}" if "skipping" in report else "")
        )
        self.result = report


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


class ExpertPruning(_PruningCallback):
    """Prune every MoE layer to ``keep`` experts after training (moe-app or stock HF MoE).

    Args:
        keep: experts kept per layer (``top_k <= keep < E``).
        method: ``enumerate`` (Lu et al. 2024), ``frequency``, ``reap`` or ``expert_drop``.
        progressive: recompute each layer's inputs through the already-pruned layers.
        scope: ``layer`` or ``global`` (``expert_drop`` only, moe-app checkpoints).
        max_subsets: enumerate all subsets while ``C(E, keep)`` is at most this; else sample.
        skipping: also calibrate dynamic skipping on the pruned model (moe-app checkpoints).
        out_name: output dir under ``default_root_dir`` (default ``model_pruned_r<keep>``).
        calibration: calibration data spec (``None``: the trainer's data module).
        source: a full data source for calibration (overrides ``calibration.data``).
        calib_batches: data-module batches used when calibrating from the data module.
        eval_batches: validation batches for the before/after loss (0: none).
        when: ``fit_end`` (on a copy) or ``test_start`` (in place, so ``test`` measures the pruned model).
    """

    name = "prune"

    def __init__(
        self,
        keep: int,
        method: str = "enumerate",
        progressive: bool = False,
        scope: str = "layer",
        max_subsets: int = EnumerationConfig.max_subsets,
        skipping: bool = False,
        **kwargs: Any,
    ) -> None:
        self.keep = keep
        super().__init__(**kwargs)
        self.config = ExpertPruneConfig(
            keep=keep,
            method=method,
            progressive=progressive,
            scope=scope,
            enumeration=EnumerationConfig(max_subsets=max_subsets),
        )
        self.skipping = skipping

    def default_out_name(self) -> str:
        return f"model_pruned_r{self.keep}"

    def job(self) -> PruneJob:
        return PruneJob(experts=self.config, skipping=self.skipping, eval_before_after=False)


class ExpertSkipping(_PruningCallback):
    """Calibrate dynamic skipping (per-layer median ``w2 / w1``) after training; write the model with it.

    Stock HF MoE models cannot store skipping thresholds: the callback refuses them. See
    :class:`ExpertPruning` for the shared arguments; ``out_name`` defaults to ``model_skip``.
    """

    name = "skip"

    def default_out_name(self) -> str:
        return "model_skip"

    def job(self) -> PruneJob:
        return PruneJob(skipping=True, eval_before_after=False)


class LayerDrop(_PruningCallback):
    """Drop the ``num_layers`` MoE sublayers with the highest ``cos(h, h + MoE(LN h))`` (He et al. 2024).

    ``out_name`` defaults to ``model_layer_drop<n>``; see :mod:`moe_app.core.pruning.drop` for storage.
    """

    name = "layer_drop"

    def __init__(self, num_layers: int = 1, **kwargs: Any) -> None:
        if num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1, got {num_layers}", where="LayerDrop", fix="use 1")
        self.num_layers = num_layers
        super().__init__(**kwargs)

    def default_out_name(self) -> str:
        return f"model_layer_drop{self.num_layers}"

    def job(self) -> PruneJob:
        return PruneJob(layer_drop=self.num_layers, eval_before_after=False)


class BlockDrop(_PruningCallback):
    """Delete the ``num_blocks`` decoder blocks with the highest ``cos(h_i, h_{i+1})`` (He et al. 2024).

    ``out_name`` defaults to ``model_block_drop<n>``.
    """

    name = "block_drop"

    def __init__(self, num_blocks: int = 1, **kwargs: Any) -> None:
        if num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {num_blocks}", where="BlockDrop", fix="use 1")
        self.num_blocks = num_blocks
        super().__init__(**kwargs)

    def default_out_name(self) -> str:
        return f"model_block_drop{self.num_blocks}"

    def job(self) -> PruneJob:
        return PruneJob(block_drop=self.num_blocks, eval_before_after=False)


__all__ = ["BlockDrop", "ExpertPruning", "ExpertSkipping", "LayerDrop"]
