"""Training step of a copy-upcycled MoE against its dense source, phase by phase, in one run.

Claim measured: a training step of the model copy-upcycled to ``E`` experts, top-``k``
(Komatsuzaki et al. 2023, "Sparse Upcycling") costs about its FLOP ratio to the dense step, i.e.
the MoE machinery (routing, sort-by-expert dispatch, the ``E``-times larger optimiser state and
gradient clipping over every expert) adds little on top of the arithmetic. Target: time ratio /
FLOP ratio <= 1.25.

One step is what ``MoeLMModule`` does with ``--trainer.gradient_clip_val 1.0``: forward with
labels (plus the router losses for the MoE), backward, ``clip_grad_norm_`` (Lightning's call),
``build_optimizer``'s AdamW step and scheduler step, ``zero_grad(set_to_none=True)``. Each phase
is timed; the optimiser phase is timed twice on the same gradients, with the kernel
``OptimConfig.impl`` picks (``new``) and with torch's default per-tensor loop that
``build_optimizer`` used before (``old``), sharing one optimiser state (the MoE's AdamW state
alone is 5.5 GB for SmolLM2-135M). ``--baseline`` swaps which of the two updates the parameters;
the timing is the same either way. Page faults (minor faults) and system time are reported per
phase because freshly allocated gradient buffers cost the kernel's page zeroing on CPU.

The FLOP ratio comes from the shapes: matmul multiply-adds per token of attention projections,
attention scores over the average causal context, FFN / ``k`` experts plus the router, LM head.

Method (DESIGN.md, "Performance method"): one process, dense and MoE interleaved (D, M, D, M, ...)
after warm-up, median of the repeats, ratios from the same run. Two estimates of the step ratio are
printed: the ratio of the two medians, and the median of the per-repeat ratios (each MoE step over
the dense step just before it), which a slow drift of the shared machine shifts less.

    python benchmarks/moe_train_step.py --tiny                     # seconds, synthetic shapes
    flock /work/notes/bigmem.lock python benchmarks/moe_train_step.py --model DIR_OR_GGUF
        # default model: the SmolLM2-135M-Instruct GGUF in the moe-app cache; ~13 GB RSS
    python benchmarks/moe_train_step.py ... --clock cpu --threads 1  # steadier on a busy machine
    python benchmarks/moe_train_step.py ... --text README.md  # a batch of real prose, not random ids
    python benchmarks/moe_train_step.py ... --split 5  # the forward by part: attention, FFN, the rest
    python benchmarks/moe_train_step.py ... --malloc system   # glibc's defaults: the step before
        # moe-app kept freed memory (see moe_app.core.utils.allocator)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from _common import cpu_model, peak_rss_mb
from moe_app.core.moe.experts import IMPLS as EXPERTS_IMPLS
from moe_app.core.moe.segments import onednn_linear

PHASES = ("forward", "backward", "clip", "optimizer")
_ONEDNN_LINEAR = "mkldnn::_linear_pointwise"
DEFAULT_GGUF = Path(os.environ.get("MOE_APP_CACHE", "~/.cache/moe_app")).expanduser() / (
    "gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
)


def load_dense(args: argparse.Namespace) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.tiny:
        cfg = LlamaConfig(
            vocab_size=2048,
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg)
    from moe_app.checkpoint.hub import load_hf_causal_lm

    model = load_hf_causal_lm(args.model, dtype="float32")
    if args.layers:  # the first N real decoder layers: real shapes and weights in a few GB
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    return model


def batch_ids(args: argparse.Namespace, vocab: int) -> torch.Tensor:
    """The step's ``(batch, seq)`` token ids: seeded uniform random ids, or (``--text``) the first
    ``batch * seq`` tokens of a text file, cut into rows. Random ids are out of distribution for a
    pretrained model, and the copy-upcycled routers send them to fewer experts (SmolLM2, 30 layers:
    116 of the 240 per-expert segments get fewer than 64 rows, against 97 on this README's text);
    the step's ratio did not improve on text for that (three runs each on one commit: 1.26, 1.26,
    1.26 on the README's first 400 tokens, 1.22, 1.25, 1.24 on random ids)."""
    if args.text is None:
        return torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    from moe_app.checkpoint.hub import load_tokenizer

    if args.tiny:
        raise SystemExit("--text needs the real model's tokenizer: drop --tiny")
    flat = load_tokenizer(args.model)(Path(args.text).read_text(encoding="utf-8")).input_ids
    need = args.batch * args.seq
    if len(flat) < need:
        raise SystemExit(f"--text {args.text}: {len(flat)} tokens, the step needs {need}")
    return torch.tensor(flat[:need]).view(args.batch, args.seq)


def macs_per_token(cfg, seq: int, experts: int | None, top_k: int) -> float:
    """Matmul multiply-adds per token of one forward (training is ~3x for both models)."""
    d, ffn, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    attn = d * q + 2 * d * kv + q * d + 2 * q * (seq + 1) / 2  # projections + QK^T, AV (causal)
    mlp = 3 * d * ffn if experts is None else top_k * 3 * d * ffn + d * experts
    return layers * (attn + mlp) + d * vocab


class _OneDNNLinear(torch.autograd.Function):
    """``x W^T`` with oneDNN's inner product for the output and the input gradient and ``torch.mm``
    (MKL) for the weight gradient: the kernels the MoE experts use on CPU, for the dense FFN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return onednn_linear(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        return onednn_linear(g2, w.t()).view(x.shape), g2.t() @ x.reshape(-1, x.shape[-1])


def dense_ffn_onednn(model: nn.Module) -> None:
    """Route every bias-free FFN projection of the dense model through :class:`_OneDNNLinear`."""
    for layer in model.model.layers:
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            assert proj.bias is None
            proj.forward = lambda x, w=proj.weight: _OneDNNLinear.apply(x, w)


class Usage:
    """Wall or process CPU time, system time and minor page faults between two marks."""

    def __init__(self, clock: str) -> None:
        self.clock = clock

    def now(self) -> tuple[float, float, int]:
        r = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter() if self.clock == "wall" else r.ru_utime + r.ru_stime
        return t, r.ru_stime, r.ru_minflt


class Candidate:
    def __init__(self, name: str, model: nn.Module, args: argparse.Namespace, is_moe: bool) -> None:
        from moe_app.core.utils.clipping import can_fold
        from moe_app.lightning.modules.optim import OptimConfig, build_optimizer

        self.name, self.model, self.is_moe, self.args = name, model, is_moe, args
        self.params = [p for p in model.parameters() if p.requires_grad]
        cfg = OptimConfig(lr=1e-6, weight_decay=0.01, warmup_steps=0, schedule="constant", impl="auto")
        out = build_optimizer(self.params, cfg, total_steps=1000)
        self.opt, self.sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
        self.new_kernel = {k: self.opt.param_groups[0][k] for k in ("fused", "foreach")}
        # The folded clip needs the fused step to be the only one on these gradients.
        self.fold_clip = args.clip == "moe-app" and args.no_old and can_fold(self.opt)
        self.old_kernel = {"fused": False, "foreach": None}  # torch's default: the loop on CPU
        self.times: dict[str, list[float]] = {p: [] for p in (*PHASES, "optimizer_old")}
        self.sys: dict[str, list[float]] = {p: [] for p in self.times}
        self.faults: dict[str, list[int]] = {p: [] for p in self.times}
        model.train()

    def _kernel(self, kernel: dict) -> None:
        for group in self.opt.param_groups:
            group.update(kernel)

    def loss(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The training loss: the LM loss, plus the router losses for the MoE."""
        from moe_app.core.moe.losses import RouterLossConfig, weighted_router_losses

        loss = self.model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        if self.is_moe:
            loss = loss + sum(weighted_router_losses(self.model, mask, RouterLossConfig()).values())
        return loss

    def step(self, ids: torch.Tensor, mask: torch.Tensor, usage: Usage, record: bool) -> None:
        from moe_app.core.utils.clipping import clip_grad_norm_folded, release

        marks = [usage.now()]
        loss = self.loss(ids, mask)
        marks.append(usage.now())
        loss.backward()
        marks.append(usage.now())
        if self.fold_clip:  # what CausalLMModule does with gradient_clip_val: the fused step scales
            clip_grad_norm_folded(self.opt, self.params, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)  # Lightning's default clipping
        marks.append(usage.now())
        # The two kernels on the same gradients; the second one's update is the one that counts.
        order = [("optimizer", self.new_kernel), ("optimizer_old", self.old_kernel)]
        if self.args.baseline:
            order.reverse()
        if self.args.no_old:  # a real step: one update, no second pass over the optimiser state
            order = [o for o in order if o[0] == "optimizer"]
        spans = {}
        for name, kernel in order:
            self._kernel(kernel)
            t0 = usage.now()
            self.opt.step()
            spans[name] = (t0, usage.now())
        release(self.opt)
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if not record:
            return
        for phase, a, b in zip(PHASES[:3], marks, marks[1:], strict=False):
            self._record(phase, a, b)
        for name, (a, b) in spans.items():
            self._record(name, a, b)

    def _record(self, phase: str, a, b) -> None:
        self.times[phase].append(b[0] - a[0])
        self.sys[phase].append(b[1] - a[1])
        self.faults[phase].append(b[2] - a[2])

    def median(self, phase: str) -> float:
        return statistics.median(self.times[phase])

    def step_totals(self, old: bool = False) -> list[float]:
        """Each recorded step's time, phases summed."""
        opt = "optimizer_old" if old else "optimizer"
        return [sum(s) for s in zip(*(self.times[p] for p in (*PHASES[:3], opt)), strict=True)]

    def total(self, old: bool = False) -> float:
        return statistics.median(self.step_totals(old))


def profile_step(cand: Candidate, ids: torch.Tensor, mask: torch.Tensor, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cand.step(ids, mask, Usage("wall"), record=False)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def ffn_gemm_table(cand: Candidate, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, str]:
    """The FFN matmuls of one profiled step (forward and backward): ``(ms, GMAC/s, table by rows)``.

    An FFN matmul is an ``aten::mm`` (or a oneDNN linear, which the experts use on CPU) with the
    FFN width ``F`` or ``2F`` (fused gate/up) among its sizes; the row count is the size that is neither ``F``, ``2F`` nor the hidden size (tokens for the
    dense FFN, the tokens routed to one expert for the MoE). Time is the profiler's wall time of the
    call on the calling thread (MKL's threads included)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = cand.model.config
    ffn, d = {cfg.intermediate_size, 2 * cfg.intermediate_size}, cfg.hidden_size
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        cand.step(ids, mask, Usage("wall"), record=False)
    edges = (16, 64, 128, 256)
    buckets: dict[str, list[float]] = {}
    total_ms = total_mac = 0.0
    for ev in prof.key_averages(group_by_input_shape=True):
        shapes = ev.input_shapes
        if len(shapes) < 2 or len(shapes[0]) != 2 or len(shapes[1]) != 2:
            continue
        if ev.key == "aten::mm":  # (a, b) @ (b, c)
            (a, b), (_, c) = shapes[:2]
        elif ev.key == _ONEDNN_LINEAR:  # x (a, b) times W^T, W (c, b)
            (a, b), (c, _) = shapes[:2]
        else:
            continue
        if not ffn & {a, b, c} or cfg.vocab_size in (a, b, c):
            continue
        ms, mac = ev.self_cpu_time_total / 1e3, float(a) * b * c * ev.count
        rows = next((x for x in (a, b, c) if x not in ffn | {d}), None)
        label = "other" if rows is None else next((f"< {e}" for e in edges if rows < e), f">= {edges[-1]}")
        acc = buckets.setdefault(label, [0.0, 0.0, 0])
        acc[0], acc[1], acc[2] = acc[0] + ms, acc[1] + mac, acc[2] + ev.count
        total_ms, total_mac = total_ms + ms, total_mac + mac
    order = [f"< {e}" for e in edges] + [f">= {edges[-1]}", "other"]
    lines = [
        f"  rows {k:<7} {buckets[k][2]:>5} calls {buckets[k][0]:>8.1f} ms {buckets[k][1] / buckets[k][0] / 1e6:>6.1f} GMAC/s"
        for k in order
        if k in buckets and buckets[k][0] > 0
    ]
    return total_ms, total_mac / max(total_ms, 1e-9) / 1e6, "\n".join(lines)


def forward_split(cand: Candidate, ids: torch.Tensor, mask: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of the forward by part, timed with module hooks over ``repeats`` extra
    forwards (no backward): the decoder layers' attention, their FFN (the MoE block: router,
    dispatch and experts) and, for the MoE, the routers alone; ``rest`` is everything else
    (embeddings, norms, LM head, loss and the router losses)."""
    spent: dict[str, float] = {}
    started: dict[int, float] = {}
    handles = []

    def timed(module: nn.Module, part: str) -> None:
        def pre(*_):
            started[id(module)] = time.perf_counter()

        def post(*_):
            spent[part] = spent.get(part, 0.0) + time.perf_counter() - started[id(module)]

        handles.extend([module.register_forward_pre_hook(pre), module.register_forward_hook(post)])

    for layer in cand.model.model.layers:
        timed(layer.self_attn, "attention")
        timed(layer.mlp, "ffn")
        if hasattr(layer.mlp, "router"):
            timed(layer.mlp.router, "router")
    runs = []
    try:
        with torch.no_grad():
            for _ in range(repeats):
                spent.clear()
                t0 = time.perf_counter()
                cand.loss(ids, mask)
                total = time.perf_counter() - t0
                runs.append({**spent, "rest": total - spent["attention"] - spent["ffn"], "total": total})
    finally:
        for h in handles:
            h.remove()
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_GGUF), help="dense model: HF dir or GGUF file")
    p.add_argument("--tiny", action="store_true", help="a random 4-layer LLaMA (hidden 128) instead")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (0: all)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="cpu: process user+sys time")
    p.add_argument("--baseline", action="store_true", help="the old AdamW loop updates the parameters")
    p.add_argument(
        "--no-old",
        action="store_true",
        help="do not also time the old AdamW loop on the same gradients (the step is then exactly "
        "one training step; the old loop's temporaries otherwise churn the heap between phases)",
    )
    p.add_argument("--profile", type=int, default=0, help="print a torch.profiler table of N rows per model")
    p.add_argument(
        "--gemm-table",
        action="store_true",
        help="profile one more step of each model: the FFN matmuls' time and GMAC/s (the MoE's by "
        "rows per expert), i.e. how much of the excess is the small per-expert GEMMs",
    )
    p.add_argument(
        "--split",
        type=int,
        default=0,
        help="time N more forwards of each model by part (attention, FFN or MoE block, router, the "
        "rest) with module hooks: which part the forward's excess is in",
    )
    p.add_argument(
        "--malloc",
        default="moe-app",
        choices=["moe-app", "system"],
        help="moe-app: keep freed heap memory as `moe-app fit` does (core/utils/allocator.py); "
        "system: glibc's defaults (the figure before that change)",
    )
    p.add_argument(
        "--clip",
        default="moe-app",
        choices=["moe-app", "torch"],
        help="moe-app: the clip coefficient applied inside the fused AdamW step, as training does "
        "(core/utils/clipping.py; needs --no-old); torch: clip_grad_norm_'s separate multiply pass",
    )
    p.add_argument(
        "--text",
        default=None,
        help="a UTF-8 text file whose first batch*seq tokens make the step's batch (default: seeded "
        "random ids); e.g. README.md, real prose at hand offline",
    )
    p.add_argument(
        "--experts-impl",
        default="auto",
        choices=EXPERTS_IMPLS,
        help="the MoE experts' matmuls (SwiGLUExperts.impl; auto = onednn for fp32 on CPU): "
        "grouped_mm for the step before moe_app.core.moe.segments",
    )
    p.add_argument(
        "--ab-impls",
        nargs="*",
        default=[],
        choices=EXPERTS_IMPLS,
        help="also step the same MoE (same optimiser) with these experts impls, alternating with "
        "--experts-impl in every round, the order swapped every other round: an A/B of the matmuls "
        "in one process, free of the host's drift",
    )
    p.add_argument(
        "--dense-ffn",
        default="mkl",
        choices=["mkl", "onednn"],
        help="onednn: the dense model's FFN products on the same kernels as the experts' (a control: "
        "how much of the ratio is the kernel, not the MoE)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.malloc == "moe-app":
        from moe_app.core.utils.allocator import keep_freed_memory

        malloc = f"moe-app ({keep_freed_memory()})"
    else:
        malloc = "glibc defaults"

    from moe_app.core.upcycling import UpcycleConfig, upcycle

    dense = load_dense(args)
    moe = upcycle(
        copy.deepcopy(dense), UpcycleConfig(method="copy", num_experts=args.experts, top_k=args.top_k)
    )
    if args.dense_ffn == "onednn":
        dense_ffn_onednn(dense)
    from moe_app.core.moe import SwiGLUExperts

    experts = [mod for mod in moe.modules() if isinstance(mod, SwiGLUExperts)]
    cands = [Candidate("dense", dense, args, False), Candidate("moe", moe, args, True)]
    impl_of = {"moe": args.experts_impl}
    for impl in args.ab_impls:  # the same model and optimiser, stepped once more per round with `impl`
        alt = copy.copy(cands[1])
        alt.name = f"moe[{impl}]"
        alt.times, alt.sys, alt.faults = ({p: [] for p in cands[1].times} for _ in range(3))
        cands.append(alt)
        impl_of[alt.name] = impl
    cfg = dense.config
    flop_ratio = macs_per_token(cfg, args.seq, args.experts, args.top_k) / macs_per_token(
        cfg, args.seq, None, 1
    )

    ids = batch_ids(args, cfg.vocab_size)
    mask = torch.ones_like(ids)
    usage = Usage(args.clock)
    for i in range(args.warmup + args.repeats):
        # With --ab-impls the MoE variants swap order every round (ABBA): whichever follows the
        # other MoE step finds the heap and caches as that step left them, not as the dense one did.
        for c in cands if i % 2 == 0 else [cands[0], *reversed(cands[1:])]:
            for mod in experts if c.is_moe else ():
                mod.impl = impl_of[c.name]
            c.step(ids, mask, usage, record=i >= args.warmup)
    for mod in experts:
        mod.impl = args.experts_impl

    d, m, *alts = cands
    cands = [d, m]
    n_params = {c.name: sum(p.numel() for p in c.params) for c in cands}
    print(
        f"{'tiny random LLaMA' if args.tiny else args.model} ({cfg.num_hidden_layers} layers): dense vs copy-upcycled E={args.experts} "
        f"top-{args.top_k}, batch {args.batch} x {args.seq} tokens ({'random ids' if args.text is None else args.text}), fp32, {args.clock} clock, median of "
        f"{args.repeats} (warm-up {args.warmup}), interleaved\n"
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, CPU: {cpu_model()}; params dense "
        f"{n_params['dense'] / 1e6:.1f}M, moe {n_params['moe'] / 1e6:.1f}M; AdamW new={m.new_kernel} "
        f"old=torch default (loop); parameters updated by {'old' if args.baseline else 'new'}; "
        f"malloc: {malloc}; clip: {'folded into the fused step' if m.fold_clip else 'clip_grad_norm_'}; "
        f"experts impl: {args.experts_impl}; dense FFN: {args.dense_ffn}"
    )
    print(f"{'phase':<15}{'dense s':>9}{'moe s':>9}{'moe/dense':>11}{'moe sys s':>11}{'moe faults':>12}")
    for ph in (*PHASES, *(() if args.no_old else ("optimizer_old",))):
        sys_s = statistics.median(m.sys[ph])
        flt = statistics.median(m.faults[ph])
        print(
            f"{ph:<15}{d.median(ph):>9.3f}{m.median(ph):>9.3f}{m.median(ph) / d.median(ph):>10.2f}x"
            f"{sys_s:>11.3f}{flt:>12.0f}"
        )
    new_ratio = m.total() / d.total()
    per_repeat = [a / b for a, b in zip(m.step_totals(), d.step_totals(), strict=True)]
    paired = statistics.median(per_repeat)
    print(f"{'total new':<15}{d.total():>9.3f}{m.total():>9.3f}{new_ratio:>10.2f}x")
    old_ratio = float("nan")
    if not args.no_old:
        old_ratio = m.total(old=True) / d.total(old=True)
        print(f"{'total old':<15}{d.total(old=True):>9.3f}{m.total(old=True):>9.3f}{old_ratio:>10.2f}x")
    print(
        f"FLOP ratio (shapes) {flop_ratio:.3f}; time ratio new {new_ratio:.2f}x -> time/FLOP "
        f"{new_ratio / flop_ratio:.2f} (target <= 1.25); old {old_ratio:.2f}x -> {old_ratio / flop_ratio:.2f}"
    )
    print(
        f"median of the per-repeat ratios {paired:.2f}x -> time/FLOP {paired / flop_ratio:.2f} "
        f"(each: {', '.join(f'{r:.2f}' for r in per_repeat)})"
    )
    for alt in alts:
        r = m.total() / alt.total()
        per = statistics.median(a / b for a, b in zip(m.step_totals(), alt.step_totals(), strict=True))
        print(
            f"A/B in one process: MoE step {m.total():.3f} s with {args.experts_impl}, {alt.total():.3f} s with "
            f"{alt.name[4:-1]} -> {r:.3f}x (per round {per:.3f}x; forward {m.median('forward') / alt.median('forward'):.3f}x, "
            f"backward {m.median('backward') / alt.median('backward'):.3f}x); {alt.name} vs dense time/FLOP "
            f"{alt.total() / d.total() / flop_ratio:.2f}"
        )
    print(f"peak RSS {peak_rss_mb():.0f} MB")
    if args.gemm_table:
        (d_ms, d_rate, _), (m_ms, m_rate, table) = (ffn_gemm_table(c, ids, mask) for c in cands)
        print(
            f"FFN matmuls of one step: dense {d_ms:.0f} ms at {d_rate:.1f} GMAC/s, MoE experts {m_ms:.0f} ms "
            f"at {m_rate:.1f} GMAC/s -> time per MAC {d_rate / m_rate:.2f}x the dense FFN's; by rows per expert:"
        )
        print(table)
    split = {}
    if args.split:
        split = {c.name: forward_split(c, ids, mask, args.split) for c in cands}
        ds, ms = split["dense"], split["moe"]
        print(f"forward by part, s (median of {args.split} forwards without backward, module hooks):")
        print(f"  {'part':<10}{'dense':>8}{'moe':>8}{'moe/dense':>10}")
        for part in ("attention", "ffn", "router", "rest", "total"):
            if part in ds:
                print(f"  {part:<10}{ds[part]:>8.3f}{ms[part]:>8.3f}{ms[part] / ds[part]:>9.2f}x")
            elif part in ms:
                print(f"  {part:<10}{'-':>8}{ms[part]:>8.3f}")
        print(
            f"  FFN FLOP ratio {args.top_k:.2f}x (+ router); excess over it "
            f"{ms['ffn'] - args.top_k * ds['ffn']:.3f} s, rest and attention "
            f"{ms['rest'] + ms['attention'] - ds['rest'] - ds['attention']:+.3f} s"
        )
    for c in cands[: 0 if not args.profile else 2]:
        print(f"--- torch.profiler, one {c.name} step (wall time) ---")
        print(profile_step(c, ids, mask, args.profile))
    result = {
        "config": vars(args),
        "malloc": malloc,
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "flop_ratio": flop_ratio,
        "time_ratio_new": new_ratio,
        "time_ratio_old": old_ratio,
        "time_ratio_paired": paired,
        "median_s": {c.name: {ph: c.median(ph) for ph in c.times if c.times[ph]} for c in (*cands, *alts)},
        "times_s": {c.name: c.times for c in (*cands, *alts)},
        "minor_faults": {c.name: c.faults for c in (*cands, *alts)},
        "peak_rss_mb": peak_rss_mb(),
        "forward_split_s": split,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
