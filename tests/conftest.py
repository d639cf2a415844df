"""Shared fixtures: tiny random models saved to temp dirs and loaded through the real code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# The tiny decoder every test model starts from (any HF family's config accepts these fields).
TINY_DECODER = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def tiny_config(config_cls, **overrides):
    """``config_cls`` (LlamaConfig, Qwen2Config, ...) with the tiny decoder sizes and ``overrides``."""
    return config_cls(**{**TINY_DECODER, **overrides})


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    defaults = dict(rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tiny_config(LlamaConfig, **{**defaults, **overrides})


def suite_llama_config(**overrides):
    """The tiny LLaMA sized for the built-in suite tokenizer: its vocabulary and special ids."""
    from moe_app.core.data.tokenizer import suite_tokenizer

    tok = suite_tokenizer()
    ids = {key: getattr(tok, key) for key in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return tiny_llama_config(**{"vocab_size": len(tok), **ids, **overrides})


def cpu_trainer(root: Path, steps: int, **kwargs):
    """A quiet one-process CPU Trainer for short fits (no logger, checkpoints, progress or validation)."""
    import lightning as L

    settings = dict(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        default_root_dir=str(root),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    return L.Trainer(**{**settings, **kwargs})


def save_tiny_model(config, path: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return path


def repackable_llama_config():
    """The tiny LLaMA with every linear a size bitsandbytes' AVX512-BF16 CPU kernel can repack
    (inputs and outputs multiples of 64), so that a test of the 4-bit pin meets the real thing."""
    return tiny_llama_config(hidden_size=64, intermediate_size=128, num_key_value_heads=4)


@pytest.fixture
def bnb_sees_avx512bf16(monkeypatch):
    """bitsandbytes told the CPU has AVX512-BF16 (its ``Linear4bit`` reads that in ``__init__``), so
    that its repacking, and moe-app's pin against it, are exercised on every CPU."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def load_stock_quantized(path: Path):
    """A bitsandbytes checkpoint loaded by stock transformers, in eval mode, its 4-bit layers pinned
    to bitsandbytes' standard path.

    On a CPU with AVX512-BF16 bitsandbytes 0.50.2 would run them through its packed inference
    kernel, which rejects the tiny test layers (``in_features`` 32 is below its block size, 64); real
    models' layers are multiples of 64. Pinned, the test runs the same code on every CPU.
    """
    from transformers import AutoModelForCausalLM

    from moe_app.core.pesc.quantize import pin_4bit_layout

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    pin_4bit_layout(model)
    return model


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A 2-layer LLaMA (hidden 32, d_ff 64, 4 heads / 2 KV heads) saved with safetensors."""
    return save_tiny_model(tiny_llama_config(), tmp_path / "tiny-llama")


@pytest.fixture
def tiny_qwen2_dir(tmp_path: Path) -> Path:
    from transformers import Qwen2Config

    cfg = tiny_config(Qwen2Config)
    return save_tiny_model(cfg, tmp_path / "tiny-qwen2")


@pytest.fixture
def tiny_mistral_dir(tmp_path: Path) -> Path:
    from transformers import MistralConfig

    cfg = tiny_config(MistralConfig)
    return save_tiny_model(cfg, tmp_path / "tiny-mistral")


@pytest.fixture(scope="session")
def suite_dense_dir(tmp_path_factory) -> Path:
    """A tiny dense LLaMA sized for the built-in suite tokenizer, saved with it (session-wide)."""
    from transformers import AutoModelForCausalLM

    from moe_app.core.data.tokenizer import suite_tokenizer

    tok = suite_tokenizer()
    out = tmp_path_factory.mktemp("suite-dense") / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(suite_llama_config()).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def ddp_upcycle_run(suite_dense_dir: Path, tmp_path_factory) -> Path:
    """The tiny upcycle recipe fitted by 2 CPU processes under DDP (the distributed reference)."""
    from distributed_helpers import fit_two_processes

    root = tmp_path_factory.mktemp("ddp-upcycle")
    fit_two_processes("upcycle", "ddp", root, suite_dense_dir)
    return root


@pytest.fixture(scope="session")
def ddp_pesc_run(suite_dense_dir: Path, tmp_path_factory) -> Path:
    """The tiny PESC recipe (frozen base + trainable experts) fitted by 2 CPU processes under DDP."""
    from distributed_helpers import fit_two_processes

    root = tmp_path_factory.mktemp("ddp-pesc")
    fit_two_processes("pesc", "ddp", root, suite_dense_dir)
    return root
