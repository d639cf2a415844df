"""Loading dense Hugging Face models and tokenizers from a local directory or a hub id.

A thin layer over ``transformers`` whose only job is to fail early and readably: a local path
without ``config.json`` or without weights is reported with the file that is missing and the
fix, instead of a deep transformers traceback. Remote code stays off unless asked for
(``trust_remote_code=False``): a checkpoint must not run code just by being loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moe_app.checkpoint.names import CONFIG_FILE
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
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "fp32": "float32",
        "float": "float32",
    }
    name = aliases.get(str(dtype).lower(), str(dtype).lower())
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise CheckpointError(
            f"unknown dtype {dtype!r}", where="dtype", fix="use float32, bfloat16 or float16"
        )
    return value


def is_local(name_or_path: str | Path) -> bool:
    return Path(name_or_path).exists() or str(name_or_path).startswith((".", "/", "~"))


def check_local_model_dir(path: str | Path) -> Path:
    """Raise ``CheckpointError`` unless ``path`` is a dir with ``config.json`` and readable safetensors.

    Every weight file listed (index or single file) must exist and its header must parse and cover
    the file: a missing, truncated or corrupt shard is reported by name before any heavy work.
    """
    from moe_app.checkpoint.shards import verify_shards

    p = Path(path).expanduser()
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
    return model.eval()


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False, required: bool = False):
    """The tokenizer of a model dir or hub id; ``None`` if it has none (unless ``required``)."""
    from transformers import AutoTokenizer

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
    """Copy the tokenizer files present in ``src_dir`` (byte-for-byte); returns their names."""
    import shutil

    src, out = Path(src_dir), Path(out_dir)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    return copied
