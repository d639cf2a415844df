"""Atomic Lightning checkpoints (``.ckpt``): same-directory temp file, ``fsync``, ``os.replace``.

Lightning's own ``_atomic_save`` writes through an fsspec transaction whose temporary file lives in
``$TMPDIR``; when that is another filesystem (tmpfs ``/tmp``, a node-local disk) the final
"rename" is ``shutil.move``, i.e. a copy straight into ``last.ckpt`` that a kill can leave
truncated, having already destroyed the previous one. :class:`AtomicCheckpointIO` also loads with
``weights_only=True`` always (Lightning defaults remote checkpoints to ``weights_only=False``).
The file write itself is :func:`moe_app.core.utils.atomic.atomic_write_file`, shared with every
other atomic file write of the project.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from moe_app.core.utils.atomic import atomic_write_file
from moe_app.errors import ConfigError
from moe_app.lightning.strategies.checks import FSDP_CLASS


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """Where this run's checkpoints go: the ModelCheckpoint's dirpath, else ``<root>/checkpoints``."""
    cb = trainer.checkpoint_callback
    dirpath = getattr(cb, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """The file ``--ckpt_path last`` resolves to (``last.ckpt`` in the checkpoint directory)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = trainer.checkpoint_callback
    name = (
        cb.CHECKPOINT_NAME_LAST if isinstance(cb, ModelCheckpoint) else ModelCheckpoint.CHECKPOINT_NAME_LAST
    )
    ext = cb.FILE_EXTENSION if isinstance(cb, ModelCheckpoint) else ModelCheckpoint.FILE_EXTENSION
    return checkpoint_dir(trainer) / f"{name}{ext}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file next to the target, ``fsync``, ``os.replace``; load safely.

    An interrupted save leaves the previous checkpoint intact and no partial file under the final
    name (temporary files start with ``.`` and end in ``.tmp-*``, which ``--ckpt_path last``
    ignores). Remote (``scheme://``) paths fall back to Lightning's writer. Loading always uses
    ``weights_only=True``: a checkpoint holding pickled objects is refused, never executed.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ConfigError(
                "loading a checkpoint with weights_only=False (arbitrary pickled objects) is disabled.",
                where=str(path),
                fix="use a checkpoint that holds only tensors and plain types (every moe-app checkpoint does)",
            )
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (same-directory temp file, fsync, rename)."""
    return atomic_write_file(path, lambda f: torch.save(obj, f))


def default_trainer_plugins(trainer_cfg: Any) -> None:
    """Give a Trainer config the atomic checkpoint writer when it names no plugins of its own.

    Called by the CLI before the Trainer is built; leaves configs with ``plugins`` set alone
    (e.g. a custom ``CheckpointIO`` or a precision plugin) and strategies that write sharded
    checkpoint directories (DeepSpeed, Lightning's FSDP1) to their own writers.
    """
    if trainer_cfg is None or trainer_cfg.get("plugins") not in (None, []):
        return
    strategy = trainer_cfg.get("strategy")
    name = str(strategy if isinstance(strategy, str) else getattr(strategy, "class_path", "") or "")

    # moe-app's FSDP writes full checkpoints on rank 0 through the CheckpointIO; Lightning's FSDP1
    # and DeepSpeed write their own sharded directories.
    if "deepspeed" in name.lower() or ("fsdp" in name.lower() and name != FSDP_CLASS):
        return
    from jsonargparse import Namespace

    trainer_cfg["plugins"] = [Namespace(class_path="moe_app.lightning.checkpoint_io.AtomicCheckpointIO")]
