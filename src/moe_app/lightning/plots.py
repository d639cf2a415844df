"""Plots a person would rather look at than read: loss curves, expert-load heatmaps, mixture weights.

Reads only what runs write anyway (Lightning's ``metrics.csv``, ``test_results.json``,
``mixture_weights.json``), so the plots can be regenerated from any finished run directory.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latest_metrics_csv(run_root: Path, key: str = "train/loss") -> Path | None:
    """The newest ``lightning_logs/version_*/metrics.csv`` under a run root that logged ``key``.

    A ``test`` run in the same root writes a newer version without training columns; it must not
    hide the fit's curves.
    """
    found = sorted(run_root.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    for path in reversed(found):
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if key in header:
            return path
    return None


def read_curve(metrics_csv: Path, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            v = row.get(key)
            if v not in (None, ""):
                steps.append(int(float(row.get("step") or 0)))
                values.append(float(v))
    return steps, values


def plot_loss_curves(runs: Iterable[tuple[str, Path]], out: Path) -> Path | None:
    """One panel per stage: training loss (and validation loss where logged) over steps."""
    runs = [(label, p) for label, p in runs if p is not None]
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (label, csv_path) in zip(axes[0], runs):
        for key, style in (("train/loss", "-"), ("val/loss", "o-")):
            steps, vals = read_curve(csv_path, key)
            if steps:
                ax.plot(steps, vals, style, label=key, markersize=3)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_expert_load(models: Iterable[tuple[str, dict[str, list[float]]]], out: Path) -> Path | None:
    """Layer x expert heatmap of the share of routed tokens, one panel per MoE model."""
    models = [(label, load) for label, load in models if load]
    if not models:
        return None
    plt = _plt()
    import numpy as np

    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), squeeze=False)
    for ax, (label, load) in zip(axes[0], models):
        names = list(load)
        width = max(len(v) for v in load.values())
        grid = np.full((len(names), width), np.nan)
        for i, n in enumerate(names):
            v = np.asarray(load[n], dtype=float)
            grid[i, : len(v)] = v / max(v.sum(), 1.0)
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_title(label)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=7)
        fig.colorbar(im, ax=ax, label="share of routed tokens")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_mixture_weights(
    history: list[dict[str, Any]], out: Path, title: str = "mixture weights"
) -> Path | None:
    """Sampling weight of each source over training steps (``[{"step": s, "weights": {src: w}}]``)."""
    if not history:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    sources = list(history[0]["weights"])
    steps = [h["step"] for h in history]
    for s in sources:
        ax.plot(steps, [h["weights"].get(s, float("nan")) for h in history], "o-", label=s, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("sampling weight")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _short(name: str) -> str:
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p == "layers" and i + 1 < len(parts):
            rest = ".".join(parts[i + 2 :])
            return f"L{parts[i + 1]} {rest}".strip()
    return name


def write_pipeline_plots(root: Path, stages: Iterable[Any], out_dir: Path) -> list[Path]:
    """Loss curves, expert-load heatmaps and mixture weights for the pipeline's stages."""
    stages = list(stages)
    written: list[Path] = []
    curves = []
    loads = []
    mixtures = []
    for st in stages:
        if getattr(st, "metrics_root", None):
            csv_path = latest_metrics_csv(root / st.metrics_root)
            if csv_path is not None:
                curves.append((st.label, csv_path))
            mix = root / st.metrics_root / "mixture_weights.json"
            if mix.exists():
                mixtures.append((st.label, json.loads(mix.read_text())))
        if getattr(st, "results", None) and (root / st.results).exists():
            res = json.loads((root / st.results).read_text())
            if res.get("expert_load"):
                loads.append((st.label, res["expert_load"]))
    for path in (
        plot_loss_curves(curves, out_dir / "loss_curves.png"),
        plot_expert_load(loads, out_dir / "expert_load.png"),
    ):
        if path is not None:
            written.append(path)
    for label, hist in mixtures:
        p = plot_mixture_weights(
            hist.get("history", []), out_dir / f"mixture_{label}.png", f"mixture weights ({label})"
        )
        if p is not None:
            written.append(p)
    return written
