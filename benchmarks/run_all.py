#!/usr/bin/env python
"""Run every benchmark of the project and write one JSON and one markdown table.

Each ``benchmarks/<name>.py`` measures one claim as a ratio to a baseline measured in the same run
and accepts ``--json PATH`` (and ``--quick`` for a smoke-sized configuration). This script runs
them one after another (never in parallel: they would measure each other), then writes
``benchmarks/results/results.json`` and ``results.md`` with the machine description; the README's
performance section is copied from ``results.md``.

Usage:  python benchmarks/run_all.py [--quick] [--only NAME ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> dict[str, str]:
    import torch

    from _common import cpu_model

    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    return info


# Run by hand, with the commands in the README: they need the real SmolLM2 (and mergekit), several GB
# of memory or disk under the shared memory lock, or tens of minutes; they take no --quick/--json.
BY_HAND = {
    "fsdp_memory",
    "mergekit_compare",
    "moe_train_step",
    "prune_streamed",
    "real_init_ppl",
    "real_prune_compare",
    "upcycle_stock",
}


def scripts(only: list[str] | None) -> list[Path]:
    found = sorted(
        p
        for p in HERE.glob("*.py")
        if p.name != Path(__file__).name and not p.name.startswith("_") and (only or p.stem not in BY_HAND)
    )
    if only:
        found = [p for p in found if p.stem in only]
    return found


def flatten(prefix: str, value, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif (
        isinstance(value, (list, tuple))
        and len(value) <= 8
        and all(not isinstance(v, (dict, list)) for v in value)
    ):
        out.append((prefix, ", ".join(_fmt(v) for v in value)))
    elif not isinstance(value, (list, tuple)):
        out.append((prefix, _fmt(value)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke-sized configurations (seconds, not minutes)")
    ap.add_argument("--only", nargs="*", default=None, help="benchmark names (file stems) to run")
    ap.add_argument("--out", default=str(HERE / "results"), help="output directory")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for script in scripts(args.only):
        js = out_dir / f"{script.stem}.json"
        cmd = [sys.executable, str(script.relative_to(HERE.parent)), "--json", str(js)]
        cmd += ["--quick"] if args.quick else []
        print(f"[bench] {script.stem}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=HERE.parent)
        entry = {
            "exit_code": proc.returncode,
            "seconds": round(time.time() - t0, 1),
            "command": " ".join(cmd[1:]),
        }
        if proc.returncode == 0 and js.exists():
            entry["result"] = json.loads(js.read_text())
        results[script.stem] = entry
    payload = {
        "machine": machine(),
        "quick": args.quick,
        "time": time.strftime("%Y-%m-%d %H:%M"),
        "benchmarks": results,
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2))
    lines = [
        f"Machine: {payload['machine']['cpu']}, {payload['machine']['cores']} cores, torch {payload['machine']['torch']} "
        f"({payload['machine']['threads']} threads), GPU: {payload['machine']['gpu']}; {payload['time']}"
        + (" (quick mode)" if args.quick else ""),
        "",
    ]
    for name, entry in results.items():
        lines.append(
            f"### {name}  (`python {entry['command']}`, exit {entry['exit_code']}, {entry['seconds']} s)"
        )
        lines.append("")
        rows: list[tuple[str, str]] = []
        flatten("", entry.get("result", {}), rows)
        if rows:
            lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
        else:
            lines.append("(no result)")
        lines.append("")
    (out_dir / "results.md").write_text("\n".join(lines))
    print(f"[bench] wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return 0 if all(e["exit_code"] == 0 for e in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
