"""Claim: streaming `moe-app upcycle` needs about one shard of memory, not the whole model.

Generates a multi-shard dense LLaMA checkpoint with random weights (a few hundred MB), then converts
it to an MoE checkpoint twice, each time in a fresh subprocess: (a) streaming, shard by shard
(``upcycle_checkpoint_streaming``), and (b) in memory (``load_hf_causal_lm`` + ``upcycle`` +
``save_moe_checkpoint``). Each child reports its peak RSS (``ru_maxrss``) and its RSS after imports
(torch + transformers), so the conversion's own footprint is ``peak - baseline``. Printed: sizes,
peaks, and the ratios of the streaming footprint to the largest input shard and to the in-memory
footprint (same run, same machine).

    python benchmarks/conversion_memory.py                      # ~330 MB fp32 source, 4 shards
    python benchmarks/conversion_memory.py --layers 8 --shard 50MB --experts 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_dense_source, peak_rss_mb, rss_mb

MB = 1024**2


def child(mode: str, src: str, out: str, experts: int, top_k: int, shard: str) -> None:
    import torch  # noqa: F401  (imports are part of the baseline)
    import transformers  # noqa: F401

    from moe_app.checkpoint.hub import load_hf_causal_lm
    from moe_app.checkpoint.model_dir import save_moe_checkpoint
    from moe_app.checkpoint.streaming import upcycle_checkpoint_streaming
    from moe_app.core.upcycling import UpcycleConfig, upcycle

    baseline = rss_mb()
    cfg = UpcycleConfig(method="copy", num_experts=experts, top_k=top_k)
    t0 = time.perf_counter()
    if mode == "streaming":
        upcycle_checkpoint_streaming(src, out, cfg, max_shard_size=shard)
    else:
        model = upcycle(load_hf_causal_lm(src, dtype="auto"), cfg)
        save_moe_checkpoint(model, out, max_shard_size=shard)
    print(
        json.dumps({"baseline_mb": baseline, "peak_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0})
    )


def dir_size_mb(path: Path, pattern: str = "*.safetensors") -> tuple[float, float]:
    sizes = [p.stat().st_size / MB for p in path.glob(pattern)]
    return sum(sizes), max(sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--shard", default="100MB", help="input and output shard size")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--quick", action="store_true", help="a ~40 MB source instead of ~300 MB (smoke run)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.src, args.out, args.experts, args.top_k, args.shard)
        return

    if args.quick:
        args.layers, args.hidden, args.ffn, args.vocab, args.shard = 2, 512, 2048, 4096, "12MB"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moe-conv-bench-"))
    try:
        src = work / "dense"
        make_dense_source(src, args.layers, args.hidden, args.ffn, args.vocab, args.shard)
        total_in, largest_in = dir_size_mb(src)
        results = {}
        for mode in ("streaming", "in-memory"):
            out = work / mode
            cmd = [sys.executable, __file__, "--child", mode, "--src", str(src), "--out", str(out)]
            cmd += ["--experts", str(args.experts), "--top_k", str(args.top_k), "--shard", args.shard]
            env = {**os.environ, "OMP_NUM_THREADS": "2"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[mode]["out_total_mb"], results[mode]["out_largest_mb"] = dir_size_mb(out)
            shutil.rmtree(out)
        s, m = results["streaming"], results["in-memory"]
        s_foot, m_foot = s["peak_mb"] - s["baseline_mb"], m["peak_mb"] - m["baseline_mb"]
        print(
            f"machine: {os.cpu_count()} CPUs ({sys.platform}); copy upcycling, E={args.experts}, top-{args.top_k}"
        )
        print(f"source: {total_in:.0f} MB in shards of <= {largest_in:.0f} MB (fp32, {args.layers} layers)")
        print(f"output: {s['out_total_mb']:.0f} MB, largest shard {s['out_largest_mb']:.0f} MB")
        for name, r, foot in (("streaming", s, s_foot), ("in-memory", m, m_foot)):
            print(
                f"{name:>10}: peak RSS {r['peak_mb']:.0f} MB (after-import baseline {r['baseline_mb']:.0f} MB, "
                f"conversion {foot:.0f} MB), {r['seconds']:.1f} s"
            )
        print(f"streaming conversion footprint / largest input shard: {s_foot / largest_in:.2f}x")
        print(
            "streaming conversion footprint / (largest input shard + largest output shard): "
            f"{s_foot / (largest_in + s['out_largest_mb']):.2f}x"
        )
        print(f"streaming conversion footprint / in-memory footprint: {s_foot / m_foot:.2f}x")
        if args.json:
            summary = {
                "source_mb": total_in,
                "largest_input_shard_mb": largest_in,
                "streaming": s,
                "in_memory": m,
                "streaming_over_largest_in_plus_out": s_foot / (largest_in + s["out_largest_mb"]),
                "streaming_over_in_memory": s_foot / m_foot,
            }
            Path(args.json).write_text(json.dumps(summary, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
