"""Streaming dense -> MoE conversion of a sharded safetensors checkpoint, shard by shard.

For the data-free methods (copy, noise, drop, partition with sequential/random/clustering split)
each layer's experts depend only on that layer's dense MLP, so the whole model never needs to be
in memory: tensors are read one at a time with ``safe_open`` (memory-mapped), a layer's
``gate/up/down_proj`` are held until all three have been seen, the layer's MoE tensors are built
with the same functions as in-memory surgery (``surgery.mlp_moe_tensors``, order-independent
seeds) and handed to a ``ShardWriter`` that flushes bounded shards. Peak memory is about one
output shard plus one layer's experts plus the tensors being read, instead of the whole model
(see benchmarks/conversion_memory.py). The output equals ``upcycle`` + ``save_moe_checkpoint``
key for key and value for value (tests/test_upcycling_streaming.py).

The structure (layer paths, key names, expected output keys) comes from the model class built on
the ``meta`` device, so architectures whose on-disk names differ from their module names
(transformers' legacy key conversions) are detected and refused; the caller then falls back to
in-memory surgery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from moe_app.checkpoint.hub import check_local_model_dir
from moe_app.checkpoint.model_dir import unique_state_dict, write_model_dir
from moe_app.checkpoint.pretrained import read_lineage
from moe_app.checkpoint.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter, shard_files
from moe_app.checkpoint.spec_file import write_spec
from moe_app.core.models.layers import dense_mlp_parts, find_decoder_layers
from moe_app.core.spec import LayerSpec, MoeSpec
from moe_app.core.upcycling.config import UpcycleConfig
from moe_app.core.upcycling.skeleton import apply_structure, describe_structure
from moe_app.core.upcycling.surgery import check_mlp_shape, mlp_moe_tensors, mlp_spec_for
from moe_app.errors import CheckpointError, UnsupportedModelError


class StreamingUnsupported(UnsupportedModelError):
    """This checkpoint / config needs in-memory surgery (the caller may fall back to it)."""


def streaming_reason(cfg: UpcycleConfig) -> str | None:
    """Why ``cfg`` cannot be converted in streaming mode, or ``None`` if it can."""
    if not cfg.builds_mlp_moe:
        return "attention-only surgery"
    if cfg.attention_moe:
        return "attention MoE wraps live attention modules"
    if cfg.needs_calibration:
        return f"split={cfg.split!r} / router_init={cfg.router_init!r} needs calibration data"
    return None


@dataclass
class _Plan:
    """What the conversion reads: the dense config, its structure on ``meta`` and the tensors on disk."""

    src: Path
    config: Any
    meta: nn.Module
    path: str
    layers: list[nn.Module]
    selected: list[int]
    keys_by_shard: dict[Path, list[str]]


def upcycle_checkpoint_streaming(
    src_dir: str | Path,
    out_dir: str | Path,
    cfg: UpcycleConfig,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    trust_remote_code: bool = False,
) -> MoeSpec:
    """Convert the dense checkpoint in ``src_dir`` into a moe-app checkpoint in ``out_dir``.

    Three steps: plan and check everything from metadata before any tensor is read
    (:func:`_plan`), stream the tensors through the surgery into output shards
    (:func:`_stream_tensors`), then describe and check the result from shapes alone (:func:`_result_spec`).
    """
    from transformers import GenerationConfig

    reason = streaming_reason(cfg)
    if reason:
        raise StreamingUnsupported(f"streaming conversion impossible: {reason}", fix="use in-memory surgery")
    plan = _plan(src_dir, cfg, trust_remote_code)
    written: set[str] = set()
    result: list[MoeSpec] = []

    def describe(staging: Path) -> None:  # runs inside the staging dir, after the shards are complete
        spec = _result_spec(plan, cfg, written, trust_remote_code)
        spec.merge_lineage(read_lineage(plan.src))  # the dense model's own stages come first
        spec.add_stage("upcycle", cfg.to_dict(), None)
        write_spec(staging, spec)
        result.append(spec)

    has_generation = (plan.src / "generation_config.json").is_file()
    write_model_dir(
        out_dir,
        plan.config,
        lambda writer: written.update(_stream_tensors(plan, cfg, writer)),
        generation_config=GenerationConfig.from_pretrained(str(plan.src)) if has_generation else None,
        tokenizer_dir=plan.src,
        max_shard_size=max_shard_size,
        extra=describe,
    )
    return result[0]


def _plan(src_dir: str | Path, cfg: UpcycleConfig, trust_remote_code: bool) -> _Plan:
    """Read the config and shard indices, check every selected MLP and that the keys match the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = check_local_model_dir(src_dir)
    config = AutoConfig.from_pretrained(str(src), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    path, layers = find_decoder_layers(meta)
    selected = cfg.select_layers(len(layers))
    for i in selected:
        gate, _, _ = dense_mlp_parts(layers[i], f"{path}.{i}")
        check_mlp_shape(cfg, gate.weight.shape[0], f"{path}.{i}.mlp")
    keys_by_shard: dict[Path, list[str]] = {}
    for f in shard_files(src):
        with safe_open(str(f), framework="pt") as h:
            keys_by_shard[f] = list(h.keys())
    on_disk = {k for keys in keys_by_shard.values() for k in keys}
    dense_keys = set(unique_state_dict(meta))
    if on_disk != dense_keys:
        diff = sorted(on_disk ^ dense_keys)[:6]
        raise StreamingUnsupported(
            f"on-disk keys differ from {type(meta).__name__}'s parameter names (e.g. {diff})",
            fix="use in-memory surgery (transformers converts these keys on load)",
        )
    return _Plan(src, config, meta, path, list(layers), list(selected), keys_by_shard)


def _stream_tensors(plan: _Plan, cfg: UpcycleConfig, writer: ShardWriter) -> set[str]:
    """Copy every tensor to ``writer``; a selected layer's MLP becomes its experts once its three
    weights have been read. Returns the names written."""
    mlp_re = re.compile(rf"^{re.escape(plan.path)}\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
    selected = set(plan.selected)
    pending: dict[int, dict[str, Tensor]] = {}
    written: set[str] = set()

    def emit(name: str, t: Tensor) -> None:
        writer.add(name, t)
        written.add(name)

    for f, keys in plan.keys_by_shard.items():
        for k in keys:
            # One short-lived mapping per tensor: the pages read are released right away, so
            # the input side costs about one tensor, not one shard, of resident memory.
            with safe_open(str(f), framework="pt") as h:
                tensor = h.get_tensor(k)
            m = mlp_re.match(k)
            if m and int(m.group(1)) in selected:
                i = int(m.group(1))
                pending.setdefault(i, {})[m.group(2)] = tensor
                if len(pending[i]) == 3:
                    p = pending.pop(i)
                    writer.reserve(_moe_nbytes(cfg, p["gate_proj"]))
                    t = mlp_moe_tensors(cfg, i, p["gate_proj"], p["up_proj"], p["down_proj"])
                    del p
                    for name, out in t.state_dict(f"{plan.path}.{i}.mlp.").items():
                        emit(name, out)
                    del t
            else:
                emit(k, tensor)
            del tensor
    if pending:
        raise CheckpointError(
            f"layers {sorted(pending)} miss MLP weights in the checkpoint",
            where=str(plan.src),
            fix="the checkpoint is incomplete; re-download or re-save it",
        )
    return written


def _result_spec(plan: _Plan, cfg: UpcycleConfig, written: set[str], trust_remote_code: bool) -> MoeSpec:
    """The surgery description of the result, from shapes alone, checked against the keys written."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta_moe = AutoModelForCausalLM.from_config(plan.config, trust_remote_code=trust_remote_code)
    base = {
        "base_architecture": type(plan.meta).__name__,
        "base_model_type": str(getattr(plan.config, "model_type", "")),
    }
    probe = MoeSpec(
        **base,
        layers=[
            LayerSpec(
                index=i,
                mlp=mlp_spec_for(cfg, layer.mlp.gate_proj.weight.shape[0]) if i in plan.selected else None,
            )
            for i, layer in enumerate(plan.layers)
        ],
    )
    apply_structure(meta_moe, probe)
    expected = set(unique_state_dict(meta_moe))
    if expected != written:
        diff = sorted(expected ^ written)[:8]
        raise CheckpointError(
            f"streaming conversion produced keys that do not match the MoE model ({diff})",
            where=str(plan.src),
            fix="report this as a bug; use in-memory surgery meanwhile (--streaming off)",
        )
    return MoeSpec(**base, layers=describe_structure(meta_moe, probe), source=str(plan.src))


def _moe_nbytes(cfg: UpcycleConfig, w_gate: Tensor) -> int:
    """Bytes of one layer's expert tensors (a partition's experts together are the dense size)."""
    f, d = w_gate.shape
    dense = 3 * f * d * w_gate.element_size()
    return dense if cfg.method == "partition" else cfg.num_experts * dense
