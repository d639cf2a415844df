"""Sharded loading of the post-training, PESC and LoRA modules, in one process.

Under FSDP only rank 0 builds a module's model (``build_weight_source``); the other ranks rebuild
its structure on meta from the JSON rank 0 broadcasts (``rebuild_on_meta``). Each test runs both
halves here and holds them to the old path, where every rank ran ``build_model``: the same
parameter names, shapes, dtypes and trainability, the same module types and settings (expert
counts, top-k, skipping thresholds, dropped MLPs, adapter sizes, LoRA scaling), the same MoE spec
and PESC config, and (for rank 0's source) the same values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_llama_config
from moe_app.lightning.modules.lm import ModelSource

SIMPLE = (bool, int, float, str, type(None))


def _settings(module: nn.Module) -> dict:
    """A module's plain settings (top_k, skip_beta, scale, dropout p, LoRA scaling, ...)."""
    out = {k: v for k, v in vars(module).items() if isinstance(v, SIMPLE) and k != "training" and k[0] != "_"}
    out.update((k, v) for k, v in vars(module).items() if k == "scaling" and isinstance(v, dict))
    return out


def _assert_same_structure(a: nn.Module, b: nn.Module) -> None:
    from moe_app.core.pesc.config import pesc_config_of
    from moe_app.core.spec import spec_of

    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(pa) == list(pb)
    for name, p in pa.items():
        q = pb[name]
        assert (p.shape, p.dtype, p.requires_grad) == (q.shape, q.dtype, q.requires_grad), name
    ma, mb = dict(a.named_modules()), dict(b.named_modules())
    assert {n: type(m) for n, m in ma.items()} == {n: type(m) for n, m in mb.items()}
    for name, m in ma.items():
        assert _settings(m) == _settings(mb[name]), name
    assert [(n, t.shape, t.dtype) for n, t in a.named_buffers()] == [
        (n, t.shape, t.dtype) for n, t in b.named_buffers()
    ]
    sa, sb = spec_of(a), spec_of(b)
    assert (sa.to_dict() if sa else None) == (sb.to_dict() if sb else None)
    ca, cb = pesc_config_of(a), pesc_config_of(b)
    assert (ca.to_dict() if ca else None) == (cb.to_dict() if cb else None)
    assert a.config.to_dict() == b.config.to_dict()


def _rank1(skeleton: nn.Module) -> nn.Module:
    """What another rank builds from rank 0's broadcast (through JSON, as it travels)."""
    from moe_app.lightning.strategies.fsdp import _structure, rebuild_on_meta

    rebuilt = rebuild_on_meta(json.loads(json.dumps(_structure(skeleton), default=str)))
    assert all(p.is_meta for p in rebuilt.parameters())
    return rebuilt


def _check_sharded_loading(make_module) -> nn.Module:
    """Rank 0's source and the other ranks' rebuild both equal the every-rank ``build_model()``
    (from the same seed, as seed_everything gives every rank: peft draws its LoRA A globally)."""
    torch.manual_seed(0)
    eager = make_module().build_model()
    torch.manual_seed(0)
    source = make_module().build_weight_source()
    skeleton = source.skeleton
    assert all(p.is_meta for p in skeleton.parameters())
    _assert_same_structure(skeleton, eager)
    rebuilt = _rank1(skeleton)
    _assert_same_structure(rebuilt, eager)
    for name, buf in skeleton.named_buffers():
        torch.testing.assert_close(buf, dict(eager.named_buffers())[name], rtol=0, atol=0, msg=name)
    params = dict(eager.named_parameters())
    names = list(params)
    for start in range(0, len(names), 7):  # asked for a few at a time, as the strategy does
        for name, value in source.tensors(names[start : start + 7]).items():
            assert value.dtype == params[name].dtype, name
            torch.testing.assert_close(value, params[name].detach(), rtol=0, atol=0, msg=name)
    return rebuilt


@pytest.fixture(scope="module")
def pruned_moe_dir(tmp_path_factory) -> Path:
    """A moe-app checkpoint every pruning feature touched: 3 layers upcycled to 4 experts top-2
    with attention MoE and router jitter, then 3 and 2 experts kept in layers 0 and 1, a skipping
    threshold in layer 0, and layer 2's MLP dropped."""
    from moe_app.checkpoint.model_dir import save_moe_checkpoint
    from moe_app.core.pruning.drop import drop_mlp_layers
    from moe_app.core.pruning.experts import keep_experts
    from moe_app.core.pruning.skipping import apply_skipping
    from moe_app.core.upcycling import upcycle
    from moe_app.core.upcycling.config import UpcycleConfig
    from upcycling_helpers import build

    cfg = UpcycleConfig(method="copy", num_experts=4, top_k=2, attention_moe=True, jitter=0.1)
    model = upcycle(build(tiny_llama_config(num_hidden_layers=3)), cfg)
    keep_experts(model, {0: [0, 2, 3], 1: [1, 3]})
    apply_skipping(model, {0: 0.4})
    drop_mlp_layers(model, [2], how="remove")
    return save_moe_checkpoint(model, tmp_path_factory.mktemp("pruned") / "model")


def test_other_ranks_rebuild_a_pruned_moe_checkpoint_that_rank0_reads_layer_by_layer(pruned_moe_dir: Path):
    from moe_app.core.moe.block import SparseMoeBlock
    from moe_app.core.utils.weights import FetchedWeights
    from moe_app.lightning.modules.moe import FreezeConfig
    from moe_app.lightning.modules.post import PostTrainModule

    def module():
        return PostTrainModule(init_from=str(pruned_moe_dir), freeze=FreezeConfig(router=True))

    first = module()
    assert first.rebuilds_on_meta()
    # rank 0 does not load the checkpoint: it reads the tensors the strategy asks for
    assert isinstance(first.build_weight_source(), FetchedWeights)
    rebuilt = _check_sharded_loading(module)
    layers = rebuilt.model.layers
    assert [layers[i].mlp.router.num_experts for i in (0, 1)] == [3, 2]
    assert layers[0].mlp.router.skip_beta == pytest.approx(0.4) and layers[1].mlp.router.skip_beta is None
    assert not isinstance(layers[2].mlp, SparseMoeBlock)
    assert layers[1].mlp.router.jitter == pytest.approx(0.1)
    assert not any(p.requires_grad for n, p in rebuilt.named_parameters() if ".router." in n)


def test_a_checkpoint_the_strict_loader_refuses_is_not_read_lazily(pruned_moe_dir: Path, tmp_path: Path):
    import shutil

    from safetensors.torch import load_file, save_file

    from moe_app.checkpoint.lazy_moe import lazy_moe_model
    from moe_app.errors import CheckpointError
    from moe_app.lightning.modules.post import PostTrainModule

    bad = tmp_path / "bad"
    shutil.copytree(pruned_moe_dir, bad)
    (shard,) = bad.glob("*.safetensors")
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.router.weight"] = torch.zeros(5, 32)  # 5 experts where the spec says 3
    save_file(tensors, shard, metadata={"format": "pt"})
    assert lazy_moe_model(bad, torch.float32) is None
    # the fallback is the strict whole-model loader, whose error says what is wrong
    with pytest.raises(CheckpointError, match="tensor shapes do not match"):
        PostTrainModule(init_from=str(bad)).build_weight_source()


@pytest.fixture(scope="module")
def pesc_dirs(suite_dense_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A PESC model (sparse adapters + a peft LoRA) saved adapter-only and as a full moe-app dir."""
    from moe_app.checkpoint.pesc import save_pesc_adapters, save_pesc_full
    from moe_app.lightning.modules.pesc import PescModule

    module = PescModule(source=ModelSource(pretrained=str(suite_dense_dir)), pesc=_pesc_config())
    model = module.build_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # trained adapters: not the zeros of a fresh craft
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.01)
    root = tmp_path_factory.mktemp("pesc")
    adapters = save_pesc_adapters(model, root / "adapters", base_model=str(suite_dense_dir), cfg=module.pesc)
    full = save_pesc_full(model, root / "full", cfg=module.pesc)
    return adapters, full


def _pesc_config():
    from moe_app.core.pesc.config import PeftLoraOptions, PescConfig

    return PescConfig(
        num_experts=3,
        adapter_dim=4,
        adapter_sparsity=0.5,
        peft_lora=PeftLoraOptions(enabled=True, rank=2, target_modules=["q_proj", "down_proj"]),
    )


def test_other_ranks_rebuild_post_training_from_pesc_adapter_and_full_dirs(pesc_dirs):
    from moe_app.core.utils.weights import FetchedWeights, ModuleWeights
    from moe_app.lightning.modules.post import PostTrainModule

    adapters, full = pesc_dirs
    for path, lazy in ((adapters, False), (full, True)):
        first = PostTrainModule(init_from=str(path))
        assert first.rebuilds_on_meta()
        assert isinstance(first.build_weight_source(), FetchedWeights if lazy else ModuleWeights)
        rebuilt = _check_sharded_loading(lambda path=path: PostTrainModule(init_from=str(path)))
        masks = [n for n, _ in rebuilt.named_buffers() if n.endswith("_mask")]
        assert masks, "the sparse adapters' masks are buffers rank 0 broadcasts"


def test_other_ranks_rebuild_pesc_crafted_in_memory_and_adopt_the_saved_config(
    suite_dense_dir: Path, pesc_dirs
):
    from moe_app.core.pesc.config import PescConfig
    from moe_app.lightning.modules.pesc import PescModule

    def fresh():
        return PescModule(source=ModelSource(pretrained=str(suite_dense_dir)), pesc=_pesc_config())

    assert fresh().rebuilds_on_meta()
    _check_sharded_loading(fresh)
    # continuing from adapters: the saved config replaces the module's own on every rank
    adapters, _ = pesc_dirs

    def resumed():
        return PescModule(source=ModelSource(pretrained=str(adapters)), pesc=PescConfig(num_experts=2))

    rebuilt = _check_sharded_loading(resumed)
    from moe_app.core.pesc.config import pesc_config_of

    assert pesc_config_of(rebuilt).to_dict() == _pesc_config().to_dict()  # what the other ranks adopt
    module = resumed()
    module.configure_model()  # adopts the config its model carries, as every rank does
    assert module.pesc.to_dict() == _pesc_config().to_dict()


def test_pesc_on_a_4bit_base_keeps_the_every_rank_path(suite_dense_dir: Path):
    # FSDP refuses 4-bit weights in setup with the reason; it must get there, not fail in a rebuild
    from moe_app.core.pesc.config import PescConfig
    from moe_app.lightning.modules.pesc import PescModule

    module = PescModule(
        source=ModelSource(pretrained=str(suite_dense_dir)), pesc=PescConfig(quantize_4bit=True)
    )
    assert not module.rebuilds_on_meta()


def test_other_ranks_rebuild_dense_lora_on_meta(suite_dense_dir: Path):
    from peft.tuners.lora import Linear as LoraLinear

    from moe_app.core.pesc.config import PeftLoraOptions
    from moe_app.lightning.modules.lora import LoraModule

    def module():
        lora = PeftLoraOptions(
            enabled=True, rank=4, alpha=8.0, dropout=0.05, target_modules=["q_proj", "v_proj"]
        )
        return LoraModule(source=ModelSource(pretrained=str(suite_dense_dir)), lora=lora)

    assert module().rebuilds_on_meta()
    rebuilt = _check_sharded_loading(module)
    q = rebuilt.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLinear) and q.scaling == {"default": 2.0}
    assert q.lora_dropout["default"].p == pytest.approx(0.05)
