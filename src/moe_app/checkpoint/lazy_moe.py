"""A moe-app checkpoint directory opened without loading it: its structure on ``meta`` plus a
reader of named tensors, so that rank 0 of a sharded (FSDP) run serves it one decoder layer at a
time instead of holding the whole model (ZeRO-3's loading, Rajbhandari et al. 2020).

The structure is built exactly as :func:`~moe_app.checkpoint.model_dir.load_model` builds it
(``config.json`` + ``moe_app.json`` through ``build_empty_model``: per-layer expert counts,
attention MoE, dropped MLPs, skipping thresholds, PESC adapters), only with the parameters on
meta; the small persistent buffers (PESC sparse-adapter masks) are read at once. Anything the
strict loader would refuse (missing, unexpected or mis-shaped tensors) makes this return ``None``,
so the caller falls back to that loader and its error names the keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from moe_app.checkpoint.hub import resolve_dtype
from moe_app.checkpoint.lazy_dense import Fetch, read_tensors
from moe_app.checkpoint.model_dir import build_empty_model, is_moe_checkpoint, unique_state_dict
from moe_app.checkpoint.names import CONFIG_FILE, GENERATION_CONFIG_FILE
from moe_app.checkpoint.pesc import is_pesc_adapter_dir
from moe_app.checkpoint.safetensors_io import read_header
from moe_app.checkpoint.shards import checkpoint_dtype, shard_files
from moe_app.checkpoint.spec_file import read_spec
from moe_app.core.utils.weights import params_on_meta
from moe_app.errors import CheckpointError


def lazy_moe_model(
    path: str | Path, dtype: torch.dtype | str | None = None, trust_remote_code: bool = False
) -> tuple[nn.Module, Fetch] | None:
    """``(model on meta, fetch)`` for a local moe-app checkpoint dir whose tensors match the
    structure its ``moe_app.json`` describes, or ``None`` for anything else (a plain HF or PESC
    adapter dir, a hub id, a checkpoint the strict loader would refuse). ``fetch(names)`` reads the
    named parameters, cast to the model's dtype for them."""
    from transformers import AutoConfig, GenerationConfig

    p = Path(path).expanduser()
    if not (p / CONFIG_FILE).is_file() or not is_moe_checkpoint(p) or is_pesc_adapter_dir(p):
        return None
    try:
        stored = {k: v for f in shard_files(p) for k, v in read_header(f)[0].items()}  # headers only
    except CheckpointError:
        return None
    where = {k: v.path for k, v in stored.items()}
    resolved = resolve_dtype(dtype)
    if resolved in (None, "auto"):
        resolved = checkpoint_dtype(p) or torch.float32
    config = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    # Every tensor on meta, buffers too: the surgery may compute buffers from weights (PESC's
    # magnitude masks), which have no values yet. Saved buffers are read below; computed ones
    # (rotary tables) come from the base model built with real buffers.
    with torch.device("meta"):
        model = build_empty_model(config, read_spec(p), resolved, trust_remote_code)
    expected = unique_state_dict(model)
    if set(stored) != set(expected) or any(stored[k].info.shape != v.shape for k, v in expected.items()):
        return None
    buffers = dict(model.named_buffers())
    values = read_tensors(where, [k for k in expected if k in buffers], lambda k: buffers[k].dtype)
    computed = _computed_buffers(config, resolved, trust_remote_code)
    for name, buf in buffers.items():
        value = values.get(name, computed.get(name))
        if value is None or value.shape != buf.shape:
            return None  # a buffer that is neither saved nor computed by the base model
        owner, _, leaf = name.rpartition(".")
        (model.get_submodule(owner) if owner else model)._buffers[leaf] = value.to(buf.dtype)
    if (p / GENERATION_CONFIG_FILE).is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(p))
    model.eval()  # as load_model returns it
    params = dict(model.named_parameters())

    def fetch(names: Sequence[str]) -> dict[str, Tensor]:
        return read_tensors(where, names, lambda k: params[k].dtype)

    return model, fetch


def _computed_buffers(config, dtype: torch.dtype, trust_remote_code: bool) -> dict[str, Tensor]:
    """The buffers the base model computes at construction (rotary tables), no parameter storage."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with params_on_meta(), no_init_weights():
        base = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return dict(base.named_buffers())


__all__ = ["lazy_moe_model"]
