"""Layer drop: eval tokens/s and parameter count before and after removing N MoE sublayers.

Claim measured: layer drop (He et al. 2024) removes the dropped MoE sublayers, so the parameter
count falls by exactly their size and eval throughput rises; the old storage (post-attention norm
zeroed, sublayer kept and still running, ``how="zero_norm"``) gives the same logits but neither.

Method (DESIGN.md, "Performance method"): a tiny upcycled LLaMA-MoE (noise upcycling, every layer
an MoE); the N sublayers with the highest ``cos(h, h + MoE(LN h))`` on random calibration tokens
are dropped. The undropped model, the removed-MLP model and the zeroed-norm model run in one
process on the same input, interleaved round-robin after warm-up; each forward is timed and we
report the median over the repeats and the ratio to the undropped model measured in the same run.
Absolute times on a shared CPU are only indicative; the ratios are the claim.

    python benchmarks/layer_drop.py                  # 8 layers, drop 4, d=256, E=8, k=2, 4x128 tokens
    python benchmarks/layer_drop.py --quick          # smoke configuration
    python benchmarks/layer_drop.py --json out.json  # also write the results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from _common import cpu_model
from moe_app.core.models.views import clone_model
from moe_app.core.pruning.drop import drop_mlp_layers, layer_drop_scores, most_similar
from moe_app.core.upcycling import UpcycleConfig, upcycle


def build(args: argparse.Namespace) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
        max_position_embeddings=max(256, args.seq),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(cfg).eval()
    moe = upcycle(
        dense, UpcycleConfig(method="noise", num_experts=args.experts, top_k=args.top_k, noise_std=0.5)
    )
    return moe.eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def forward_s(model: nn.Module, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--drop", type=int, default=4, help="MoE sublayers to drop")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: least noise on a shared CPU)"
    )
    p.add_argument("--quick", action="store_true", help="4 layers, drop 2, 5 repeats")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.layers, args.drop, args.repeats, args.warmup, args.seq = 4, 2, 5, 1, 64
    torch.set_num_threads(args.threads)

    base = build(args)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(3, args.vocab, (2, 32), generator=g)]
    scores = layer_drop_scores(base, calib)
    drop = most_similar(scores, args.drop)
    removed = drop_mlp_layers(clone_model(base), drop)  # how="auto": a moe-app model -> removed
    zeroed = drop_mlp_layers(clone_model(base), drop, how="zero_norm")
    models = {"undropped": base, "removed": removed, "zero_norm": zeroed}

    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    with torch.no_grad():
        ref = removed(input_ids=ids).logits
        diff = (zeroed(input_ids=ids).logits - ref).abs().max().item()
    for _ in range(args.warmup):
        for m in models.values():
            forward_s(m, ids)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):  # round-robin: machine noise hits all candidates alike
        for name, m in models.items():
            times[name].append(forward_s(m, ids))

    tokens = ids.numel()
    med = {name: statistics.median(ts) for name, ts in times.items()}
    params = {name: n_params(m) for name, m in models.items()}
    print(f"machine: {cpu_model()}, torch {torch.__version__}, {args.threads} thread(s)")
    print(
        f"model: LLaMA-MoE {args.layers} layers, d={args.hidden}, E={args.experts}, k={args.top_k}, "
        f"F={args.ffn}; dropped MoE sublayers {drop}; eval forward on {args.batch}x{args.seq} tokens, "
        f"median of {args.repeats} interleaved repeats"
    )
    print(f"removed vs zero_norm logits: max |diff| = {diff:.3g}")
    print(f"{'model':<11} {'params':>11} {'x params':>9} {'tokens/s':>10} {'x tokens/s':>11}")
    rows = {}
    for name in models:
        tps = tokens / med[name]
        rows[name] = {
            "params": params[name],
            "params_ratio": params[name] / params["undropped"],
            "tokens_per_s": tps,
            "tokens_per_s_ratio": med["undropped"] / med[name],
            "median_s": med[name],
        }
        print(
            f"{name:<11} {params[name]:>11,} {rows[name]['params_ratio']:>9.3f} {tps:>10,.0f} "
            f"{rows[name]['tokens_per_s_ratio']:>11.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "dropped": drop, "max_abs_logit_diff": diff, "results": rows},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
