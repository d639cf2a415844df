"""Safety: no unpickling, no remote code unless asked, outputs stay in their run directory.

An AST scan of ``src/`` refuses the unsafe forms (``pickle``/``dill``/``joblib``/``marshal``/
``shelve`` imports, ``torch.load`` without ``weights_only=True``, any literal
``weights_only=False``, ``trust_remote_code=True``, ``allow_pickle=True``,
``safe_serialization=False`` / ``use_safetensors=False``, ``eval``/``exec``); the loaders refuse
pickle weights; remote code is off by default everywhere it can be switched on; and
:func:`moe_app.core.utils.paths.resolve_output_path` keeps configured outputs inside the run directory.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "moe_app"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}
UNSAFE_KEYWORDS = {
    ("weights_only", False),
    ("trust_remote_code", True),
    ("allow_pickle", True),
    ("safe_serialization", False),
    ("use_safetensors", False),
}


def _call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def unsafe_forms(source: str, filename: str = "<src>") -> list[str]:
    """``file:line: what`` for each unsafe form in ``source``."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _call_name(node)
            kwargs = {k.arg: k.value for k in node.keywords if k.arg}
            for key, bad in UNSAFE_KEYWORDS:
                v = kwargs.get(key)
                if isinstance(v, ast.Constant) and v.value is bad:
                    found.append(f"{where}: {name}({key}={bad})")
            if name.endswith("torch.load"):
                wo = kwargs.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    found.append(f"{where}: {name}(...) without weights_only=True")
            if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                found.append(f"{where}: {name}(...)")
    return found


def test_the_scanner_catches_each_unsafe_form():
    bad = """
import pickle
from dill import loads
import torch
torch.load("x")
torch.load("x", weights_only=False)
AutoModel.from_pretrained("x", trust_remote_code=True)
np.load("x", allow_pickle=True)
model.save_pretrained("x", safe_serialization=False)
eval("1")
"""
    assert len(unsafe_forms(bad)) == 9
    assert unsafe_forms("model.eval()\ncopy.deepcopy(m).eval()") == []
    good = """
import torch
torch.load("x", weights_only=True)
AutoModel.from_pretrained("x", trust_remote_code=cfg.trust_remote_code)
"""
    assert unsafe_forms(good) == []


def test_no_unsafe_forms_in_src():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        problems += unsafe_forms(path.read_text(), str(path.relative_to(SRC.parent)))
    assert not problems, "\n".join(problems)


def test_remote_code_is_off_by_default_everywhere():
    from moe_app import load_model
    from moe_app.checkpoint.hub import load_hf_causal_lm, load_tokenizer
    from moe_app.lightning.modules.lm import ModelSource

    for fn in (load_model, load_hf_causal_lm, load_tokenizer):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn
    assert ModelSource(arch={}).trust_remote_code is False


def test_pickle_weights_are_refused(tmp_path, tiny_llama_dir):
    from moe_app import load_model
    from moe_app.errors import CheckpointError

    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(d)


def test_lightning_checkpoints_load_weights_only(tmp_path):
    """A checkpoint carrying an arbitrary object is refused by the CLI's checkpoint reader."""
    from moe_app.lightning.checkpoint_io import AtomicCheckpointIO

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(Exception, match=r"[Ww]eights.only"):
        AtomicCheckpointIO().load_checkpoint(path)


# ------------------------------------------------------------------------------------------------
# Output paths from configs


def test_relative_outputs_resolve_inside_the_run_dir(tmp_path):
    from moe_app.core.utils.paths import resolve_output_path

    run = tmp_path / "run"
    assert resolve_output_path("model", run) == (run / "model").resolve()
    assert resolve_output_path("a/../b", run) == (run / "b").resolve()
    assert resolve_output_path(".", run) == run.resolve()
    assert resolve_output_path(run / "x", run) == (run / "x").resolve()


@pytest.mark.parametrize("value", ["../model", "a/../../x", "../../../../etc/passwd"])
def test_dotdot_escapes_are_refused(tmp_path, value):
    from moe_app.core.utils.paths import resolve_output_path
    from moe_app.errors import ConfigError

    with pytest.raises(ConfigError, match="escapes the run directory") as info:
        resolve_output_path(value, tmp_path / "run", key="model.init_args.save_dir")
    assert "model.init_args.save_dir" in str(info.value) and "Fix:" in str(info.value)


def test_symlink_escape_is_refused(tmp_path):
    from moe_app.core.utils.paths import resolve_output_path
    from moe_app.errors import ConfigError

    run = tmp_path / "run"
    run.mkdir()
    (run / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ConfigError, match="escapes"):
        resolve_output_path("link/model", run)


def test_absolute_outside_needs_explicit_permission(tmp_path):
    from moe_app.core.utils.paths import resolve_output_path
    from moe_app.errors import ConfigError

    outside = tmp_path / "exports" / "m"
    with pytest.raises(ConfigError, match="outside the run directory"):
        resolve_output_path(outside, tmp_path / "run")
    assert resolve_output_path(outside, tmp_path / "run", allow_absolute=True) == outside.resolve()
    for bad in ("", "   ", "a\x00b"):
        with pytest.raises(ConfigError):
            resolve_output_path(bad, tmp_path / "run")
