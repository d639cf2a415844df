"""Layer drop removes the MLP (He et al. 2024): no parameters, no checkpoint tensors, rebuilt on load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.testing import assert_close

import moe_app
from conftest import tiny_llama_config
from moe_app.checkpoint.export import export_checkpoint
from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.checkpoint.shards import shard_files
from moe_app.core.models.dropped import DroppedMlp, DroppedNorm, mlp_norm_removable, remove_mlp
from moe_app.core.models.views import clone_model, moe_layer_views
from moe_app.core.pruning import drop_blocks, drop_mlp_layers, replace_dropped_mlps
from moe_app.core.spec import SPEC_FILE, MoeSpec, spec_of
from moe_app.core.upcycling import UpcycleConfig
from moe_app.errors import CheckpointError, ConfigError, UnsupportedModelError
from test_generation_cache import _check_both_batches, _llama, _upcycled
from upcycling_helpers import build, logits, tokens, upcycled

DROP = [0, 2]


def _moe(layers: int = 4):
    dense = build(tiny_llama_config(num_hidden_layers=layers))
    return upcycled(dense, UpcycleConfig(method="noise", num_experts=4, top_k=2, noise_std=0.5))


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _saved_keys(ckpt) -> set[str]:
    keys: set[str] = set()
    for f in shard_files(ckpt):
        with safe_open(str(f), "pt") as st:
            keys.update(st.keys())
    return keys


def _removed_prefixes(layers) -> tuple[str, ...]:
    return tuple(
        p for i in layers for p in (f"model.layers.{i}.mlp.", f"model.layers.{i}.post_attention_layernorm.")
    )


def test_layer_drop_removes_the_mlp_and_its_norm(tmp_path):
    model = _moe()
    layers = model.model.layers
    assert all(mlp_norm_removable(layer) for layer in layers)  # LLaMA: the norm feeds only the MLP
    before = _n_params(model)
    removed = sum(_n_params(layers[i].mlp) + _n_params(layers[i].post_attention_layernorm) for i in DROP)
    ids = tokens()
    reference = replace_dropped_mlps(clone_model(model), DROP)  # MLP gone, norm kept: the residual alone
    drop_mlp_layers(model, DROP)

    for i in DROP:
        assert isinstance(layers[i].mlp, DroppedMlp) and isinstance(
            layers[i].post_attention_layernorm, DroppedNorm
        )
        assert (
            list(layers[i].mlp.parameters()) == []
            and list(layers[i].post_attention_layernorm.parameters()) == []
        )
    assert not any(k.startswith(_removed_prefixes(DROP)) for k in model.state_dict())
    assert _n_params(model) == before - removed  # exactly the MLPs (router, experts) and their norms
    assert [lay for lay, _ in moe_layer_views(model)] == [1, 3]
    spec = spec_of(model)
    assert spec.dropped_mlp_layers() == DROP and all(spec.layers[i].mlp is None for i in DROP)
    assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=0)

    out = save_moe_checkpoint(model, tmp_path / "ld")
    keys = _saved_keys(out)
    assert not any(k.startswith(_removed_prefixes(DROP)) for k in keys)
    assert any(k.startswith("model.layers.1.mlp.") for k in keys)  # the kept MoE layers are all there
    saved = json.loads((out / SPEC_FILE).read_text())
    assert saved["format_version"] == 2 and saved["pruning"]["dropped_mlp_layers"] == DROP
    assert [lay.get("mlp_dropped", False) for lay in saved["layers"]] == [True, False, True, False]
    assert all(saved["layers"][i]["mlp_norm_dropped"] for i in DROP)

    loaded = moe_app.load_model(out)
    for i in DROP:
        assert isinstance(loaded.model.layers[i].mlp, DroppedMlp)
        assert isinstance(loaded.model.layers[i].post_attention_layernorm, DroppedNorm)
    assert _n_params(loaded) == _n_params(model)
    assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    again = save_moe_checkpoint(loaded, tmp_path / "again")  # the round trip is stable
    assert _saved_keys(again) == keys
    assert json.loads((again / SPEC_FILE).read_text())["layers"] == saved["layers"]


def test_generation_with_cache_equals_without_after_layer_drop():
    model = _upcycled(_llama(num_hidden_layers=3), method="noise", num_experts=4, top_k=2, noise_std=0.5)
    drop_mlp_layers(model, [1])
    _check_both_batches(model.eval())


def test_block_drop_after_layer_drop_moves_the_removed_mlp(tmp_path):
    model = _moe()
    drop_mlp_layers(model, [2])
    drop_blocks(model, [0])
    assert isinstance(model.model.layers[1].mlp, DroppedMlp)
    assert spec_of(model).dropped_mlp_layers() == [1] and spec_of(model).pruning["dropped_mlp_layers"] == [1]
    out = save_moe_checkpoint(model, tmp_path / "both")
    loaded = moe_app.load_model(out)
    assert loaded.config.num_hidden_layers == 3 and isinstance(loaded.model.layers[1].mlp, DroppedMlp)
    ids = tokens()
    assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)


def test_mlp_removed_with_its_norm_kept_round_trips(tmp_path):
    """Where the norm stays (replace_dropped_mlps, or a layout that uses it elsewhere), it is saved and loaded."""
    model = _moe(layers=3)
    replace_dropped_mlps(model, [1])
    out = save_moe_checkpoint(model, tmp_path / "kept")
    keys = _saved_keys(out)
    assert not any(k.startswith("model.layers.1.mlp.") for k in keys)
    assert "model.layers.1.post_attention_layernorm.weight" in keys
    layer = json.loads((out / SPEC_FILE).read_text())["layers"][1]
    assert layer["mlp_dropped"] is True and layer["mlp_norm_dropped"] is False
    loaded = moe_app.load_model(out)
    assert not isinstance(loaded.model.layers[1].post_attention_layernorm, DroppedNorm)
    ids = tokens()
    assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)


def test_norm_is_kept_where_it_feeds_more_than_the_mlp():
    class PostNormLayer(nn.Module):  # OLMo2-like: the norm normalises the attention output
        def __init__(self):
            super().__init__()
            self.post_attention_layernorm = nn.LayerNorm(4)
            self.mlp = nn.Linear(4, 4)

        def forward(self, hidden_states):
            residual = hidden_states
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states = residual + hidden_states
            hidden_states = hidden_states + self.mlp(hidden_states)
            return hidden_states

    layer = PostNormLayer()
    assert not mlp_norm_removable(layer)
    with pytest.raises(ValueError, match="cannot be removed"):
        remove_mlp(layer, norm=True)
    assert remove_mlp(layer) is False
    assert isinstance(layer.mlp, DroppedMlp) and isinstance(layer.post_attention_layernorm, nn.LayerNorm)


def test_export_refuses_removed_mlps_with_the_reason(tmp_path, capsys):
    from moe_app.cli.main import main

    model = _moe(layers=3)
    drop_mlp_layers(model, [1])
    for fmt in ("auto", "mixtral", "qwen2_moe"):
        with pytest.raises(UnsupportedModelError, match=r"layer drop removed the MLP of layers \[1\]"):
            export_checkpoint(model, tmp_path / f"x_{fmt}", fmt)
    ckpt = save_moe_checkpoint(model, tmp_path / "ckpt")
    rc = main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--format", "qwen2_moe"])
    err = capsys.readouterr().err
    assert rc == 2 and "removed the MLP of layers [1]" in err and "no per-layer 'no MLP' option" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "hf").exists()


def test_remove_needs_a_moe_app_model_and_spec_is_validated():
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    stock = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(ConfigError, match="needs a moe-app model"):
        drop_mlp_layers(stock, [1], how="remove")
    with pytest.raises(ConfigError, match="unknown layer-drop mode"):
        drop_mlp_layers(stock, [1], how="delete")
    assert not isinstance(stock.model.layers[1].mlp, DroppedMlp)

    d = _moe(layers=3)
    drop_mlp_layers(d, [1])
    spec = spec_of(d).to_dict()
    assert MoeSpec.from_dict(spec).layers[1].mlp_dropped
    bad = json.loads(json.dumps(spec))
    bad["layers"][1]["mlp"] = bad["layers"][0]["mlp"]
    with pytest.raises(CheckpointError, match="both an MLP MoE and mlp_dropped"):
        MoeSpec.from_dict(bad)
    bad["layers"][1]["mlp"], bad["layers"][1]["mlp_dropped"] = None, "yes"
    with pytest.raises(CheckpointError, match="must be true or false"):
        MoeSpec.from_dict(bad)
    with pytest.raises(ConfigError, match="no MoE sublayer"):
        drop_mlp_layers(d, [1])  # already removed
    assert torch.isfinite(logits(d, tokens())).all()
