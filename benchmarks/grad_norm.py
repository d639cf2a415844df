"""Global gradient norm for clipping: moe-app's dot-product pass against torch's, time and error.

Claim measured: :func:`moe_app.core.utils.clipping.total_norm` (BLAS dot products over 1M-element
chunks, summed in float64), which the folded clip of ``moe-app fit`` uses, is faster than the
``torch.nn.utils.get_total_norm(..., foreach=True)`` that ``clip_grad_norm_`` calls, and more
accurate. The gradients have the shapes of SmolLM2-135M copy-upcycled to 8 experts (per decoder
layer: ``gate_up_proj (8, 3072, 576)``, ``down_proj (8, 576, 1536)``, attention and norms), filled
with seeded Gaussian noise of a different scale per tensor; the error is against a float64 sum.

Method (DESIGN.md, "Performance method"): the two in alternation in one process, median of the
repeats, ratio from the same run.

    python benchmarks/grad_norm.py                 # 8 layers (0.82 GB of gradients), ~20 s
    python benchmarks/grad_norm.py --layers 30     # the whole model (2.8 GB)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import cpu_model


def gradients(layers: int, experts: int, d: int, ffn: int, vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d), (d // 3, d), (d // 3, d), (d, d), (d,), (d,), (experts, d)]
        shapes += [(experts, 2 * ffn, d), (experts, d, ffn)]
    return [torch.randn(s, generator=gen) * (1 + i % 7) for i, s in enumerate(shapes)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from moe_app.core.utils.clipping import total_norm

    grads = gradients(args.layers, args.experts, 576, 1536, 49152)
    exact = sum(float(g.double().pow(2).sum()) for g in grads) ** 0.5
    ways = {
        "torch get_total_norm": lambda: torch.nn.utils.get_total_norm(grads, 2.0, foreach=True),
        "moe-app total_norm": lambda: total_norm(grads),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for i in range(args.repeats + 1):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    n = sum(g.numel() for g in grads)
    print(
        f"{len(grads)} gradients, {n / 1e6:.0f}M fp32 elements ({args.layers} layers, {args.experts} experts), "
        f"median of {args.repeats}, threads={torch.get_num_threads()}, CPU: {cpu_model()}"
    )
    result = {}
    for name, fn in ways.items():
        med = statistics.median(times[name])
        err = abs(float(fn()) - exact) / exact
        result[name] = {"median_s": med, "rel_error": err}
        print(f"{name:<22}{med * 1e3:9.1f} ms {4 * n / med / 1e9:6.1f} GB/s   relative error {err:.1e}")
    base, new = (result[k]["median_s"] for k in ways)
    print(f"time moe-app / torch: {new / base:.2f}x")
    return result


if __name__ == "__main__":
    main()
