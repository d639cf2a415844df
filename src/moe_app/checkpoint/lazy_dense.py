"""A dense Hugging Face checkpoint opened without loading it: its structure on ``meta`` plus a
reader of named tensors, for building a model one decoder layer at a time (sharded FSDP loading).

``from_pretrained`` reads every tensor before anything else can happen; here only the headers
are read. The model is built from ``config.json`` with parameters on the meta device, and
:func:`lazy_dense_model`'s ``fetch(names)`` reads just those tensors from the safetensors files.
Only a directory whose tensor names are exactly the model's parameter names qualifies
(transformers renames some legacy keys while loading; those checkpoints are loaded whole).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from moe_app.checkpoint.model_dir import is_moe_checkpoint, unique_state_dict
from moe_app.checkpoint.names import CONFIG_FILE, GENERATION_CONFIG_FILE
from moe_app.checkpoint.pesc import is_pesc_adapter_dir
from moe_app.checkpoint.shards import shard_files
from moe_app.core.utils.weights import params_on_meta
from moe_app.errors import CheckpointError

Fetch = Callable[[Sequence[str]], dict[str, Tensor]]
"""``fetch(names) -> {name: tensor}``: read the named tensors from disk, cast to the model's dtype."""


def lazy_dense_model(
    path: str | Path, dtype: torch.dtype, trust_remote_code: bool = False
) -> tuple[nn.Module, Fetch] | None:
    """``(model on meta, fetch)`` for a local dense safetensors checkpoint dir, or ``None`` when
    ``path`` is anything else (hub id, GGUF file, moe-app or PESC dir, renamed keys): the caller
    then loads it whole."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    p = Path(path).expanduser()
    if not (p / CONFIG_FILE).is_file() or is_moe_checkpoint(p) or is_pesc_adapter_dir(p):
        return None
    try:
        files = shard_files(p)
    except CheckpointError:
        return None
    where = tensor_files(files)
    config = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    with params_on_meta(), no_init_weights():  # buffers (rotary tables) stay real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if set(where) != set(unique_state_dict(model)):
        return None
    if (p / GENERATION_CONFIG_FILE).is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(p))
    model.eval()  # as from_pretrained returns it

    def fetch(names: Sequence[str]) -> dict[str, Tensor]:
        return read_tensors(where, names, lambda _: dtype)

    return model, fetch


def tensor_files(files: Sequence[Path]) -> dict[str, Path]:
    """``{tensor name: the safetensors file holding it}``, from the files' headers only."""
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            where.update(dict.fromkeys(h.keys(), f))
    return where


def read_tensors(
    where: dict[str, Path], names: Sequence[str], dtype_of: Callable[[str], torch.dtype]
) -> dict[str, Tensor]:
    """The named tensors, read from their files (each file opened once), cast to ``dtype_of(name)``."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(where[name], []).append(name)
    out = {}
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            for k in keys:
                out[k] = h.get_tensor(k).to(dtype_of(k))
    return out


__all__ = ["Fetch", "lazy_dense_model", "read_tensors", "tensor_files"]
