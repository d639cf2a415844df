"""What ``--trainer.strategy`` resolves to, what is refused and why, and the FSDP building blocks
that need no second process (the 2-process fits are in test_fsdp.py)."""

from __future__ import annotations

import pytest
import torch
from jsonargparse import Namespace
from transformers import AutoModelForCausalLM

from moe_app.errors import ConfigError
from moe_app.lightning.strategies.checks import FSDP_CLASS, check_strategy
from moe_app.lightning.strategies.fsdp import check_shardable, decoder_layer_classes, meta_skeleton


@pytest.mark.parametrize("name", ["fsdp", "FSDP", "fsdp2"])
def test_bare_fsdp_resolves_to_moe_apps_fsdp2_strategy(name):
    cfg = Namespace(strategy=name, accelerator="cpu")
    check_strategy(cfg)
    assert cfg.strategy.class_path == FSDP_CLASS


@pytest.mark.parametrize(
    "strategy",
    [
        Namespace(class_path="lightning.pytorch.strategies.FSDPStrategy"),
        Namespace(class_path="pytorch_lightning.strategies.FSDPStrategy"),
        "fsdp_cpu_offload",
    ],
)
def test_lightnings_fsdp1_is_refused_with_the_reason(strategy):
    with pytest.raises(ConfigError, match="FSDP1") as err:
        check_strategy(Namespace(strategy=strategy))
    assert "--trainer.strategy fsdp" in str(err.value)


@pytest.mark.parametrize(
    "strategy",
    [
        "deepspeed_stage_3",
        "deepspeed_stage_3_offload",
        Namespace(class_path="lightning.pytorch.strategies.DeepSpeedStrategy", init_args=Namespace(stage=3)),
        Namespace(
            class_path="lightning.pytorch.strategies.DeepSpeedStrategy",
            init_args=Namespace(config={"zero_optimization": {"stage": 3}}),
        ),
    ],
)
def test_zero3_is_refused_pointing_at_fsdp(strategy):
    with pytest.raises(ConfigError, match="ZeRO-3 is not supported") as err:
        check_strategy(Namespace(strategy=strategy, accelerator="gpu"))
    assert "--trainer.strategy fsdp" in str(err.value)


def test_deepspeed_stage_2_needs_cuda():
    with pytest.raises(ConfigError, match="needs CUDA GPUs") as err:
        check_strategy({"strategy": "deepspeed_stage_2", "accelerator": "cpu"})
    assert "ddp or fsdp" in str(err.value)


@pytest.mark.parametrize("strategy", ["ddp", "auto", None, Namespace(class_path=FSDP_CLASS)])
def test_cpu_strategies_are_accepted(strategy):
    check_strategy({"strategy": strategy, "accelerator": "cpu"})


def test_strategy_instances_and_attribute_configs_are_checked_too():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from moe_app.lightning.strategies.fsdp import DecoderLayerFSDPStrategy

    with pytest.raises(ConfigError, match="FSDP1"):
        check_strategy(SimpleNamespace(strategy=FSDPStrategy(), accelerator="gpu"))
    check_strategy(SimpleNamespace(strategy=DecoderLayerFSDPStrategy(), accelerator="cpu"))
    cfg = SimpleNamespace(strategy="fsdp", accelerator="cpu")  # attributes only, no item access
    check_strategy(cfg)
    assert cfg.strategy.class_path == FSDP_CLASS


def test_decoder_layers_are_found_on_any_family(tiny_llama_dir, tiny_qwen2_dir):
    for path in (tiny_llama_dir, tiny_qwen2_dir):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert decoder_layer_classes(model) == {type(model.model.layers[0])}


def test_meta_skeleton_copies_structure_not_storage_and_reloads_exactly(tiny_llama_dir):
    from transformers import LlamaConfig

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=True))
    assert isinstance(model.config, LlamaConfig)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    skeleton = meta_skeleton(model)
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight  # tying survives
    assert not skeleton.model.layers[0].self_attn.q_proj.weight.requires_grad
    assert model.model.embed_tokens.weight.is_meta is False  # the original is untouched
    skeleton.load_state_dict(model.state_dict(), strict=True, assign=True)
    skeleton.tie_weights()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(skeleton(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_4bit_weights_are_refused_by_fsdp_with_the_ddp_fix(tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    from moe_app.core.pesc.config import PescConfig
    from moe_app.core.pesc.surgery import build_pesc

    model = build_pesc(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        PescConfig(num_experts=2, adapter_dim=4, quantize_4bit=True),
    )
    with pytest.raises(ConfigError, match="cannot shard bitsandbytes 4-bit") as err:
        check_shardable(model)
    assert "--trainer.strategy ddp" in str(err.value)
    check_shardable(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))  # a plain model passes
