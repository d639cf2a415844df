"""Claim: `moe-app upcycle --format mixtral` is as fast and as lean as mergekit-moe, and exact.

The same dense checkpoint is turned into a stock Mixtral with 8 copies of its FFN (top-2) by both
tools, interleaved, each run in a fresh process whose wall time and peak RSS are measured (the
process and its children: ``ru_maxrss`` of a tiny wrapper's children); medians of ``--repeats``.

* moe-app: ``python -m moe_app upcycle --model DENSE --out OUT --method copy --num_experts 8
  --top_k 2 --format mixtral`` (one streaming pass, shards written in place);
* mergekit: ``mergekit-moe CONFIG OUT --i-understand-this-is-not-useful-without-training`` with
  ``base_model`` and 8 ``experts`` all the dense dir, ``gate_mode: random``, the dense dtype.

Sources: SmolLM2-135M-Instruct (the cached GGUF dequantised once to a float32 safetensors dir *with*
its tokenizer, which mergekit needs) and a random dense LLaMA of about 0.5B parameters in bf16
(written tensor by tensor; moe-app's built-in tokenizer). Both tools copy the FFN into every
expert, so the result must reproduce the dense model: stock transformers' logits on moe-app's
output are compared with the dense model's.

mergekit is not a moe-app dependency (and pins its own stack): install it into a separate venv,
never into moe-app's, e.g. ::

    python -m venv /tmp/mk-venv && /tmp/mk-venv/bin/pip install torch==2.13.0 && /tmp/mk-venv/bin/pip install mergekit
    flock /work/notes/bigmem.lock python benchmarks/mergekit_compare.py            # both models, 3 repeats
    python benchmarks/mergekit_compare.py --models random --layers 4 --repeats 1   # quick smoke run

Without mergekit (``--mergekit``, ``$MERGEKIT_MOE``, ``mergekit-moe`` on PATH or /tmp/mk-venv) the
script says so and exits 0.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, random_llama_config

MB = 1024**2
GGUF = Path("~/.cache/moe_app/gguf/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()

# Runs argv in a child and prints its wall time and peak RSS (ru_maxrss of the waited child, KiB).
MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "log = open(sys.argv[1], 'w')\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.call(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)\n"
    "s = time.perf_counter() - t\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
    "print(json.dumps({'rc': rc, 'seconds': s, 'peak_mb': peak}))\n"
)


def find_mergekit(explicit: str | None) -> str | None:
    for c in (
        explicit,
        os.environ.get("MERGEKIT_MOE"),
        shutil.which("mergekit-moe"),
        "/tmp/mk-venv/bin/mergekit-moe",
    ):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def smollm2_dir(work: Path) -> Path | None:
    """SmolLM2-135M-Instruct as a float32 safetensors dir with its tokenizer (made once, reused)."""
    out = work / "smollm2-f32"
    if (out / "config.json").is_file():
        return out
    if not GGUF.is_file():
        return None
    from moe_app.checkpoint.hub import load_hf_causal_lm, load_tokenizer
    from moe_app.checkpoint.model_dir import unique_state_dict
    from moe_app.checkpoint.shards import ShardWriter

    model = load_hf_causal_lm(GGUF, dtype="float32")
    tok = load_tokenizer(GGUF, required=True)
    tmp = work / "smollm2-f32.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # transformers refuses to save a model it dequantised from GGUF: write the float weights ourselves
    writer = ShardWriter(tmp, "2GB")
    for k, v in unique_state_dict(model).items():
        writer.add(k, v.float())
    writer.close()
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def random_dir(work: Path, layers: int, hidden: int, ffn: int) -> Path:
    """A seeded random dense LLaMA in bf16, written tensor by tensor, with moe-app's built-in tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from moe_app.checkpoint.shards import ShardWriter
    from moe_app.core.data.tokenizer import suite_tokenizer

    out = work / f"random-l{layers}-h{hidden}-f{ffn}-bf16"
    if (out / "config.json").is_file():
        return out
    tok = suite_tokenizer()
    cfg = random_llama_config(
        layers,
        hidden,
        ffn,
        len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    tmp = work / (out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    writer = ShardWriter(tmp, "2GB")
    g = torch.Generator().manual_seed(0)
    for k, v in meta.state_dict().items():
        t = torch.ones(v.shape) if k.endswith("norm.weight") else torch.randn(v.shape, generator=g) * 0.02
        writer.add(k, t.to(torch.bfloat16))
    writer.close()
    tmp.rename(out)
    return out


def n_params(d: Path) -> int:
    from moe_app.checkpoint.safetensors_io import read_header
    from moe_app.checkpoint.shards import shard_files

    return sum(
        t.info.nbytes // t.info.dtype.itemsize for f in shard_files(d) for t in read_header(f)[0].values()
    )


def measure(argv: list[str], log: Path, env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(log), *argv], capture_output=True, text=True, env=env, check=True
    )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        raise SystemExit(f"{argv[0]} failed (exit {r['rc']}); log: {log}\n" + log.read_text()[-3000:])
    return r


def commands(
    tool: str, dense: Path, out: Path, work: Path, experts: int, dtype: str, mergekit: str
) -> list[str]:
    if tool == "moe-app":
        return [
            sys.executable, "-m", "moe_app", "upcycle", "--model", str(dense), "--out", str(out),
            "--method", "copy", "--num_experts", str(experts), "--top_k", "2", "--format", "mixtral",
        ]  # fmt: skip
    cfg = work / f"mergekit-{dense.name}.yml"
    lines = [
        f"base_model: {dense}",
        "gate_mode: random",
        f"dtype: {dtype}",
        "experts_per_token: 2",
        "experts:",
    ]
    lines += [f"  - source_model: {dense}" for _ in range(experts)]
    cfg.write_text("\n".join(lines) + "\n")
    return [
        mergekit, str(cfg), str(out), "--i-understand-this-is-not-useful-without-training",
        "--random-seed", "0", "--quiet", "--no-write-model-card",
    ]  # fmt: skip


def logits_gap(dense: Path, moe: Path) -> float:
    """Max |logits(stock Mixtral from moe-app) - logits(dense)| on a fixed batch, in the dense dtype."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(dense, dtype="auto").eval()(ids).logits.float()
        got_model = AutoModelForCausalLM.from_pretrained(moe, dtype="auto").eval()
        assert type(got_model).__name__ == "MixtralForCausalLM"
        got = got_model(ids).logits.float()
    return (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)


def compare(name: str, dense: Path, args, work: Path, mergekit: str) -> dict:
    import torch

    from moe_app.checkpoint.shards import checkpoint_dtype

    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[checkpoint_dtype(dense)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MOE_APP_PROGRESS": "0"}
    runs: dict[str, list[dict]] = {"moe-app": [], "mergekit": []}
    gap = None
    for r in range(args.repeats):
        for tool in runs:
            out = work / f"{name}-{tool}-out"
            shutil.rmtree(out, ignore_errors=True)
            argv = commands(tool, dense, out, work, args.experts, dtype, mergekit)
            res = measure(argv, work / f"{name}-{tool}.log", env)
            res["out_mb"] = sum(p.stat().st_size for p in out.glob("*.safetensors")) / MB
            runs[tool].append(res)
            print(
                f"  {name} {tool} run {r + 1}: {res['seconds']:.1f} s, peak RSS {res['peak_mb']:.0f} MB",
                flush=True,
            )
            if tool == "moe-app" and r == 0 and name in args.check_logits:
                gap = logits_gap(dense, out)
            shutil.rmtree(out, ignore_errors=True)
    med = {
        t: {k: statistics.median(x[k] for x in rs) for k in ("seconds", "peak_mb", "out_mb")}
        for t, rs in runs.items()
    }
    return {"dtype": dtype, "params": n_params(dense), "median": med, "logits_rel_gap": gap}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "random"], choices=["smollm2", "random"])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--layers", type=int, default=30, help="random model: layers (30 x hidden 1024 x d_ff 4096 ~ 0.5B)"
    )
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--check_logits", nargs="*", default=["smollm2", "random"], help="models whose output to check"
    )
    ap.add_argument(
        "--workdir", default=None, help="keeps the dense sources between runs (default: a temp dir)"
    )
    ap.add_argument("--mergekit", default=None, help="path of the mergekit-moe executable")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    mergekit = find_mergekit(args.mergekit)
    if mergekit is None:
        print(
            "SKIP: mergekit is not installed (it is not a moe-app dependency). Install it into a separate venv, "
            "e.g. `python -m venv /tmp/mk-venv && /tmp/mk-venv/bin/pip install torch==2.13.0 mergekit`, "
            "then pass --mergekit /tmp/mk-venv/bin/mergekit-moe"
        )
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moe-mergekit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for name in args.models:
            dense = (
                smollm2_dir(work)
                if name == "smollm2"
                else random_dir(work, args.layers, args.hidden, args.ffn)
            )
            if dense is None:
                print(
                    f"SKIP smollm2: {GGUF} is not cached (run `moe-app fetch` or the real-model tests once)"
                )
                continue
            results[name] = compare(name, dense, args, work, mergekit)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={args.threads}")
    print(
        f"copy upcycling to a stock Mixtral, E={args.experts}, top-2; median of {args.repeats}; mergekit: {mergekit}"
    )
    for name, r in results.items():
        m, k = r["median"]["moe-app"], r["median"]["mergekit"]
        print(f"{name} ({r['params'] / 1e6:.0f}M params, {r['dtype']}; output {m['out_mb']:.0f} MB):")
        for tool, x in (("moe-app", m), ("mergekit", k)):
            print(f"  {tool:>8}: {x['seconds']:.1f} s, peak RSS {x['peak_mb']:.0f} MB")
        print(f"  time moe-app / mergekit: {m['seconds'] / k['seconds']:.2f}x")
        print(f"  peak RSS moe-app / mergekit: {m['peak_mb'] / k['peak_mb']:.2f}x")
        if r["logits_rel_gap"] is not None:
            print(f"  stock Mixtral (moe-app output) vs dense logits: max rel. gap {r['logits_rel_gap']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
