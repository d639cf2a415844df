"""moe-app checkpoint directories: save and load.

Layout (DESIGN.md contract)::

    DIR/config.json                      the base model's config (unchanged architecture)
    DIR/generation_config.json           if the base has one
    DIR/moe_app.json                     the surgery (core/spec.py): per-layer MoE shapes, lineage, ...
    DIR/model-0000i-of-0000n.safetensors
    DIR/model.safetensors.index.json
    DIR/tokenizer files                  if a tokenizer was given / present in the source

Saving is atomic (``atomic_directory``). Loading builds the base from ``config.json`` without weight
initialisation, rebuilds the MoE modules from ``moe_app.json`` (structure only), then loads the
safetensors shard by shard and checks the key sets strictly: a missing or unexpected key is an
error naming the keys, never a silently random weight. Tied weights (``tie_word_embeddings``) are
saved once and re-tied by the model, as transformers does. Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_app.checkpoint.hub import copy_tokenizer_files, load_hf_causal_lm, resolve_dtype
from moe_app.checkpoint.names import CONFIG_FILE, SPEC_FILE
from moe_app.checkpoint.pesc import is_pesc_adapter_dir, load_pesc_model
from moe_app.checkpoint.pretrained import write_lineage_file
from moe_app.checkpoint.shards import (
    DEFAULT_MAX_SHARD_SIZE,
    ShardWriter,
    checkpoint_dtype,
    load_shard,
    shard_files,
)
from moe_app.checkpoint.spec_file import read_spec, write_spec
from moe_app.core.pesc.config import SPEC_KIND as PESC_KIND
from moe_app.core.pesc.surgery import pesc_skeleton
from moe_app.core.spec import MoeSpec, attach_spec, spec_of
from moe_app.core.upcycling.skeleton import apply_structure, describe_structure, skipping_from_model
from moe_app.core.utils.atomic import atomic_directory
from moe_app.errors import CheckpointError


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without aliases of an earlier entry (tied embeddings are saved once).

    Tied parameters are the same ``Parameter`` object, so identity (not storage pointers, which
    meta tensors lack) decides what is an alias.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in seen:
            continue
        seen.add(id(v))
        out[k] = v.detach()
    return out


def is_moe_checkpoint(path: str | Path) -> bool:
    return (Path(path) / SPEC_FILE).is_file()


def current_spec(model: nn.Module, spec: MoeSpec | None = None) -> MoeSpec:
    """``spec`` (or the one attached to ``model``: :func:`~moe_app.core.spec.spec_of`) with its structure refreshed from the live modules."""

    spec = spec if spec is not None else spec_of(model)
    if spec is None:
        raise CheckpointError(
            "the model carries no moe-app surgery description (moe_app.core.spec.spec_of(model) is None)",
            where="save_moe_checkpoint",
            fix="create the model with moe_app.core.upcycling.upcycle / moe_app.load_model, or pass spec=",
        )
    spec.layers = describe_structure(model, spec)
    spec.skipping = skipping_from_model(model)
    return spec


def save_moe_checkpoint(
    model: nn.Module,
    out_dir: str | Path,
    spec: MoeSpec | None = None,
    tokenizer: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    *,
    tokenizer_dir: str | Path | None = None,
    stage: str | None = None,
    stage_config: dict[str, Any] | None = None,
    lineage: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``model`` as a moe-app checkpoint dir, atomically; returns the final path.

    ``tokenizer`` is saved with ``save_pretrained``; alternatively ``tokenizer_dir`` names a dir
    whose tokenizer files are copied verbatim. ``stage`` appends a lineage entry before saving;
    ``lineage`` (a full stage list, e.g. from a training run) is merged in with
    :func:`~moe_app.core.spec.merge_lineage`: entries already recorded are not repeated and the result
    is in the order the stages happened. ``moe_app.json`` is the dir's only lineage store.
    """
    spec = current_spec(model, spec)
    # Time-ordered: the base's stages, then the surgery recorded while loading, then this stage.
    spec.merge_lineage(lineage)
    if stage:
        spec.add_stage(stage, stage_config)
    return write_model_dir(
        out_dir,
        model.config,
        unique_state_dict(model).items(),
        generation_config=getattr(model, "generation_config", None),
        tokenizer=tokenizer,
        tokenizer_dir=tokenizer_dir,
        max_shard_size=max_shard_size,
        extra=lambda tmp: write_spec(tmp, spec),
    )


def write_model_dir(
    out_dir: str | Path,
    config: Any,
    tensors: Iterable[tuple[str, torch.Tensor]] | Callable[[ShardWriter], object],
    *,
    generation_config: Any = None,
    tokenizer: Any = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    lineage: list[dict[str, Any]] | None = None,
    extra: Callable[[Path], Any] | None = None,
) -> Path:
    """An HF-style model directory, written atomically; returns its path.

    ``config.json``, the generation config (a bad one is skipped, not fatal), sharded safetensors
    of ``tensors`` (pairs, or a function that fills the shard writer itself: the streaming
    conversion, which reserves room before each layer's experts), the tokenizer (``save_pretrained``, or the files copied from
    ``tokenizer_dir``), the ``lineage`` of a plain (stock) dir in ``moe_app_lineage.json`` (a moe-app
    dir keeps its lineage in ``moe_app.json`` instead), then ``extra(staging_dir)`` for files of the
    caller's own (``moe_app.json``).
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        config.save_pretrained(tmp)
        if generation_config is not None:
            with contextlib.suppress(ValueError, OSError):
                generation_config.save_pretrained(tmp)
        writer = ShardWriter(tmp, max_shard_size)
        if callable(tensors):
            tensors(writer)
        else:
            for k, v in tensors:
                writer.add(k, v)
        writer.close()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        if lineage is not None:
            write_lineage_file(tmp, lineage)
        if extra is not None:
            extra(tmp)
    return out_dir


def build_empty_model(
    config: Any, spec: MoeSpec | None, dtype: torch.dtype, trust_remote_code: bool = False
) -> nn.Module:
    """The base model from ``config`` plus the MoE structure of ``spec``, weights uninitialised."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    if spec is not None:
        apply_structure(model, spec)
        if spec.adapters:
            _apply_adapters(model, spec.adapters)
        attach_spec(model, spec)
    return model


# Adapter kinds recorded in moe_app.json's ``adapters`` slot -> the core function that rebuilds them.
ADAPTER_SKELETONS: dict[str, Callable[[nn.Module, dict[str, Any]], nn.Module]] = {PESC_KIND: pesc_skeleton}


def _apply_adapters(model: nn.Module, slot: dict[str, Any]) -> None:
    kind = slot.get("kind") if isinstance(slot, dict) else None
    skeleton = ADAPTER_SKELETONS.get(str(kind))
    if skeleton is None:
        raise CheckpointError(
            f"unknown adapters kind {kind!r}",
            where=SPEC_FILE,
            fix=f"known kinds: {', '.join(ADAPTER_SKELETONS)}; upgrade moe-app if the checkpoint is newer",
        )
    skeleton(model, slot)


def load_state_dict_strict(model: nn.Module, ckpt_dir: str | Path) -> None:
    """Load every shard into ``model``; raise ``CheckpointError`` naming missing/unexpected keys."""
    expected = set(unique_state_dict(model))
    seen: set[str] = set()
    unexpected: list[str] = []
    for f in shard_files(ckpt_dir):
        tensors = load_shard(f)
        unexpected += [k for k in tensors if k not in expected]
        tensors = {k: v for k, v in tensors.items() if k in expected}
        seen.update(tensors)
        try:
            model.load_state_dict(tensors, strict=False)
        except RuntimeError as e:
            raise CheckpointError(
                f"tensor shapes do not match the model built from config.json + {SPEC_FILE}: {e}",
                where=str(f),
                fix="the weights and the surgery file disagree; regenerate the checkpoint",
            ) from e
        del tensors
    missing = sorted(expected - seen)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing keys ({len(missing)}): {missing[:8]}" + (" ..." if len(missing) > 8 else "")
            )
        if unexpected:
            u = sorted(unexpected)
            parts.append(f"unexpected keys ({len(u)}): {u[:8]}" + (" ..." if len(u) > 8 else ""))
        raise CheckpointError(
            "; ".join(parts),
            where=str(ckpt_dir),
            fix=f"the safetensors do not match config.json + {SPEC_FILE}; regenerate or repair the checkpoint",
        )


def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A ready ``PreTrainedModel`` (eval mode) from any directory moe-app writes or reads.

    The first entry of :data:`LOADERS` that recognises the directory loads it: a PESC adapter-only
    dir (base model + adapters and routers on top), a moe-app checkpoint dir (MoE structure and
    adapters rebuilt from ``moe_app.json``, weights loaded strictly, skipping thresholds applied),
    or anything else through ``AutoModelForCausalLM.from_pretrained`` (``trust_remote_code`` off
    unless asked). ``dtype`` defaults to the checkpoint's.
    """
    p = Path(path).expanduser()
    for _, recognises, load in LOADERS:
        if recognises(p):
            return load(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    raise AssertionError("the last loader accepts every path")  # pragma: no cover


def _load_pesc_adapter_dir(
    path: str | Path, *, dtype: Any, device: Any, trust_remote_code: bool
) -> nn.Module:

    return load_pesc_model(path, dtype=dtype, device=device)


def _load_moe_dir(path: str | Path, *, dtype: Any, device: Any, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig

    p = Path(path).expanduser()
    if not (p / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"missing {CONFIG_FILE} (the base model's config)",
            where=str(p),
            fix="copy the base model's config.json into the checkpoint dir, or regenerate it",
        )
    spec = read_spec(p)
    config = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    resolved = resolve_dtype(dtype)
    if resolved in (None, "auto"):
        resolved = checkpoint_dtype(p) or torch.float32
    model = build_empty_model(config, spec, resolved, trust_remote_code)
    load_state_dict_strict(model, p)
    if device is not None:
        model.to(device)
    return model.eval()


def _load_hf_dir(path: str | Path, *, dtype: Any, device: Any, trust_remote_code: bool) -> nn.Module:
    return load_hf_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device)


def _is_pesc_adapter_dir(path: Path) -> bool:

    return is_pesc_adapter_dir(path)


# The one loader registry: (name, recognises(dir), load(dir, dtype=, device=, trust_remote_code=)),
# tried in order; the last accepts everything (a plain HF dir, a hub id, a .gguf file).
LOADERS: tuple[tuple[str, Callable[[Path], bool], Callable[..., nn.Module]], ...] = (
    ("pesc-adapters", _is_pesc_adapter_dir, _load_pesc_adapter_dir),
    ("moe-app", is_moe_checkpoint, _load_moe_dir),
    ("hugging-face", lambda _: True, _load_hf_dir),
)
