"""Learning-rate schedule, optimiser groups and the per-domain report."""

from __future__ import annotations

import math

import pytest
import torch

from moe_app.errors import ConfigError
from moe_app.lightning.modules.optim import OptimConfig, build_optimizer, lr_multiplier
from moe_app.lightning.modules.report import DomainReport


def test_warmup_then_cosine_reaches_min_ratio():
    total, warm = 100, 10
    assert lr_multiplier(0, total, warm, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, total, warm, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(10, total, warm, "cosine", 0.1) == pytest.approx(1.0)
    mid = warm + (total - warm) // 2
    assert lr_multiplier(mid, total, warm, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)
    assert lr_multiplier(total, total, warm, "cosine", 0.1) == pytest.approx(0.1)


def test_linear_and_constant_schedules():
    assert lr_multiplier(50, 100, 0, "linear", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(99, 100, 0, "constant", 0.0) == 1.0


def test_optimizer_excludes_vectors_from_weight_decay_and_steps_the_schedule():
    lin = torch.nn.Linear(4, 4)
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=2, schedule="constant")
    out = build_optimizer(lin.parameters(), cfg, total_steps=10)
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.1]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-2)  # first warm-up step
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "optim.lr must be > 0"),
        ({"schedule": "step"}, "unknown schedule 'step'"),
        ({"warmup_ratio": 1.5}, "warmup_ratio must be in"),
    ],
)
def test_optim_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        OptimConfig(**kwargs)


def test_domain_report_token_weighted_loss_and_accuracy():
    rep = DomainReport(["a", "b"])
    rep.update(["a", "a", "b"], torch.tensor([2.0, 4.0, 3.0]), torch.tensor([1, 3, 3]), [True, False, True])
    rows = {r["domain"]: r for r in rep.compute()}
    assert rows["a"]["loss"] == pytest.approx(6.0 / 4.0)
    assert rows["a"]["perplexity"] == pytest.approx(math.exp(1.5))
    assert rows["a"]["accuracy"] == pytest.approx(0.5)
    assert rows["b"]["accuracy"] == pytest.approx(1.0)
    assert rows["ALL"]["loss"] == pytest.approx(9.0 / 7.0)
    assert rows["ALL"]["n"] == 3
    table = DomainReport.format_table(list(rows.values()))
    assert "exact match" in table and "50.0%" in table
