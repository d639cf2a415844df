"""The one table of floating-point dtypes a config may name, and their short aliases."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def dtype_from_name(name: str) -> torch.dtype | None:
    """``float32`` / ``bf16`` / ``torch.float16`` / ... -> the dtype; ``None`` when it is not one."""
    key = str(name).lower().removeprefix("torch.")
    return DTYPES.get(ALIASES.get(key, key))


def dtype_names() -> list[str]:
    return list(DTYPES)


__all__ = ["ALIASES", "DTYPES", "dtype_from_name", "dtype_names"]
