"""Claim: streaming `moe-app upcycle` and `moe-app export` need about one decoder layer of memory.

Generates a multi-shard dense LLaMA checkpoint with random weights (a few hundred MB), then converts
it to an MoE checkpoint twice, each time in a fresh subprocess: (a) streaming, layer by layer
(``upcycle_checkpoint_streaming``), and (b) in memory (``load_hf_causal_lm`` + ``upcycle`` +
``save_moe_checkpoint``); then exports that MoE checkpoint to a stock Mixtral twice: (c) streaming
(``export_checkpoint``, layer by layer from memory-mapped shards) and (d) in memory
(``export_checkpoint(..., streaming=False)``: ``load_model`` first). Each child reports its peak RSS
(``VmHWM``, see _memory.py) and its RSS after imports (torch + transformers), so the conversion's own footprint
is ``peak - baseline``. Printed: sizes, peaks, and the ratios of each streaming footprint to the
largest decoder layer (of the MoE) and to the in-memory footprint (same run, same machine).

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
from _common import cpu_model, make_dense_source, rss_mb
from _memory import own_peak_mb

MB = 1024**2


def child(mode: str, src: str, out: str, experts: int, top_k: int, shard: str) -> None:
    import torch  # noqa: F401  (imports are part of the baseline)
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM, MixtralForCausalLM  # noqa: F401  (lazy modules: baseline too)

    from moe_app.checkpoint.export import export_checkpoint
    from moe_app.checkpoint.hub import load_hf_causal_lm
    from moe_app.checkpoint.model_dir import save_moe_checkpoint
    from moe_app.checkpoint.streaming import upcycle_checkpoint_streaming
    from moe_app.core.upcycling import UpcycleConfig, upcycle

    baseline = rss_mb()
    cfg = UpcycleConfig(method="copy", num_experts=experts, top_k=top_k)
    t0 = time.perf_counter()
    if mode == "streaming":
        upcycle_checkpoint_streaming(src, out, cfg, max_shard_size=shard)
    elif mode.startswith("export"):  # src is the MoE checkpoint
        export_checkpoint(src, out, "mixtral", max_shard_size=shard, streaming=mode == "export-streaming")
    else:
        model = upcycle(load_hf_causal_lm(src, dtype="auto"), cfg)
        save_moe_checkpoint(model, out, max_shard_size=shard)
    print(
        json.dumps({"baseline_mb": baseline, "peak_mb": own_peak_mb(), "seconds": time.perf_counter() - t0})
    )


def dir_size_mb(path: Path, pattern: str = "*.safetensors") -> tuple[float, float]:
    sizes = [p.stat().st_size / MB for p in path.glob(pattern)]
    return sum(sizes), max(sizes)


def largest_layer_mb(ckpt: Path) -> float:
    """Bytes of the largest decoder layer (all its tensors), from the shard headers."""
    from moe_app.checkpoint.safetensors_io import read_header
    from moe_app.checkpoint.shards import shard_files

    sizes: dict[str, int] = {}
    for f in shard_files(ckpt):
        for name, t in read_header(f)[0].items():
            if name.startswith("model.layers."):
                layer = name.split(".")[2]
                sizes[layer] = sizes.get(layer, 0) + t.info.nbytes
    return max(sizes.values()) / MB


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
        moe = work / "moe"
        for mode in ("streaming", "in-memory", "export-streaming", "export-in-memory"):
            out = work / mode
            mode_src = moe if mode.startswith("export") else src
            cmd = [sys.executable, __file__, "--child", mode, "--src", str(mode_src), "--out", str(out)]
            cmd += ["--experts", str(args.experts), "--top_k", str(args.top_k), "--shard", args.shard]
            env = {**os.environ, "OMP_NUM_THREADS": "2", "MOE_APP_PROGRESS": "0"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[mode]["out_total_mb"], results[mode]["out_largest_mb"] = dir_size_mb(out)
            if mode == "streaming":
                out.rename(moe)  # the MoE checkpoint the exports read
            else:
                shutil.rmtree(out)
        layer_mb = largest_layer_mb(moe)
        foot = {m: r["peak_mb"] - r["baseline_mb"] for m, r in results.items()}
        s = results["streaming"]
        print(
            f"machine: {cpu_model()}, {os.cpu_count()} CPUs; copy upcycling, E={args.experts}, top-{args.top_k}"
        )
        print(f"source: {total_in:.0f} MB in shards of <= {largest_in:.0f} MB (fp32, {args.layers} layers)")
        print(
            f"MoE: {s['out_total_mb']:.0f} MB, largest shard {s['out_largest_mb']:.0f} MB, largest layer {layer_mb:.0f} MB"
        )
        for name, r in results.items():
            print(
                f"{name:>16}: peak RSS {r['peak_mb']:.0f} MB (after-import baseline {r['baseline_mb']:.0f} MB, "
                f"conversion {foot[name]:.0f} MB), {r['seconds']:.1f} s"
            )
        print(f"streaming upcycle footprint / largest input shard: {foot['streaming'] / largest_in:.2f}x")
        print(
            f"streaming upcycle footprint / in-memory footprint: {foot['streaming'] / foot['in-memory']:.2f}x"
        )
        print(f"streaming export footprint / largest MoE layer: {foot['export-streaming'] / layer_mb:.2f}x")
        print(
            "streaming export footprint / in-memory export footprint: "
            f"{foot['export-streaming'] / foot['export-in-memory']:.2f}x"
        )
        if args.json:
            summary = {
                "source_mb": total_in,
                "largest_input_shard_mb": largest_in,
                "largest_moe_layer_mb": layer_mb,
                **results,
                "streaming_over_in_memory": foot["streaming"] / foot["in-memory"],
                "export_streaming_over_in_memory": foot["export-streaming"] / foot["export-in-memory"],
                "export_streaming_over_largest_layer": foot["export-streaming"] / layer_mb,
            }
            Path(args.json).write_text(json.dumps(summary, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
