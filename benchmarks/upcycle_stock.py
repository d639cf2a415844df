"""Claim: `moe-app upcycle --format mixtral` (one streaming pass) beats upcycle + export (two passes).

Generates a sharded random dense LLaMA (default: hidden 512, 8 layers, ~140 MB fp32), then writes
the same stock Mixtral checkpoint two ways, each in a fresh subprocess, 3 times each (interleaved):

* one-pass: ``upcycle_to_stock_streaming`` (dense shards -> Mixtral shards, tensor by tensor);
* two-pass: ``upcycle_checkpoint_streaming`` (dense -> moe-app checkpoint) then ``export_checkpoint``
  (that checkpoint -> Mixtral, layer by layer from its memory-mapped shards), i.e. ``moe-app upcycle``
  + ``moe-app export``. ``--in_memory_export`` makes the second pass load the whole model first
  (the export before it streamed).

Each child reports its conversion wall time (after imports) and its peak RSS (``VmHWM``: benchmarks/_memory.py) and
after-import baseline. Printed: the medians and the ratios one-pass / two-pass.

    python benchmarks/upcycle_stock.py                 # ~1-2 minutes on 2 CPUs
    python benchmarks/upcycle_stock.py --layers 4 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_model, make_dense_source, rss_mb
from _memory import own_peak_mb

MB = 1024**2


def child(
    mode: str, src: str, work: str, experts: int, top_k: int, shard: str, in_memory_export: bool = False
) -> None:
    import torch  # noqa: F401  (imports are part of the baseline)
    import transformers  # noqa: F401

    from moe_app.checkpoint.export import export_checkpoint
    from moe_app.checkpoint.streaming import upcycle_checkpoint_streaming, upcycle_to_stock_streaming
    from moe_app.core.upcycling import UpcycleConfig

    baseline = rss_mb()
    cfg = UpcycleConfig(method="copy", num_experts=experts, top_k=top_k)
    out = Path(work) / f"{mode}-out"
    t0 = time.perf_counter()
    if mode == "one-pass":
        upcycle_to_stock_streaming(src, out, cfg, "mixtral", max_shard_size=shard)
    else:
        mid = Path(work) / "moe-app-mid"
        upcycle_checkpoint_streaming(src, mid, cfg, max_shard_size=shard)
        export_checkpoint(mid, out, "mixtral", max_shard_size=shard, streaming=not in_memory_export)
        shutil.rmtree(mid)
    seconds = time.perf_counter() - t0
    print(json.dumps({"baseline_mb": baseline, "peak_mb": own_peak_mb(), "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--shard", default="50MB", help="input and output shard size")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--in_memory_export", action="store_true", help="two-pass: load the model to export it")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.src, args.work, args.experts, args.top_k, args.shard, args.in_memory_export)
        return

    work = Path(tempfile.mkdtemp(prefix="moe-stock-bench-"))
    try:
        src = work / "dense"
        make_dense_source(src, args.layers, args.hidden, args.ffn, args.vocab, args.shard)
        src_mb = sum(p.stat().st_size for p in src.glob("*.safetensors")) / MB
        runs: dict[str, list[dict]] = {"one-pass": [], "two-pass": []}
        out_mb = 0.0
        for _ in range(args.repeats):
            for mode in runs:
                cmd = [sys.executable, __file__, "--child", mode, "--src", str(src), "--work", str(work)]
                cmd += ["--experts", str(args.experts), "--top_k", str(args.top_k), "--shard", args.shard]
                cmd += ["--in_memory_export"] if args.in_memory_export else []
                env = {**os.environ, "OMP_NUM_THREADS": "2"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                out = work / f"{mode}-out"
                out_mb = sum(p.stat().st_size for p in out.glob("*.safetensors")) / MB
                shutil.rmtree(out)
        med = {
            mode: {
                key: statistics.median(r[key] for r in rs) for key in ("seconds", "peak_mb", "baseline_mb")
            }
            for mode, rs in runs.items()
        }
        for m in med.values():
            m["footprint_mb"] = m["peak_mb"] - m["baseline_mb"]
        one, two = med["one-pass"], med["two-pass"]
        print(
            f"machine: {cpu_model()}, {os.cpu_count()} CPUs; copy upcycling E={args.experts} top-{args.top_k}"
        )
        print(
            f"source: {src_mb:.0f} MB fp32 ({args.layers} layers, hidden {args.hidden}, d_ff {args.ffn}); "
            f"Mixtral output {out_mb:.0f} MB; shards {args.shard}; median of {args.repeats}"
        )
        for name, m in (("one-pass", one), ("two-pass", two)):
            print(
                f"{name:>9}: {m['seconds']:.2f} s, peak RSS {m['peak_mb']:.0f} MB "
                f"(after-import baseline {m['baseline_mb']:.0f} MB, conversion {m['footprint_mb']:.0f} MB)"
            )
        print(f"wall time one-pass / two-pass: {one['seconds'] / two['seconds']:.2f}x")
        print(f"peak RSS one-pass / two-pass: {one['peak_mb'] / two['peak_mb']:.2f}x")
        print(f"conversion footprint one-pass / two-pass: {one['footprint_mb'] / two['footprint_mb']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
