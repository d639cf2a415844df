"""Prune a checkpoint directory end to end: load, validate, calibrate, prune / skip / drop, write.

The output is the same kind of checkpoint as the input (DESIGN.md contract):

* a **moe-app checkpoint** (``moe_app.json``) is written with ``save_moe_checkpoint``: the per-layer
  ``num_experts`` are read back from the sliced modules, ``top_k`` is unchanged (``--method merge``
  below top_k lowers it), the ``pruning`` slot
  records what was kept and why, ``skipping`` holds the calibrated betas, and a ``prune`` lineage
  stage is appended;
* a **stock HF MoE checkpoint** (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) is written with
  ``save_pretrained`` (config ``num_local_experts`` / ``num_experts`` updated), its tokenizer files
  copied byte for byte, the lineage in ``moe_app_lineage.json``; it loads in stock transformers.

All validation (a dense model, ``keep >= E`` or ``keep < top_k``, skipping on a stock model,
empty calibration data) happens before any output exists, and the write itself is atomic, so a
refused or failed run leaves nothing behind.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_app.checkpoint.hub import check_local_model_dir, load_tokenizer
from moe_app.checkpoint.pretrained import read_lineage, save_pretrained_dir
from moe_app.core.models.layers import find_decoder_layers
from moe_app.core.models.views import model_kind, moe_layer_views
from moe_app.core.pruning.calibration import CalibrationConfig, calibration_batches, eval_loss
from moe_app.core.pruning.drop import check_mlp_drop
from moe_app.core.pruning.experts import ExpertPruneConfig, check_prunable, prune_experts
from moe_app.core.pruning.skipping import apply_skipping, calibrate_skipping, skip_rates
from moe_app.core.pruning.slim import SlimConfig, check_slimmable, slim_experts
from moe_app.core.spec import spec_of, utc_now
from moe_app.errors import ConfigError, UnsupportedModelError

logger = logging.getLogger("moe_app.core.pruning")


@dataclass
class PruneJob:
    """Everything ``moe-app prune`` can do to one checkpoint (each part optional, applied in this order)."""

    experts: ExpertPruneConfig | None = None
    """Expert pruning (``None``: keep every expert)."""
    block_drop: int = 0
    """Decoder blocks to delete (highest ``cos(h_i, h_{i+1})`` first)."""
    layer_drop: int = 0
    """MoE sublayers to drop (highest ``cos(h, h + MoE(LN h))`` first)."""
    skipping: bool = False
    """Calibrate and store dynamic-skipping betas (moe-app checkpoints only)."""
    slim: SlimConfig | None = None
    """Expert slimming (wanda / sparsegpt / 2:4 inside every expert), after the drops, before skipping."""
    quantize: str | None = None
    """``nf4`` / ``int8``: bitsandbytes weight-only quantisation of the expert linears, at write time
    (stock HF checkpoints with nn.Linear experts only; see :mod:`moe_app.checkpoint.quantized`)."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    """Calibration data."""
    eval_before_after: bool = True
    """Report the calibration-data loss before and after (one extra forward pass each)."""

    def __post_init__(self) -> None:
        if self.block_drop < 0 or self.layer_drop < 0:
            raise ConfigError("--block_drop and --layer_drop must be >= 0", fix="pass a count such as 1")
        if self.experts is None and not (
            self.block_drop or self.layer_drop or self.skipping or self.slim or self.quantize
        ):
            raise ConfigError(
                "nothing to do: no --keep, --skipping, --layer_drop, --block_drop, --slim or --quantize given",
                fix="pass e.g. --keep 4 --method enumerate",
            )


def validate_job(model: nn.Module, job: PruneJob, where: str) -> str:
    """Refuse impossible jobs before any work; return the model kind (``moe-app`` or ``hf``)."""
    kind = model_kind(model)
    if kind == "dense":
        raise UnsupportedModelError(
            "the checkpoint has no MoE layers (a dense model)",
            where=where,
            fix="prune an MoE checkpoint (moe-app upcycle output, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)",
        )
    if job.experts is not None:
        check_prunable(model, job.experts.keep, where, method=job.experts.method)
    if job.skipping and kind == "hf":
        raise UnsupportedModelError(
            "dynamic expert skipping cannot be stored in a stock transformers checkpoint "
            "(its routers have no skipping threshold)",
            where=where,
            fix="run without --skipping, or prune a moe-app checkpoint (moe-app keeps betas in moe_app.json)",
        )

    if job.skipping and any(v.kind in ("pesc", "lora-experts") for _, v in moe_layer_views(model)):
        raise UnsupportedModelError(
            "dynamic skipping of PESC / LoRA-expert blocks is not stored by moe-app checkpoints yet "
            "(moe_app.json's `skipping` is read from SparseMoeBlock routers only)",
            where=where,
            fix="run without --skipping, or merge the experts first (merge_pesc) and prune the merged model",
        )

    if job.layer_drop:
        check_mlp_drop(model)
    if job.slim is not None:
        check_slimmable(model, where, job.slim)
    if job.quantize:
        from moe_app.checkpoint.quantized import check_quantizable

        check_quantizable(model, kind, job.quantize, where)

    n_layers = len(find_decoder_layers(model)[1])
    if job.block_drop >= n_layers:
        raise ConfigError(
            f"--block_drop {job.block_drop} would delete all {n_layers} decoder blocks",
            fix=f"drop at most {n_layers - 1}",
        )
    n_moe = len(moe_layer_views(model))
    if job.layer_drop > n_moe:
        raise ConfigError(
            f"--layer_drop {job.layer_drop} exceeds the {n_moe} MoE sublayers", fix=f"use <= {n_moe}"
        )
    return kind


def run_job(model: nn.Module, batches: list[dict[str, Any]], job: PruneJob) -> dict[str, Any]:
    """Apply ``job`` to ``model`` in place; return a JSON-able report."""
    from moe_app.core.pruning.drop import (
        block_drop_scores,
        drop_blocks,
        drop_entry,
        drop_mlp_layers,
        layer_drop_how,
        layer_drop_scores,
        most_similar,
    )

    report: dict[str, Any] = {"calibration": asdict(job.calibration)}
    if job.eval_before_after:
        report["eval_loss_before"] = eval_loss(model, batches)
    if job.experts is not None:
        report["experts"] = prune_experts(model, batches, job.experts).to_dict()
    if job.block_drop:
        scores = block_drop_scores(model, batches)
        drop = most_similar(scores, job.block_drop)
        drop_blocks(model, drop)
        report["block_drop"] = drop_entry("block drop: removed decoder blocks", scores, drop)
    if job.layer_drop:
        scores = layer_drop_scores(model, batches)
        drop = most_similar(scores, job.layer_drop)
        how = layer_drop_how(model)
        drop_mlp_layers(model, drop)
        report["layer_drop"] = drop_entry(f"layer drop: {how} MoE sublayers", scores, drop)
    if job.slim is not None:
        report["slim"] = slim_experts(model, batches, job.slim).to_dict()
    if job.skipping:
        betas = calibrate_skipping(model, batches)
        apply_skipping(model, betas)
        rates = skip_rates(model, batches)
        report["skipping"] = {"betas": {str(k): v for k, v in betas.items()}, "skip_rate": rates}
        logger.info(
            "skipping: betas %s, skip rate %.3f", {k: round(v, 4) for k, v in betas.items()}, rates["all"]
        )
        spec = spec_of(model)
        if spec is not None:
            spec.pruning = {**(spec.pruning or {}), "skipping_calibration": report["skipping"]}
    if job.eval_before_after:
        report["eval_loss_after"] = eval_loss(model, batches)
    return report


def write_pruned(
    model: nn.Module,
    out: str | Path,
    *,
    kind: str,
    source_dir: str | Path | None = None,
    tokenizer: Any = None,
    stage_config: dict[str, Any] | None = None,
    lineage: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``model`` as the same kind of checkpoint it was read as (atomic)."""
    out = Path(out)
    stage_config = stage_config or {}
    if kind == "moe-app":
        from moe_app.checkpoint.model_dir import save_moe_checkpoint

        return save_moe_checkpoint(
            model,
            out,
            tokenizer=tokenizer,
            tokenizer_dir=source_dir if tokenizer is None else None,
            stage="prune",
            stage_config=stage_config,
            lineage=lineage,
        )

    previous = list(lineage) if lineage is not None else (read_lineage(source_dir) if source_dir else [])
    entry = {"stage": "prune", "time": utc_now(), "config": stage_config}
    return save_pretrained_dir(
        model,
        out,
        tokenizer=tokenizer,
        tokenizer_dir=source_dir,
        lineage=[*previous, entry],
        max_shard_size="5GB",
    )


def checked_paths(ckpt: str | Path, out: str | Path, overwrite: bool) -> tuple[Path, Path]:
    """``(ckpt, out)`` as paths, once ``ckpt`` is a complete local dir and ``out`` may be written."""
    src, out = Path(ckpt).expanduser(), Path(out).expanduser()
    check_local_model_dir(src)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            "output dir exists and is not empty", where=str(out), fix="pass --overwrite or a new --out"
        )
    if out.resolve() == src.resolve():
        raise ConfigError("--out is the checkpoint dir", where="--out", fix="write to a new directory")
    return src, out


def own_aligned_memory(model: nn.Module) -> nn.Module:
    """Copy into fresh memory every parameter and buffer that transformers left in its memory-mapped
    safetensors file, returning ``model``.

    A mapped tensor starts wherever the file puts it (8-byte aligned), a fresh one on the allocator's
    64 bytes, and BLAS picks its code path by alignment, so the same product can differ in the last
    bit. The layer-streamed path reads every tensor into fresh memory
    (:func:`~moe_app.checkpoint.safetensors_io.read_tensor`); this gives the in-memory path the same
    operands, so one job reports the same losses either way. Tied parameters stay tied (the
    ``Parameter`` keeps its identity; only its data moves)."""
    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if p.data_ptr() % 64:
                    p.data = p.data.clone()
            for name, b in module.named_buffers(recurse=False):
                if b.data_ptr() % 64:
                    module._buffers[name] = b.clone()
    return model


def prune_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    job: PruneJob,
    overwrite: bool = False,
    *,
    streaming: str = "auto",
    memory_budget: int | str | None = None,
) -> dict[str, Any]:
    """``moe-app prune``: read ``ckpt``, apply ``job``, write ``out`` (same kind); return the report.

    ``streaming``: ``auto`` prunes one decoder layer at a time (:mod:`moe_app.checkpoint.prune_streaming`)
    when the checkpoint is larger than ``memory_budget`` (default: half the available memory) and the
    job allows it, ``on`` always does (refusing what it cannot do), ``off`` loads the whole model.
    """
    import moe_app

    src, out = checked_paths(ckpt, out, overwrite)
    from moe_app.checkpoint.prune_streaming import prune_checkpoint_streaming, use_streaming

    if use_streaming(src, job, streaming, memory_budget):
        return prune_checkpoint_streaming(src, out, job, overwrite, memory_budget=memory_budget)
    tokenizer = load_tokenizer(src, required=True)
    model = own_aligned_memory(moe_app.load_model(src))
    kind = validate_job(model, job, str(src))
    batches = calibration_batches(tokenizer, job.calibration)
    report = run_job(model, batches, job)
    config = {
        "source": str(src),
        "experts": asdict(job.experts) if job.experts is not None else None,
        "block_drop": job.block_drop,
        "layer_drop": job.layer_drop,
        "skipping": job.skipping,
        "slim": asdict(job.slim) if job.slim is not None else None,
        "quantize": job.quantize,
        "calibration": asdict(job.calibration),
        "eval_loss_before": report.get("eval_loss_before"),
        "eval_loss_after": report.get("eval_loss_after"),
    }
    if job.quantize:  # last: a storage format, written through transformers' own bitsandbytes loader
        from moe_app.checkpoint.quantized import write_quantized

        qmodel = write_quantized(
            model,
            out,
            job.quantize,
            lambda d: write_pruned(model, d, kind=kind, source_dir=src, stage_config=config),
        )
        if job.eval_before_after:
            report["eval_loss_quantized"] = eval_loss(own_aligned_memory(qmodel), batches)
    else:
        write_pruned(model, out, kind=kind, source_dir=src, stage_config=config)
    report["out"] = str(out)
    report["kind"] = kind
    return report


__all__ = ["PruneJob", "prune_checkpoint", "run_job", "validate_job", "write_pruned"]
