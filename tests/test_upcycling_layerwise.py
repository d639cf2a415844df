"""Layer-by-layer upcycling (``LayerwiseUpcycle``) equals ``upcycle`` exactly, and holds at most one
upcycled layer at a time: what FSDP's sharded loading relies on."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_llama_config
from moe_app.core.spec import spec_of
from moe_app.core.upcycling.config import UpcycleConfig
from moe_app.core.upcycling.layerwise import LayerwiseUpcycle
from moe_app.core.utils.weights import ModuleWeights, meta_copy
from upcycling_helpers import build, upcycled


def _calibration(n: int = 4, seq: int = 16):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 128, (2, seq), generator=g) for _ in range(n)]


CASES = {
    "copy": (UpcycleConfig(method="copy", num_experts=4, top_k=2), False),
    "drop": (UpcycleConfig(method="drop", num_experts=4, top_k=2, drop_ratio=0.5, seed=7), False),
    "partition_importance_kmeans": (
        UpcycleConfig(
            method="partition",
            split="importance",
            num_experts=4,
            top_k=2,
            router_init="kmeans",
            kmeans_iters=5,
        ),
        True,
    ),
    "attention_moe_last_layer": (
        UpcycleConfig(
            method="noise", num_experts=2, top_k=1, attention_moe=True, layers=[1], noisy_gating=True
        ),
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layerwise_upcycle_equals_upcycle(case: str):
    cfg, calibrate = CASES[case]
    dense = build(tiny_llama_config())
    calib = _calibration() if calibrate else None
    reference = upcycled(dense, cfg, calib)
    source = LayerwiseUpcycle(copy.deepcopy(dense), cfg, calib)
    skeleton = source.skeleton
    ref_params = dict(reference.named_parameters())
    skel_params = dict(skeleton.named_parameters())
    assert list(skel_params) == list(ref_params)
    for name, p in skel_params.items():
        assert p.is_meta and p.shape == ref_params[name].shape and p.dtype == ref_params[name].dtype, name
    # the same spec (structure, methods, stage config), up to the time stamp of the stage
    ref_spec, spec = spec_of(reference).to_dict(), spec_of(skeleton).to_dict()
    for s in (ref_spec, spec):
        for entry in s.get("lineage", []):
            entry.pop("time", None)
    assert spec == ref_spec
    # one layer at a time (reversed: the order of the requests does not matter), bit for bit
    names = list(skel_params)
    got = {}
    for group in reversed(_by_layer(names)):
        got.update(source.tensors(group))
    assert got.keys() == ref_params.keys()
    for name, value in got.items():
        assert torch.equal(value, ref_params[name].detach()), name


def _by_layer(names: list[str]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".")
        key = ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else "rest"
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def test_layerwise_upcycle_releases_each_dense_layer_once_served():
    cfg = UpcycleConfig(method="copy", num_experts=4, top_k=2)
    dense = build(tiny_llama_config())
    source = LayerwiseUpcycle(dense, cfg)
    names = [n for n, _ in source.skeleton.named_parameters() if n.startswith("model.layers.0.")]
    served = source.tensors(names)
    assert served["model.layers.0.mlp.experts.down_proj"].shape[0] == 4
    # the dense model's layer 0 is now storage-free; layer 1 is still the real dense layer
    assert all(p.is_meta for p in dense.model.layers[0].parameters())
    assert not any(p.is_meta for p in dense.model.layers[1].parameters())
    assert not source._pending  # nothing of layer 0 is kept by the source


def test_module_weights_serves_and_releases_a_whole_model():
    model = build(tiny_llama_config(tie_word_embeddings=True))
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    source = ModuleWeights(model)
    assert source.skeleton.lm_head.weight is source.skeleton.model.embed_tokens.weight  # still tied
    got = source.tensors(list(reference))
    for name, value in reference.items():
        assert torch.equal(got[name], value), name
    assert all(p.numel() == 0 for p in model.parameters())  # released as served
    skeleton = meta_copy(build(tiny_llama_config()))
    assert all(p.is_meta for p in skeleton.parameters())
    assert not any(b.is_meta for b in skeleton.buffers())


def test_layerwise_upcycle_reads_the_dense_checkpoint_one_layer_at_a_time(tmp_path):
    from conftest import save_tiny_model
    from moe_app import load_model
    from moe_app.checkpoint.lazy_dense import lazy_dense_model
    from moe_app.core.upcycling import upcycle

    path = save_tiny_model(tiny_llama_config(), tmp_path / "dense")
    cfg = UpcycleConfig(method="drop", num_experts=4, top_k=2, seed=3)
    reference = upcycle(load_model(path, dtype=torch.float32), cfg)  # the whole-model path
    dense, fetch = lazy_dense_model(path, torch.float32)
    assert all(p.is_meta for p in dense.parameters())
    assert not any(b.is_meta for b in dense.buffers())  # rotary tables are computed, not read
    read: list[str] = []

    def counting_fetch(names):
        read.extend(names)
        return fetch(names)

    source = LayerwiseUpcycle(dense, cfg, fetch=counting_fetch)
    assert read == []  # nothing is read before the weights are asked for
    ref = dict(reference.named_parameters())
    layer1 = [n for n in ref if n.startswith("model.layers.1.")]
    got = source.tensors(layer1)
    assert read and all(n.startswith("model.layers.1.") for n in read)  # only layer 1's dense tensors
    got.update(source.tensors([n for n in ref if n not in got]))
    for name, value in ref.items():
        assert torch.equal(got[name], value.detach()), name
    # a moe-app checkpoint (or anything transformers must convert) is not opened lazily
    assert lazy_dense_model(tmp_path / "missing", torch.float32) is None
