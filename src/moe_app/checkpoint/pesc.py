"""PESC checkpoints: the adapter-only directory and the full moe-app directory.

The adapter-only directory (:func:`save_pesc_adapters`) holds the trainable tensors (and the fixed
masks of sparse adapters) in safetensors
plus ``pesc.json`` (the :class:`~moe_app.core.pesc.config.PescConfig` and the base model path) and
reloads on top of the dense base with identical logits (a 4-bit base is re-quantised
deterministically). A full checkpoint (:func:`save_pesc_full`) is a moe-app checkpoint dir whose
``moe_app.json`` carries the PESC config in its ``adapters`` slot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_app.checkpoint.names import PESC_ADAPTER_FILE, PESC_META
from moe_app.core.pesc.config import PescConfig, pesc_config_of
from moe_app.core.pesc.quantize import model_is_quantized
from moe_app.core.pesc.surgery import (
    build_pesc,
    pesc_blocks,
    pesc_checkpoint_tensors,
    pesc_spec_slot,
    pesc_state_dict,
)
from moe_app.errors import CheckpointError, ConfigError

ADAPTER_FILE = PESC_ADAPTER_FILE
ADAPTER_META = PESC_META


ADAPTER_FORMAT = "moe-app-pesc-adapters"


def _resolve_base(base_model: str | Path) -> str:
    p = Path(base_model).expanduser()
    return str(p.resolve()) if p.exists() else str(base_model)


def save_pesc_adapters(
    model: nn.Module,
    path: str | Path,
    *,
    base_model: str | Path,
    cfg: PescConfig | None = None,
    tokenizer: Any = None,
    lineage: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``ADAPTER_FILE`` (trainable tensors) and ``ADAPTER_META`` (config + base path) atomically."""
    from safetensors.torch import save_file

    from moe_app.core.utils.atomic import atomic_directory

    cfg = cfg or pesc_config_of(model)
    if cfg is None:
        raise ConfigError("the model carries no PESC config", where="save_pesc_adapters", fix="pass cfg=")
    tensors = pesc_state_dict(model)
    if not tensors:
        raise CheckpointError(
            "the model has no PESC parameters", where="save_pesc_adapters", fix="apply build_pesc first"
        )
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": 1,
        "base_model": _resolve_base(base_model),
        "pesc": cfg.to_dict(),
        "num_tensors": len(tensors),
        "lineage": lineage or [],
    }
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def is_pesc_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_META).is_file() and (Path(path) / ADAPTER_FILE).is_file()


def read_pesc_meta(path: str | Path) -> dict[str, Any]:
    f = Path(path) / ADAPTER_META
    if not is_pesc_adapter_dir(path):
        raise CheckpointError(
            f"not a PESC adapter checkpoint (needs {ADAPTER_META} and {ADAPTER_FILE})",
            where=str(path),
            fix="point at a directory written by save_pesc_adapters / PescModule",
        )
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"invalid JSON ({e})", where=str(f), fix="repair or regenerate the file") from e
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(
            f"unknown format {meta.get('format')!r}", where=str(f), fix="regenerate the checkpoint"
        )
    return meta


@torch.no_grad()
def load_pesc_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy the tensors of an adapter checkpoint into a ``build_pesc`` model; keys must match exactly.

    The keys are the trainable PESC parameters plus, for sparse adapters, their fixed masks (buffers).
    """
    from safetensors.torch import load_file

    tensors = load_file(str(Path(path) / ADAPTER_FILE))
    params = pesc_checkpoint_tensors(model)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"adapter keys do not match the model: missing {missing[:6]}, unexpected {unexpected[:6]}",
            where=str(path),
            fix="load on the same base model with the PescConfig stored in pesc.json",
        )
    for name, p in params.items():
        t = tensors[name]
        if t.shape != p.shape:
            raise CheckpointError(
                f"`{name}` has shape {tuple(t.shape)}, the model {tuple(p.shape)}",
                where=str(path),
                fix="load on the same base model with the PescConfig stored in pesc.json",
            )
        p.copy_(t.to(device=p.device, dtype=p.dtype))
    return model


def load_pesc_model(
    path: str | Path,
    base_model: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Dense base (``base_model`` or the one recorded in ``pesc.json``) + PESC surgery + saved tensors, eval mode."""
    from moe_app import load_model

    meta = read_pesc_meta(path)
    cfg = PescConfig.from_dict(meta["pesc"])
    model = load_model(base_model or meta["base_model"], dtype=dtype)
    if device is not None:
        model.to(device)  # before build_pesc: 4-bit quantisation happens on the weights' device
    build_pesc(model, cfg)
    load_pesc_adapters(model, path)
    return model.eval()


def save_pesc_full(
    model: nn.Module,
    path: str | Path,
    *,
    cfg: PescConfig | None = None,
    tokenizer: Any = None,
    source: str | None = None,
    stage: str = "pesc",
) -> Path:
    """Write the whole model as a moe-app checkpoint dir (``moe_app.json`` + sharded safetensors).

    Unmerged PESC models record their config in the ``adapters`` slot (structure rebuilt by
    :func:`pesc_skeleton`); merged ``lora`` models are plain MoE layers described per layer.
    """
    from moe_app.checkpoint.model_dir import save_moe_checkpoint
    from moe_app.core.spec import MoeSpec

    if model_is_quantized(model):
        raise ConfigError(
            "a full checkpoint of a 4-bit base would store quantisation internals, not a loadable model",
            where="save_full",
            fix="save the adapter-only checkpoint (the base is re-quantised on load), or train without quantize_4bit",
        )
    cfg = cfg or pesc_config_of(model)
    slot = pesc_spec_slot(cfg) if pesc_blocks(model) and cfg is not None else None
    spec = MoeSpec(
        base_architecture=type(model).__name__,
        base_model_type=getattr(model.config, "model_type", "unknown"),
        layers=[],
        source=_resolve_base(source) if source else None,
        adapters=slot,
    )
    return save_moe_checkpoint(
        model, path, spec, tokenizer=tokenizer, stage=stage, stage_config=cfg.to_dict() if cfg else None
    )
