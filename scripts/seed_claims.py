#!/usr/bin/env python
"""Re-run the project's tiny-scale claims with several seeds and report mean and spread per claim.

Every run is an ordinary ``moe-app fit`` / ``test`` / ``prune`` command on the configs under
``configs/tiny/`` (the ``make demo`` setting, with fewer steps; the settings used are printed in the
table header). Per seed the whole chain is retrained -- ``seed_everything``, the data shuffle seed,
PESC's router/adapter init seed and the pruning calibration sample all take the seed -- and runs
that several claims share are made once per seed:

  dense base (configs/tiny/dense.yaml)
    +-> dense continued on the upcycling data/optimiser/steps  } claim 1: sparse upcycling
    +-> upcycled MoE (configs/tiny/upcycle.yaml)               }
    |     +-> instruction tuning, one run per mixing strategy (configs/tiny/mixture.yaml)  claim 3
    |           dynamic run -> prune to r experts: enumerate / frequency / reap / merge     claim 4
    |                           enumerate-pruned -> dynamic skipping calibration            claim 5
    |                       -> slimming / trimming recipes (wanda, 2:4, layer/block drop)   claim 6
    +-> PESC (configs/tiny/pesc.yaml) vs dense LoRA (configs/tiny/lora.yaml)                claim 2

The test set is fixed (the built-in suite's test split; the data seed only shuffles training
rows), so the spread is the training/calibration variance. A claim "holds" here only when the
per-seed paired difference has the same sign in every seed and its mean exceeds its std;
otherwise the table says the difference is within the spread.

To avoid paying the ~20 s torch/lightning import per command (about 30 commands per seed), the
script imports moe-app once and forks a fresh child process per command (``os.fork``: the child
runs ``moe_app.cli.main.main(argv)`` exactly as ``moe-app`` would, with its output in the run's
``log.txt``). A run whose directory already holds its outputs for the same command is reused, so an
interrupted sweep resumes.

Usage:
  python scripts/seed_claims.py                  # default settings, seeds 0 1 2
  python scripts/seed_claims.py --seeds 0 1 2 3  # more seeds
  python scripts/seed_claims.py --quick          # a few steps per stage: checks the plumbing
Writes runs/seeds/<settings>/s<seed>/<run>/... and runs/seeds/<settings>/seed_claims.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("arithmetic", "arithmetic_alt", "strings", "sorting", "lookup", "expressions")
EVERY_DOMAIN = json.dumps([{"name": d, "builtin": d} for d in DOMAINS])
UPCYCLE_DATA = json.dumps([{"name": "pretrain", "builtin": "pretrain"}, {"name": "suite", "builtin": "all"}])
STRATEGIES = ("dynamic", "uniform", "size", "static_gate_load", "random", "sequential", "sentence_embedding")
PRUNE_METHODS = ("enumerate", "frequency", "reap", "merge")


@dataclass(frozen=True)
class Settings:
    """Everything that changes the numbers (named in the table header and the run folder)."""

    dense_steps: int = 150
    """Dense pre-training steps (``make demo``: 800)."""
    cont_steps: int = 50
    """Upcycled continual pre-training steps, and the same for the dense continuation (demo: 300)."""
    tune_steps: int = 50
    """PESC and LoRA steps (demo: 400)."""
    mix_steps: int = 30
    """Instruction tuning steps per mixing strategy (demo mixture.yaml: 300)."""
    mix_update_every: int = 5
    """Steps between dynamic mixture updates (mixture.yaml: 25, for 300 steps)."""
    test_examples: int = 30
    """Test examples per domain where exact match is generated (claims 1, 2; the demo uses 30)."""
    loss_examples: int = 100
    """Test examples per domain for loss-only tests (claims 3-6; the suite's test split has 100)."""
    keep: int = 6
    """Experts kept per layer by every pruning method (of 8)."""
    calib_samples: int = 32
    """Calibration sequences for pruning and skipping."""

    def tag(self) -> str:
        return (
            f"d{self.dense_steps}-c{self.cont_steps}-t{self.tune_steps}-m{self.mix_steps}u{self.mix_update_every}"
            f"-n{self.test_examples}-{self.loss_examples}-r{self.keep}-k{self.calib_samples}"
        )


QUICK = Settings(
    dense_steps=20,
    cont_steps=10,
    tune_steps=10,
    mix_steps=10,
    mix_update_every=5,
    test_examples=4,
    loss_examples=8,
    calib_samples=8,
)


# ----------------------------------------------------------------------------------- running


class RunFailed(RuntimeError):
    pass


class Runner:
    """Runs ``moe-app`` commands in forked children of this (pre-imported) process."""

    def __init__(self, base: Path, threads: int | None = None) -> None:
        self.base = base
        self.threads = threads
        """torch intra-op threads per command (1 when several seeds run at once on 2 cores)."""
        self.timings: dict[str, float] = {}
        import lightning.pytorch  # noqa: F401

        import moe_app.lightning.data.mixture
        import moe_app.lightning.modules.lora
        import moe_app.lightning.modules.moe
        import moe_app.lightning.modules.pesc  # noqa: F401
        from moe_app.cli.main import main  # the expensive imports, once

        self._main = main

    def moe(self, run_dir: Path, argv: list[str]) -> None:
        """Run ``moe-app <argv>`` with its output appended to ``run_dir/log.txt``; raise on failure."""
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "log.txt"
        with open(log, "a") as f:
            f.write(f"\n$ moe-app {shlex.join(argv)}\n")
        t0 = time.time()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child: a fresh process as far as the command is concerned
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_APPEND)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.chdir(ROOT)
                if self.threads:
                    import torch

                    torch.set_num_threads(self.threads)
                code = int(self._main(argv) or 0)
            except BaseException as exc:
                print(f"seed_claims child: {exc!r}", file=sys.stderr)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        dt = time.time() - t0
        key = str(run_dir.relative_to(self.base))
        self.timings[key] = self.timings.get(key, 0.0) + dt
        print(f"  [{dt:6.1f}s] moe-app {argv[0]} -> {key}  (rc {code})", flush=True)
        if code != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise RunFailed(f"moe-app {shlex.join(argv)} exited {code}; log {log}:\n{tail}")

    def once(self, run_dir: Path, commands: list[list[str]], done: Path) -> None:
        """Run ``commands`` unless ``done`` exists from the same commands (resume / reuse)."""
        stamp = run_dir / "commands.json"
        if done.exists() and stamp.exists() and json.loads(stamp.read_text()) == commands:
            print(f"  [reused] {run_dir.relative_to(self.base)}", flush=True)
            return
        if run_dir.exists():  # an interrupted or different run: start it clean (no stale last.ckpt)
            shutil.rmtree(run_dir)
        for argv in commands:
            self.moe(run_dir, argv)
        stamp.write_text(json.dumps(commands, indent=1))


QUIET = ["--trainer.enable_progress_bar", "false"]


def test_args(s: Settings, generate: bool) -> list[str]:
    """Exact-match tests generate answers (at most 16 tokens); loss-only tests skip generation and
    use more examples, since a forward pass per example is cheap next to 16 decoding steps."""
    n = s.test_examples if generate else s.loss_examples
    gen = ["--model.init_args.generation.max_new_tokens", "16"]
    if not generate:
        gen = ["--model.init_args.generation.enabled", "false"]
    return [*QUIET, "--data.init_args.max_eval_examples_per_source", str(n), *gen]


def fit_and_test(
    r: Runner,
    run_dir: Path,
    config: str,
    seed: int,
    steps: int,
    s: Settings,
    model_args=(),
    data_args=(),
    test_data=(),
    generate: bool = True,
) -> dict:
    """``moe-app fit`` then ``moe-app test --ckpt_path last``; returns test_results.json.

    One validation pass (2 batches) at the end: validation is not reported here."""
    common = ["-c", config, "--trainer.default_root_dir", str(run_dir), *model_args]
    seeded = ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
    steps_args = ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
    steps_args += ["--trainer.limit_val_batches", "2"]
    r.once(
        run_dir,
        [
            ["fit", *common, *seeded, *steps_args, *QUIET, *data_args],
            ["test", *common, *seeded, "--ckpt_path", "last", *test_args(s, generate), *test_data],
        ],
        run_dir / "test_results.json",
    )
    return json.loads((run_dir / "test_results.json").read_text())


def test_only(r: Runner, run_dir: Path, config: str, model_args: list[str], seed: int, s: Settings) -> dict:
    """Loss-only ``moe-app test`` of an offline-made checkpoint (pruned / skipping)."""
    argv = ["test", "-c", config, "--trainer.default_root_dir", str(run_dir), "--seed_everything", str(seed)]
    r.once(run_dir, [[*argv, *model_args, *test_args(s, generate=False)]], run_dir / "test_results.json")
    return json.loads((run_dir / "test_results.json").read_text())


def prune(r: Runner, run_dir: Path, ckpt: Path, seed: int, s: Settings, extra: list[str]) -> dict:
    out, report = run_dir / "model", run_dir / "prune_report.json"
    argv = ["prune", "--ckpt", str(ckpt), "--out", str(out), "--seed", str(seed)]
    argv += ["--calib_samples", str(s.calib_samples), "--max_length", "96", "--batch_size", "16"]
    argv += [*extra, "--report", str(report), "--overwrite"]
    r.once(run_dir, [argv], report)
    return json.loads(report.read_text())


# ----------------------------------------------------------------------------------- metrics


def by_domain(res: dict) -> dict[str, dict]:
    return {row["domain"]: row for row in res["rows"]}


def loss(res: dict) -> float:
    return by_domain(res)["ALL"]["loss"]


def em(res: dict, domain: str = "ALL") -> float:
    """Exact match in %, ``ALL`` = over every generated answer (equal examples per domain)."""
    return 100.0 * by_domain(res)[domain]["accuracy"]


def recon(report: dict) -> float:
    """Summed per-layer reconstruction loss of the pruned layers (sum_b ||Z_b - Z'_b||_F)."""
    return sum(report["experts"]["reconstruction_loss"].values())


# ----------------------------------------------------------------------------------- claims
# Each claim function runs (or reuses) its runs for one seed and returns {row: {metric: value}}.


def seed_dir(base: Path, seed: int) -> Path:
    return base / f"s{seed}"


def dense_base(r: Runner, base: Path, seed: int, s: Settings) -> tuple[Path, dict]:
    """The seed's dense base (configs/tiny/dense.yaml), shared by claims 1 and 2."""
    d = seed_dir(base, seed) / "dense"
    every = ["--data.init_args.sources", EVERY_DOMAIN]
    res = fit_and_test(r, d, "configs/tiny/dense.yaml", seed, s.dense_steps, s, test_data=every)
    return d / "model", res


def upcycled(r: Runner, base: Path, seed: int, s: Settings) -> tuple[Path, dict]:
    """The seed's upcycled MoE (configs/tiny/upcycle.yaml), shared by claims 1 and 3-5."""
    dense, _ = dense_base(r, base, seed, s)
    d = seed_dir(base, seed) / "upcycle"
    src = ["--model.init_args.source.pretrained", str(dense)]
    every = ["--data.init_args.sources", EVERY_DOMAIN]
    res = fit_and_test(r, d, "configs/tiny/upcycle.yaml", seed, s.cont_steps, s, src, test_data=every)
    return d / "model", res


def mixture_run(r: Runner, base: Path, seed: int, s: Settings, strategy: str) -> tuple[Path, dict]:
    """Instruction tuning of the seed's upcycled MoE with one mixing strategy (configs/tiny/mixture.yaml)."""
    up, _ = upcycled(r, base, seed, s)
    d = seed_dir(base, seed) / f"mix-{strategy}"
    mix = ["--data.init_args.mixture.strategy", strategy]
    mix += ["--data.init_args.mixture.update_every", str(s.mix_update_every)]
    res = fit_and_test(
        r,
        d,
        "configs/tiny/mixture.yaml",
        seed,
        s.mix_steps,
        s,
        ["--model.init_args.source.pretrained", str(up)],
        data_args=mix,
        generate=False,
    )
    return d / "model", res


def finished_mixing(base: Path, seed: int, strategies) -> dict:
    """Claim 3's rows from the mixing runs of ``seed`` that finished (fit and test)."""
    rows = {}
    for strategy in strategies:
        d = seed_dir(base, seed) / f"mix-{strategy}"
        if (d / "commands.json").exists() and (d / "test_results.json").exists():
            res = json.loads((d / "test_results.json").read_text())
            rows[strategy] = {"loss": loss(res), **{dom: by_domain(res)[dom]["loss"] for dom in DOMAINS}}
    return rows


def claim_upcycling(r: Runner, base: Path, seed: int, s: Settings) -> dict:
    """Claim 1 (Komatsuzaki et al. 2022): the upcycled MoE beats the dense model trained on for
    the same tokens (same data, batch, steps, optimiser schedule)."""
    dense, dense_res = dense_base(r, base, seed, s)
    _, up = upcycled(r, base, seed, s)
    # The dense continuation copies upcycle.yaml's data and optimiser onto dense.yaml's module.
    cont_opt = [
        "--model.init_args.optim.lr", "1.0e-3", "--model.init_args.optim.weight_decay", "0.01",
        "--model.init_args.optim.warmup_ratio", "0.05", "--model.init_args.optim.schedule", "cosine",
        "--model.init_args.optim.min_lr_ratio", "0.1", "--trainer.gradient_clip_val", "1.0",
    ]  # fmt: skip
    cont = fit_and_test(
        r,
        seed_dir(base, seed) / "dense_cont",
        "configs/tiny/dense.yaml",
        seed,
        s.cont_steps,
        s,
        ["--model.init_args.source.pretrained", str(dense), *cont_opt],
        data_args=["--data.init_args.sources", UPCYCLE_DATA],
        test_data=["--data.init_args.sources", EVERY_DOMAIN],
    )
    return {
        "dense base": {"loss": loss(dense_res), "em": em(dense_res)},
        "dense continued": {"loss": loss(cont), "em": em(cont)},
        "upcycled MoE (8x top-2)": {"loss": loss(up), "em": em(up)},
    }


def claim_pesc(r: Runner, base: Path, seed: int, s: Settings) -> dict:
    """Claim 2 (Camelidae, arXiv 2401.02731): PESC vs dense LoRA at a similar trainable budget."""
    dense, _ = dense_base(r, base, seed, s)
    src = ["--model.init_args.source.pretrained", str(dense)]
    every = ["--data.init_args.sources", EVERY_DOMAIN]
    rows = {}
    for label, cfg, extra in (
        ("PESC (8 adapters top-2)", "configs/tiny/pesc.yaml", ["--model.init_args.pesc.seed", str(seed)]),
        ("dense LoRA r14", "configs/tiny/lora.yaml", []),
    ):
        d = seed_dir(base, seed) / Path(cfg).stem
        res = fit_and_test(r, d, cfg, seed, s.tune_steps, s, [*src, *extra], test_data=every)
        row = {"loss": loss(res), "em": em(res), "trainable": res["parameters"]["trainable"]}
        row.update({dom: em(res, dom) for dom in DOMAINS})
        rows[label] = row
    return rows


def claim_mixing(r: Runner, base: Path, seed: int, s: Settings, strategies=STRATEGIES) -> dict:
    """Claim 3 (Zhu et al. 2024, arXiv 2406.11256): dynamic redundancy-aware mixing vs static
    mixtures and the paper's baselines, each instruction-tuning the same upcycled MoE."""
    rows = {}
    for strategy in strategies:
        _, res = mixture_run(r, base, seed, s, strategy)
        rows[strategy] = {"loss": loss(res), **{dom: by_domain(res)[dom]["loss"] for dom in DOMAINS}}
    return rows


def claim_pruning(r: Runner, base: Path, seed: int, s: Settings) -> dict:
    """Claim 4 (Lu et al. 2024, arXiv 2402.14800): enumeration pruning keeps the lowest
    reconstruction loss at the same r, vs frequency, REAP and HC-SMoE merging."""
    tuned, ref = mixture_run(r, base, seed, s, "dynamic")
    rows = {"unpruned (8 experts)": {"recon": 0.0, "calib": float("nan"), "loss": loss(ref)}}
    for method in PRUNE_METHODS:
        d = seed_dir(base, seed) / f"prune-{method}"
        rep = prune(r, d, tuned, seed, s, ["--keep", str(s.keep), "--method", method])
        model = ["--model.init_args.source.pretrained", str(d / "model")]
        res = test_only(r, d / "test", "configs/tiny/mixture.yaml", model, seed, s)
        rows[method] = {"recon": recon(rep), "calib": rep["eval_loss_after"], "loss": loss(res)}
        rows["unpruned (8 experts)"]["calib"] = rep["eval_loss_before"]
    return rows


def enumeration_pruned(r: Runner, base: Path, seed: int, s: Settings) -> Path:
    """Claim 4's enumeration-pruned run of ``seed`` (made, with the other methods, if missing)."""
    pruned = seed_dir(base, seed) / "prune-enumerate"
    if not (pruned / "test" / "test_results.json").exists():
        claim_pruning(r, base, seed, s)
    return pruned


def claim_skipping(r: Runner, base: Path, seed: int, s: Settings) -> dict:
    """Claim 5 (Lu et al. 2024): dynamic skipping of the second expert saves compute for a small
    loss increase (calibrated on the enumeration-pruned model)."""
    pruned = enumeration_pruned(r, base, seed, s)
    d = seed_dir(base, seed) / "skip"
    rep = prune(r, d, pruned / "model", seed, s, ["--skipping"])
    model = ["--model.init_args.source.pretrained", str(d / "model")]
    res = test_only(r, d / "test", "configs/tiny/mixture.yaml", model, seed, s)
    before = json.loads((pruned / "test" / "test_results.json").read_text())
    return {
        "skipping": {
            "skip_rate": 100.0 * rep["skipping"]["skip_rate"]["all"],
            "calib_delta": rep["eval_loss_after"] - rep["eval_loss_before"],
            "loss_before": loss(before),
            "loss_after": loss(res),
            "loss_delta": loss(res) - loss(before),
        }
    }


def compression_recipes(keep: int) -> dict[str, list[str]]:
    """He et al. 2024 (arXiv 2406.02500): expert trimming and slimming, alone and combined, each one
    ``moe-app prune`` command on the seed's dynamic-mixing model (``keep`` alone is claim 4's run)."""
    by_enumeration = ["--keep", str(keep), "--method", "enumerate"]
    return {
        "wanda 0.5": ["--slim", "wanda", "--sparsity", "0.5"],
        "2:4": ["--slim", "2:4"],
        f"keep {keep} + wanda 0.5": [*by_enumeration, "--slim", "wanda", "--sparsity", "0.5"],
        f"keep {keep} + layer drop 1": [*by_enumeration, "--layer_drop", "1"],
        "block drop 1": ["--block_drop", "1"],
    }


def claim_compression(r: Runner, base: Path, seed: int, s: Settings) -> dict:
    """Claim 6 (He et al. 2024): what each compression recipe costs in test loss, against the
    unpruned model and expert pruning alone (claim 4's enumeration run)."""
    tuned, ref = mixture_run(r, base, seed, s, "dynamic")
    keep_r = json.loads((enumeration_pruned(r, base, seed, s) / "test" / "test_results.json").read_text())
    rows = {"unpruned": {"loss": loss(ref)}, f"keep {s.keep}": {"loss": loss(keep_r)}}
    for name, extra in compression_recipes(s.keep).items():
        d = seed_dir(base, seed) / ("compress-" + name.replace(" ", "_").replace(":", "-").replace("+", ""))
        prune(r, d, tuned, seed, s, extra)
        model = ["--model.init_args.source.pretrained", str(d / "model")]
        rows[name] = {"loss": loss(test_only(r, d / "test", "configs/tiny/mixture.yaml", model, seed, s))}
    for row in rows.values():
        row["delta"] = row["loss"] - loss(ref)
    return rows


# Run order: the cheap shared chain first, the seven mixing runs last, so a sweep cut short by
# time still has claims 1, 2, 4, 5 and 6 for every seed (pruning trains only the dynamic mixing run).
CLAIMS = (
    ("upcycling", claim_upcycling),
    ("pesc", claim_pesc),
    ("pruning", claim_pruning),
    ("skipping", claim_skipping),
    ("compression", claim_compression),
    ("mixing", claim_mixing),
)


# ----------------------------------------------------------------------------------- report


def spread(xs: list[float], fmt: str = "{:.3f}") -> str:
    """``mean ± std [min..max]`` over seeds."""
    xs = [x for x in xs if x == x]  # drop NaN
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    f = fmt.format
    return f"{f(statistics.mean(xs))} ± {f(sd)} [{f(min(xs))}..{f(max(xs))}]"


def table(results: dict, claim: str, metrics: list[tuple[str, str, str]]) -> list[str]:
    """One markdown table: a row per variant, a column per metric (mean ± std [min..max]); a
    variant missing for some seed says over how many seeds it is."""
    seeds = sorted(results)
    rows = list(dict.fromkeys(row for sd in seeds for row in results[sd][claim]))
    head = ["variant", *[m[1] for m in metrics]]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        have = [sd for sd in seeds if row in results[sd][claim]]
        label = row if len(have) == len(seeds) else f"{row} (seeds {have} only)"
        cells = [spread([results[sd][claim][row][m[0]] for sd in have], m[2]) for m in metrics]
        out.append("| " + " | ".join([label, *cells]) + " |")
    return out


def verdict(
    results: dict, claim: str, a: str, b: str, metric: str, better: str, name: str, fmt="{:+.3f}"
) -> str:
    """Paired per-seed difference ``a - b``; holds only if every seed agrees and |mean| > std."""
    seeds = [sd for sd in sorted(results) if a in results[sd][claim] and b in results[sd][claim]]
    xa = [results[sd][claim][a][metric] for sd in seeds]
    xb = [results[sd][claim][b][metric] for sd in seeds]
    diffs = [x - y for x, y in zip(xa, xb)]
    if not diffs:
        return f"- {name}: no seed has both {a} and {b}"
    mean = statistics.mean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    good = [(d < 0) if better == "lower" else (d > 0) for d in diffs]
    bad = [(d > 0) if better == "lower" else (d < 0) for d in diffs]
    if len(diffs) < 2:
        word = "one seed only: no spread to judge by"
    elif all(good) and abs(mean) > sd:
        word = "holds"
    elif all(bad) and abs(mean) > sd:
        word = "REVERSED (the baseline is better in every seed)"
    else:
        word = "NOT SHOWN at this scale (difference within the spread)"
    overlap = max(min(xa), min(xb)) <= min(max(xa), max(xb))
    per_seed = ", ".join(fmt.format(d) for d in diffs)
    return (
        f"- {name}: {a} - {b} = {fmt.format(mean)} ± {fmt.replace('+', '').format(sd)} (per seed {per_seed}; {better} is better; "
        f"{sum(good)}/{len(seeds)} seeds agree; min..max ranges {'overlap' if overlap else 'disjoint'}) "
        f"-> **{word}**"
    )


def header(s: Settings, seeds: list[int], wall: float | None, argv: list[str]) -> list[str]:
    took = f"; wall time {wall / 60:.1f} min" if wall is not None else ""
    return [
        "# Seed claims (tiny built-in suite, `scripts/seed_claims.py`)",
        "",
        f"Command: `python scripts/seed_claims.py {shlex.join(argv)}`{took} (2-core CPU shared with other jobs).",
        "",
        f"Seeds {seeds}; every cell is mean ± std [min..max] over the seeds. Settings: dense pre-training "
        f"{s.dense_steps} steps (demo 800); upcycled continual pre-training and the dense continuation "
        f"{s.cont_steps} steps each (demo 300; pretrain + suite data, batch 32 x 96 tokens, lr 1e-3 cosine); "
        f"PESC and LoRA {s.tune_steps} steps each (demo 400); mixture instruction tuning {s.mix_steps} steps per "
        f"strategy from the upcycled MoE, dynamic update every {s.mix_update_every} steps (demo 300 / 25); "
        f"pruning to r={s.keep} of 8 experts with {s.calib_samples} calibration sequences of 96 tokens. "
        f"Tests on the suite's fixed test split: claims 1-2 on {s.test_examples} examples per domain x 6 "
        f"domains with generated answers (at most 16 tokens, exact match EM in %), claims 3-6 loss only on "
        f"{s.loss_examples} examples per domain x 6 domains.",
        "",
        "What a seed varies: seed_everything (the dense base's init, router init, dropout), the training-data "
        "shuffle (data seed), PESC's adapter seed and the pruning calibration sample. The whole chain is "
        "retrained per seed: one dense base per seed is shared by claims 1 and 2, one upcycled MoE per seed by "
        "claims 1 and 3, the seed's dynamic-mixing model is what claims 4 and 6 compress, and claim 5 calibrates "
        "skipping on the seed's enumeration-pruned model. A claim holds only if the paired per-seed "
        "difference has the same sign in every seed and |mean| > its std.",
        "",
    ]


def claim_sections(results: dict, s: Settings) -> dict:
    """Per claim, a function making its markdown section (only claims with results are made)."""
    up, dc = "upcycled MoE (8x top-2)", "dense continued"
    pesc, lora = "PESC (8 adapters top-2)", "dense LoRA r14"
    return {
        "upcycling": lambda: [
            "## 1. Sparse upcycling vs the dense model continued for the same tokens",
            "",
            *table(results, "upcycling", [("loss", "test loss", "{:.3f}"), ("em", "EM", "{:.1f}")]),
            "",
            verdict(results, "upcycling", up, dc, "loss", "lower", "test loss"),
            verdict(results, "upcycling", up, dc, "em", "higher", "EM", "{:+.1f}"),
        ],
        "pesc": lambda: [
            "## 2. PESC vs dense LoRA (same base, data, steps, lr; similar trainable budget)",
            "",
            *table(
                results,
                "pesc",
                [
                    ("trainable", "trainable", "{:.0f}"),
                    ("loss", "test loss", "{:.3f}"),
                    ("em", "EM mean", "{:.1f}"),
                ]
                + [(d, f"EM {d}", "{:.1f}") for d in DOMAINS],
            ),
            "",
            verdict(results, "pesc", pesc, lora, "loss", "lower", "test loss"),
            verdict(results, "pesc", pesc, lora, "em", "higher", "EM", "{:+.1f}"),
        ],
        "mixing": lambda: [
            "## 3. Dynamic data mixing vs static mixtures and the paper's baselines (test loss)",
            "",
            *table(
                results, "mixing", [("loss", "test loss ALL", "{:.3f}")] + [(d, d, "{:.3f}") for d in DOMAINS]
            ),
            "",
            *[
                verdict(results, "mixing", "dynamic", other, "loss", "lower", f"test loss vs {other}")
                for other in results[min(results)]["mixing"]
                if other != "dynamic"
            ],
        ],
        "pruning": lambda: [
            f"## 4. Expert pruning to r={s.keep} of 8 (same r, same calibration data)",
            "",
            *table(
                results,
                "pruning",
                [
                    ("recon", "reconstruction loss (sum over layers)", "{:.2f}"),
                    ("calib", "calibration loss", "{:.3f}"),
                    ("loss", "test loss", "{:.3f}"),
                ],
            ),
            "",
            *[
                verdict(results, "pruning", "enumerate", other, m, "lower", f"{label} vs {other}", f)
                for other in PRUNE_METHODS[1:]
                for m, label, f in (
                    ("recon", "reconstruction loss", "{:+.2f}"),
                    ("loss", "test loss", "{:+.3f}"),
                )
            ],
        ],
        "skipping": lambda: [
            "## 5. Dynamic skipping (on the enumeration-pruned model)",
            "",
            *table(
                results,
                "skipping",
                [
                    ("skip_rate", "skip rate % (calibration)", "{:.1f}"),
                    ("calib_delta", "calibration loss change", "{:+.4f}"),
                    ("loss_before", "test loss before", "{:.3f}"),
                    ("loss_after", "test loss after", "{:.3f}"),
                    ("loss_delta", "test loss change", "{:+.4f}"),
                ],
            ),
        ],
        "compression": lambda: [
            "## 6. Compression recipes (He et al. 2024) on the dynamic-mixing model (test loss)",
            "",
            *table(
                results,
                "compression",
                [("loss", "test loss", "{:.3f}"), ("delta", "change vs unpruned", "{:+.4f}")],
            ),
            "",
            "Every recipe costs some test loss; what is checked is the ordering He et al. report: the "
            "fine-grained recipes (slimming inside the experts, pruning experts, dropping one MoE layer) cost "
            "less loss than dropping a whole decoder block (the coarsest and fastest).",
            "",
            *[
                verdict(
                    results,
                    "compression",
                    row,
                    "block drop 1",
                    "loss",
                    "lower",
                    f"test loss, {row} vs block drop 1",
                )
                for row in results[min(results)]["compression"]
                if row not in ("unpruned", "block drop 1")
            ],
        ],
    }


def report(results: dict, s: Settings, wall: float | None, argv: list[str]) -> str:
    """The markdown report; a claim missing for some seed is listed as not finished."""
    seeds = sorted(results)
    lines = header(s, seeds, wall, argv)
    sections = claim_sections
    for name in ("upcycling", "pesc", "mixing", "pruning", "skipping", "compression"):
        have = [sd for sd in seeds if name in results[sd]]
        if not have:
            lines += [f"## {name}: not run / not finished for any seed", ""]
            continue
        sub = {sd: results[sd] for sd in have}
        if len(have) < len(seeds):
            lines.append(f"_{name}: finished for seeds {have} only_")
        lines += [*sections(sub, s)[name](), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main


def run_seed(runner: Runner, base: Path, seed: int, s: Settings, claims) -> int:
    """Every selected claim for one seed; results saved after each claim (s<seed>/results.json)."""
    out = seed_dir(base, seed) / "results.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for name, fn in claims:
        t1 = time.time()
        print(f"[seed_claims] seed {seed}: {name}", flush=True)
        try:
            results[name] = fn(runner, base, seed, s)
        except RunFailed as exc:
            print(f"[seed_claims] seed {seed}: FAILED: {exc}", flush=True)
            return 1
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        (seed_dir(base, seed) / "timings.json").write_text(json.dumps(runner.timings, indent=1))
        print(f"[seed_claims] seed {seed}: {name} done in {time.time() - t1:.0f}s", flush=True)
    return 0


def run_parallel(runner: Runner, base: Path, seeds: list[int], s: Settings, claims, jobs: int) -> int:
    """Seeds are independent chains: run up to ``jobs`` of them at once (one forked worker each)."""
    if jobs <= 1:
        return max((run_seed(runner, base, sd, s, claims) for sd in seeds), default=0)
    pending, running, worst = list(seeds), {}, 0
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = run_seed(runner, base, seed, s, claims)
                finally:
                    sys.stdout.flush()
                    os._exit(code)
            running[pid] = seed
        pid, status = os.wait()
        code = os.waitstatus_to_exitcode(status)
        worst = max(worst, code)
        print(f"[seed_claims] seed {running.pop(pid)} finished (rc {code})", flush=True)
    return worst


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="a few steps per stage: checks the plumbing only")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once (each command then uses 1 thread)")
    ap.add_argument("--runs", default="runs/seeds", help="root of every run (default runs/seeds)")
    ap.add_argument("--only", nargs="*", choices=[c for c, _ in CLAIMS], help="run these claims only")
    ap.add_argument(
        "--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES), help="claim 3's strategies"
    )
    ap.add_argument("--report-only", action="store_true", help="rewrite the table from finished runs")
    for field, default in asdict(Settings()).items():
        ap.add_argument(f"--{field.replace('_', '-')}", type=int, default=None, help=f"default {default}")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else Settings()
    overrides = {k: getattr(args, k) for k in asdict(s) if getattr(args, k) is not None}
    s = Settings(**{**asdict(s), **overrides})
    base = (ROOT / args.runs / s.tag()).resolve()
    base.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MOE_APP_PROGRESS", "0")
    t0 = time.time()
    code = 0
    if not args.report_only:
        runner = Runner(base, threads=1 if args.jobs > 1 else None)
        print(f"[seed_claims] imports {time.time() - t0:.0f}s; {s}; runs under {base}", flush=True)
        claims = [(n, f) for n, f in CLAIMS if not args.only or n in args.only]
        claims = [(n, partial(f, strategies=args.strategies) if n == "mixing" else f) for n, f in claims]
        code = run_parallel(runner, base, args.seeds, s, claims, args.jobs)
    results = {}
    for seed in args.seeds:
        f = seed_dir(base, seed) / "results.json"
        results[seed] = json.loads(f.read_text()) if f.exists() else {}
        if "mixing" not in results[seed]:  # a sweep cut short: the strategies that did finish
            results[seed]["mixing"] = finished_mixing(base, seed, args.strategies)
            if not results[seed]["mixing"]:
                del results[seed]["mixing"]
    wall = None if args.report_only else time.time() - t0
    text = report(results, s, wall, argv)
    (base / "seed_claims.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\n[seed_claims] wrote {base / 'seed_claims.md'}" + (f"; total {wall:.0f}s" if wall else ""))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
