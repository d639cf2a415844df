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

:func:`upcycle_to_stock_streaming` is the same single pass with a stock MoE checkpoint (Mixtral,
Qwen2-MoE, Qwen3-MoE) as its output instead of a moe-app one: each layer's experts go through
``export.stock_mlp_tensors`` (the in-memory export's own mapping) on their way to the shard
writer, and the config is ``export.stock_config`` of the dense config and the planned layer shapes.
Whether the format can express the construction is decided from metadata alone
(:func:`check_stock_upcycle`), before any tensor is read; the output equals ``upcycle`` +
``moe-app export`` tensor for tensor (tests/test_upcycle_stock_format.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from moe_app.checkpoint.export import (
    MoeShape,
    _Analysis,
    check_against_target,
    check_format,
    stock_analysis,
    stock_config,
    stock_mlp_tensors,
)
from moe_app.checkpoint.hub import check_local_model_dir
from moe_app.checkpoint.model_dir import unique_state_dict, write_model_dir
from moe_app.checkpoint.pretrained import read_lineage
from moe_app.checkpoint.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter, checkpoint_dtype, shard_files
from moe_app.checkpoint.spec_file import write_spec
from moe_app.core.models.layers import dense_mlp_parts, find_decoder_layers
from moe_app.core.spec import LayerSpec, MoeSpec
from moe_app.core.upcycling.config import UpcycleConfig
from moe_app.core.upcycling.skeleton import apply_structure, describe_structure
from moe_app.core.upcycling.surgery import MlpMoeTensors, check_mlp_shape, mlp_moe_tensors, mlp_spec_for
from moe_app.errors import CheckpointError, ConfigError, UnsupportedModelError

STOCK_FORMATS = ("mixtral", "qwen2_moe", "qwen3_moe")


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


LayerOut = Callable[[int, Tensor, Tensor, Tensor], dict[str, Tensor]]
"""``(layer, W_gate, W_up, W_down) -> {name: tensor}``: what one collected dense MLP becomes."""


def _stream_tensors(
    plan: _Plan,
    cfg: UpcycleConfig,
    writer: ShardWriter,
    *,
    collect: set[int] | None = None,
    layer_out: LayerOut | None = None,
    layer_nbytes: Callable[[int, Tensor], int] | None = None,
) -> set[str]:
    """Copy every tensor to ``writer``; the MLP of a layer in ``collect`` (default: the selected
    ones) becomes ``layer_out(i, gate, up, down)`` (default: its moe-app experts) once its three
    weights have been read. Returns the names written."""
    mlp_re = re.compile(rf"^{re.escape(plan.path)}\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
    collect = set(plan.selected) if collect is None else collect
    if layer_out is None:

        def layer_out(i: int, g: Tensor, u: Tensor, d: Tensor) -> dict[str, Tensor]:
            return mlp_moe_tensors(cfg, i, g, u, d).state_dict(f"{plan.path}.{i}.mlp.")

    if layer_nbytes is None:

        def layer_nbytes(i: int, g: Tensor) -> int:
            return _moe_nbytes(cfg, g)

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
            if m and int(m.group(1)) in collect:
                i = int(m.group(1))
                pending.setdefault(i, {})[m.group(2)] = tensor
                if len(pending[i]) == 3:
                    p = pending.pop(i)
                    writer.reserve(layer_nbytes(i, p["gate_proj"]))
                    out = layer_out(i, p["gate_proj"], p["up_proj"], p["down_proj"])
                    del p
                    for name, t in out.items():
                        emit(name, t)
                    del out
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


# --- one pass to a stock MoE format --------------------------------------------------------------


@dataclass
class StockUpcycleResult:
    path: Path
    format: str
    moe_layers: list[int]


def stock_upcycle_problems(cfg: UpcycleConfig) -> list[str]:
    """Why no stock MoE format can express what ``cfg`` builds, whatever the base model."""
    r: list[str] = []
    if cfg.attention_moe:
        r.append("attention MoE (LLaMA-MoE v2) has no stock HF format")
    if cfg.noisy_gating:
        r.append("noisy gating (a trainable router noise_weight) has no stock router; drop --noisy_gating")
    if cfg.jitter:
        r.append(f"router jitter ({cfg.jitter:g}) has no stock config field; drop --jitter")
    if not cfg.builds_mlp_moe:
        r.append("the surgery builds no MLP MoE layer")
    return r


def check_stock_options(cfg: UpcycleConfig, fmt: str) -> None:
    """Raise ``ConfigError`` for an unknown format or options that no stock format has."""
    if fmt not in STOCK_FORMATS:
        raise ConfigError(
            f"unknown stock format {fmt!r}", where="--format", fix=f"choose one of {', '.join(STOCK_FORMATS)}"
        )
    problems = stock_upcycle_problems(cfg)
    if problems:
        raise ConfigError(
            f"cannot write {fmt} exactly: " + "; ".join(problems),
            where=f"upcycle --format {fmt}",
            fix="drop these options, or write a moe-app checkpoint (--format moe-app)",
        )


def check_stock_upcycle(config: Any, meta: nn.Module, cfg: UpcycleConfig, fmt: str) -> _Analysis:
    """Check from metadata alone that upcycling the dense model (``config``, its structure ``meta``)
    with ``cfg`` is exactly expressible in ``fmt``; returns the analysis the writer maps with.

    Raises ``ConfigError`` (unknown format, options no stock format has, a bad partition size) or
    ``UnsupportedModelError`` (the format cannot express this model/construction) with the reasons.
    """
    where = f"upcycle --format {fmt}"
    check_stock_options(cfg, fmt)
    path, layers = find_decoder_layers(meta)
    moe: dict[int, MoeShape] = {}
    for i in cfg.select_layers(len(layers)):
        gate, _, _ = dense_mlp_parts(layers[i], f"{path}.{i}")
        check_mlp_shape(cfg, gate.weight.shape[0], f"{path}.{i}.mlp")
        spec = mlp_spec_for(cfg, gate.weight.shape[0])
        moe[i] = MoeShape(
            num_experts=spec.num_experts,
            top_k=spec.top_k,
            rule=spec.rule,
            expert_f=spec.expert_intermediate_size,
            shared_f=spec.shared_intermediate_size,
        )
    a = stock_analysis(config, meta, moe)
    check_format(
        a,
        config,
        fmt,
        where=where,
        fix="choose another --format (or change the construction), or write a moe-app checkpoint (--format moe-app)",
    )
    return a


def upcycle_to_stock_streaming(
    src_dir: str | Path,
    out_dir: str | Path,
    cfg: UpcycleConfig,
    fmt: str,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    trust_remote_code: bool = False,
) -> StockUpcycleResult:
    """Upcycle the dense checkpoint in ``src_dir`` straight into a stock ``fmt`` checkpoint in one
    streaming pass (no intermediate moe-app checkpoint); refusals come before any tensor is read."""
    from transformers import GenerationConfig

    check_stock_options(cfg, fmt)  # the config-level refusals come before streaming's own
    reason = streaming_reason(cfg)
    if reason:
        raise StreamingUnsupported(f"streaming conversion impossible: {reason}", fix="use in-memory surgery")
    plan = _plan(src_dir, cfg, trust_remote_code)
    a = check_stock_upcycle(plan.config, plan.meta, cfg, fmt)
    dtype = checkpoint_dtype(plan.src) or torch.float32
    stock_cfg = stock_config(a, plan.config, fmt, dtype)
    expected = _stock_shapes(plan, a, fmt, dtype)
    check_against_target(stock_cfg, expected)

    def layer_out(i: int, g: Tensor, u: Tensor, d: Tensor) -> dict[str, Tensor]:
        if i not in a.moe:
            return stock_mlp_tensors(fmt, i, a, dense=(g, u, d))
        t: MlpMoeTensors = mlp_moe_tensors(cfg, i, g, u, d)
        return stock_mlp_tensors(
            fmt, i, a, router=t.router, gate_up=t.gate_up, down=t.down, scale=t.spec.scale, shared=t.shared
        )

    def layer_nbytes(i: int, g: Tensor) -> int:
        dense = 3 * g.numel() * g.element_size()
        if fmt == "mixtral" or (i in a.moe and cfg.method != "partition"):
            return a.num_experts * dense
        return dense

    written: set[str] = set()
    has_generation = (plan.src / "generation_config.json").is_file()
    write_model_dir(
        out_dir,
        stock_cfg,
        lambda writer: written.update(
            _stream_tensors(
                plan,
                cfg,
                writer,
                collect=set(range(len(plan.layers))),
                layer_out=layer_out,
                layer_nbytes=layer_nbytes,
            )
        ),
        generation_config=GenerationConfig.from_pretrained(str(plan.src)) if has_generation else None,
        tokenizer_dir=plan.src,
        max_shard_size=max_shard_size,
        extra=lambda _staging: _check_written(plan, set(expected), written),
    )
    return StockUpcycleResult(path=Path(out_dir), format=fmt, moe_layers=sorted(a.moe))


def _stock_shapes(plan: _Plan, a: _Analysis, fmt: str, dtype: torch.dtype) -> dict[str, tuple[int, ...]]:
    """Every output key and shape, from the dense structure on ``meta`` through the same mapping."""
    out: dict[str, tuple[int, ...]] = {}
    mlp_keys = re.compile(rf"^{re.escape(plan.path)}\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
    for k, v in unique_state_dict(plan.meta).items():
        if not mlp_keys.match(k):
            out[k] = tuple(v.shape)
    meta = torch.device("meta")
    for i, layer in enumerate(plan.layers):
        f, d = layer.mlp.gate_proj.weight.shape
        if i in a.moe:
            s = a.moe[i]
            e, fe, fs = s.num_experts, s.expert_f, s.shared_f
            shared = None
            if fs:
                shared = tuple(
                    torch.empty(shape, dtype=dtype, device=meta) for shape in ((fs, d), (fs, d), (d, fs))
                )
            tensors = stock_mlp_tensors(
                fmt,
                i,
                a,
                router=torch.empty(e, d, dtype=dtype, device=meta),
                gate_up=torch.empty(e, 2 * fe, d, dtype=dtype, device=meta),
                down=torch.empty(e, d, fe, dtype=dtype, device=meta),
                shared=shared,
            )
        else:
            dense = tuple(torch.empty(shape, dtype=dtype, device=meta) for shape in ((f, d), (f, d), (d, f)))
            tensors = stock_mlp_tensors(fmt, i, a, dense=dense)
        out.update({k: tuple(v.shape) for k, v in tensors.items()})
    return out


def _check_written(plan: _Plan, expected: set[str], written: set[str]) -> None:
    if expected != written:
        diff = sorted(expected ^ written)[:8]
        raise CheckpointError(
            f"the one-pass stock conversion wrote keys other than planned ({diff})",
            where=str(plan.src),
            fix="report this as a bug; use --format moe-app then `moe-app export` meanwhile",
        )
