#!/usr/bin/env python
"""Perplexity of SmolLM2-135M-Instruct's upcycled MoEs on real English text, at init and after a short CPT.

Claim (issue 14): copy upcycling (and noise / Drop-Upcycling to a lesser degree) starts at the dense
model's perplexity, while neuron partition (LLaMA-MoE, Zhu et al. 2024) with ``k < E`` and no
training is catastrophic, because each token only sees ``k / E`` of the FFN neurons; a short
continued pre-training (CPT) shows which constructions recover. Every row is measured in the same
run against the dense model (first row), which is the baseline.

Text: the prose of the Python reference documentation shipped with CPython,
``pydoc_data.topics`` (see ``benchmarks/_text.py``), tokenised with SmolLM2's tokenizer and cut into
consecutive blocks of ``--seq_len`` tokens; the first ``--eval_blocks`` are held out for
evaluation, the next ``--calib_blocks`` are calibration data for the importance split (a different
slice than the evaluated one), and the next ``--steps * --batch`` blocks are CPT data, each used once.

Constructions (``moe_app.core.upcycling.upcycle``, the project's own surgery, on a deep copy of
the dense model loaded once from the cached GGUF): copy, noise (std 0.01 of each matrix's std),
drop (Drop-Upcycling, r = 0.5), partition with split sequential / random / clustering /
importance, each without and with a shared expert. With a shared expert the FFN is cut into the
same ``E`` chunks of ``d_ff / E`` neurons, one chunk is the always-on shared expert and the other
``E - 1`` are routed, top-``k`` (LLaMA-MoE v2's "1 shared + 7 routed" at E = 8); clustering has no
shared variant (``UpcycleConfig`` rejects it: a cluster split has no notion of a shared neuron).
Router init: ``normal(0, 0.02)``; scale: the method's default (1 for copy-like, ``E / k`` for
partition, over the routed experts).

CPT: ``--steps`` AdamW steps (``fused=True``, lr ``--lr`` with ``--warmup`` linear warm-up then
constant, weight decay 0) of ``--batch x --seq_len`` tokens, next-token loss, no router aux loss.
``--train moe`` (default) trains only the MoE layers' parameters (experts, shared experts,
routers) and, for the dense reference row, the dense MLPs they were built from; ``--train all``
trains everything, as LLaMA-MoE's CPT does. Evaluated on the held-out slice afterwards.

Memory: the dense model stays loaded (~0.55 GB fp32). Every phase whose estimated footprint is
over ``--lock_above_gb`` (E = 8 copy MoE with AdamW ~11 GB; E = 8 copy eval peaks ~4.4 GB RSS) runs under
the shared memory lock (``flock`` on ``--lock``), one model at a time, freed before the next.

    python benchmarks/real_init_ppl.py [--out runs/real_init_ppl.md] [--experts 8:2,16:4] [--cpt 8:2]

The markdown table (and the command) is printed and rewritten to ``--out`` after every row.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import gc
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_model, peak_rss_mb, rss_mb
from _text import TextSlices, pydoc_slices, source_description

DEFAULT_GGUF = "~/.cache/moe_app/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
SPLITS = ("sequential", "random", "clustering", "importance")


@dataclass(frozen=True)
class Construction:
    """One row of the table: an upcycling method at ``(E, k)`` (``method == 'dense'``: no surgery)."""

    method: str
    num_experts: int = 0
    top_k: int = 0
    split: str | None = None
    shared: int = 0

    @property
    def name(self) -> str:
        return f"partition {self.split}" if self.method == "partition" else self.method

    @property
    def routed(self) -> int:
        return self.num_experts - self.shared

    def config(self, seed: int, calib_tokens: int):
        from moe_app.core.upcycling import UpcycleConfig

        if self.method in ("copy", "noise", "drop"):
            return UpcycleConfig(
                method=self.method, num_experts=self.num_experts, top_k=self.top_k, drop_ratio=0.5, seed=seed
            )
        return UpcycleConfig(
            method="partition",
            split=self.split,
            num_experts=self.routed,
            top_k=self.top_k,
            shared_experts=self.shared,
            calibration_tokens=calib_tokens,
            seed=seed,
        )


def constructions(e: int, k: int) -> list[Construction]:
    rows = [Construction(m, e, k) for m in ("copy", "noise", "drop")]
    for split in SPLITS:
        rows.append(Construction("partition", e, k, split))
        if split != "clustering":
            rows.append(Construction("partition", e, k, split, shared=1))
    return rows


# ------------------------------------------------------------------ measurement


@torch.no_grad()
def perplexity(model: nn.Module, blocks: Tensor, batch: int) -> float:
    """``exp`` of the mean next-token NLL over every position of ``blocks (N, S)`` (moe_app's token_nll)."""
    from moe_app.core.moe.stats import token_nll

    model.eval()
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch):
        ids = blocks[i : i + batch]  # (B, S)
        nll, mask = token_nll(model(input_ids=ids).logits, ids)  # (B, S-1)
        total += float(nll.sum(dtype=torch.float64))
        count += int(mask.sum())
    return math.exp(total / count)


def trainable_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    """``all`` parameters, or ``moe``: the decoder layers' MLP parameters (MoE blocks: experts,
    shared expert, router; dense: the MLP itself), the rest frozen."""
    from moe_app.core.models.layers import find_decoder_layers

    for p in model.parameters():
        p.requires_grad_(which == "all")
    if which == "all":
        return list(model.parameters())
    _, layers = find_decoder_layers(model)
    params = [p for layer in layers for p in layer.mlp.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def continue_pretraining(model: nn.Module, train: Tensor, args: argparse.Namespace) -> tuple[float, float]:
    """``args.steps`` AdamW steps over ``train (steps * batch, S)``; returns (first, last) loss."""
    params = trainable_parameters(model, args.train)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    model.train()
    losses = []
    for step in range(args.steps):
        ids = train[step * args.batch : (step + 1) * args.batch]  # (B, S)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"    step {step + 1}/{args.steps} loss {losses[-1]:.3f} rss {rss_mb():.0f} MB", flush=True)
    del opt, sched
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses[0], losses[-1]


# ------------------------------------------------------------------ memory lock


def estimated_gb(dense: nn.Module, c: Construction, training: bool, which: str) -> float:
    """Rough extra footprint of building (and training) ``c``: fp32 weights, plus grads + 2 AdamW moments."""
    n_dense = sum(p.numel() for p in dense.parameters())
    mlp = sum(p.numel() for n, p in dense.named_parameters() if ".mlp." in n)
    if c.method in ("copy", "noise", "drop"):
        moe_mlp = mlp * c.num_experts
    else:
        moe_mlp = mlp
    total = n_dense - mlp + moe_mlp
    trained = (total if which == "all" else moe_mlp) if training else 0
    return (total + 3 * trained) * 4 / 1e9 + 1.0  # + ~1 GB activations / logits / temporaries


@contextlib.contextmanager
def memory_lock(path: str, needed: bool):
    """Hold ``flock(path)`` (the team's ``flock /work/notes/bigmem.lock``) while ``needed``."""
    if not needed or not path:
        yield
        return
    with open(path, "a") as f:
        t0 = time.time()
        fcntl.flock(f, fcntl.LOCK_EX)
        waited = time.time() - t0
        if waited > 1:
            print(f"    (waited {waited:.0f} s for the memory lock)", flush=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------ table


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "inf"
    return f"{x:.4g}" if x < 1e5 else f"{x:.3g}"


def render(rows: list[dict], args: argparse.Namespace, text: TextSlices, command: str, elapsed: float) -> str:
    lines = [
        "# SmolLM2-135M-Instruct: upcycled MoEs on real English text, at init and after short CPT",
        "",
        f"Text: {source_description()}; SmolLM2 tokenizer, {text.describe()}.",
        "Perplexity on the held-out `eval` slice; importance calibration on the `calib` slice; "
        + (
            "no CPT in this run (`--cpt ''`)"
            if not args.cpt.strip() or args.steps == 0
            else f"CPT (for E:k in {args.cpt}) on `train`: {args.steps} AdamW steps (fused, lr {args.lr:g}, "
            f"{args.warmup} warm-up steps, then constant, grad clip 1.0) of {args.batch} x {args.seq_len} "
            "tokens, training "
            + (
                "every parameter"
                if args.train == "all"
                else "only the MLP / MoE-layer parameters (experts, shared expert, routers; the dense MLPs "
                "for the dense row)"
            )
        )
        + ". `shared = 1`: one of the E chunks of d_ff/E neurons is an always-on shared expert, "
        "the other E-1 are routed (column E). Partition scale E/k over the routed experts (default).",
        "",
        "| construction | shared | E | k | ppl init | ppl after CPT | ratio init / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    dense = rows[0]["init"] if rows else None
    for r in rows:
        ratio = "1" if r["name"] == "dense" else (fmt(r["init"] / dense) if dense else "-")
        lines.append(
            f"| {r['name']} | {r['shared']} | {r['E']} | {r['k']} | {fmt(r['init'])} | {fmt(r.get('cpt'))} | {ratio} |"
        )
    lines += [
        "",
        f"Machine: {cpu_model()}, {torch.get_num_threads()} torch threads (shared, noisy); "
        f"{elapsed / 60:.1f} min; peak RSS {peak_rss_mb():.0f} MB.",
        "",
        f"Command: `{command}`",
        "",
    ]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------ main


def parse_pairs(s: str) -> list[tuple[int, int]]:
    out = []
    for part in filter(None, (p.strip() for p in s.split(","))):
        e, k = part.split(":")
        out.append((int(e), int(k)))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="the cached SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--out", default="runs/real_init_ppl.md")
    ap.add_argument("--experts", default="8:2,16:4", help="E:k pairs for the init table")
    ap.add_argument("--cpt", default="8:2", help="E:k pairs that also get CPT ('' for none)")
    ap.add_argument("--only", default="", help="comma list of construction names to keep (e.g. copy,drop)")
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--eval_blocks", type=int, default=32, help="held-out blocks (default 4096 tokens)")
    ap.add_argument("--calib_blocks", type=int, default=8, help="importance-split calibration blocks")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--train", choices=("moe", "all"), default="moe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lock", default="/work/notes/bigmem.lock")
    ap.add_argument(
        "--lock_above_gb", type=float, default=3.0, help="GB; E=8 copy-family evals peak ~4.4 GB RSS"
    )
    args = ap.parse_args(argv)
    command = "python benchmarks/real_init_ppl.py " + " ".join(
        map(shlex.quote, sys.argv[1:] if argv is None else argv)
    )
    t_start = time.time()

    from moe_app.checkpoint.hub import load_hf_causal_lm, load_tokenizer
    from moe_app.core.upcycling import upcycle

    torch.manual_seed(args.seed)
    gguf = Path(args.gguf).expanduser()
    tok = load_tokenizer(gguf, required=True)
    dense = load_hf_causal_lm(gguf, dtype=torch.float32).eval()
    for p in dense.parameters():
        p.requires_grad_(False)
    cpt_pairs = set(parse_pairs(args.cpt))
    do_dense_cpt = bool(cpt_pairs) and args.steps > 0
    sizes = {
        "eval": args.eval_blocks,
        "calib": args.calib_blocks,
        "train": args.steps * args.batch if do_dense_cpt else 0,
    }
    text = pydoc_slices(tok, args.seq_len, sizes)
    ev, calib, train = text.slices["eval"], text.slices["calib"], text.slices["train"]
    calib_batches = [calib[i : i + args.batch] for i in range(0, calib.shape[0], args.batch)]
    print(f"[real_init_ppl] {text.describe()}; loaded in {time.time() - t_start:.0f} s", flush=True)
    out = Path(args.out)
    only = set(filter(None, (s.strip() for s in args.only.split(","))))

    rows: list[dict] = []

    def emit() -> None:
        write_atomic(out, render(rows, args, text, command, time.time() - t_start))

    # dense baseline (and its CPT reference)
    t0 = time.time()
    row = {"name": "dense", "shared": "-", "E": "-", "k": "-", "init": perplexity(dense, ev, args.batch)}
    print(f"  dense: ppl {row['init']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    if do_dense_cpt:
        model = copy.deepcopy(dense)
        first, last = continue_pretraining(model, train, args)
        row["cpt"] = perplexity(model, ev, args.batch)
        print(f"  dense CPT: loss {first:.3f} -> {last:.3f}, ppl {row['cpt']:.3f}", flush=True)
        del model
        gc.collect()
    rows.append(row)
    emit()

    for e, k in parse_pairs(args.experts):
        for c in constructions(e, k):
            label = f"{c.name}{' +shared' if c.shared else ''} E={c.routed} k={c.top_k}"
            if only and not only & {c.name, c.method, c.split}:
                continue
            train_it = (e, k) in cpt_pairs and args.steps > 0
            need = estimated_gb(dense, c, train_it, args.train) > args.lock_above_gb
            t0 = time.time()
            with memory_lock(args.lock, need):
                cfg = c.config(args.seed, calib.numel())
                data = calib_batches if cfg.needs_calibration else None
                model = upcycle(copy.deepcopy(dense), cfg, data).eval()
                row = {"name": c.name, "shared": c.shared, "E": c.routed, "k": c.top_k}
                row["init"] = perplexity(model, ev, args.batch)
                print(f"  {label}: init ppl {row['init']:.4g} ({time.time() - t0:.0f} s)", flush=True)
                if train_it:
                    first, last = continue_pretraining(model, train, args)
                    row["cpt"] = perplexity(model, ev, args.batch)
                    print(f"  {label}: CPT loss {first:.3f} -> {last:.3f}, ppl {row['cpt']:.4g}", flush=True)
                del model
                gc.collect()
            rows.append(row)
            emit()

    table = render(rows, args, text, command, time.time() - t_start)
    write_atomic(out, table)
    print(table)
    print(f"[real_init_ppl] wrote {out}")


if __name__ == "__main__":
    main()
