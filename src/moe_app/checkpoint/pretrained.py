"""Write a plain Hugging Face model directory atomically (dense models, stock HF MoE models), and
read the lineage of any model directory.

MoE models built by moe-app are written by :mod:`moe_app.checkpoint.model_dir` instead, which adds the
surgery description; this is the path for models that stock transformers describes completely.
Where each kind of directory keeps its lineage is documented in :mod:`moe_app.checkpoint.names`:
one place per directory, read by :func:`read_lineage` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from moe_app.checkpoint.hub import copy_tokenizer_files
from moe_app.checkpoint.names import LINEAGE_FILE, PESC_META, SPEC_FILE
from moe_app.core.spec import merge_lineage, utc_now
from moe_app.core.utils.atomic import atomic_directory

__all__ = ["LINEAGE_FILE", "lineage_plus", "read_lineage", "save_pretrained_dir", "write_lineage_file"]


def save_pretrained_dir(
    model: nn.Module,
    path: str | Path,
    tokenizer: Any | None = None,
    lineage: list[dict[str, Any]] | None = None,
    max_shard_size: str = "2GB",
    *,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Save ``model`` (a PreTrainedModel) with safetensors, plus tokenizer and lineage, atomically.

    The writer of every plain Hugging Face dir moe-app produces (dense training, a pruned stock MoE).
    The tokenizer is ``tokenizer.save_pretrained`` or, without one, the files copied from
    ``tokenizer_dir``. ``lineage`` is the full list of stages that produced the model (see
    :func:`read_lineage`); it goes to :data:`~moe_app.checkpoint.names.LINEAGE_FILE`, which stock
    transformers ignores.
    """

    path = Path(path)
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        if lineage is not None:
            write_lineage_file(tmp, lineage)
    return path


def write_lineage_file(directory: str | Path, lineage: list[dict[str, Any]]) -> Path:
    """Write the lineage of a plain HF dir (time-ordered, UTC times) into ``directory``."""
    f = Path(directory) / LINEAGE_FILE
    f.write_text(json.dumps({"lineage": merge_lineage(lineage)}, indent=2, default=str) + "\n")
    return f


def read_lineage(path: str | Path) -> list[dict[str, Any]]:
    """The lineage recorded in a model directory, or ``[]``.

    A moe-app checkpoint's ``moe_app.json``, a PESC adapter dir's ``pesc.json`` or a plain HF dir's
    ``moe_app_lineage.json``, whichever the dir has (in that order); entries time-ordered, UTC.
    """
    path = Path(path)
    for name in (SPEC_FILE, PESC_META, LINEAGE_FILE):
        f = path / name
        if f.is_file():
            try:
                entries = json.loads(f.read_text()).get("lineage") or []
                return merge_lineage([e for e in entries if isinstance(e, dict)])
            except (ValueError, AttributeError, TypeError):
                return []
    return []


def lineage_plus(previous: list[dict[str, Any]], stage: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    """``previous`` stages followed by a new ``stage`` entry stamped now (UTC): the lineage a
    conversion writes into a stock dir it produces (``upcycle --format``, ``export``), so a stock
    checkpoint still says where it came from."""
    return [*previous, {"stage": stage, "time": utc_now(), "config": config, "data": None}]
