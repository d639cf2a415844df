"""moe-app checkpoint dirs: save -> load_model round trip, strict keys, skipping, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import moe_app
from conftest import tiny_llama_config
from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.checkpoint.shards import INDEX_FILE, shard_files
from moe_app.core.moe.block import SparseMoeBlock
from moe_app.core.spec import SPEC_FILE, MoeSpec, spec_of
from moe_app.core.upcycling import UpcycleConfig
from moe_app.errors import CheckpointError
from upcycling_helpers import build, logits, tokens, upcycled


def _moe(**cfg_kw):
    dense = build(tiny_llama_config(**cfg_kw.pop("model", {})))
    cfg = UpcycleConfig(**{"method": "noise", "num_experts": 4, "top_k": 2, "noise_std": 0.1, **cfg_kw})
    return upcycled(dense, cfg)


def test_save_load_round_trip_identical_logits(tmp_path):
    moe = _moe(layers="1")
    out = save_moe_checkpoint(moe, tmp_path / "ckpt", max_shard_size="40KB")
    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", SPEC_FILE, INDEX_FILE} <= set(files)
    assert len(shard_files(out)) > 1  # sharded
    assert not [f for f in files if f.startswith(".")]  # atomic: no temp leftovers
    loaded = moe_app.load_model(out)
    assert isinstance(loaded.model.layers[1].mlp, SparseMoeBlock)
    assert not isinstance(loaded.model.layers[0].mlp, SparseMoeBlock)
    ids = tokens()
    assert_close(logits(loaded, ids), logits(moe, ids), rtol=0, atol=0)
    assert not loaded.training


def test_spec_schema_and_lineage(tmp_path):
    moe = _moe(
        model={"num_hidden_layers": 3}, layers="0,2", method="partition", split="random", shared_experts=0
    )
    save_moe_checkpoint(moe, tmp_path / "c", stage="test-stage", stage_config={"x": 1})
    d = json.loads((tmp_path / "c" / SPEC_FILE).read_text())
    assert d["format"] == "moe-app" and d["format_version"] == 1
    assert d["base"]["architecture"] == "LlamaForCausalLM" and d["base"]["num_hidden_layers"] == 3
    assert [lay["mlp"] is not None for lay in d["layers"]] == [True, False, True]
    mlp = d["layers"][0]["mlp"]
    assert mlp["num_experts"] == 4 and mlp["top_k"] == 2 and mlp["scale"] == 2.0
    assert mlp["expert_intermediate_size"] == 16 and mlp["method"] == "partition" and mlp["split"] == "random"
    assert [s["stage"] for s in d["lineage"]] == ["upcycle", "test-stage"]
    assert d["lineage"][0]["config"]["num_experts"] == 4
    assert set(d) >= {"adapters", "pruning", "skipping"}
    assert MoeSpec.from_dict(d).to_dict() == d


def test_inherited_lineage_goes_before_the_surgery_and_is_not_repeated(tmp_path):
    """A training run's lineage (base stages + its own entry) merged with the surgery recorded at load."""
    from datetime import datetime, timedelta

    moe = _moe(layers="1")
    surgery = spec_of(moe).lineage[-1]
    t_surgery = datetime.fromisoformat(surgery["time"])
    dense = {"stage": "CausalLMModule", "time": (t_surgery - timedelta(seconds=30)).isoformat()}
    own = {"stage": "upcycle:copy", "time": (t_surgery + timedelta(seconds=5)).isoformat()}
    save_moe_checkpoint(moe, tmp_path / "c", lineage=[dense, own])
    save_moe_checkpoint(moe, tmp_path / "c", lineage=[dense, own])  # idempotent: nothing repeated
    lineage = json.loads((tmp_path / "c" / SPEC_FILE).read_text())["lineage"]
    assert [e["stage"] for e in lineage] == ["CausalLMModule", "upcycle", "upcycle:copy"]
    assert all(datetime.fromisoformat(e["time"]).utcoffset() == timedelta(0) for e in lineage)
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if "lineage" in p.name) == []


def test_tied_embeddings_round_trip(tmp_path):
    moe = _moe(model={"tie_word_embeddings": True})
    save_moe_checkpoint(moe, tmp_path / "c")
    keys = set().union(*(load_file(str(f)).keys() for f in shard_files(tmp_path / "c")))
    assert "lm_head.weight" not in keys
    loaded = moe_app.load_model(tmp_path / "c")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = tokens()
    assert_close(logits(loaded, ids), logits(moe, ids), rtol=0, atol=0)


def test_skipping_betas_are_applied_on_load(tmp_path):
    moe = _moe()
    save_moe_checkpoint(moe, tmp_path / "c")
    spec_path = tmp_path / "c" / SPEC_FILE
    d = json.loads(spec_path.read_text())
    d["skipping"] = {"1": 0.5}
    spec_path.write_text(json.dumps(d))
    loaded = moe_app.load_model(tmp_path / "c")
    assert loaded.model.layers[1].mlp.router.skip_beta == 0.5
    assert loaded.model.layers[0].mlp.router.skip_beta is None
    # and they are saved back from the routers
    save_moe_checkpoint(loaded, tmp_path / "d")
    assert json.loads((tmp_path / "d" / SPEC_FILE).read_text())["skipping"] == {"1": 0.5}


def test_missing_and_unexpected_keys_are_named(tmp_path):
    moe = _moe()
    save_moe_checkpoint(moe, tmp_path / "c", max_shard_size="1GB")
    (shard,) = shard_files(tmp_path / "c")
    tensors = load_file(str(shard))
    tensors.pop("model.layers.0.mlp.router.weight")
    tensors["model.layers.0.mlp.bogus.weight"] = torch.zeros(1)
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError) as e:
        moe_app.load_model(tmp_path / "c")
    msg = str(e.value)
    assert "missing keys (1): ['model.layers.0.mlp.router.weight']" in msg
    assert "unexpected keys (1): ['model.layers.0.mlp.bogus.weight']" in msg


def test_missing_files_are_named(tmp_path):
    moe = _moe()
    save_moe_checkpoint(moe, tmp_path / "c", max_shard_size="40KB")
    shards = shard_files(tmp_path / "c")
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[1].name}.*missing"):
        moe_app.load_model(tmp_path / "c")
    save_moe_checkpoint(moe, tmp_path / "d")
    (tmp_path / "d" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing config\.json"):
        moe_app.load_model(tmp_path / "d")
    with pytest.raises(CheckpointError, match="directory not found"):
        moe_app.load_model(tmp_path / "nope")


def test_shape_mismatch_between_spec_and_weights(tmp_path):
    moe = _moe()
    save_moe_checkpoint(moe, tmp_path / "c")
    spec_path = tmp_path / "c" / SPEC_FILE
    d = json.loads(spec_path.read_text())
    d["layers"][0]["mlp"]["num_experts"] = 3
    spec_path.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="shapes do not match"):
        moe_app.load_model(tmp_path / "c")


def test_plain_hf_dir_loads_through_load_model(tiny_llama_dir):
    model = moe_app.load_model(tiny_llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training


def test_failed_save_leaves_previous_checkpoint(tmp_path):
    moe = _moe()
    save_moe_checkpoint(moe, tmp_path / "c")
    before = sorted(p.name for p in (tmp_path / "c").iterdir())

    class Boom:
        def save_pretrained(self, *_):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_moe_checkpoint(moe, tmp_path / "c", tokenizer=Boom())
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_attention_moe_round_trip(tmp_path):
    dense = build(tiny_llama_config())
    ids = tokens()
    cfg = UpcycleConfig(
        method="copy", num_experts=2, top_k=1, attention_moe=True, router_init="zeros", attention_scale=2.0
    )
    moe = upcycled(dense, cfg)
    # all groups selected with unit multipliers (zero router: w = 1/2, scale 2) == dense
    assert_close(logits(moe, ids), logits(dense, ids), rtol=1e-5, atol=1e-5)
    save_moe_checkpoint(moe, tmp_path / "c")
    spec = json.loads((tmp_path / "c" / SPEC_FILE).read_text())
    assert spec["layers"][0]["attention"] == {
        "num_experts": 2,
        "top_k": 2,
        "rule": "softmax_topk_renorm",
        "scale": 2.0,
    }
    loaded = moe_app.load_model(tmp_path / "c")
    assert_close(logits(loaded, ids), logits(moe, ids), rtol=0, atol=0)
