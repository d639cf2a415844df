"""Expert pruning on the trained real MoE: enumeration vs frequency, REAP and HC-SMoE merging, then skipping.

Claim measured (issue 14): on SmolLM2-135M-Instruct copy-upcycled to 8 experts, top-2 and trained
by ``make demo-real`` (its post-training stage 2 output), enumeration at r = 6 of 8 (Lu et al. 2024)
keeps the subset with the lowest layer reconstruction loss ``sum_b ||Z_b - Z'_b||_F``, by
construction at most that of frequency and REAP at the same r; this script measures by how much,
and what each costs in calibration loss. Dynamic skipping (Lu et al.) is then calibrated on the
enumerated model: its skip rate and the loss change.

Method: every method is one ``moe-app prune`` command on the same checkpoint with the same
calibration data (``--data``, ``--calib_samples`` sequences of ``--max_length`` tokens, seed 0); the
report each writes gives the per-layer reconstruction losses and the calibration loss before and
after. Losses are on the calibration batches (the quantity pruning optimises), not a held-out set.

    make demo-real                                   # writes runs/real/post2/model
    python benchmarks/real_prune_compare.py          # --ckpt runs/real/post2/model --keep 6
    python benchmarks/real_prune_compare.py --ckpt DIR --keep 6 --methods enumerate frequency reap
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prune(
    ckpt: str, out: Path, report: Path, extra: list[str], args: argparse.Namespace
) -> tuple[dict, float]:
    cmd = [
        sys.executable,
        "-m",
        "moe_app",
        "prune",
        "--ckpt",
        ckpt,
        "--out",
        str(out),
        "--data",
        args.data,
        "--calib_samples",
        str(args.calib_samples),
        "--max_length",
        str(args.max_length),
        "--report",
        str(report),
        "--overwrite",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"moe-app prune failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return json.loads(report.read_text()), time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="runs/real/post2/model", help="a trained moe-app MoE checkpoint")
    ap.add_argument("--keep", type=int, default=6)
    ap.add_argument("--methods", nargs="+", default=["enumerate", "frequency", "reap", "merge"])
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--calib_samples", type=int, default=32)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    if not (ROOT / args.ckpt).exists() and not Path(args.ckpt).exists():
        sys.exit(f"{args.ckpt} does not exist: run `make demo-real` first (or pass --ckpt)")

    rows = []
    with tempfile.TemporaryDirectory(prefix="real-prune-") as tmp:
        tmp = Path(tmp)
        enumerated = None
        for method in args.methods:
            out = tmp / method
            rep, secs = prune(
                args.ckpt, out, tmp / f"{method}.json", ["--keep", str(args.keep), "--method", method], args
            )
            recon = sum(rep["experts"]["reconstruction_loss"].values())
            rows.append(
                (
                    f"{method} r={args.keep}",
                    recon,
                    rep["eval_loss_before"],
                    rep["eval_loss_after"],
                    None,
                    secs,
                )
            )
            if method == "enumerate":
                enumerated = out
        if enumerated is not None:
            rep, secs = prune(str(enumerated), tmp / "skip", tmp / "skip.json", ["--skipping"], args)
            rate = rep["skipping"]["skip_rate"]["all"]  # share of tokens' second choices skipped
            rows.append(
                ("enumerate + skipping", None, rep["eval_loss_before"], rep["eval_loss_after"], rate, secs)
            )

    base = rows[0][1] if rows and rows[0][0].startswith("enumerate") else None
    lines = [
        f"Trained real MoE `{args.ckpt}`, calibration: {args.data}, {args.calib_samples} x {args.max_length} tokens.",
        "",
        "| method | reconstruction loss (sum over layers) | vs enumerate | loss before | loss after | skip rate | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, recon, before, after, rate, secs in rows:
        ratio = "-" if recon is None or not base else f"{recon / base:.2f}x"
        lines.append(
            f"| {name} | {'-' if recon is None else f'{recon:.1f}'} | {ratio} | {before:.4f} | {after:.4f} | "
            f"{'-' if rate is None else f'{100 * rate:.1f}%'} | {secs:.0f} s |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
