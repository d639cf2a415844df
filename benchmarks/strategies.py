#!/usr/bin/env python
"""FSDP against DDP on the same 2-process CPU fit: per-rank training state and step time.

Claim: moe-app's ``fsdp`` (FSDP2 on decoder layers) holds about ``1 / world_size`` of the
parameters, gradients and AdamW state on each rank, against DDP's full replica, and trains the
same model (the equivalence is a test: ``tests/test_fsdp.py``). What it costs is communication:
every layer's weights are all-gathered in forward and again in backward, and gradients are
reduce-scattered. On a 2-core CPU with gloo that cost dominates the step, so the step-time ratio
here is an upper bound, not a GPU figure.

Both strategies run the tiny copy-upcycling recipe (``configs/tiny/upcycle.yaml``) from the same
random dense LLaMA (built in a temp dir; ``--hidden`` / ``--layers`` size it) through the real
CLI, interleaved, ``--repeats`` times; step times are medians after ``--warmup`` steps.

    python benchmarks/strategies.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_dense(out: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from moe_app.core.data.tokenizer import suite_tokenizer

    tok = suite_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=max(4, hidden // 64),
        num_key_value_heads=max(2, hidden // 128),
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def fit(strategy: str, dense: Path, root: Path, args: argparse.Namespace) -> list[dict]:
    cmd = [
        sys.executable, "-m", "moe_app", "fit", "-c", "configs/tiny/upcycle.yaml",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", strategy,
        "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
        "--checkpoint.save_last", "false", "--model.init_args.save_dir", "null",
        "--model.init_args.source.pretrained", str(dense),
        "--model.init_args.upcycle.num_experts", str(args.experts),
        "--data.init_args.batch_size", str(args.batch_size), "--data.init_args.max_length", str(args.seq),
        "--data.init_args.sources", '[{"name": "suite", "builtin": "all", "builtin_train_size": 512}]',
        "--trainer.callbacks+=benchmarks._strategy_probe.StrategyProbe",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{strategy} fit failed:\n{res.stderr[-3000:]}")
    return [json.loads((root / f"strategy_rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke-sized: 1 repeat, 4 steps, hidden 64")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps, args.warmup, args.hidden, args.layers = 1, 4, 1, 64, 2

    runs: dict[str, list[list[dict]]] = {"ddp": [], "fsdp": []}
    with tempfile.TemporaryDirectory() as tmp:
        dense = build_dense(Path(tmp) / "dense", args.hidden, args.layers)
        for i in range(args.repeats):
            for strategy in runs:  # interleaved: both see the same machine load
                runs[strategy].append(fit(strategy, dense, Path(tmp) / f"{strategy}-{i}", args))

    def state_mb(rank: dict) -> float:
        return (rank["param_bytes"] + rank["grad_bytes"] + rank["optimizer_bytes"]) / 2**20

    summary = {}
    for strategy, reps in runs.items():
        steps = [s for rep in reps for rank in rep for s in rank["steps_s"][args.warmup :]]
        summary[strategy] = {
            "step_s_median": statistics.median(steps),
            "state_mb_per_rank": max(state_mb(rank) for rank in reps[0]),
            "params_mb_per_rank": max(rank["param_bytes"] for rank in reps[0]) / 2**20,
            "peak_rss_mb_per_rank": statistics.median(max(r["peak_rss_mb"] for r in rep) for rep in reps),
        }
    ratio = {
        "step_time": summary["fsdp"]["step_s_median"] / summary["ddp"]["step_s_median"],
        "training_state_per_rank": summary["fsdp"]["state_mb_per_rank"] / summary["ddp"]["state_mb_per_rank"],
        "peak_rss_per_rank": summary["fsdp"]["peak_rss_mb_per_rank"] / summary["ddp"]["peak_rss_mb_per_rank"],
    }
    from _common import cpu_model

    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.python_version()}, 2 processes (gloo), 1 thread each"
    )
    print(
        f"model: hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-2; "
        f"batch {args.batch_size} x {args.seq} per rank; {args.steps} steps x {args.repeats} repeats"
    )
    for strategy, s in summary.items():
        print(
            f"{strategy:>5}: step {s['step_s_median'] * 1e3:7.1f} ms | params+grads+AdamW per rank "
            f"{s['state_mb_per_rank']:7.1f} MB | peak RSS per rank {s['peak_rss_mb_per_rank']:7.0f} MB"
        )
    print(
        f"fsdp / ddp: training state per rank {ratio['training_state_per_rank']:.2f}x, "
        f"step time {ratio['step_time']:.2f}x, peak RSS {ratio['peak_rss_per_rank']:.2f}x"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"config": vars(args) | {"json": str(args.json)}, "summary": summary, "ratio": ratio},
                indent=2,
            )
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
