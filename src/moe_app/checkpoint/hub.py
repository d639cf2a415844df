"""Loading dense Hugging Face models and tokenizers from a local directory or a hub id.

A thin layer over ``transformers`` whose only job is to fail early and readably: a local path
without ``config.json`` or without weights is reported with the file that is missing and the
fix, instead of a deep transformers traceback.

A path ending in ``.gguf`` is a dense model in one GGUF file (see :mod:`moe_app.checkpoint.gguf`):
``load_hf_causal_lm`` dequantises it to a float model and ``load_tokenizer`` reads the tokenizer
and chat template from the same file. Such a source is always loaded in memory (like a hub id):
the streaming upcycle path needs safetensors shards, so ``is_local`` is false for it. Remote code stays off unless asked for
(``trust_remote_code=False``): a checkpoint must not run code just by being loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moe_app.checkpoint.gguf import (
    check_gguf_file,
    is_gguf_path,
    load_gguf_causal_lm,
    load_gguf_tokenizer,
)
from moe_app.checkpoint.names import CONFIG_FILE
from moe_app.checkpoint.shards import verify_shards
from moe_app.core.pesc.quantize import pin_4bit_layout
from moe_app.core.utils.dtypes import dtype_from_name, dtype_names
from moe_app.errors import CheckpointError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16``/``"auto"``/``None`` -> what transformers accepts."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = dtype_from_name(str(dtype))
    if value is None:
        raise CheckpointError(
            f"unknown dtype {dtype!r}", where="dtype", fix=f"use one of {', '.join(dtype_names())}"
        )
    return value


def is_local(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` is a local model *directory* path (not a hub id, not a ``.gguf`` file)."""
    if is_gguf_path(name_or_path):
        return False
    return Path(name_or_path).exists() or str(name_or_path).startswith((".", "/", "~"))


def check_local_model_dir(path: str | Path) -> Path:
    """Raise ``CheckpointError`` unless ``path`` is a dir with ``config.json`` and readable safetensors.

    Every weight file listed (index or single file) must exist and its header must parse and cover
    the file: a missing, truncated or corrupt shard is reported by name before any heavy work.
    """

    p = Path(path).expanduser()
    if is_gguf_path(p):
        raise CheckpointError(
            "a GGUF file is not a model directory: it is a dense source, loaded in memory",
            where=str(p),
            fix="pass it where a dense model is read (`moe-app upcycle --model X.gguf` without "
            "--streaming on, or source.pretrained: X.gguf); commands that read a checkpoint dir take "
            "the safetensors dir written from it",
        )
    if not p.is_dir():
        raise CheckpointError(
            "directory not found", where=str(p), fix="check the path (or pass a hub id like org/name)"
        )
    if not (p / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"missing {CONFIG_FILE}",
            where=str(p),
            fix="point at a Hugging Face model directory (save it with `model.save_pretrained(dir)`)",
        )
    verify_shards(p)  # raises with the missing / truncated file named
    return p


def load_hf_causal_lm(
    name_or_path: str | Path,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    device_map: Any = None,
) -> torch.nn.Module:
    """A dense (or stock MoE) ``AutoModelForCausalLM`` from a local dir or hub id, in eval mode."""
    from transformers import AutoModelForCausalLM

    if is_gguf_path(name_or_path):
        model = load_gguf_causal_lm(name_or_path, dtype=dtype)
        return model.to(device_map) if isinstance(device_map, (str, torch.device)) else model
    src = str(name_or_path)
    if is_local(name_or_path):
        src = str(check_local_model_dir(name_or_path))
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    resolved = resolve_dtype(dtype)
    if resolved is not None:
        kwargs["dtype"] = resolved
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except OSError as e:
        raise CheckpointError(
            f"could not load model ({e})",
            where=src,
            fix="check the hub id / path and your network or HF_HUB_OFFLINE setting",
        ) from e
    except ValueError as e:
        if "trust_remote_code" in str(e) or "model type" in str(e):
            raise CheckpointError(
                f"transformers does not know this architecture ({e})",
                where=src,
                fix="upgrade transformers, or pass trust_remote_code=True if you trust the repository",
            ) from e
        raise
    pin_4bit_layout(model)  # a bitsandbytes 4-bit checkpoint: one code path on every CPU
    return model.eval()


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False, required: bool = False):
    """The tokenizer of a model dir or hub id; ``None`` if it has none (unless ``required``)."""
    from transformers import AutoTokenizer

    if is_gguf_path(name_or_path):
        check_gguf_file(name_or_path)  # a missing / bad file is an error even when not required
        try:
            return load_gguf_tokenizer(name_or_path)
        except CheckpointError:
            if required:
                raise
            return None
    if is_local(name_or_path):
        p = Path(name_or_path).expanduser()
        if not any((p / f).is_file() for f in TOKENIZER_FILES):
            if required:
                raise CheckpointError(
                    "no tokenizer files (tokenizer.json / tokenizer.model / tokenizer_config.json)",
                    where=str(p),
                    fix="save the tokenizer next to the model (`tokenizer.save_pretrained(dir)`)",
                )
            return None
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if required:
            raise CheckpointError(f"could not load tokenizer ({e})", where=str(name_or_path)) from e
        return None


def copy_tokenizer_files(src_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer files present in ``src_dir`` (byte-for-byte); returns their names.

    For a ``.gguf`` source the tokenizer stored in the file is written with ``save_pretrained``.
    """
    import shutil

    src, out = Path(src_dir), Path(out_dir)
    if is_gguf_path(src):  # the tokenizer inside a GGUF file, written as ordinary tokenizer files
        tokenizer = load_tokenizer(src)
        return [Path(f).name for f in tokenizer.save_pretrained(str(out))] if tokenizer is not None else []
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    return copied
