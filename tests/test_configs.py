"""Every shipped YAML is a test: it parses, composes and instantiates through the real CLI.

Instantiation is cheap by design (models and tokenizers load lazily in ``configure_model`` /
``setup``), so hub ids in ``configs/models`` are checked without any download.
"""

from __future__ import annotations

import os
import sys
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


def _pipeline():
    import importlib.util

    spec = importlib.util.spec_from_file_location("moe_app_pipeline", ROOT / "scripts" / "pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def test_real_pipeline_composes_every_stage_from_the_real_size_recipes(tmp_path: Path):
    """`make demo-real` runs the real-size recipes composed with the SmolLM2 model file and the CPU
    preset: every fit/test command it runs instantiates, with the preset's settings winning."""
    pipeline = _pipeline()
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")  # only its existence is checked at instantiation
    runs = tmp_path / "runs"
    for d in ("upcycle", "post1", "pruned", "skip", "export/mixtral"):  # what earlier stages write
        (runs / d / ("" if d.startswith("export") else "model")).mkdir(parents=True, exist_ok=True)
    stages = pipeline.real_stages(str(runs), str(gguf))
    assert [s.name for s in stages] == [
        "fetch",
        "dense",
        "upcycle",
        "pesc",
        "lora",
        "post1",
        "post2",
        "prune",
        "skip",
        "export",
    ]
    assert stages[1].label.startswith("dense SmolLM2")  # the dense model is the first row
    seen = 0
    for st in stages:
        for cmd in st.commands:
            if cmd[0] not in ("fit", "test"):
                continue
            assert "configs/presets/cpu_smoke.yaml" in cmd and "configs/models/smollm2-135m.yaml" in cmd
            recipe = cmd[cmd.index("-c") + 1]
            assert not recipe.startswith("configs/tiny/"), recipe  # the real-size recipes themselves
            args = list(cmd[1:])
            if "--ckpt_path" in args:  # a `test` subcommand argument, not a config key
                i = args.index("--ckpt_path")
                del args[i : i + 2]
            cli = cli_main(args, run=False)
            assert cli.trainer.max_steps == (pipeline.REAL_STEPS.get(st.name, 20) if cmd[0] == "fit" else 20)
            assert cli.datamodule.max_length == 128 and cli.datamodule.batch_size == 4
            assert type(cli.trainer.accelerator).__name__ == "CPUAccelerator"
            if st.name == "lora":
                assert cli.model.lora.rank == pipeline.REAL_LORA_RANK
            seen += 1
    assert seen == 14  # the dense row (test), 5 trained stages (fit + test), 3 offline stages (test)


def test_pipeline_names_its_outputs_inside_or_outside_the_repository(tmp_path: Path):
    """`--runs` may point outside the checkout: the summary line names such a path whole (it raised
    after the last stage before)."""
    pipeline = _pipeline()
    assert pipeline._shown(ROOT / "runs" / "pipeline_summary.md") == str(Path("runs") / "pipeline_summary.md")
    assert pipeline._shown(tmp_path / "pipeline_summary.md") == str(tmp_path / "pipeline_summary.md")
