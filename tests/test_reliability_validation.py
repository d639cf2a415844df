"""Bad config values are reported (exit 2, one line with the fix) before any heavy work starts.

The CLI runs in-process with the heavy steps (data tokenisation in ``setup``, model loading /
building) replaced by a tripwire: a config error must be raised, and reported, before them.
"""

from __future__ import annotations

import pytest

from reliability_helpers import CONFIGS


class HeavyWorkStarted(BaseException):
    """Raised by the tripwire: not an Exception, so nothing reports it as a user error."""


@pytest.fixture
def tripwire(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_APP_CACHE", str(tmp_path / "cache"))

    def trip(*args, **kwargs):
        raise HeavyWorkStarted

    monkeypatch.setattr("moe_app.lightning.data.instruction.InstructionDataModule.setup", trip)
    monkeypatch.setattr("moe_app.lightning.data.instruction.InstructionDataModule.prepare_data", trip)
    monkeypatch.setattr("moe_app.lightning.modules.lm.CausalLMModule.configure_model", trip)
    monkeypatch.setattr("moe_app.lightning.modules.lm.CausalLMModule.load_base_model", trip)


CASES = {
    "negative lr": ("dense.yaml", ["--model.init_args.optim.lr", "-1"], "optim.lr"),
    "unknown schedule": ("dense.yaml", ["--model.init_args.optim.schedule", "steep"], "schedule"),
    "unknown dtype": ("dense.yaml", ["--model.init_args.source.dtype", "float8"], "dtype"),
    "zero batch size": ("dense.yaml", ["--data.init_args.batch_size", "0"], "batch_size"),
    "source with two kinds": (
        "dense.yaml",
        ["--data.init_args.sources", '[{"name": "x", "path": "a.jsonl", "builtin": "all"}]'],
        "exactly one of path/hub/builtin",
    ),
    "top_k above experts": ("upcycle.yaml", ["--model.init_args.upcycle.top_k", "99"], "top_k"),
    "unknown upcycle method": ("upcycle.yaml", ["--model.init_args.upcycle.method", "clone"], "method"),
    "uncatchable stop signal": ("dense.yaml", ["--graceful_stop.signals", "[SIGKILL]"], "SIGKILL"),
    "unknown key": ("dense.yaml", ["--model.init_args.optim.lrr", "1"], "lrr"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_errors_are_reported_before_heavy_work(case, tripwire, tmp_path, capsys):
    from moe_app.cli.main import main

    config, args, needle = CASES[case]
    argv = ["fit", "-c", str(CONFIGS / config), "--trainer.default_root_dir", str(tmp_path / "run"), *args]
    rc = main(argv)  # HeavyWorkStarted would propagate out of main and fail the test
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert needle in err and "Fix" in err, err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "model").exists()
