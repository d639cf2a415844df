"""Streaming dense -> MoE conversion of a sharded safetensors checkpoint, shard by shard.

For the data-free methods (copy, noise, drop, partition with sequential/random/clustering split)
each layer's experts depend only on that layer's dense MLP, so the whole model never needs to be
in memory: the shard headers are read first (no tensor), tensors that pass through unchanged are
copied byte for byte from file to file (never loaded), a layer's ``gate/up/down_proj`` are
memory-mapped (``safe_open``) once all three have been seen, the layer's MoE tensors are built with
the same functions as in-memory surgery (``surgery.mlp_moe_tensors``, order-independent seeds) and
handed to a ``ShardWriter``, which writes each tensor to disk as it arrives. Peak memory is about
one layer's dense MLP plus its experts, whatever the model or shard size (see
benchmarks/conversion_memory.py). The output equals ``upcycle`` + ``save_moe_checkpoint`` key for
key and value for value (tests/test_upcycling_streaming.py). The per-layer loop shows a progress
bar on a terminal (``core.utils.progress``).

The structure (layer paths, key names, expected output keys) comes from the model class built on
the ``meta`` device, so architectures whose on-disk names differ from their module names
(transformers' legacy key conversions) are detected and refused; the caller then falls back to
in-memory surgery.

:func:`upcycle_to_stock_streaming` is the same single pass with a stock MoE checkpoint (Mixtral,
Qwen2-MoE, Qwen3-MoE) as its output instead of a moe-app one: each layer's experts go through
``export.stock_mlp_tensors`` (the in-memory export's own mapping) on their way to the shard
writer, and the config is ``export.stock_config`` of the dense config and the planned layer shapes.
Whether the format can express the construction is decided from metadata alone
(:func:`check_stock_upcycle`), before any tensor is read; every output tensor's name, dtype and
shape is then known, so the shard writer is given the whole plan and fills preallocated shards in
place. The output equals ``upcycle`` + ``moe-app export`` tensor for tensor
(tests/test_upcycle_stock_format.py); benchmarks/mergekit_compare.py compares it with mergekit-moe.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
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
from moe_app.checkpoint.pretrained import lineage_plus, read_lineage
from moe_app.checkpoint.safetensors_io import StoredTensor, TensorInfo, read_header
from moe_app.checkpoint.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter, checkpoint_dtype, shard_files
from moe_app.checkpoint.spec_file import write_spec
from moe_app.core.models.layers import dense_mlp_parts, find_decoder_layers
from moe_app.core.spec import LayerSpec, MoeSpec
from moe_app.core.upcycling.config import UpcycleConfig
from moe_app.core.upcycling.skeleton import apply_structure, describe_structure
from moe_app.core.upcycling.surgery import MlpMoeTensors, check_mlp_shape, mlp_moe_tensors, mlp_spec_for
from moe_app.core.utils.progress import progress
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
    stored: dict[str, StoredTensor]  # every input tensor: where its bytes are (from the headers)


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
    stored: dict[str, StoredTensor] = {}
    for f in shard_files(src):
        tensors, _ = read_header(f)
        keys_by_shard[f] = list(tensors)
        stored.update(tensors)
    on_disk = {k for keys in keys_by_shard.values() for k in keys}
    dense_keys = set(unique_state_dict(meta))
    if on_disk != dense_keys:
        diff = sorted(on_disk ^ dense_keys)[:6]
        raise StreamingUnsupported(
            f"on-disk keys differ from {type(meta).__name__}'s parameter names (e.g. {diff})",
            fix="use in-memory surgery (transformers converts these keys on load)",
        )
    return _Plan(src, config, meta, path, list(layers), list(selected), keys_by_shard, stored)


LayerOut = Callable[[int, Tensor, Tensor, Tensor], dict[str, Tensor]]
"""``(layer, W_gate, W_up, W_down) -> {name: tensor}``: what one collected dense MLP becomes."""


def load_stored(t: StoredTensor) -> Tensor:
    """One tensor read through a short-lived memory map: its pages are released once the tensor is
    dropped, so the input side costs what the caller holds, not one shard of resident memory."""
    try:
        with safe_open(str(t.path), framework="pt") as h:
            return h.get_tensor(t.info.name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"cannot read tensor {t.info.name!r} from {t.path.name} ({e})",
            where=str(t.path),
            fix="the input checkpoint is incomplete or was changed while in use: restore it and run again",
        ) from e


WorkItem = tuple[str, int | None, list[str]]
"""``("copy", None, [key])``: an input tensor written unchanged; ``("layer", i, [gate, up, down])``:
layer ``i``'s dense MLP, due once its three weights have been seen (in input order)."""


def _work_items(plan: _Plan, collect: set[int]) -> list[WorkItem]:
    """The conversion as a list of steps, in input order (what the progress bar counts)."""
    mlp_re = re.compile(rf"^{re.escape(plan.path)}\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
    items: list[WorkItem] = []
    pending: dict[int, dict[str, str]] = {}
    for keys in plan.keys_by_shard.values():
        for k in keys:
            m = mlp_re.match(k)
            if m and int(m.group(1)) in collect:
                i = int(m.group(1))
                pending.setdefault(i, {})[m.group(2)] = k
                if len(pending[i]) == 3:
                    p = pending.pop(i)
                    items.append(("layer", i, [p["gate_proj"], p["up_proj"], p["down_proj"]]))
            else:
                items.append(("copy", None, [k]))
    if pending:
        raise CheckpointError(
            f"layers {sorted(pending)} miss MLP weights in the checkpoint",
            where=str(plan.src),
            fix="the checkpoint is incomplete; re-download or re-save it",
        )
    return items


def _stream_tensors(
    plan: _Plan,
    cfg: UpcycleConfig,
    writer: ShardWriter,
    *,
    collect: set[int] | None = None,
    layer_out: LayerOut | None = None,
    layer_nbytes: Callable[[int, Tensor], int] | None = None,
    layer_infos: Callable[[int, TensorInfo], list[TensorInfo]] | None = None,
    desc: str = "upcycle",
) -> set[str]:
    """Copy every tensor to ``writer``; the MLP of a layer in ``collect`` (default: the selected
    ones) becomes ``layer_out(i, gate, up, down)`` (default: its moe-app experts) once its three
    weights have been read. Returns the names written.

    Tensors written unchanged are copied byte for byte from the input file (never loaded). With
    ``layer_infos(i, gate_info)`` (the output tensors of layer ``i``, from metadata) the writer is
    given the whole output plan first, so shards are preallocated and filled in place."""
    collect = set(plan.selected) if collect is None else collect
    if layer_out is None:

        def layer_out(i: int, g: Tensor, u: Tensor, d: Tensor) -> dict[str, Tensor]:
            return mlp_moe_tensors(cfg, i, g, u, d).state_dict(f"{plan.path}.{i}.mlp.")

    if layer_nbytes is None:

        def layer_nbytes(i: int, g: Tensor) -> int:
            return _moe_nbytes(cfg, g)

    items = _work_items(plan, collect)
    if layer_infos is not None:
        infos: list[TensorInfo] = []
        for kind, i, keys in items:
            if kind == "copy":
                infos.append(plan.stored[keys[0]].info)
            else:
                infos.extend(layer_infos(i, plan.stored[keys[0]].info))
        writer.plan(infos)
    written: set[str] = set()
    for kind, i, keys in progress(items, desc, total=len(items), unit="step"):
        if kind == "copy":
            writer.copy(keys[0], plan.stored[keys[0]])
            written.add(keys[0])
            continue
        g, u, d = (load_stored(plan.stored[k]) for k in keys)
        writer.reserve(layer_nbytes(i, g))
        out = layer_out(i, g, u, d)
        del g, u, d
        for name in list(out):
            writer.add(name, out.pop(name))  # dropped as soon as written
            written.add(name)
        del out
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
    lineage = lineage_plus(read_lineage(plan.src), "upcycle", {**cfg.to_dict(), "format": fmt})
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
                layer_infos=lambda i, gate: [
                    TensorInfo.of(k, v) for k, v in _stock_layer_meta(plan, a, fmt, i, gate.dtype).items()
                ],
                desc=f"upcycle -> {fmt}",
            )
        ),
        generation_config=GenerationConfig.from_pretrained(str(plan.src)) if has_generation else None,
        tokenizer_dir=plan.src,
        max_shard_size=max_shard_size,
        lineage=lineage,
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
    for i in range(len(plan.layers)):
        out.update({k: tuple(v.shape) for k, v in _stock_layer_meta(plan, a, fmt, i, dtype).items()})
    return out


def _stock_layer_meta(plan: _Plan, a: _Analysis, fmt: str, i: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """Layer ``i``'s stock MLP tensors on the ``meta`` device (names, shapes, dtypes; no data)."""
    meta = torch.device("meta")
    f, d = plan.layers[i].mlp.gate_proj.weight.shape
    if i not in a.moe:
        dense = tuple(torch.empty(shape, dtype=dtype, device=meta) for shape in ((f, d), (f, d), (d, f)))
        return stock_mlp_tensors(fmt, i, a, dense=dense)
    s = a.moe[i]
    e, fe, fs = s.num_experts, s.expert_f, s.shared_f
    shared = None
    if fs:
        shared = tuple(torch.empty(shape, dtype=dtype, device=meta) for shape in ((fs, d), (fs, d), (d, fs)))
    return stock_mlp_tensors(
        fmt,
        i,
        a,
        router=torch.empty(e, d, dtype=dtype, device=meta),
        gate_up=torch.empty(e, 2 * fe, d, dtype=dtype, device=meta),
        down=torch.empty(e, d, fe, dtype=dtype, device=meta),
        shared=shared,
    )


def _check_written(plan: _Plan, expected: set[str], written: set[str]) -> None:
    if expected != written:
        diff = sorted(expected ^ written)[:8]
        raise CheckpointError(
            f"the one-pass stock conversion wrote keys other than planned ({diff})",
            where=str(plan.src),
            fix="report this as a bug; use --format moe-app then `moe-app export` meanwhile",
        )
