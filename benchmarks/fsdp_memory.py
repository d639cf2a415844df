#!/usr/bin/env python
"""Peak host memory per rank: FSDP with sharded loading against DDP, on an upcycled real model.

Claim: under ``--trainer.strategy fsdp`` no rank builds the full upcycled model. Rank 0 reads the
dense checkpoint and upcycles it one decoder layer at a time while the shards fill; rank 1 builds
the model on the ``meta`` device and only ever allocates its shards. So the peak resident memory
(``ru_maxrss``) of every FSDP rank is well under a DDP rank's, which holds the whole upcycled model,
its gradients and DDP's gradient buckets. ``fsdp_eager`` is the loading FSDP had before (every
rank upcycles the whole model, then shards it), measured in the same run.

Setup (what is measured): SmolLM2-135M-Instruct (the cached GGUF, dequantised once to a float32
safetensors dir) copy-upcycled to ``--experts`` experts top-2 on the fly in ``moe-app fit``, 2 CPU
processes (gloo), routers and experts trainable, attention and embeddings frozen, and plain SGD
without momentum (no optimiser state: two AdamW replicas of this model do not fit a 24 GiB host;
even with SGD two DDP replicas need ~17 GB, so ``--ddp-devices 1`` measures the DDP rank alone),
``--steps`` steps of batch ``--batch-size`` x ``--seq`` tokens. ``--random HIDDEN:LAYERS`` runs the
same on a random LLaMA of that size instead (``--tiny``: 256:4, a smoke test of the script).

    flock /work/notes/bigmem.lock python benchmarks/fsdp_memory.py [--repeats 3] [--json PATH]
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
MODULES = {
    "ddp": ("ddp", "benchmarks._strategy_probe.SgdMoeLMModule"),
    "fsdp": ("fsdp", "benchmarks._strategy_probe.SgdMoeLMModule"),
    "fsdp_eager": ("fsdp", "benchmarks._strategy_probe.EagerSgdMoeLMModule"),
}


def dense_source(args: argparse.Namespace, tmp: Path) -> Path:
    """The dense checkpoint dir: a random tiny model (``--tiny``), or the GGUF saved once as float32."""
    if args.random:
        from strategies import build_dense

        hidden, layers = (int(v) for v in args.random.split(":"))
        return build_dense(tmp / "dense", hidden=hidden, layers=layers)
    out = args.cache_dir
    if (out / "config.json").is_file():
        return out
    from moe_app.checkpoint.gguf import GGUF_MODELS
    from moe_app.checkpoint.hub import load_hf_causal_lm
    from moe_app.cli.commands.fetch import fetch

    gguf = args.model or fetch(GGUF_MODELS["smollm2"])
    from safetensors.torch import save_file

    from moe_app.checkpoint.model_dir import unique_state_dict

    model = load_hf_causal_lm(gguf, dtype="float32")
    staging = out.with_name(out.name + ".tmp")
    staging.mkdir(parents=True, exist_ok=True)
    # transformers refuses to save a model it dequantised from GGUF: write the float weights ourselves
    state = {k: v.contiguous() for k, v in unique_state_dict(model).items()}
    save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    staging.rename(out)  # complete or absent
    return out


def fit(mode: str, dense: Path, root: Path, args: argparse.Namespace) -> list[dict]:
    strategy, module = MODULES[mode]
    devices = args.ddp_devices if mode == "ddp" else 2
    cmd = [
        sys.executable, "-m", "moe_app", "fit", "-c", "configs/tiny/upcycle.yaml",
        "--model.class_path", module,
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.strategy", strategy,
        "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
        "--checkpoint.save_last", "false",
        "--model.init_args.save_dir", "null",
        "--model.init_args.source.pretrained", str(dense), "--model.init_args.source.tokenizer", "builtin",
        "--model.init_args.upcycle.num_experts", str(args.experts),
        "--model.init_args.freeze.attention", "true", "--model.init_args.freeze.embeddings", "true",
        "--model.init_args.freeze.experts", str(args.trainable == "routers").lower(),
        "--model.init_args.optim.lr", "1e-3",
        "--data.init_args.batch_size", str(args.batch_size), "--data.init_args.max_length", str(args.seq),
        "--data.init_args.sources", '[{"name": "suite", "builtin": "all", "builtin_train_size": 64}]',
        "--trainer.callbacks+=benchmarks._strategy_probe.StrategyProbe",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_APP_PROGRESS": "0"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{mode} fit failed:\n{res.stderr[-3000:]}")
    ranks = [json.loads((root / f"strategy_rank{r}.json").read_text()) for r in range(devices)]
    return ranks * (2 // devices)  # one DDP process: every DDP rank holds what it holds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a dense .gguf file or model dir (default: SmolLM2 GGUF)")
    ap.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "moe_app_bench/smollm2-f32"
    )
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="ddp,fsdp,fsdp_eager")
    ap.add_argument(
        "--trainable",
        choices=("experts", "routers"),
        default="experts",
        help="experts: routers + experts train (DDP needs ~8.5 GB per rank for SmolLM2 x 8); routers: only routers",
    )
    ap.add_argument(
        "--random", default=None, metavar="HIDDEN:LAYERS", help="a random LLaMA of this size instead"
    )
    ap.add_argument(
        "--ddp-devices",
        type=int,
        choices=(1, 2),
        default=2,
        help="1: measure the DDP baseline with one process (a DDP rank holds the same replica, gradients "
        "and buckets at any world size) when two DDP replicas do not fit the host",
    )
    ap.add_argument("--tiny", action="store_true", help="--random 256:4 (a smoke test of the script)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.tiny:
        args.random = args.random or "256:4"
    if args.model is not None and Path(args.model).is_dir():
        args.cache_dir = Path(args.model)
    modes = args.modes.split(",")
    if "ddp" not in modes:
        raise SystemExit("--modes must include ddp (the baseline)")

    runs: dict[str, list[list[dict]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        dense = dense_source(args, Path(tmp))
        for i in range(args.repeats):
            for mode in modes:  # interleaved: every mode sees the same machine load
                runs[mode].append(fit(mode, dense, Path(tmp) / f"{mode}-{i}", args))
                print(
                    f"repeat {i}: {mode} peak RSS per rank (MB): "
                    + ", ".join(f"{r['peak_rss_mb']:.0f}" for r in runs[mode][-1]),
                    flush=True,
                )

    summary = {}
    for mode, reps in runs.items():
        summary[mode] = {
            "peak_rss_mb": [statistics.median(rep[r]["peak_rss_mb"] for rep in reps) for r in (0, 1)],
            "load_peak_rss_mb": [
                statistics.median(rep[r]["load_peak_rss_mb"] for rep in reps) for r in (0, 1)
            ],
            "param_mb": [reps[0][r]["param_bytes"] / 2**20 for r in (0, 1)],
            "grad_mb": [reps[0][r]["grad_bytes"] / 2**20 for r in (0, 1)],
        }
    base = summary["ddp"]["peak_rss_mb"]
    ratios = {m: [s["peak_rss_mb"][r] / base[r] for r in (0, 1)] for m, s in summary.items() if m != "ddp"}

    from _common import cpu_model

    src = f"random LLaMA (hidden:layers {args.random})" if args.random else "SmolLM2-135M-Instruct (float32)"
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.python_version()}, 2 processes (gloo)")
    print(
        f"model: {src} copy-upcycled to {args.experts} experts top-2 on the fly; trainable: "
        f"{'routers + experts' if args.trainable == 'experts' else 'routers only'}, "
        f"SGD (no momentum); batch {args.batch_size} x {args.seq}; {args.steps} steps; median of {args.repeats}; "
        f"DDP with {args.ddp_devices} process(es), FSDP with 2"
    )
    for mode, s in summary.items():
        print(
            f"{mode:>10}: peak RSS rank0 {s['peak_rss_mb'][0]:6.0f} MB, rank1 {s['peak_rss_mb'][1]:6.0f} MB "
            f"(at train start {s['load_peak_rss_mb'][0]:.0f} / {s['load_peak_rss_mb'][1]:.0f}) | params per rank "
            f"{s['param_mb'][0]:.0f} MB, grads {s['grad_mb'][0]:.0f} MB"
        )
    for mode, r in ratios.items():
        print(f"{mode} / ddp peak RSS: rank0 {r[0]:.2f}x, rank1 {r[1]:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        cfg = {k: str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"config": cfg, "summary": summary, "ratio": ratios}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
