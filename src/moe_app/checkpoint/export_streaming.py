"""Streaming ``moe-app export``: a moe-app checkpoint dir -> a stock MoE checkpoint, one decoder layer at a time.

The in-memory export (:func:`moe_app.checkpoint.export.export_checkpoint` on a live model) loads
the whole model first: about twice the model in peak memory. Nothing in the mapping needs that:
every stock tensor of decoder layer ``i`` depends only on layer ``i``'s MLP (experts, router,
block scale, shared expert), and every other tensor is copied unchanged. So this module

1. rebuilds the model's *structure* on the ``meta`` device from ``config.json`` + ``moe_app.json``
   (``build_empty_model``, exactly as ``load_model`` does, but without memory), runs the same
   analysis and refusals (``_analyse`` / ``check_format``) and the same target config;
2. reads the shard headers (no tensor) and checks the keys and shapes against that structure;
3. plans every output tensor (name, dtype, shape) by running the same per-layer mapping
   (``export._layer_tensors`` -> ``stock_mlp_tensors``) on the meta model, checks the plan
   against the target architecture, and hands it to the shard writer, which preallocates each
   shard with its final header;
4. streams: a tensor written unchanged is copied byte for byte from its input file (never loaded,
   at most one copy buffer in memory); a layer's MLP tensors are memory-mapped (``safe_open``),
   assigned into a copy of that layer's meta module, mapped by the same function as in memory,
   written at their offsets, and dropped before the next layer.

Peak memory is therefore about one decoder layer's MLP (input pages plus any tensor the mapping
creates, e.g. a scaled W_down) plus one copy buffer, whatever the model or shard size
(tests/test_export_streaming.py holds it to 1.5x that). The output equals the in-memory export
tensor for tensor. PESC checkpoints with adapters (adapter-only dirs, LoRA experts that must be
merged first, adapter experts that are refused) keep the in-memory path: merging needs the live
modules (:func:`streaming_export_reason`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_app.checkpoint.export import (
    ExportResult,
    _analyse,
    _layer_tensors,
    check_against_target,
    choose_format,
    log_dropped_training_parts,
    target_config,
)
from moe_app.checkpoint.hub import check_local_model_dir
from moe_app.checkpoint.model_dir import (
    build_empty_model,
    is_moe_checkpoint,
    unique_state_dict,
    write_model_dir,
)
from moe_app.checkpoint.names import SPEC_FILE
from moe_app.checkpoint.pesc import is_pesc_adapter_dir
from moe_app.checkpoint.pretrained import lineage_plus, read_lineage
from moe_app.checkpoint.safetensors_io import StoredTensor, TensorInfo, read_header
from moe_app.checkpoint.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter, checkpoint_dtype, shard_files
from moe_app.checkpoint.spec_file import read_spec
from moe_app.checkpoint.streaming import load_stored
from moe_app.core.models.layers import find_decoder_layers
from moe_app.core.utils.progress import progress
from moe_app.errors import CheckpointError


def streaming_export_reason(src_dir: str | Path) -> str | None:
    """Why the checkpoint in ``src_dir`` must be exported in memory, or ``None`` if it can stream."""
    p = Path(src_dir).expanduser()
    if is_pesc_adapter_dir(p):
        return "a PESC adapter-only dir is assembled from its base model in memory"
    if not is_moe_checkpoint(p):
        return f"not a moe-app checkpoint dir (no {SPEC_FILE})"
    if read_spec(p).adapters:
        return "PESC adapters / LoRA experts are merged (or refused) on the live model"
    return None


Step = tuple[str, int | None, list[str]]
"""``("copy", None, [key])`` or ``("layer", i, [every key of layer i's MLP])``, in input order."""


def _steps(stored: dict[str, StoredTensor], mlp_layers: set[int], path: str) -> list[Step]:
    by_layer: dict[int, list[str]] = {}
    for k in stored:
        i = _mlp_layer(k, path)
        if i is not None and i in mlp_layers:
            by_layer.setdefault(i, []).append(k)
    steps: list[Step] = []
    for k in stored:
        i = _mlp_layer(k, path)
        if i is None or i not in mlp_layers:
            steps.append(("copy", None, [k]))
        elif by_layer[i][0] == k:  # the layer is due where its first tensor is
            steps.append(("layer", i, by_layer[i]))
    return steps


def _mlp_layer(key: str, path: str) -> int | None:
    head = f"{path}."
    if not key.startswith(head):
        return None
    index, _, rest = key[len(head) :].partition(".")
    return int(index) if index.isdigit() and rest.startswith("mlp.") else None


def _check_keys(src: Path, expected: dict[str, torch.Tensor], stored: dict[str, StoredTensor]) -> None:
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    bad = [
        f"{k} {stored[k].info.shape} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in stored and stored[k].info.shape != tuple(v.shape)
    ]
    if missing or unexpected or bad:
        parts = [f"missing keys {missing[:8]}"] if missing else []
        parts += [f"unexpected keys {unexpected[:8]}"] if unexpected else []
        parts += [f"wrong shapes {bad[:4]}"] if bad else []
        raise CheckpointError(
            "; ".join(parts),
            where=str(src),
            fix=f"the safetensors do not match config.json + {SPEC_FILE}; regenerate or repair the checkpoint",
        )


def export_checkpoint_streaming(
    src_dir: str | Path,
    out_dir: str | Path,
    format: str = "auto",
    *,
    tokenizer: Any = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> ExportResult:
    """Export the moe-app checkpoint in ``src_dir`` as a stock ``format`` checkpoint, layer by layer.

    Raises ``UnsupportedModelError`` (not representable: nothing written), ``CheckpointError`` (bad
    or vanishing input, a full disk: nothing left at ``out_dir``, a previous ``out_dir`` kept)."""
    from transformers import AutoConfig

    src = check_local_model_dir(src_dir)
    reason = streaming_export_reason(src)
    if reason:
        raise CheckpointError(
            f"cannot export in streaming mode: {reason}", where=str(src), fix="export in memory"
        )
    spec = read_spec(src)
    config = AutoConfig.from_pretrained(str(src))
    dtype = checkpoint_dtype(src) or torch.float32
    with torch.device("meta"):
        meta = build_empty_model(config, spec, dtype)
    fmt = choose_format(meta, format)
    a = _analyse(meta)
    log_dropped_training_parts(a)
    cfg = target_config(meta, fmt)
    path, layers = find_decoder_layers(meta)

    stored: dict[str, StoredTensor] = {}
    for f in shard_files(src):
        stored.update(read_header(f)[0])
    expected = unique_state_dict(meta)
    _check_keys(src, expected, stored)
    steps = _steps(stored, {*a.moe, *a.dense}, path)

    def layer_out(i: int, mlp: nn.Module) -> dict[str, torch.Tensor]:
        return _layer_tensors(fmt, i, mlp, a, i in a.moe)

    infos: list[TensorInfo] = []
    for kind, i, keys in steps:
        if kind == "copy":
            infos.append(TensorInfo.of(keys[0], expected[keys[0]]))
        else:
            infos.extend(TensorInfo.of(k, v) for k, v in layer_out(i, layers[i].mlp).items())
    check_against_target(cfg, {i.name: i.shape for i in infos})

    def fill(writer: ShardWriter) -> None:
        writer.plan(infos)
        for kind, i, keys in progress(steps, f"export -> {fmt}", total=len(steps), unit="step"):
            if kind == "copy":
                k = keys[0]
                if stored[k].info.dtype == expected[k].dtype:
                    writer.copy(k, stored[k])
                else:  # the in-memory export casts to the model's dtype on load: so do we
                    writer.add(k, load_stored(stored[k]).to(expected[k].dtype))
                continue
            prefix = f"{path}.{i}.mlp."
            mlp = copy.deepcopy(layers[i].mlp)  # structure on meta; the weights are assigned below
            weights = {k[len(prefix) :]: load_stored(stored[k]).to(expected[k].dtype) for k in keys}
            mlp.load_state_dict(weights, strict=True, assign=True)
            del weights
            out = layer_out(i, mlp)
            del mlp
            for name in list(out):
                writer.add(name, out.pop(name))

    lineage = lineage_plus(read_lineage(src), "export", {"format": fmt})
    out = write_model_dir(
        out_dir,
        cfg,
        fill,
        generation_config=getattr(meta, "generation_config", None),
        tokenizer=tokenizer,
        tokenizer_dir=tokenizer_dir if tokenizer_dir is not None else src,
        max_shard_size=max_shard_size,
        lineage=lineage,
    )
    return ExportResult(path=out, format=fmt)
