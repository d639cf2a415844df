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
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from moe_app.checkpoint.hub import check_local_model_dir, copy_tokenizer_files
from moe_app.checkpoint.model_dir import unique_state_dict
from moe_app.checkpoint.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter, shard_files
from moe_app.core.models.layers import dense_mlp_parts, find_decoder_layers
from moe_app.core.spec import LayerSpec, MoeSpec
from moe_app.core.upcycling.config import UpcycleConfig
from moe_app.core.upcycling.skeleton import apply_structure, describe_structure
from moe_app.core.upcycling.surgery import check_mlp_shape, mlp_moe_tensors, mlp_spec_for
from moe_app.core.utils.atomic import atomic_directory
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


def upcycle_checkpoint_streaming(
    src_dir: str | Path,
    out_dir: str | Path,
    cfg: UpcycleConfig,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    trust_remote_code: bool = False,
) -> MoeSpec:
    """Convert the dense checkpoint in ``src_dir`` into a moe-app checkpoint in ``out_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    reason = streaming_reason(cfg)
    if reason:
        raise StreamingUnsupported(f"streaming conversion impossible: {reason}", fix="use in-memory surgery")
    src = check_local_model_dir(src_dir)
    config = AutoConfig.from_pretrained(str(src), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    path, layers = find_decoder_layers(meta)
    selected = cfg.select_layers(len(layers))
    for i in selected:
        gate, _, _ = dense_mlp_parts(layers[i], f"{path}.{i}")
        check_mlp_shape(cfg, gate.weight.shape[0], f"{path}.{i}.mlp")
    dense_keys = set(unique_state_dict(meta))
    on_disk: dict[str, Path] = {}
    on_disk_keys: dict[Path, list[str]] = {}
    for f in shard_files(src):
        with safe_open(str(f), framework="pt") as h:
            on_disk_keys[f] = list(h.keys())
        for k in on_disk_keys[f]:
            on_disk[k] = f
    if set(on_disk) != dense_keys:
        diff = sorted(set(on_disk) ^ dense_keys)[:6]
        raise StreamingUnsupported(
            f"on-disk keys differ from {type(meta).__name__}'s parameter names (e.g. {diff})",
            fix="use in-memory surgery (transformers converts these keys on load)",
        )

    # The output structure, built on meta: the expected keys and the surgery description.
    mlp_re = re.compile(rf"^{re.escape(path)}\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
    pending: dict[int, dict[str, Tensor]] = {}
    written: set[str] = set()

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        writer = ShardWriter(tmp, max_shard_size)

        def emit(name: str, t: Tensor) -> None:
            writer.add(name, t)
            written.add(name)

        for f in shard_files(src):
            for k in on_disk_keys[f]:
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
                        for name, out in t.state_dict(f"{path}.{i}.mlp.").items():
                            emit(name, out)
                        del t
                else:
                    emit(k, tensor)
                del tensor
        if pending:
            raise CheckpointError(
                f"layers {sorted(pending)} miss MLP weights in the checkpoint",
                where=str(src),
                fix="the checkpoint is incomplete; re-download or re-save it",
            )
        writer.close()

        # Structure of the result from shapes alone, checked against the keys actually written.
        with torch.device("meta"):
            meta_moe = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        probe = MoeSpec(
            base_architecture=type(meta).__name__,
            base_model_type=str(getattr(config, "model_type", "")),
            layers=[
                LayerSpec(
                    index=i,
                    mlp=mlp_spec_for(cfg, layers[i].mlp.gate_proj.weight.shape[0]) if i in selected else None,
                )
                for i in range(len(layers))
            ],
        )
        apply_structure(meta_moe, probe)
        expected = set(unique_state_dict(meta_moe))
        if expected != written:
            diff = sorted(expected ^ written)[:8]
            raise CheckpointError(
                f"streaming conversion produced keys that do not match the MoE model ({diff})",
                where=str(src),
                fix="report this as a bug; use in-memory surgery meanwhile (--streaming off)",
            )
        spec = MoeSpec(
            base_architecture=type(meta).__name__,
            base_model_type=str(getattr(config, "model_type", "")),
            layers=describe_structure(meta_moe, probe),
            source=str(src),
        )
        spec.add_stage("upcycle", cfg.to_dict(), None)
        config.save_pretrained(tmp)
        if (src / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(str(src)).save_pretrained(tmp)
        copy_tokenizer_files(src, tmp)
        spec.save(tmp)
    return spec


def _moe_nbytes(cfg: UpcycleConfig, w_gate: Tensor) -> int:
    """Bytes of one layer's expert tensors (a partition's experts together are the dense size)."""
    f, d = w_gate.shape
    dense = 3 * f * d * w_gate.element_size()
    return dense if cfg.method == "partition" else cfg.num_experts * dense
