"""MoE block forward+backward time against a dense FFN and transformers' Mixtral block.

Claim measured: moe-app's ``SparseMoeBlock`` (router + ``SwiGLUExperts`` sort-by-expert dispatch)
costs about as much as a dense SwiGLU FFN with the same *active* parameters (``d_ff = k * F``),
and is not slower than transformers' own ``MixtralSparseMoeBlock`` on the same weights and input.

Method (DESIGN.md, "Performance method"): all candidates run in one process on the same input,
interleaved round-robin (A, B, C, A, B, C, ...) so machine noise hits them alike, after warm-up;
we report the median of the repeats and ratios against the dense baseline and against the best
transformers implementation measured in the same run. Absolute times on a shared CPU are only
indicative; the ratios are the claim.

    python benchmarks/moe_block.py                 # E=8, k=2, d=512, F=1376, 4096 tokens, fp32
    python benchmarks/moe_block.py --quick         # small smoke configuration
    python benchmarks/moe_block.py --json out.json # also write the results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _common import cpu_model
from moe_app.core.moe.block import SparseMoeBlock
from moe_app.core.moe.experts import IMPLS, SwiGLUExperts
from moe_app.core.moe.router import TopKRouter


class DenseSwiGLU(nn.Module):
    """A dense SwiGLU FFN with gate and up fused into one GEMM, like the experts store them."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(2 * ffn, hidden) * 0.02)
        self.down = nn.Parameter(torch.randn(hidden, ffn) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)  # (T, ffn) each
        return F.linear(F.silu(gate) * up, self.down)  # (T, d)


def build(args: argparse.Namespace) -> dict[str, Callable[[], nn.Module]]:
    """Return the candidates as name -> module, all holding the same expert weights."""
    from transformers import LlamaConfig, MixtralConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    E, k, d, ffn = args.experts, args.top_k, args.hidden, args.ffn
    ours = SparseMoeBlock(TopKRouter(d, E, k), SwiGLUExperts(E, d, ffn, impl=args.impl))
    with torch.no_grad():
        ours.experts.gate_up_proj.normal_(std=0.02)
        ours.experts.down_proj.normal_(std=0.02)
    # Two dense baselines with the active parameter count (d_ff = k * F): the model's own LlamaMLP
    # (separate gate/up GEMMs) and a fused gate/up variant; ratios are against the faster one.
    llama_mlp = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=k * ffn, hidden_act="silu"))
    for lin in (llama_mlp.gate_proj, llama_mlp.up_proj, llama_mlp.down_proj):
        nn.init.normal_(lin.weight, std=0.02)
    models: dict[str, nn.Module] = {
        "dense-llama": llama_mlp,
        "dense-fused": DenseSwiGLU(d, k * ffn),
        "moe-app": ours,
    }
    for impl in args.hf_impls:
        cfg = MixtralConfig(hidden_size=d, intermediate_size=ffn, num_local_experts=E, num_experts_per_tok=k)
        cfg._experts_implementation = impl
        hf = MixtralSparseMoeBlock(cfg)
        with torch.no_grad():
            hf.gate.weight.copy_(ours.router.weight)
            hf.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
            hf.experts.down_proj.copy_(ours.experts.down_proj)
        models[f"hf-{impl}"] = hf
    return models


def step(model: nn.Module, x: Tensor, grad: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    x.grad = None
    y = model(x)
    y.backward(grad)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1376, help="expert intermediate size F")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--impl", default="auto", choices=IMPLS)
    p.add_argument("--hf-impls", nargs="*", default=["grouped_mm", "eager"])
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
        args.hidden, args.ffn, args.tokens, args.repeats, args.warmup = 64, 96, 256, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    models = build(args)
    torch.manual_seed(1)
    x = torch.randn(1, args.tokens, args.hidden, requires_grad=True)  # (B, S, d)
    grad = torch.randn_like(x)
    # The candidates must compute the same function, or the timing compares different work.
    ref = models["moe-app"](x)
    for name, m in models.items():
        if name.startswith("hf-"):
            torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5, msg=f"{name} != moe-app")

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.warmup + args.repeats):
        for name, m in models.items():
            t0 = clock()
            step(m, x, grad)
            dt = clock() - t0
            if i >= args.warmup:
                times[name].append(dt)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    best_dense = min(("dense-llama", "dense-fused"), key=med.__getitem__)
    hf_names = [n for n in med if n.startswith("hf-")]
    best_hf = min(hf_names, key=med.__getitem__) if hf_names else None
    header = (
        f"E={args.experts} k={args.top_k} d={args.hidden} F={args.ffn} tokens={args.tokens} fp32 "
        f"fwd+bwd, impl={args.impl}, {args.clock} clock, median of {args.repeats} (warm-up {args.warmup}), "
        "interleaved\n"
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, CPU: {cpu_model()}"
    )
    print(header)
    print(
        f"ratios against the faster dense baseline ({best_dense}) and the faster transformers block ({best_hf})"
    )
    print(f"{'candidate':<16}{'median ms':>11}{'min ms':>9}{'vs dense':>10}{'vs best hf':>12}")
    for name, m in med.items():
        vs_hf = f"{m / med[best_hf]:.3f}x" if best_hf else "-"
        print(
            f"{name:<16}{m * 1e3:>11.1f}{min(times[name]) * 1e3:>9.1f}{m / med[best_dense]:>9.3f}x{vs_hf:>12}"
        )
    result = {
        "config": vars(args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "median_s": med,
        "times_s": times,
        "best_dense": best_dense,
        "ratio_vs_dense": {n: m / med[best_dense] for n, m in med.items()},
        "best_hf": best_hf,
        "ratio_vs_best_hf": {n: m / med[best_hf] for n, m in med.items()} if best_hf else {},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
