"""The per-domain test report is rank-consistent: domains fixed before any batch, summed by position.

Under DDP each rank holds a shard of the test set and meets the domains in its own order (or not at
all); the report's states are all-reduced by position, so the table must not depend on that order.
The slow test runs the real ``moe-app test`` on 2 CPU processes (gloo) over a test file arranged so
that the two ranks see the domains in different orders and one lacks a domain, and compares its
table with the 1-process one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_app.core.data.protocols import DomainNames
from moe_app.core.data.sources import SourceConfig
from moe_app.core.data.tokenizer import suite_tokenizer
from moe_app.errors import DataError
from moe_app.lightning.data.instruction import InstructionDataModule
from moe_app.lightning.modules.report import DomainReport

ROOT = Path(__file__).resolve().parents[1]
DENSE = str(ROOT / "configs" / "tiny" / "dense.yaml")


# ---------------------------------------------------------------------------------------------
# DomainReport: the order a rank meets the domains in does not matter.

ROWS = [  # (domain, summed nll, labelled tokens, exact match or None for plain text)
    ("beta", 2.0, 2, True),
    ("mix", 9.0, 6, None),
    ("alpha", 3.0, 3, False),
    ("alpha", 1.0, 1, True),
    ("mix", 4.0, 5, None),
    ("gamma", 5.0, 4, False),
    ("gamma", 6.0, 2, True),
    ("alpha", 7.0, 3, False),
]
DOMAINS = sorted({d for d, *_ in ROWS})


def feed(report: DomainReport, rows: list[tuple], batch: int = 2) -> None:
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        report.update(
            [r[0] for r in part],
            torch.tensor([r[1] for r in part]),
            torch.tensor([r[2] for r in part]),
            [r[3] for r in part],
        )


def all_reduced(*ranks: DomainReport) -> DomainReport:
    """What ``compute`` sees after the all-reduce: every rank's state summed, by position."""
    merged = DomainReport(ranks[0].domains)
    for key, metric in merged.metrics.items():
        for rank in ranks:
            metric.merge_state(rank.metrics[key])
    return merged


def assert_same_table(rows: list[dict], expected: list[dict], rel: float = 1e-12) -> None:
    assert [r["domain"] for r in rows] == [r["domain"] for r in expected]
    for a, b in zip(rows, expected):
        assert a["n"] == b["n"], a["domain"]
        assert a["loss"] == pytest.approx(b["loss"], rel=rel), a["domain"]
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=rel), a["domain"]
        assert (a["accuracy"] is None) == (b["accuracy"] is None), a["domain"]
        if a["accuracy"] is not None:
            assert a["accuracy"] == pytest.approx(b["accuracy"], rel=rel), a["domain"]


def test_two_ranks_meeting_domains_in_different_orders_give_the_one_process_table():
    one = DomainReport(DOMAINS)
    feed(one, ROWS)
    # DistributedSampler(shuffle=False): rank r gets rows r, r + 2, ... Rank 0 meets beta, alpha,
    # mix, gamma; rank 1 meets mix, alpha, gamma and no beta at all.
    rank0, rank1 = DomainReport(DOMAINS), DomainReport(DOMAINS)
    feed(rank0, ROWS[0::2])
    feed(rank1, ROWS[1::2])
    assert [d for d, *_ in ROWS[0::2]] == ["beta", "alpha", "mix", "gamma"]
    assert "beta" not in {d for d, *_ in ROWS[1::2]}
    assert rank0.domains == rank1.domains == DOMAINS  # nothing added while the batches arrived
    expected = one.compute()
    assert [r["domain"] for r in expected] == [*DOMAINS, "ALL"]
    assert_same_table(all_reduced(rank0, rank1).compute(), expected)
    assert_same_table(all_reduced(rank1, rank0).compute(), expected)
    rows = {r["domain"]: r for r in expected}
    assert rows["alpha"]["n"] == 3 and rows["alpha"]["loss"] == pytest.approx(11.0 / 7.0)
    assert rows["alpha"]["accuracy"] == pytest.approx(1 / 3)
    assert rows["mix"]["accuracy"] is None and rows["ALL"]["n"] == len(ROWS)


def test_an_unannounced_domain_is_an_error_not_a_new_index():
    report = DomainReport(["alpha", "beta"])
    with pytest.raises(DataError, match=r"'gamma'.*not one of the announced domains"):
        report.update(["alpha", "gamma"], torch.tensor([1.0, 1.0]), torch.tensor([1, 1]), None)
    assert report.domains == ["alpha", "beta"] and len(report.metrics) == 10


def test_fallback_domain_counts_every_unannounced_row():
    report = DomainReport(["all"], fallback="all")
    feed(report, ROWS)
    (row,) = report.compute()
    assert row["domain"] == "all" and row["n"] == len(ROWS)
    assert row["loss"] == pytest.approx(sum(r[1] for r in ROWS) / sum(r[2] for r in ROWS))
    assert report.domains == ["all"]
    with pytest.raises(ValueError, match="fallback"):
        DomainReport(["a"], fallback="all")


# ---------------------------------------------------------------------------------------------
# The data module announces its test domains before any batch.


def write_mixed_source(d: Path) -> Path:
    """``train.jsonl`` and ``test.jsonl`` in ``d``: instruction rows of domains alpha/beta/gamma
    and plain-text rows without a domain (counted under the source's name, ``mix``), arranged so
    that under a 2-rank DistributedSampler rank 0 meets beta, alpha, mix, gamma and rank 1 meets
    mix, alpha, gamma (no beta)."""
    d.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (domain, *_) in enumerate(ROWS):
        if domain == "mix":
            records.append({"text": f"plain text line number {i} of the mixed source."})
        else:
            records.append({"instruction": f"Repeat {i}", "output": f"{i}", "domain": domain})
    records[-1] = {"text": "a plain text row of domain alpha", "domain": "alpha"}
    text = "\n".join(json.dumps(r) for r in records) + "\n"
    (d / "train.jsonl").write_text(text)
    (d / "test.jsonl").write_text(text)
    return d


def test_instruction_datamodule_announces_sorted_test_domains(tmp_path: Path):
    tok = suite_tokenizer(str(tmp_path / "tok"))
    dm = InstructionDataModule(
        sources=[SourceConfig(name="mix", path=str(write_mixed_source(tmp_path / "data")))], max_length=64
    )
    dm.set_tokenizer(tok)
    assert isinstance(dm, DomainNames)
    dm.setup("test")
    assert dm.domain_names() == ["alpha", "beta", "gamma", "mix"]
    seen = [d for b in dm.test_dataloader() for d in b["domain"]]
    assert set(seen) == set(dm.domain_names())


# ---------------------------------------------------------------------------------------------
# The real command line: 1 process vs 2 DDP processes on CPU.

SMALL = (
    "--model.init_args.source.arch.hidden_size",
    "32",
    "--model.init_args.source.arch.intermediate_size",
    "64",
    "--model.init_args.source.arch.num_hidden_layers",
    "2",
    "--model.init_args.generation.max_new_tokens",
    "3",
    "--data.init_args.eval_batch_size",
    "2",
    "--trainer.deterministic",
    "false",
    "--trainer.enable_progress_bar",
    "false",
)


def moe_app_test(root: Path, data: Path, devices: int, env: dict[str, str] | None = None):
    """``moe-app test`` of the tiny dense recipe (fresh seeded weights, no training) on the mixed
    test file; returns the process and ``test_results.json``."""
    run_env = dict(os.environ)
    run_env.pop("MOE_APP_DEBUG", None)
    run_env.update(env or {})
    ddp = ("--trainer.strategy", "ddp") if devices > 1 else ()
    cmd = [
        sys.executable,
        "-m",
        "moe_app",
        "test",
        "-c",
        DENSE,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        str(devices),
        *ddp,
        "--trainer.default_root_dir",
        str(root),
        "--data.init_args.sources",
        json.dumps([{"name": "mix", "path": str(data)}]),
        *SMALL,
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return res, json.loads((root / "test_results.json").read_text())


def sync_dist_warnings(stderr: str) -> int:
    return stderr.count("sync_dist=True")


@pytest.mark.slow
def test_ddp_report_equals_one_process_when_ranks_meet_domains_in_different_orders(tmp_path: Path):
    data = write_mixed_source(tmp_path / "data")
    one_res, one = moe_app_test(tmp_path / "one", data, devices=1)
    t0 = time.perf_counter()
    two_res, two = moe_app_test(tmp_path / "two", data, devices=2)
    print(f"2-process DDP moe-app test: {time.perf_counter() - t0:.1f} s")
    assert sync_dist_warnings(one_res.stderr) == 0, one_res.stderr[-3000:]
    assert sync_dist_warnings(two_res.stderr) == 0, two_res.stderr[-3000:]
    assert [r["domain"] for r in one["rows"]] == ["alpha", "beta", "gamma", "mix", "ALL"]
    assert_same_table(two["rows"], one["rows"], rel=1e-5)
    assert {r["domain"]: r["n"] for r in one["rows"]} == {
        "alpha": 3,
        "beta": 1,
        "gamma": 2,
        "mix": 2,
        "ALL": 8,
    }
