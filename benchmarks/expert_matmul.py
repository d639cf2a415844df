"""One expert's products on CPU at few rows: MKL (``torch.mm``) against oneDNN's inner product.

Claim measured: for the products whose rows are tokens (forward ``x W^T``, input gradient
``g W``), oneDNN (``torch.ops.mkldnn._linear_pointwise``, what ``SwiGLUExperts`` uses on CPU in
fp32) is faster than MKL at the row counts an expert gets in a fine-tuning batch, and MKL stays the
faster one for the weight gradient ``g^T x`` (moe_app.core.moe.segments). Baseline: MKL, same run.

The weights are SmolLM2-135M's expert shapes (d=576, 2F=3072) and cold: each timing cycles over
``--weights`` distinct matrices (more than the last-level cache holds), as a training step does.

    python benchmarks/expert_matmul.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import cpu_model
from moe_app.core.moe.segments import onednn_linear as _linear


def timed_ms(fn, weights: list[torch.Tensor], repeats: int) -> float:
    """Median over ``repeats`` of the mean time of ``fn(w)`` across the cold weights."""
    fn(weights[0])  # warm-up: oneDNN builds and caches its primitive
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in weights:
            fn(w)
        times.append((time.perf_counter() - t0) / len(weights))
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--out", type=int, default=3072, help="the product's other side (fused gate/up: 2F)")
    p.add_argument("--rows", type=int, nargs="+", default=[8, 32, 100, 400])
    p.add_argument("--weights", type=int, default=12)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [torch.randn(args.out, args.hidden) * 0.02 for _ in range(args.weights)]  # W (out, d)
    print(
        f"one expert's products, W ({args.out}, {args.hidden}) fp32, {args.weights} cold weights, "
        f"median of {args.repeats}; torch {torch.__version__}, threads={torch.get_num_threads()}, CPU: {cpu_model()}"
    )
    print(f"{'rows':>5}  {'product':<22}{'MKL ms':>9}{'oneDNN ms':>11}{'oneDNN/MKL':>12}")
    result = {}
    for n in args.rows:
        x, g = torch.randn(n, args.hidden), torch.randn(n, args.out)
        cases = {
            "forward x W^T": (lambda w, x=x: x @ w.t(), lambda w, x=x: _linear(x, w)),
            "input grad g W": (lambda w, g=g: g @ w, lambda w, g=g: _linear(g, w.t())),
            "weight grad g^T x": (lambda w, g=g, x=x: g.t() @ x, lambda w, g=g, x=x: _linear(g.t(), x.t())),
        }
        for name, (mkl, onednn) in cases.items():
            a, b = timed_ms(mkl, weights, args.repeats), timed_ms(onednn, weights, args.repeats)
            result[f"{n} {name}"] = {"mkl_ms": a, "onednn_ms": b}
            print(f"{n:>5}  {name:<22}{a:>9.3f}{b:>11.3f}{b / a:>11.2f}x")
    return result


if __name__ == "__main__":
    main()
