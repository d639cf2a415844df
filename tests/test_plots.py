"""The pipeline's plots read what runs write: metrics.csv, test_results.json, mixture_weights.json."""

from __future__ import annotations

import os
import time
from pathlib import Path

from moe_app.lightning.plots import (
    latest_metrics_csv,
    plot_expert_load,
    plot_loss_curves,
    plot_mixture_weights,
    read_curve,
)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_loss_curves_come_from_the_fit_not_a_later_test_run(tmp_path: Path):
    fit = _write(
        tmp_path / "lightning_logs/version_0/metrics.csv",
        "epoch,step,train/loss,val/loss\n0,9,2.5,\n0,19,1.5,1.7\n",
    )
    test = _write(tmp_path / "lightning_logs/version_1/metrics.csv", "epoch,step,test/ALL/loss\n0,0,1.6\n")
    later = time.time() + 5
    os.utime(test, (later, later))
    assert latest_metrics_csv(tmp_path) == fit
    assert read_curve(fit, "train/loss") == ([9, 19], [2.5, 1.5])
    assert read_curve(fit, "val/loss") == ([19], [1.7])
    assert latest_metrics_csv(tmp_path / "nothing") is None


def test_plots_are_written_as_png(tmp_path: Path):
    fit = _write(tmp_path / "m.csv", "epoch,step,train/loss\n0,1,3.0\n0,2,2.0\n")
    paths = [
        plot_loss_curves([("dense", fit)], tmp_path / "loss.png"),
        plot_expert_load(
            [("moe", {"model.layers.0.mlp": [3.0, 1.0], "model.layers.1.mlp": [2.0, 2.0]})],
            tmp_path / "load.png",
        ),
        plot_mixture_weights(
            [{"step": 0, "weights": {"a": 0.5, "b": 0.5}}, {"step": 25, "weights": {"a": 0.7, "b": 0.3}}],
            tmp_path / "mix.png",
        ),
    ]
    for p in paths:
        assert p is not None and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_loss_curves([], tmp_path / "none.png") is None
