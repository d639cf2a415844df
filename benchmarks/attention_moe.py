"""Attention-MoE forward+backward time against the dense attention it was built from.

Claim measured: ``AttentionMoe`` (LLaMA-MoE v2 attention experts, one per GQA group) computes only
the selected groups: at ``k`` of ``G`` groups it projects, attends and output-projects ``k/G`` of
the query heads per token, and each group attends only among its own ``~k/G`` of the tokens. Target
at ``k = G/2``: at most 0.75x the dense attention time (forward + backward).

Shapes: SmolLM2-135M's attention (hidden 576, 9 heads, 3 KV heads: G = 3, so k = G/2 is not an
integer and k = 1 stands in for it) and a wider one with more groups (hidden 1024, 16 heads, 8 KV
heads: G = 8, k = 4 and 7); head dim 64, batch 4, sequence lengths 256 and 1024, fp32, causal
(no padding mask: both sides take SDPA's ``is_causal`` path).

Method (DESIGN.md, "Performance method"): the dense attention (transformers' ``LlamaAttention``,
``attn_implementation="sdpa"``) and the attention MoE around a copy of the same module run in one
process on the same input, interleaved round-robin after warm-up; we report the median of the
repeats and the ratio to dense. The router is random (``TopKRouter``'s own init) on random
hidden states, so the groups get about ``k/G`` of the tokens each, as a load-balanced trained
router would give them.

    python benchmarks/attention_moe.py                    # both shapes, S = 256 and 1024
    python benchmarks/attention_moe.py --threads 1 --clock cpu   # steadier on a busy shared machine
    python benchmarks/attention_moe.py --quick            # small smoke configuration
    python benchmarks/attention_moe.py --seq 256 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import Tensor, nn

from _common import cpu_model, peak_rss_mb
from moe_app.core.moe.attention import AttentionMoe
from moe_app.core.moe.router import TopKRouter

# name: (hidden, heads, kv heads, the k values to time)
SHAPES = {
    "smollm2-135m (G=3)": (576, 9, 3, (1, 2)),
    "wide (G=8)": (1024, 16, 8, (4, 7)),
}


def build(
    hidden: int, heads: int, kv_heads: int, ks: tuple[int, ...]
) -> tuple[dict[str, nn.Module], nn.Module]:
    """The dense attention and one attention MoE per ``k`` (same weights), plus the rotary embedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    cfg = LlamaConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=4096,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dense = LlamaAttention(cfg, layer_idx=0)
    for lin in (dense.q_proj, dense.k_proj, dense.v_proj, dense.o_proj):
        nn.init.normal_(lin.weight, std=0.02)
    models: dict[str, nn.Module] = {"dense": dense}
    for k in ks:
        router = TopKRouter(hidden, kv_heads, k, rule="softmax_topk_renorm")
        models[f"moe k={k}/{kv_heads}"] = AttentionMoe(copy.deepcopy(dense), router, scale=kv_heads / k)
    return models, LlamaRotaryEmbedding(cfg)


def step(model: nn.Module, x: Tensor, cos_sin: tuple[Tensor, Tensor], grad: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    x.grad = None
    out, _ = model(x, position_embeddings=cos_sin, attention_mask=None)
    out.backward(grad)


def measure(name: str, args: argparse.Namespace, seq: int) -> dict:
    hidden, heads, kv_heads, ks = SHAPES[name]
    models, rotary = build(hidden, heads, kv_heads, ks)
    torch.manual_seed(1)
    x = torch.randn(args.batch, seq, hidden, requires_grad=True)  # (B, S, d)
    grad = torch.randn_like(x)
    cos_sin = rotary(x, torch.arange(seq).unsqueeze(0))
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    times: dict[str, list[float]] = {n: [] for n in models}
    for i in range(args.warmup + args.repeats):
        for n, m in models.items():
            t0 = clock()
            step(m, x, cos_sin, grad)
            dt = clock() - t0
            if i >= args.warmup:
                times[n].append(dt)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    # How evenly the (random) router spread the tokens: the gathered width L is the busiest group.
    loads = {}
    for n, m in models.items():
        if isinstance(m, AttentionMoe):
            with torch.no_grad():
                m(x, position_embeddings=cos_sin, attention_mask=None)
            idx = m.last_routing.indices.view(args.batch, seq, -1)
            per_group = torch.stack([(idx == g).any(-1).sum(-1) for g in range(kv_heads)])  # (G, B)
            loads[n] = float(per_group.max()) / seq
    print(f"\n{name}: hidden {hidden}, {heads} heads / {kv_heads} KV heads, batch {args.batch} x {seq}")
    print(f"{'candidate':<16}{'median ms':>11}{'min ms':>9}{'vs dense':>10}{'busiest group':>15}")
    for n, m in med.items():
        load = f"{loads[n]:.2f} S" if n in loads else "-"
        print(f"{n:<16}{m * 1e3:>11.1f}{min(times[n]) * 1e3:>9.1f}{m / med['dense']:>9.3f}x{load:>15}")
    return {
        "shape": name,
        "seq": seq,
        "median_s": med,
        "times_s": times,
        "ratio_vs_dense": {n: m / med["dense"] for n, m in med.items()},
        "busiest_group_fraction": loads,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--seq", type=int, nargs="*", default=[256, 1024])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: perf_counter; cpu: this process's CPU time, steadier on a busy shared machine "
        "(use with --threads 1: with more threads it also counts OpenMP spin-waiting)",
    )
    p.add_argument("--quick", action="store_true", help="small smoke configuration")
    p.add_argument("--json", default=None, help="write results to this path")
    args = p.parse_args(argv)
    if args.quick:
        args.seq, args.batch, args.repeats, args.warmup = [64], 2, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"attention MoE vs dense attention, fp32 fwd+bwd, {args.clock} clock, median of {args.repeats} "
        f"(warm-up {args.warmup}), interleaved\ntorch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"CPU: {cpu_model()}"
    )
    results = [measure(name, args, seq) for name in args.shapes for seq in args.seq]
    print("\nratios to dense attention (target at k = G/2: <= 0.75x)")
    for r in results:
        ratios = ", ".join(f"{n} {v:.3f}x" for n, v in r["ratio_vs_dense"].items() if n != "dense")
        print(f"  {r['shape']:<20} S={r['seq']:<5} {ratios}")
    print(f"peak RSS {peak_rss_mb():.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "torch": torch.__version__, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
