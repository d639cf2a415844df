"""Training-step cost of PESC against dense LoRA fine-tuning and full sparse upcycling.

Claim measured: a PESC training step (shared frozen FFN computed once per token, E routed bottleneck
adapters through the sort-by-expert dispatch; Wu et al. 2024, arXiv 2401.02731) costs at most about
1.10x a dense LoRA fine-tuning step with a similar trainable-parameter budget, and much less than
sparse upcycling by copying (Komatsuzaki et al. 2023), where every token runs k full experts and
all expert weights train.

Candidates, all built from the same random dense LLaMA and fed the same batch:

* ``lora``: peft LoRA on q,k,v,o,gate,up,down of the dense model, rank chosen so that its trainable
  parameter count is closest to PESC's (the baseline);
* ``pesc``: PESC adapters (E=8, k=2, adapter dim 64, s=1), routers and adapters trainable;
* ``pesc-lora``: the MixLoRA variant (per-expert LoRA rank 8 on gate/up/down);
* ``upcycled``: copy upcycling (E=8, k=2), every expert and router weight trainable (attention and
  embeddings frozen, so the difference to PESC is the expert parametrisation).

One step = forward with labels + backward + AdamW step + zero_grad. Method (DESIGN.md,
"Performance method"): one process, warm-up, candidates interleaved round-robin (A, B, C, D, A, ...)
so machine noise hits them alike, median of the repeats, ratios against ``lora`` from the same run.

Memory: on CUDA the peak ``torch.cuda.max_memory_allocated`` of a step. On CPU there is no allocator
peak to read (tracemalloc does not see torch's allocations and RSS deltas are dominated by allocator
caching), so we report two exact byte counts instead: *static* = all parameters + gradients of the
trainable ones + AdamW's two fp32 moments, and *activations* = the unique storages autograd saves for
backward in one step (via ``torch.autograd.graph.saved_tensors_hooks``).

    python benchmarks/pesc_step.py                 # hidden 512, 4 layers, seq 256, batch 4, fp32
    python benchmarks/pesc_step.py --quick         # small smoke configuration
    python benchmarks/pesc_step.py --json out.json # also write the results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from _common import cpu_model
from moe_app.core.pesc.config import QLORA_TARGETS, PescConfig
from moe_app.core.pesc.surgery import build_pesc


def dense_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 128),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(device)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_per_rank(model: nn.Module) -> int:
    """Trainable parameters one unit of LoRA rank adds over the QLoRA targets."""
    return sum(
        m.in_features + m.out_features
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in QLORA_TARGETS
    )


def build(args: argparse.Namespace, device: torch.device) -> dict[str, nn.Module]:
    from peft import LoraConfig, inject_adapter_in_model

    from moe_app.core.upcycling import UpcycleConfig, upcycle

    models: dict[str, nn.Module] = {}
    pesc = build_pesc(
        dense_model(args, device),
        PescConfig(num_experts=args.experts, top_k=args.top_k, adapter_dim=args.adapter_dim, impl=args.impl),
    )
    budget = trainable(pesc)
    base = dense_model(args, device)
    rank = max(1, round(budget / lora_per_rank(base)))
    for p in base.parameters():
        p.requires_grad_(False)
    lora_cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.1, target_modules=list(QLORA_TARGETS))
    models["lora"] = inject_adapter_in_model(lora_cfg, base)
    for n, p in models["lora"].named_parameters():
        p.requires_grad_("lora_" in n)
    models["pesc"] = pesc
    models["pesc-lora"] = build_pesc(
        dense_model(args, device),
        PescConfig(variant="lora", num_experts=args.experts, top_k=args.top_k, lora_rank=8, impl=args.impl),
    )
    up = upcycle(
        dense_model(args, device), UpcycleConfig(method="copy", num_experts=args.experts, top_k=args.top_k)
    )
    for n, p in up.named_parameters():
        p.requires_grad_(".mlp." in n)
    models["upcycled"] = up
    args.lora_rank = rank
    return models


def make_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.opt = opt  # type: ignore[attr-defined]
    return step


def static_bytes(model: nn.Module) -> int:
    """Parameters + gradients of the trainable ones + AdamW's two fp32 moments."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    train = [p for p in model.parameters() if p.requires_grad]
    return params + sum(p.numel() * p.element_size() for p in train) + sum(2 * 4 * p.numel() for p in train)


def activation_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Unique storages autograd saves for backward in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    del loss
    return sum(seen.values())


def cuda_peak(step: Callable[[], None]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--adapter_dim", type=int, default=64)
    ap.add_argument("--impl", default="auto", choices=["auto", "grouped_mm", "loop"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="hidden 128, 2 layers, seq 64, 3 repeats")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.ffn, args.layers, args.heads, args.vocab = 128, 352, 2, 4, 2000
        args.seq, args.batch, args.repeats, args.warmup = 64, 2, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = build(args, device)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    steps = {name: make_step(m, ids) for name, m in models.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():  # interleaved A, B, C, D
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for name, m in models.items():
        row = {
            "name": name,
            "median_s": med[name],
            "ratio_vs_lora": med[name] / med["lora"],
            # median of the per-repeat ratios: robust to noise that hits one round of the interleave
            "paired_ratio_vs_lora": statistics.median(a / b for a, b in zip(times[name], times["lora"])),
            "trainable": trainable(m),
            "total": sum(p.numel() for p in m.parameters()),
            "times_s": times[name],
        }
        if device.type == "cuda":
            row["peak_bytes_cuda"] = cuda_peak(steps[name])
        else:
            row["static_bytes"] = static_bytes(m)
            row["activation_bytes"] = activation_bytes(m, ids)
        rows.append(row)
    header = (
        f"PESC step benchmark on {device.type} ({torch.cuda.get_device_name() if device.type == 'cuda' else cpu_model()}, "
        f"{torch.get_num_threads()} threads), fp32: hidden {args.hidden}, ffn {args.ffn}, {args.layers} layers, "
        f"seq {args.seq}, batch {args.batch}; E={args.experts}, k={args.top_k}, adapter dim {args.adapter_dim}, "
        f"LoRA baseline rank {args.lora_rank}; median of {args.repeats} interleaved repeats"
    )
    print(header)
    mem_cols = "peak MiB (cuda)" if device.type == "cuda" else "static MiB  activ. MiB"
    print(
        f"{'candidate':<10} {'step ms':>9} {'vs lora':>8} {'paired':>7} {'trainable':>11} {'total':>11}  {mem_cols}"
    )
    for r in rows:
        mem = (
            f"{r['peak_bytes_cuda'] / 2**20:>10.1f}"
            if device.type == "cuda"
            else f"{r['static_bytes'] / 2**20:>10.1f} {r['activation_bytes'] / 2**20:>11.1f}"
        )
        print(
            f"{r['name']:<10} {1e3 * r['median_s']:>9.1f} {r['ratio_vs_lora']:>7.2f}x {r['paired_ratio_vs_lora']:>6.2f}x "
            f"{r['trainable']:>11,} {r['total']:>11,}  {mem}"
        )
    pesc_ratio = med["pesc"] / med["lora"]
    paired = rows[list(models).index("pesc")]["paired_ratio_vs_lora"]
    verdict = "met" if max(pesc_ratio, paired) <= 1.10 else "NOT met"
    print(
        f"PESC / dense LoRA step: {pesc_ratio:.2f}x (medians), {paired:.2f}x (paired); target <= 1.10x: {verdict}"
    )
    result = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "header": header, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
