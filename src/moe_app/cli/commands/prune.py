"""``moe-app prune``: expert pruning / skipping / layer and block drop of a checkpoint, offline.

Works on moe-app checkpoints and on stock HF MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)
and writes the same kind it read (see :mod:`moe_app.checkpoint.pruning`). Examples::

    moe-app prune --ckpt runs/tiny-upcycle/model --out runs/pruned-r4 --keep 4 --method enumerate
    moe-app prune --ckpt M --out O --keep 6 --method reap --data builtin:arithmetic   # task-specific
    moe-app prune --ckpt M --out O --keep 4 --progressive --skipping                  # + dynamic skipping
    moe-app prune --ckpt M --out O --block_drop 1                                     # delete a decoder block

Steps run in this order: expert pruning (``--keep``), block drop, layer drop, skipping calibration.
``--data`` is ``builtin`` (the built-in suite), ``builtin:<domain>`` or a local
jsonl/json/parquet/csv file or directory; the tokenizer comes from ``--ckpt``. Bad input (a dense
checkpoint, ``--keep`` >= E or < top_k, ``--skipping`` on a stock HF checkpoint, empty data) exits
with code 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging

HELP = (
    "prune experts (enumeration / frequency / REAP / expert drop), calibrate skipping, drop layers or blocks"
)


def build_parser(parser: argparse.ArgumentParser) -> None:
    from moe_app.core.pruning.enumerate import FALLBACKS
    from moe_app.core.pruning.experts import PRUNE_METHODS

    parser.add_argument("--ckpt", required=True, help="moe-app checkpoint dir or stock HF MoE model dir")
    parser.add_argument(
        "--out", required=True, help="output dir (same kind of checkpoint; written atomically)"
    )
    parser.add_argument(
        "--keep", type=int, default=None, help="experts kept per MoE layer (r); omit to keep all"
    )
    parser.add_argument(
        "--method", choices=PRUNE_METHODS, default="enumerate", help="expert selection method"
    )
    parser.add_argument(
        "--scope", choices=("layer", "global"), default="layer", help="global: expert_drop across layers"
    )
    parser.add_argument(
        "--data", default="builtin", help="calibration: builtin, builtin:<domain> or a file path"
    )
    parser.add_argument("--calib_samples", type=int, default=64, help="calibration sequences (default 64)")
    parser.add_argument("--max_length", type=int, default=256, help="tokens per calibration sequence")
    parser.add_argument("--batch_size", type=int, default=8, help="calibration sequences per forward")
    parser.add_argument("--progressive", action="store_true", help="recompute inputs through pruned layers")
    parser.add_argument(
        "--max_subsets", type=int, default=20000, help="enumerate all subsets while C(E, r) <= this"
    )
    parser.add_argument("--fallback", choices=FALLBACKS, default="sample", help="above --max_subsets")
    parser.add_argument("--skipping", action="store_true", help="calibrate dynamic skipping (moe-app only)")
    parser.add_argument("--layer_drop", type=int, default=0, help="MoE sublayers to drop (He et al.)")
    parser.add_argument("--block_drop", type=int, default=0, help="decoder blocks to delete (He et al.)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration choice and sampling")
    parser.add_argument("--no_eval", action="store_true", help="skip the before/after calibration loss")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--report", default=None, help="also write the JSON report to this file")


def run(args: argparse.Namespace) -> int:
    from moe_app.checkpoint.pruning import PruneJob, prune_checkpoint
    from moe_app.core.pruning.calibration import CalibrationConfig
    from moe_app.core.pruning.enumerate import EnumerationConfig
    from moe_app.core.pruning.experts import ExpertPruneConfig

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
        )
    job = PruneJob(
        experts=experts,
        block_drop=args.block_drop,
        layer_drop=args.layer_drop,
        skipping=args.skipping,
        calibration=CalibrationConfig(
            data=args.data,
            num_samples=args.calib_samples,
            max_length=args.max_length,
            batch_size=args.batch_size,
            seed=args.seed,
        ),
        eval_before_after=not args.no_eval,
    )
    report = prune_checkpoint(args.ckpt, args.out, job, overwrite=args.overwrite)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    line = f"[moe-app] pruned {args.ckpt} -> {report['out']} ({report['kind']} checkpoint)"
    if "eval_loss_before" in report:
        line += f"; calibration loss {report['eval_loss_before']:.4f} -> {report['eval_loss_after']:.4f}"
    if "skipping" in report:
        line += f"; skip rate {report['skipping']['skip_rate']['all']:.3f}"
    print(line)
    return 0
