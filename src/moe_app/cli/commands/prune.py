"""``moe-app prune``: expert pruning / skipping / layer and block drop of a checkpoint, offline.

Works on moe-app checkpoints and on stock HF MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)
and writes the same kind it read (see :mod:`moe_app.checkpoint.pruning`). Examples::

    moe-app prune --ckpt runs/tiny-upcycle/model --out runs/pruned-r4 --keep 4 --method enumerate
    moe-app prune --ckpt M --out O --keep 6 --method reap --data builtin:arithmetic   # task-specific
    moe-app prune --ckpt M --out O --keep 4 --progressive --skipping                  # + dynamic skipping
    moe-app prune --ckpt M --out O --block_drop 1                                     # delete a decoder block
    moe-app prune --ckpt M --out O --keep 4 --method merge                            # HC-SMoE merging

``--method merge`` (HC-SMoE, arXiv 2410.08589) clusters each layer's experts by their average
output (average linkage, ``--merge_distance``) into ``--keep`` groups and merges each group by a
routing-frequency-weighted average of its weights and router rows (``--merge_router``); ``--keep``
may then be below top_k (top_k is lowered).

Expert slimming (He et al. 2024, arXiv 2406.02500): ``--slim wanda|sparsegpt --sparsity S`` zeroes the
fraction ``S`` of every routed expert's weight rows from the activations each expert receives on the
calibration data (Wanda, arXiv 2306.11695; SparseGPT, arXiv 2301.00774); ``--slim 2:4`` keeps 2 of
every 4 (Wanda scores). ``--quantize nf4|int8`` writes the expert linears in bitsandbytes format with
transformers' ``quantization_config`` (stock checkpoints whose experts are nn.Linear, e.g. Qwen2-MoE's
shared expert; fused 3-D experts -- Mixtral, Qwen3-MoE, OLMoE, moe-app -- are refused: transformers
5.24 cannot load them quantised). Example::

    moe-app prune --ckpt M --out O --keep 4 --layer_drop 1 --slim wanda --sparsity 0.5

Checkpoints larger than ``--memory_budget`` (default: half the available memory) are pruned one
decoder layer at a time (``--streaming auto``; ``on`` forces it, ``off`` loads the whole model):
layer-wise, progressive or global expert pruning by any method, block drop, layer drop, ``--slim``,
skipping calibration and ``--quantize``, with the same result as in memory
(``checkpoint/prune_streaming.py``; the drops and global expert drop add a scoring pass each, and
``--keep`` with a drop writes the expert-pruned checkpoint to a temporary directory next to
``--out`` first: disk for one more checkpoint).

Steps run in this order: expert pruning (``--keep``), block drop, layer drop, expert slimming
(``--slim``), skipping calibration, quantisation (``--quantize``, at write time). Coarse to fine: whole
units go first so slimming calibrates only the surviving experts on the inputs the smaller model
produces; skipping betas are measured on the final float model; quantisation is a storage format.
``--data`` is ``builtin`` (the built-in suite), ``builtin:<domain>`` or a local
jsonl/json/parquet/csv file or directory; the tokenizer comes from ``--ckpt``. Bad input (a dense
checkpoint, ``--keep`` >= E or < top_k, ``--skipping`` on a stock HF checkpoint, empty data) exits
with code 2 and writes nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Literal

from jsonargparse import ArgumentParser, Namespace

from moe_app.cli.commands import OFFLINE_COMMANDS
from moe_app.cli.commands._options import add_options, build
from moe_app.core.pruning.calibration import CalibrationConfig
from moe_app.core.pruning.enumerate import FALLBACKS, EnumerationConfig
from moe_app.core.pruning.experts import PRUNE_METHODS
from moe_app.core.pruning.merge import MERGE_DISTANCES, MERGE_ROUTERS
from moe_app.core.pruning.slim import SLIM_METHODS

# = moe_app.checkpoint.quantized.QUANT_SCHEMES (not imported here: the parser stays light)
QUANT_SCHEMES = ("nf4", "int8")

HELP = OFFLINE_COMMANDS["prune"]


@dataclass
class PruneOptions:
    """What to prune, on which calibration data, and where to write it."""

    ckpt: str
    """moe-app checkpoint dir or stock HF MoE model dir."""
    out: str
    """Output dir (same kind of checkpoint; written atomically)."""
    keep: int | None = None
    """Experts kept per MoE layer (``r``); omit to keep all."""
    method: Literal[PRUNE_METHODS] = "enumerate"  # type: ignore[valid-type]
    """Expert selection method (``merge``: HC-SMoE expert merging)."""
    scope: Literal["layer", "global"] = "layer"
    """``global``: expert_drop across layers."""
    data: str = CalibrationConfig.data
    """Calibration: ``builtin``, ``builtin:<domain>`` or a local jsonl/json/parquet/csv file or dir."""
    calib_samples: int = CalibrationConfig.num_samples
    """Calibration sequences."""
    max_length: int = CalibrationConfig.max_length
    """Tokens per calibration sequence."""
    batch_size: int = CalibrationConfig.batch_size
    """Calibration sequences per forward."""
    progressive: bool = False
    """Recompute inputs through the layers already pruned."""
    max_subsets: int = EnumerationConfig.max_subsets
    """Enumerate all subsets while ``C(E, r)`` is at most this."""
    fallback: Literal[FALLBACKS] = EnumerationConfig.fallback  # type: ignore[valid-type]
    """Selection above ``--max_subsets``."""
    merge_distance: Literal[MERGE_DISTANCES] = "euclidean"  # type: ignore[valid-type]
    """``--method merge``: distance between the experts' average outputs (average linkage)."""
    merge_router: Literal[MERGE_ROUTERS] = "average"  # type: ignore[valid-type]
    """``--method merge``: merged router row, frequency-weighted ``average`` or the ``dominant`` member's."""
    skipping: bool = False
    """Calibrate dynamic skipping (moe-app checkpoints only)."""
    slim: Literal[SLIM_METHODS] | None = None  # type: ignore[valid-type]
    """Expert slimming: ``wanda`` / ``sparsegpt`` (with ``--sparsity``) or ``2:4`` inside every expert."""
    sparsity: float | None = None
    """``--slim wanda|sparsegpt``: fraction of each expert weight row zeroed, 0 < S < 1."""
    quantize: Literal[QUANT_SCHEMES] | None = None  # type: ignore[valid-type]
    """bitsandbytes ``nf4`` / ``int8`` of the expert linears (stock checkpoints with nn.Linear experts)."""
    layer_drop: int = 0
    """MoE sublayers to drop (He et al.)."""
    block_drop: int = 0
    """Decoder blocks to delete (He et al.)."""
    seed: int = 0
    """Seed of the calibration choice and sampling."""
    eval: bool = True
    """Report the calibration loss before and after (``--no_eval`` skips it)."""
    overwrite: bool = False
    """Replace ``--out`` if it exists."""
    streaming: Literal["auto", "on", "off"] = "auto"
    """Prune one decoder layer at a time: ``auto`` when the checkpoint exceeds ``--memory_budget``."""
    memory_budget: str | None = None
    """Memory for ``--streaming auto`` (e.g. ``8GB``); default: half of the available memory."""
    report: str | None = None
    """Also write the JSON report to this file."""


def build_parser(parser: ArgumentParser) -> None:
    add_options(parser, PruneOptions)


def _slim_config(args: PruneOptions):
    from moe_app.core.pruning.slim import SlimConfig
    from moe_app.errors import ConfigError

    if args.slim is None:
        if args.sparsity is not None:
            raise ConfigError(
                "--sparsity without --slim", where="--sparsity", fix="add --slim wanda (or sparsegpt)"
            )
        return None
    return SlimConfig(method=args.slim, sparsity=args.sparsity)


def run(cfg: Namespace) -> int:
    from moe_app.checkpoint.pruning import PruneJob, prune_checkpoint
    from moe_app.core.pruning.calibration import CalibrationConfig
    from moe_app.core.pruning.enumerate import EnumerationConfig
    from moe_app.core.pruning.experts import ExpertPruneConfig
    from moe_app.core.pruning.merge import MergeConfig

    args = build(PruneOptions, cfg)
    logging.basicConfig(level=logging.INFO, format="[moe-app] %(message)s")
    experts = None
    if args.keep is not None:
        experts = ExpertPruneConfig(
            keep=args.keep,
            method=args.method,
            progressive=args.progressive,
            scope=args.scope,
            enumeration=EnumerationConfig(
                max_subsets=args.max_subsets, fallback=args.fallback, seed=args.seed
            ),
            merge=MergeConfig(distance=args.merge_distance, router=args.merge_router),
        )
    job = PruneJob(
        experts=experts,
        block_drop=args.block_drop,
        layer_drop=args.layer_drop,
        skipping=args.skipping,
        slim=_slim_config(args),
        quantize=args.quantize,
        calibration=CalibrationConfig(
            data=args.data,
            num_samples=args.calib_samples,
            max_length=args.max_length,
            batch_size=args.batch_size,
            seed=args.seed,
        ),
        eval_before_after=args.eval,
    )
    report = prune_checkpoint(
        args.ckpt,
        args.out,
        job,
        overwrite=args.overwrite,
        streaming=args.streaming,
        memory_budget=args.memory_budget,
    )
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    mode = report.get("mode", "in-memory")
    line = f"[moe-app] pruned {args.ckpt} -> {report['out']} ({report['kind']} checkpoint, {mode})"
    if "eval_loss_before" in report:
        line += f"; calibration loss {report['eval_loss_before']:.4f} -> {report['eval_loss_after']:.4f}"
    if "slim" in report:
        line += f"; expert sparsity {report['slim']['expert_sparsity']:.3f} ({report['slim']['method']})"
    if "eval_loss_quantized" in report:
        line += f"; quantised loss {report['eval_loss_quantized']:.4f}"
    if "skipping" in report:
        line += f"; skip rate {report['skipping']['skip_rate']['all']:.3f}"
    print(line)
    return 0
