"""Every shipped YAML is a test: it parses, composes and instantiates through the real CLI.

Instantiation is cheap by design (models and tokenizers load lazily in ``configure_model`` /
``setup``), so hub ids in ``configs/models`` are checked without any download.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moe_app.cli.main import cli_main, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("models", "presets"))
MODELS = sorted((CONFIGS / "models").glob("*.yaml"))
PRESETS = sorted((CONFIGS / "presets").glob("*.yaml"))
GPU_PRESETS = ("deepspeed",)


def _local_inputs(configs: tuple[Path, ...]) -> list[str]:
    """Local model directories a config reads (source.pretrained / init_from that are not hub ids)."""
    import yaml

    found = []
    for c in configs:
        init = (yaml.safe_load(c.read_text()) or {}).get("model", {}).get("init_args", {}) or {}
        for value in (init.get("init_from"), (init.get("source") or {}).get("pretrained")):
            if isinstance(value, str) and (value.startswith(("runs/", "./", "/")) or value.count("/") != 1):
                found.append(value)
    return found


def _instantiate(tmp_path: Path, *configs: Path, extra: tuple[str, ...] = ()):
    # Recipes read the outputs of earlier stages (runs/...): run where those inputs exist, as in
    # the pipeline, so that the existence check on source paths is satisfied.
    os.chdir(tmp_path)
    for rel in _local_inputs(configs):
        (tmp_path / rel).mkdir(parents=True, exist_ok=True)
    args = []
    for c in configs:
        args += ["-c", str(c)]
    args += ["--trainer.default_root_dir", str(tmp_path), *extra]
    return cli_main(args, run=False)


def _rel(p: Path) -> str:
    return str(p.relative_to(CONFIGS))


@pytest.fixture(autouse=True)
def _restore_cwd():
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


def test_every_config_dir_is_populated():
    assert RECIPES and MODELS and PRESETS
    assert (CONFIGS / "tiny" / "dense.yaml") in RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=_rel)
def test_recipe_instantiates(recipe: Path, tmp_path: Path):
    cli = _instantiate(tmp_path, recipe)
    from moe_app.lightning.modules.lm import CausalLMModule

    assert isinstance(cli.model, CausalLMModule)
    assert cli.datamodule is not None
    assert cli.trainer.default_root_dir == str(tmp_path)


@pytest.mark.parametrize("model_file", MODELS, ids=_rel)
def test_model_file_composes_with_a_recipe(model_file: Path, tmp_path: Path):
    import yaml

    expected = yaml.safe_load(model_file.read_text())["model"]["init_args"]["source"]["pretrained"]
    cli = _instantiate(
        tmp_path,
        CONFIGS / "tiny" / "dense.yaml",
        model_file,
        extra=("--trainer.accelerator", "cpu", "--trainer.precision", "32-true"),
    )
    assert cli.model.source.pretrained == expected
    assert cli.model.source.tokenizer is None  # the checkpoint's own tokenizer
    assert cli.model.model is None  # nothing loaded at instantiation


@pytest.mark.parametrize("preset", PRESETS, ids=_rel)
def test_preset_composes_with_a_recipe(preset: Path, tmp_path: Path):
    if preset.stem.startswith(GPU_PRESETS):
        from moe_app.errors import ConfigError

        with pytest.raises(ConfigError, match="needs CUDA GPUs"):
            _instantiate(
                tmp_path, CONFIGS / "tiny" / "dense.yaml", preset, extra=("--trainer.accelerator", "cpu")
            )
        return
    cli = _instantiate(
        tmp_path, CONFIGS / "tiny" / "dense.yaml", preset, extra=("--trainer.accelerator", "cpu")
    )
    assert cli.trainer is not None
    if preset.stem == "fsdp":  # runs on CPU too (gloo); the 2-process fits are in test_fsdp.py
        from moe_app.lightning.strategies.fsdp import DecoderLayerFSDPStrategy

        assert isinstance(cli.trainer.strategy, DecoderLayerFSDPStrategy)
        assert cli.trainer.strategy.reshard_after_forward is True


def test_print_config_shows_the_resolved_config(capsys):
    code = main(["fit", "-c", str(CONFIGS / "tiny" / "dense.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert code == 0
    assert "class_path: moe_app.lightning.modules.lm.CausalLMModule" in out
    assert "hidden_size: 128" in out


def test_unknown_config_key_exits_2(capsys, tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 3\n")
    code = main(["fit", "-c", str(CONFIGS / "tiny" / "dense.yaml"), "-c", str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert "max_stepz" in err
    assert "Traceback" not in err
