"""Cost and effect of redundancy-aware dynamic data mixing (Zhu et al., arXiv 2406.11256).

Two measurements, each a comparison inside one run (shared, noisy machines: ratios, medians):

* ``overhead`` (default): training wall time of ``dynamic`` (probe + update every ``--update-every``
  steps, 100 as claimed) against ``static`` (same weights, never updated), interleaved repeats,
  medians. Claim: overhead <= 3 %. The probe costs about ``n * probe_size`` forward rows per
  ``update_every * batch_size`` trained rows (forward + backward), ~2 % with the tiny recipe's
  6 sources x 32 probe rows, batch 32, interval 100.
* ``--quality``: per-domain exact-match accuracy on the suite's test split after the same number
  of steps with ``dynamic`` vs ``uniform`` vs ``size`` mixing (slow; sizes configurable).

    python benchmarks/mixture_overhead.py [--quick] [--json]
    python benchmarks/mixture_overhead.py --quality --steps 300 --model runs/tiny-upcycle/model [--json]

Without ``--model`` a fresh tiny MoE (random dense LLaMA, copy-upcycled) is built in a temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SUITE = ("arithmetic", "arithmetic_alt", "strings", "sorting", "lookup", "expressions")


def build_tiny_moe(out: Path, hidden: int = 64, layers: int = 2, experts: int = 8, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from moe_app.checkpoint.model_dir import save_moe_checkpoint
    from moe_app.core.data.tokenizer import suite_tokenizer
    from moe_app.core.upcycling import upcycle
    from moe_app.core.upcycling.config import UpcycleConfig

    tok = suite_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = upcycle(
        AutoModelForCausalLM.from_config(cfg), UpcycleConfig(method="noise", num_experts=experts, top_k=2)
    )
    return save_moe_checkpoint(model, out, tokenizer=tok)


def _objects(
    model_dir: Path, strategy: str, args: argparse.Namespace, weights: dict[str, float] | None = None
):
    from moe_app.core.data.sources import SourceConfig
    from moe_app.core.mixing.config import MixtureConfig
    from moe_app.lightning.data.mixture import MixtureDataModule
    from moe_app.lightning.modules.lm import GenerationConfig, ModelSource
    from moe_app.lightning.modules.moe import MoeLMModule
    from moe_app.lightning.modules.optim import OptimConfig

    module = MoeLMModule(
        source=ModelSource(pretrained=str(model_dir)),
        upcycle=None,
        log_load_every_n_steps=0,
        optim=OptimConfig(lr=args.lr, warmup_ratio=0.05),
        generation=GenerationConfig(max_new_tokens=12),
        save_dir=None,
    )
    sources = [
        SourceConfig(name=d, builtin=d, builtin_train_size=args.train_size, builtin_eval_size=args.eval_size)
        for d in SUITE
    ]
    mixture = MixtureConfig(
        strategy=strategy,
        weights=weights,
        update_every=args.update_every,
        probe_size=args.probe_size,
        plot=False,
    )
    dm = MixtureDataModule(
        sources=sources,
        tokenizer=None,
        max_length=args.max_length,
        batch_size=args.batch_size,
        mixture=mixture,
    )
    return module, dm


class _Timer:
    """Step periods (end of one training batch to the end of the next) and the run's wall time."""

    def __init__(self) -> None:
        import lightning as L

        class Cb(L.Callback):
            def on_train_start(cb, trainer, pl_module):
                self.t0 = self.last = time.perf_counter()

            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx):
                now = time.perf_counter()
                self.periods.append(now - self.last)
                self.last = now

            def on_train_end(cb, trainer, pl_module):
                self.seconds = time.perf_counter() - self.t0

        self.callback = Cb()
        self.t0 = self.last = 0.0
        self.periods: list[float] = []
        self.seconds = float("nan")


def _trainer(root: Path, steps: int, callbacks: list) -> Any:
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=callbacks,
    )


def run_overhead(model_dir: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """End to end: median wall time of interleaved static/dynamic runs at ``update_every``. Decomposed
    (robust on a shared machine): median update cost / (``claim_interval`` x median static step)."""
    import lightning as L

    from moe_app.lightning.callbacks.mixture import MixtureWeightsCallback

    steps = args.updates * args.update_every + 1  # updates at update_every, 2 * update_every, ...
    uniform = {d: 1.0 for d in SUITE}
    times: dict[str, list[float]] = {"static": [], "dynamic": []}
    step_periods: list[float] = []
    update_seconds: list[float] = []
    for r in range(args.repeats):
        order = ("static", "dynamic") if r % 2 == 0 else ("dynamic", "static")
        for strategy in order:
            L.seed_everything(0, verbose=False)
            module, dm = _objects(model_dir, strategy, args, weights=uniform)
            timer, mix = _Timer(), MixtureWeightsCallback()
            _trainer(work / f"{strategy}{r}", steps, [timer.callback, mix]).fit(module, datamodule=dm)
            times[strategy].append(timer.seconds)
            if strategy == "static":
                step_periods += timer.periods[1:]  # the first includes loader start-up
            update_seconds += mix.update_seconds
            print(f"  repeat {r} {strategy:<8} {timer.seconds:7.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    step = statistics.median(step_periods)
    update = statistics.median(update_seconds)
    return {
        "steps": steps,
        "update_every": args.update_every,
        "updates": args.updates,
        "repeats": args.repeats,
        "probe_rows": args.probe_size * len(SUITE),
        "batch_size": args.batch_size,
        "seconds": times,
        "median_s": med,
        "end_to_end_overhead": med["dynamic"] / med["static"] - 1.0,
        "median_step_s": step,
        "median_update_s": update,
        "claim_interval": args.claim_interval,
        "overhead": update / (args.claim_interval * step),
        "target": 0.03,
    }


def run_quality(model_dir: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import lightning as L

    results: dict[str, Any] = {}
    for strategy in ("dynamic", "uniform", "size"):
        L.seed_everything(0, verbose=False)
        module, dm = _objects(model_dir, strategy, args)
        trainer = _trainer(work / f"q-{strategy}", args.steps, [])
        trainer.fit(module, datamodule=dm)
        final = dm.named_weights()
        trainer.test(module, datamodule=dm, verbose=False)
        rows = {r["domain"]: r for r in module.test_results}
        results[strategy] = {
            "final_weights": final,
            "accuracy": {d: rows[d]["accuracy"] for d in SUITE if d in rows},
            "loss": {d: rows[d]["loss"] for d in SUITE if d in rows},
        }
        acc = results[strategy]["accuracy"]
        results[strategy]["mean_accuracy"] = sum(acc.values()) / max(len(acc), 1)
        print(
            f"  {strategy:<8} mean acc {results[strategy]['mean_accuracy']:.3f}  "
            + " ".join(f"{d}={a:.2f}" for d, a in acc.items()),
            flush=True,
        )
    return {"steps": args.steps, "eval_size": args.eval_size, "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quality", action="store_true", help="per-domain accuracy: dynamic vs uniform vs size")
    p.add_argument("--quick", action="store_true", help="fewer repeats / steps (smoke run)")
    p.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")
    p.add_argument(
        "--model", type=Path, default=None, help="moe-app MoE checkpoint dir (default: fresh tiny MoE)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--updates", type=int, default=2, help="overhead: updates per run")
    p.add_argument("--update-every", type=int, default=100)
    p.add_argument("--claim-interval", type=int, default=100, help="interval the decomposed overhead is for")
    p.add_argument("--probe-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--eval-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=300, help="quality: training steps per strategy")
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    if (
        args.quick
    ):  # smaller model and batch, same probe-rows : trained-rows ratio; interval 10, projected to 100
        args.repeats, args.updates, args.update_every = 2, 4, 10
        args.batch_size, args.probe_size, args.max_length = 8, 8, 48
        args.steps = min(args.steps, 60)
        args.eval_size = min(args.eval_size, 20)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = args.model or build_tiny_moe(work / "tiny-moe", hidden=32 if args.quick else 64)
        if args.quality and args.update_every > args.steps // 2:
            args.update_every = max(1, args.steps // 6)
        result = run_quality(model_dir, args, work) if args.quality else run_overhead(model_dir, args, work)
    result |= {
        "benchmark": "mixture_quality" if args.quality else "mixture_overhead",
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} threads={torch.get_num_threads()}".strip(),
        "model": str(
            args.model or f"fresh tiny MoE (hidden {32 if args.quick else 64}, 2 layers, 8 experts top-2)"
        ),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.quality:
        print(f"quality after {result['steps']} steps (update every {args.update_every}):")
        for s, r in result["results"].items():
            print(f"  {s:<8} mean accuracy {r['mean_accuracy']:.3f}")
    else:
        print(
            f"dynamic vs static, {result['steps']} steps, update every {result['update_every']}: median "
            f"{result['median_s']['dynamic']:.2f} s vs {result['median_s']['static']:.2f} s "
            f"({100 * result['end_to_end_overhead']:+.2f} % end to end)\n"
            f"update {result['median_update_s'] * 1e3:.1f} ms / ({result['claim_interval']} x step "
            f"{result['median_step_s'] * 1e3:.1f} ms) -> overhead {100 * result['overhead']:.2f} % at interval "
            f"{result['claim_interval']} (target <= 3 %)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
