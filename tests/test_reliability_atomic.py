"""Interrupted writes leave nothing loadable: model dirs, MoE checkpoints, exports, Lightning checkpoints.

Two kinds of interruption are simulated inside the real writers:

* an exception half-way through a weight file (disk full, a bug): the writer's ``atomic_directory``
  cleans up, the final path does not exist or still holds the previous complete version;
* a kill half-way through (no cleanup code runs): simulated by also disabling the cleanup; the
  final path is still absent and the half-written staging directory is refused by
  ``moe_app.load_model`` and by ``transformers.AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama_config
from moe_app.core.utils.atomic import atomic_directory


class Killed(BaseException):
    """Stands in for the process dying mid-write (not an Exception: nothing should catch it)."""


def truncating_save_file(tensors, filename, metadata=None):
    """``safetensors.torch.save_file`` that writes half the bytes, then 'dies'."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    Path(filename).write_bytes(data[: len(data) // 2])
    raise Killed(f"killed while writing {filename}")


def truncating_write_at(fd, data, offset):
    """``moe_app.checkpoint.safetensors_io.write_at`` (every shard byte goes through it) that writes
    half the bytes, then 'dies'."""
    import os

    view = memoryview(data).cast("B")
    os.pwrite(fd, view[: view.nbytes // 2], offset)
    raise Killed("killed while writing a shard")


def interrupt_weight_writes(monkeypatch) -> None:
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", truncating_save_file)
    monkeypatch.setattr("moe_app.checkpoint.safetensors_io.write_at", truncating_write_at)
    monkeypatch.setattr("safetensors.torch.save_file", truncating_save_file)


def no_cleanup(monkeypatch) -> None:
    """A SIGKILL runs no ``except``/``finally``: leave the staging directory behind."""
    monkeypatch.setattr("moe_app.core.utils.atomic.shutil.rmtree", lambda *a, **k: None)


def staging_dirs(final: Path) -> list[Path]:
    return sorted(p for p in final.parent.glob(f".{final.name}.*") if p.is_dir())


def assert_refused(path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from moe_app import load_model

    with pytest.raises(Exception):  # noqa: B017 (any refusal will do; it must not load)
        load_model(path)
    with pytest.raises(Exception):  # noqa: B017
        AutoModelForCausalLM.from_pretrained(path)


# ------------------------------------------------------------------------------------------------
# atomic_directory itself


def test_atomic_directory_failure_leaves_no_final_and_no_staging(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("boom")
    assert not final.exists()
    assert staging_dirs(final) == []


def test_atomic_directory_failure_keeps_the_previous_version(tmp_path):
    final = tmp_path / "out"
    with atomic_directory(final) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(Killed), atomic_directory(final) as tmp:
        (tmp / "v").write_text("2")
        raise Killed
    assert (final / "v").read_text() == "1"
    assert staging_dirs(final) == []


# ------------------------------------------------------------------------------------------------
# The real writers, interrupted half-way through a weight file


def _dense(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config())


def _moe(tmp_path: Path):
    from moe_app.core.upcycling import upcycle
    from moe_app.core.upcycling.config import UpcycleConfig

    return upcycle(_dense(tmp_path), UpcycleConfig(method="copy", num_experts=4, top_k=2))


def write_dense(model, out: Path) -> None:
    from moe_app.checkpoint.pretrained import save_pretrained_dir

    save_pretrained_dir(model, out)


def write_moe(model, out: Path) -> None:
    from moe_app.checkpoint.model_dir import save_moe_checkpoint

    save_moe_checkpoint(model, out)


def write_export(model, out: Path) -> None:
    from moe_app.checkpoint.export import export_checkpoint

    export_checkpoint(model, out, format="mixtral")


WRITERS = {
    "dense model dir": (_dense, write_dense),
    "moe-app checkpoint": (_moe, write_moe),
    "HF export": (_moe, write_export),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_writer_interrupted_by_an_error_leaves_nothing(tmp_path, monkeypatch, name):
    build, write = WRITERS[name]
    model = build(tmp_path)
    out = tmp_path / "out"
    interrupt_weight_writes(monkeypatch)
    with pytest.raises(Killed):
        write(model, out)
    assert not out.exists()
    assert staging_dirs(out) == []


@pytest.mark.parametrize("name", list(WRITERS))
def test_writer_killed_midway_leaves_no_loadable_dir(tmp_path, monkeypatch, name):
    build, write = WRITERS[name]
    model = build(tmp_path)
    out = tmp_path / "out"
    interrupt_weight_writes(monkeypatch)
    no_cleanup(monkeypatch)
    with pytest.raises(Killed):
        write(model, out)
    assert not out.exists()
    (staging,) = staging_dirs(out)
    assert any(staging.glob("*.safetensors")), "the simulated kill should land inside the weights"
    assert_refused(staging)


@pytest.mark.parametrize("name", list(WRITERS))
def test_rewrite_killed_midway_keeps_the_previous_complete_version(tmp_path, monkeypatch, name):
    from moe_app import load_model

    build, write = WRITERS[name]
    model = build(tmp_path)
    out = tmp_path / "out"
    write(model, out)
    before = sorted(p.name for p in out.iterdir())
    with monkeypatch.context() as m:
        interrupt_weight_writes(m)
        no_cleanup(m)
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        with pytest.raises(Killed):
            write(model, out)
    assert sorted(p.name for p in out.iterdir()) == before
    load_model(out)  # still the complete previous version


def test_pesc_adapter_dir_killed_midway_is_refused(tmp_path, monkeypatch):
    from moe_app import load_model
    from moe_app.checkpoint.pesc import load_pesc_model, save_pesc_adapters
    from moe_app.core.pesc.config import PescConfig
    from moe_app.core.pesc.surgery import build_pesc

    base = tmp_path / "base"
    write_dense(_dense(tmp_path), base)
    model = build_pesc(load_model(base), PescConfig(num_experts=2, top_k=1, adapter_dim=4))
    out = tmp_path / "adapters"
    interrupt_weight_writes(monkeypatch)
    no_cleanup(monkeypatch)
    with pytest.raises(Killed):
        save_pesc_adapters(model, out, base_model=base)
    assert not out.exists()
    (staging,) = staging_dirs(out)
    with pytest.raises(Exception):  # noqa: B017
        load_pesc_model(staging)


# ------------------------------------------------------------------------------------------------
# Lightning checkpoints (AtomicCheckpointIO)


def test_atomic_checkpoint_io_keeps_last_ckpt_when_a_save_dies(tmp_path, monkeypatch):
    from moe_app.lightning.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 4, "w": torch.ones(3)}, path)

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)  # half the bytes reached the disk, then the process died
        raise Killed

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Killed):
        io.save_checkpoint({"global_step": 6, "w": torch.zeros(3)}, path)
    monkeypatch.undo()

    assert io.load_checkpoint(path)["global_step"] == 4
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_atomic_checkpoint_io_refuses_pickled_objects(tmp_path):
    from moe_app.errors import ConfigError
    from moe_app.lightning.checkpoint_io import AtomicCheckpointIO

    path = tmp_path / "evil.ckpt"
    torch.save({"state": Path("x")}, path)  # a non-tensor object: needs the pickle machinery
    io = AtomicCheckpointIO()
    with pytest.raises(Exception, match=r"[Ww]eights.only"):
        io.load_checkpoint(path)
    with pytest.raises(ConfigError, match="weights_only=False"):
        io.load_checkpoint(path, weights_only=False)


def test_lightning_trainer_uses_the_atomic_writer_from_the_cli_defaults():
    from jsonargparse import Namespace

    from moe_app.lightning.checkpoint_io import default_trainer_plugins

    cfg = Namespace(plugins=None, strategy="auto")
    default_trainer_plugins(cfg)
    assert cfg.plugins[0].class_path.endswith("AtomicCheckpointIO")
    # moe-app's FSDP writes one full checkpoint on rank 0 through the CheckpointIO: atomic too
    fsdp = Namespace(
        plugins=None,
        strategy=Namespace(class_path="moe_app.lightning.strategies.fsdp.DecoderLayerFSDPStrategy"),
    )
    default_trainer_plugins(fsdp)
    assert fsdp.plugins[0].class_path.endswith("AtomicCheckpointIO")
    lightning_fsdp1 = Namespace(
        plugins=None, strategy=Namespace(class_path="lightning.pytorch.strategies.FSDPStrategy")
    )
    for kept in (
        Namespace(plugins=["custom"], strategy="auto"),
        lightning_fsdp1,
        Namespace(plugins=None, strategy="deepspeed_stage_2"),
    ):
        before = json.dumps(kept.plugins)
        default_trainer_plugins(kept)
        assert json.dumps(kept.plugins) == before
