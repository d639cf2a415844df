"""Claim: layer-streamed `moe-app prune` prunes a checkpoint at least 4x larger than its own peak RSS.

Writes a seeded random stock Mixtral in bf16 tensor by tensor (default: 40 layers, hidden 1024,
8 experts of width 1536, ~3.3 GB; the generator itself holds about one shard), then prunes it to
r = 6 of 8 experts per layer by enumeration (Lu et al. 2024) in fresh subprocesses:

* streamed: ``prune_checkpoint(..., streaming="auto", memory_budget=...)`` -- the checkpoint is
  larger than the budget, so it runs one decoder layer at a time (``checkpoint/prune_streaming.py``);
* in-memory (the baseline, ``--compare``, on by default): ``streaming="off"``, the whole model loaded.

Each child reports its pruning wall time and peak RSS (``ru_maxrss``). Printed: the checkpoint size,
the medians, checkpoint size / streamed peak RSS (the claim: >= 4) and in-memory / streamed peak.
The two outputs are then compared tensor by tensor (same kept experts, bitwise equal weights), and the
streamed output is loaded in stock transformers (a forward pass, ``num_local_experts == 6``).

``--block-drop N`` / ``--layer-drop N`` / ``--slim wanda|sparsegpt|2:4 [--sparsity S]`` add He et
al.'s block drop, layer drop and expert slimming to the same job: the streamed path then writes the
expert-pruned model to a temporary checkpoint, scores the blocks and the MoE sublayers in passes of
their own, and slims and writes the result in a last pass, each pass one decoder layer at a time.
``--kind qwen2_moe --quantize nf4|int8`` writes a random Qwen2-MoE instead (a shared expert 4x the
expert width) and quantises its shared-expert linears as each layer is written.

Run it under the shared memory lock (the in-memory baseline needs ~2x the checkpoint):

    flock /work/notes/bigmem.lock python benchmarks/prune_streamed.py          # ~5-10 min on 2 CPUs
    python benchmarks/prune_streamed.py --layers 8 --no-compare                # quick look

The generated checkpoint and the outputs live in a temporary directory (``--work``) that is removed
at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_model, peak_rss_mb, rss_mb

MB = 1024**2


def make_stock(path: Path, kind: str, layers: int, hidden: int, ffn: int, experts: int, vocab: int) -> int:
    """A seeded random stock MoE (``mixtral`` or ``qwen2_moe``, whose shared expert is ``4 * ffn``
    wide) in bf16 with the stock on-disk names, written tensor by tensor; returns bytes."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    from moe_app.checkpoint.keymaps import FORMAT_ARCHITECTURES, FORMAT_KEYMAPS
    from moe_app.checkpoint.model_dir import unique_state_dict
    from moe_app.checkpoint.shards import ShardWriter
    from moe_app.core.data.tokenizer import suite_tokenizer

    tok = suite_tokenizer()
    common = dict(
        vocab_size=max(vocab, len(tok)), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
        num_experts_per_tok=2, tie_word_embeddings=False, max_position_embeddings=512, dtype=torch.bfloat16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if kind == "mixtral":
        cfg = MixtralConfig(**common, intermediate_size=ffn, num_local_experts=experts)
    else:
        cfg = Qwen2MoeConfig(
            **common, intermediate_size=4 * ffn, moe_intermediate_size=ffn, num_experts=experts,
            shared_expert_intermediate_size=4 * ffn,
        )  # fmt: skip
    keymap = FORMAT_KEYMAPS[kind]
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    writer = ShardWriter(path, "512MB")

    def rand(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)

    for key, t in unique_state_dict(meta).items():
        shape = tuple(t.shape)
        if key.endswith("norm.weight"):
            writer.add(key, torch.ones(shape, dtype=torch.bfloat16))
        elif key.endswith("mlp.gate.weight"):  # routers that prefer some experts
            writer.add(keymap["router"].format(i=int(key.split(".")[2])), rand(shape, 0.5))
        elif key.endswith("mlp.experts.gate_up_proj") or key.endswith("mlp.experts.down_proj"):
            i = int(key.split(".")[2])
            for j in range(shape[0]):
                if key.endswith("gate_up_proj"):
                    writer.add(keymap["expert_gate_proj"].format(i=i, j=j), rand((ffn, hidden), 0.02))
                    writer.add(keymap["expert_up_proj"].format(i=i, j=j), rand((ffn, hidden), 0.02))
                else:
                    writer.add(keymap["expert_down_proj"].format(i=i, j=j), rand((hidden, ffn), 0.02))
        else:
            writer.add(key, rand(shape, 0.02))
    writer.close()
    cfg.architectures = [FORMAT_ARCHITECTURES[kind]]
    cfg.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def child(args: argparse.Namespace) -> None:
    import torch  # noqa: F401  (imports are part of the baseline)
    import transformers  # noqa: F401

    from moe_app.checkpoint.pruning import PruneJob, prune_checkpoint
    from moe_app.core.pruning import CalibrationConfig, ExpertPruneConfig
    from moe_app.core.pruning.slim import SlimConfig

    baseline = rss_mb()
    job = PruneJob(
        experts=ExpertPruneConfig(keep=args.keep, method="enumerate"),
        block_drop=args.block_drop,
        layer_drop=args.layer_drop,
        slim=SlimConfig(method=args.slim, sparsity=args.sparsity) if args.slim else None,
        quantize=args.quantize,
        calibration=CalibrationConfig(
            data="builtin", num_samples=args.samples, max_length=args.length, batch_size=4
        ),
        eval_before_after=False,
    )
    t0 = time.perf_counter()
    streaming = "auto" if args.child == "streamed" else "off"
    report = prune_checkpoint(args.src, args.out, job, streaming=streaming, memory_budget=args.budget)
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "baseline_mb": baseline,
                "peak_mb": peak_rss_mb(),
                "seconds": seconds,
                "mode": report.get("mode", "in-memory"),
                "kept": report["experts"]["kept"],
                "dropped": [report.get(k, {}).get("dropped") for k in ("block_drop", "layer_drop")],
            }
        )
    )


def run_child(mode: str, args: argparse.Namespace, src: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--src", str(src), "--out", str(out)]
    cmd += ["--keep", str(args.keep), "--budget", args.budget]
    cmd += ["--samples", str(args.samples), "--length", str(args.length)]
    cmd += ["--block-drop", str(args.block_drop), "--layer-drop", str(args.layer_drop)]
    if args.slim:
        cmd += ["--slim", args.slim] + (["--sparsity", str(args.sparsity)] if args.sparsity else [])
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def same_tensors(a: Path, b: Path) -> tuple[int, int]:
    """``(tensors compared, tensors different)`` of two checkpoint dirs, one tensor in memory at a time."""
    import torch
    from safetensors import safe_open

    from moe_app.checkpoint.shards import shard_files

    def where(d: Path) -> dict[str, Path]:
        out = {}
        for f in shard_files(d):
            with safe_open(str(f), "pt") as h:
                out.update(dict.fromkeys(h.keys(), f))
        return out

    wa, wb = where(a), where(b)
    if set(wa) != set(wb):
        raise SystemExit(f"different keys: {sorted(set(wa) ^ set(wb))[:6]}")
    bad = 0
    for k in sorted(wa):
        with safe_open(str(wa[k]), "pt") as ha, safe_open(str(wb[k]), "pt") as hb:
            bad += not torch.equal(ha.get_tensor(k), hb.get_tensor(k))
    return len(wa), bad


def reload_check(out: Path) -> str:
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); "
        "ids = torch.arange(1, 17).unsqueeze(0); c = m.config; "
        "n = getattr(c, 'num_local_experts', None) or c.num_experts; "
        "q = sum(type(x).__name__ in ('Linear4bit', 'Linear8bitLt') for x in m.modules()); "
        "print(n, q, bool(torch.isfinite(m(input_ids=ids).logits.float()).all()))"
    )
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"stock reload failed:\n{res.stderr[-3000:]}")
    return res.stdout.strip().splitlines()[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="mixtral", choices=["mixtral", "qwen2_moe"])
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=1536, help="expert width")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--keep", type=int, default=6)
    p.add_argument("--block-drop", type=int, default=0, help="also delete N decoder blocks (He et al.)")
    p.add_argument("--layer-drop", type=int, default=0, help="also drop N MoE sublayers (He et al.)")
    p.add_argument("--slim", default=None, help="also slim the experts: wanda, sparsegpt or 2:4")
    p.add_argument("--sparsity", type=float, default=None, help="--slim wanda/sparsegpt: fraction zeroed")
    p.add_argument(
        "--quantize", default=None, help="also quantise the expert linears: nf4 or int8 (--kind qwen2_moe)"
    )
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument(
        "--budget", default="1GB", help="memory budget (--memory_budget); the checkpoint exceeds it"
    )
    p.add_argument("--samples", type=int, default=8, help="calibration sequences")
    p.add_argument("--length", type=int, default=64, help="tokens per calibration sequence")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--work", default=None, help="scratch dir (default: a new temporary dir, removed at the end)"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--src", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    work = Path(tempfile.mkdtemp(prefix="prune-streamed-", dir=args.work))
    try:
        t0 = time.perf_counter()
        src = work / args.kind
        size = make_stock(src, args.kind, args.layers, args.hidden, args.ffn, args.experts, args.vocab)
        print(f"machine: {cpu_model()}")
        print(
            f"random {args.kind}: {args.layers} layers, hidden {args.hidden}, {args.experts} experts of width "
            f"{args.ffn}, bf16: {size / 1e9:.2f} GB on disk (written in {time.perf_counter() - t0:.0f} s, "
            f"generator peak RSS {peak_rss_mb():.0f} MB); prune to r = {args.keep} by enumeration"
            + (f", block drop {args.block_drop}" if args.block_drop else "")
            + (f", layer drop {args.layer_drop}" if args.layer_drop else "")
            + (f", slim {args.slim} {args.sparsity or ''}" if args.slim else "")
            + (f", quantize {args.quantize}" if args.quantize else "")
            + f", memory budget {args.budget}"
        )
        runs: dict[str, list[dict]] = {"streamed": [], "in-memory": []}
        modes = ["streamed", "in-memory"] if args.compare else ["streamed"]
        for r in range(args.repeats):
            for mode in modes:
                out = work / f"{mode}-{r}"
                runs[mode].append(run_child(mode, args, src, out))
                if r < args.repeats - 1:
                    shutil.rmtree(out)
        s = runs["streamed"]
        assert all(x["mode"] == "streaming" for x in s), (
            "auto did not stream: raise the size or lower --budget"
        )
        peak = statistics.median(x["peak_mb"] for x in s)
        print(
            f"streamed : peak RSS {peak:.0f} MB (after-import baseline {statistics.median(x['baseline_mb'] for x in s):.0f} MB), "
            f"{statistics.median(x['seconds'] for x in s):.0f} s"
        )
        print(f"checkpoint size / streamed peak RSS: {size / MB / peak:.2f}x  (claim: >= 4)")
        last = args.repeats - 1
        if args.compare:
            m = runs["in-memory"]
            mpeak = statistics.median(x["peak_mb"] for x in m)
            print(f"in-memory: peak RSS {mpeak:.0f} MB, {statistics.median(x['seconds'] for x in m):.0f} s")
            print(f"in-memory peak / streamed peak: {mpeak / peak:.2f}x")
            same = s[-1]["kept"] == m[-1]["kept"]
            n, bad = same_tensors(work / f"streamed-{last}", work / f"in-memory-{last}")
            print(f"same kept experts: {same}; output tensors bitwise equal: {n - bad}/{n}")
            if args.block_drop or args.layer_drop:
                print(
                    f"dropped blocks / MoE sublayers: streamed {s[-1]['dropped']}, in-memory {m[-1]['dropped']}"
                )
            shutil.rmtree(work / f"in-memory-{last}")
        experts, quantised, finite = reload_check(work / f"streamed-{last}").split()
        print(
            f"stock transformers reload of the streamed output: {experts} experts per layer, "
            f"{quantised} bitsandbytes modules, finite logits={finite}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
