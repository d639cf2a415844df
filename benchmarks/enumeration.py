"""Enumeration expert pruning cost, and what pruning and skipping buy (Lu et al. 2024, arXiv 2402.14800).

Claims measured, all as ratios in one run on the same calibration tokens:

1. Searching every ``r``-subset of every layer (C(8,4) = 70, C(8,6) = 28 subsets per layer) with
   moe-app's vectorised enumeration costs at most ~3x **one forward pass of the whole model**
   over the calibration tokens (each expert runs once per token; a subset is a re-weighting).
2. It is much faster than the naive reference (one block forward per subset).
3. At the calibrated skipping threshold (median ``w2 / w1``) about half of the tokens skip their
   second expert; the eval-loss change is reported.
4. Pruned models (r = 6, 4 of 8): eval loss and forward tokens/s against the unpruned model.

Method (DESIGN.md, "Performance method"): candidates interleaved round-robin after warm-up,
medians of the repeats; the naive reference runs once per repeat for one layer and is scaled to
all layers. Absolute times on a shared CPU are indicative only; the ratios are the claims.
The model is a moe-app upcycled LLaMA (``--hidden 256 --layers 4``, 8 experts top-2, experts
perturbed by noise so that they differ) or any checkpoint given with ``--ckpt``.

    python benchmarks/enumeration.py                  # hidden 256, 4 layers, 8 x 256 calibration tokens
    python benchmarks/enumeration.py --quick          # small smoke configuration
    python benchmarks/enumeration.py --json out.json  # also write the results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from _common import cpu_model
from moe_app.core.models.views import clone_model
from moe_app.core.pruning import (
    EnumerationConfig,
    ExpertPruneConfig,
    apply_skipping,
    calibrate_skipping,
    eval_loss,
    moe_layer_views,
    prune_experts,
    search_layer,
    skip_rates,
    subset_losses_naive,
)
from moe_app.core.pruning.calibration import capture_block_io, normalize_batches, run_model
from moe_app.core.pruning.enumerate import all_subsets


def build_model(args: argparse.Namespace):
    if args.ckpt:
        import moe_app

        return moe_app.load_model(args.ckpt).float().eval()
    from transformers import AutoModelForCausalLM, LlamaConfig

    from moe_app.core.upcycling import UpcycleConfig, upcycle

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=max(512, args.seq),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(cfg)
    moe = upcycle(dense, UpcycleConfig(method="noise", num_experts=8, top_k=2, noise_std=0.5, router_std=0.1))
    return moe.eval()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(cands: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each candidate, run round-robin ``repeats`` times after one warm-up each."""
    for fn in cands.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(repeats):
        for k, fn in cands.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ckpt", default=None, help="prune this moe-app / HF MoE checkpoint instead of a random one"
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512, help="expert intermediate size (copy of the dense FFN)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8, help="calibration sequences")
    p.add_argument("--seq", type=int, default=256, help="calibration sequence length")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="small smoke configuration")
    p.add_argument("--json", default=None, help="write results to this path")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.ffn, args.layers, args.vocab = 64, 128, 2, 512
        args.batch, args.seq, args.repeats = 2, 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    calib = normalize_batches([torch.randint(3, vocab, (args.batch, args.seq), generator=g)])
    held = normalize_batches([torch.randint(3, vocab, (args.batch, args.seq), generator=g)])
    views = moe_layer_views(model)
    io = capture_block_io(model, {lay: v.module for lay, v in views}, calib)
    tokens = int(calib[0]["attention_mask"].sum())
    res: dict = {
        "machine": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": {
            "hidden": model.config.hidden_size,
            "layers": model.config.num_hidden_layers,
            "moe_layers": len(views),
            "experts": views[0][1].num_experts,
            "top_k": views[0][1].top_k,
        },
        "calibration_tokens": tokens,
        "repeats": args.repeats,
    }

    def search_all(r: int, impl: str) -> Callable[[], object]:
        cfg = EnumerationConfig(impl=impl)
        return lambda: [search_layer(v, *io[lay], r, cfg) for lay, v in views]

    # 1-2: search time against one forward pass, and against the naive per-subset reference.
    for r in (6, 4):
        cands = {
            "forward": lambda: run_model(model, calib),
            "capture": lambda: capture_block_io(model, {lay: v.module for lay, v in views}, calib),
            "search_gram": search_all(r, "gram"),
            "search_direct": search_all(r, "direct"),
        }
        med = interleave(cands, args.repeats)
        lay0, v0 = views[0]
        subsets = all_subsets(v0.num_experts, r)
        naive_one = statistics.median(
            timed(lambda v0=v0, lay0=lay0, s=subsets: subset_losses_naive(v0, *io[lay0], s))
            for _ in range(max(1, args.repeats // 2))
        )
        naive = naive_one * len(views)
        best = min(med["search_gram"], med["search_direct"])
        res[f"r{r}"] = {
            "subsets_per_layer": subsets.shape[0],
            "seconds": {**med, "naive_scaled": naive},
            "search_over_forward": best / med["forward"],
            "search_plus_capture_over_forward": (best + med["capture"]) / med["forward"],
            "gram_over_forward": med["search_gram"] / med["forward"],
            "direct_over_forward": med["search_direct"] / med["forward"],
            "naive_over_search": naive / best,
        }

    # 3: skipping at the calibrated beta.
    base_loss = eval_loss(model, held)
    skipper = clone_model(model)
    betas = calibrate_skipping(skipper, calib)
    apply_skipping(skipper, betas)
    res["skipping"] = {
        "betas": {str(k): v for k, v in betas.items()},
        "skip_rate_calibration": skip_rates(skipper, calib)["all"],
        "skip_rate_heldout": skip_rates(skipper, held)["all"],
        "eval_loss": base_loss,
        "eval_loss_skipping": eval_loss(skipper, held),
    }

    # 4: pruned models against the unpruned one (eval loss on held-out tokens, forward tokens/s).
    models = {"unpruned": model}
    for r in (6, 4):
        pruned = clone_model(model)
        prune_experts(pruned, calib, ExpertPruneConfig(keep=r))
        models[f"r{r}"] = pruned
    models["skipping"] = skipper
    med = interleave({k: (lambda m=m: run_model(m, held)) for k, m in models.items()}, args.repeats)
    held_tokens = int(held[0]["attention_mask"].sum())
    res["pruned"] = {
        k: {
            "eval_loss": eval_loss(m, held),
            "tokens_per_s": held_tokens / med[k],
            "speedup": med["unpruned"] / med[k],
        }
        for k, m in models.items()
    }

    print(
        f"machine: {res['machine']}, {res['threads']} threads; model {res['model']}; {tokens} calibration tokens"
    )
    for r in (6, 4):
        x = res[f"r{r}"]
        s = x["seconds"]
        print(
            f"r={r} ({x['subsets_per_layer']} subsets/layer): forward {s['forward'] * 1e3:.1f} ms, "
            f"search gram {s['search_gram'] * 1e3:.1f} ms ({x['gram_over_forward']:.2f}x forward), "
            f"direct {s['search_direct'] * 1e3:.1f} ms ({x['direct_over_forward']:.2f}x), "
            f"search+capture {x['search_plus_capture_over_forward']:.2f}x, "
            f"naive {s['naive_scaled']:.2f} s ({x['naive_over_search']:.0f}x slower than the vectorised search)"
        )
    sk = res["skipping"]
    print(
        f"skipping: rate {sk['skip_rate_calibration']:.3f} on calibration, {sk['skip_rate_heldout']:.3f} held out; "
        f"eval loss {sk['eval_loss']:.4f} -> {sk['eval_loss_skipping']:.4f}"
    )
    for k, v in res["pruned"].items():
        print(f"{k:>9}: eval loss {v['eval_loss']:.4f}, {v['tokens_per_s']:.0f} tok/s ({v['speedup']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
