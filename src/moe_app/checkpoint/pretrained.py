"""Write a plain Hugging Face model directory atomically (dense models, stock HF MoE models).

MoE models built by moe-app are written by :mod:`moe_app.checkpoint.model_dir` instead, which adds the
surgery description; this is the path for models that stock transformers describes completely.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from moe_app.core.utils.atomic import atomic_directory

LINEAGE_FILE = "moe_app_lineage.json"


def save_pretrained_dir(
    model: nn.Module,
    path: str | Path,
    tokenizer: Any | None = None,
    lineage: list[dict[str, Any]] | None = None,
    max_shard_size: str = "2GB",
) -> Path:
    """Save ``model`` (a PreTrainedModel) with safetensors, plus tokenizer and lineage, atomically.

    ``lineage`` is the full list of stages that produced the model (see :func:`read_lineage`).
    """
    path = Path(path)
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if lineage is not None:
            (tmp / LINEAGE_FILE).write_text(json.dumps({"lineage": lineage}, indent=2, default=str))
    return path


def read_lineage(path: str | Path) -> list[dict[str, Any]]:
    """The lineage recorded in a model directory (moe-app checkpoint or plain HF dir), or ``[]``."""
    path = Path(path)
    for name in ("moe_app.json", LINEAGE_FILE):
        f = path / name
        if f.exists():
            try:
                return list(json.loads(f.read_text()).get("lineage", []))
            except (ValueError, AttributeError, TypeError):
                return []
    return []
