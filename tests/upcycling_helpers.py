"""Helpers shared by the upcycling / checkpoint / export tests (tiny random models, fixed inputs)."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config


def build(config, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def tokens(vocab: int = 128, batch: int = 2, seq: int = 11, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def upcycled(dense, cfg, calibration=None):
    from moe_app.core.upcycling import upcycle

    return upcycle(copy.deepcopy(dense), cfg, calibration).eval()


def qwen3_config(**kw):
    from transformers import Qwen3Config

    return tiny_config(Qwen3Config, **{"head_dim": 8, **kw})


def qwen2_config(**kw):
    from transformers import Qwen2Config

    return tiny_config(Qwen2Config, **kw)
