"""``moe-app upcycle``: offline surgery of a dense HF checkpoint into a moe-app checkpoint dir.

Data-free methods on a local safetensors checkpoint are converted in streaming mode (shard by
shard; peak memory about one shard, see ``checkpoint/streaming.py``); data-driven ones (importance
split, k-means router init), attention MoE and hub ids go through in-memory ``upcycle`` +
``save_moe_checkpoint``. Both give the same files.

``--format mixtral|qwen2_moe|qwen3_moe`` writes a stock HF MoE checkpoint instead, in the same single
pass (``checkpoint/streaming.py: upcycle_to_stock_streaming``; in memory: ``upcycle`` then
``export_checkpoint`` on the live model); what the format cannot express is refused first.

``--method pesc`` / ``pesc_lora`` craft a PESC model at initialisation (Wu et al. 2024; shared
frozen FFN + routed bottleneck adapters, or MixLoRA-style LoRA experts) with
:func:`~moe_app.core.pesc.surgery.build_pesc` and write it with
:func:`~moe_app.checkpoint.pesc.save_pesc_full`: a moe-app checkpoint dir that ``moe_app.load_model``
loads and that computes the dense model's function. A ``pesc_lora`` dir exports to a stock Mixtral
(``moe-app export --format mixtral``).

Options come from the typed configs (jsonargparse, field docstrings as help): ``UpcycleConfig``
(``moe_app.core.upcycling.config``), the PESC-only fields of ``PescConfig``
(``moe_app.core.pesc.config``) and :class:`UpcycleRun` below. Calibration data is read by the same
reader as ``moe-app prune --data`` (``moe_app.core.pruning.calibration`` on
``moe_app.core.data.sources``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ArgumentParser, Namespace

from moe_app.cli.commands import OFFLINE_COMMANDS
from moe_app.cli.commands._options import add_options, build, field_docs, non_default, values
from moe_app.core.upcycling.config import METHODS, UpcycleConfig
from moe_app.errors import ConfigError, DataError

HELP = OFFLINE_COMMANDS["upcycle"]

PESC_METHODS = {"pesc": "adapter", "pesc_lora": "lora"}
"""``--method`` values that build a PESC model, and the ``PescConfig.variant`` of each."""

ALL_METHODS = (*METHODS, *PESC_METHODS)

SHARED_WITH_PESC = ("num_experts", "top_k", "scale", "layers", "keep_first_dense", "keep_last_dense", "seed")
"""``UpcycleConfig`` options that also configure ``--method pesc/pesc_lora``."""

PESC_NOT_OPTIONS = ("variant", "quantize_4bit", "quant_compute_dtype")
"""``PescConfig`` fields that are no upcycle option: the variant comes from ``--method``; a 4-bit
base cannot be saved as a full checkpoint (it is a training-time choice, ``PescModule``)."""

CALIBRATION_BATCH = 8
"""Calibration sequences per forward pass."""


@dataclass
class UpcycleRun:
    """Source, output and I/O of the conversion."""

    model: str
    """Dense source: local HF model dir or hub id."""
    out: str
    """Output moe-app checkpoint dir (written atomically)."""
    calibration: str | None = None
    """Calibration data for ``--split importance`` / ``--router_init kmeans``: ``builtin`` (the
    offline suite), ``builtin:<domain>``, or a local .jsonl/.json/.parquet/.csv file or directory
    (any record format moe-app reads; the same reader as ``moe-app prune --data``)."""
    seq_len: int = 512
    """Tokens per calibration sequence (longer examples are cut on the right)."""
    dtype: str = "auto"
    """Load/save dtype: ``auto`` (the checkpoint's), ``bf16``, ``fp32``."""
    max_shard_size: str = "5GB"
    """Output shard size."""
    streaming: Literal["auto", "on", "off"] = "auto"
    """Shard-by-shard conversion for data-free methods (``auto``: whenever possible)."""
    overwrite: bool = False
    """Replace ``--out`` if it exists."""
    trust_remote_code: bool = False
    """Allow the source's custom modelling code."""
    format: Literal["moe-app", "mixtral", "qwen2_moe", "qwen3_moe"] = "moe-app"
    """Output format: a moe-app checkpoint, or a stock HF MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE)
    written directly in the same pass (no intermediate moe-app checkpoint). A construction the
    format cannot express exactly is refused before any work, with the reason."""


def _pesc_config_class():
    from moe_app.core.pesc.config import PescConfig

    return PescConfig


def pesc_option_names() -> list[str]:
    """The ``PescConfig`` fields exposed as upcycle options (those ``UpcycleConfig`` has not)."""
    shared = {f.name for f in dataclasses.fields(UpcycleConfig)}
    return [
        f.name
        for f in dataclasses.fields(_pesc_config_class())
        if f.name not in shared and f.name not in PESC_NOT_OPTIONS
    ]


def build_parser(parser: ArgumentParser) -> None:
    add_options(parser, UpcycleRun)
    add_options(parser, UpcycleConfig, skip={"method"})
    group = parser.groups.get(UpcycleConfig.__name__, parser)
    pesc_doc = (
        " ``pesc``: PESC (Wu et al. 2024), the dense FFN shared and frozen plus top-k routed bottleneck "
        "adapters; ``pesc_lora``: MixLoRA-style LoRA experts on the shared FFN (exports to a stock "
        "Mixtral). Both compute the dense model at initialisation."
    )
    group.add_argument(
        "--method",
        type=Literal[ALL_METHODS],  # type: ignore[valid-type]
        default=UpcycleConfig.method,
        help=field_docs(UpcycleConfig).get("method", "") + pesc_doc,
    )
    pesc_cls = _pesc_config_class()
    skip = {f.name for f in dataclasses.fields(pesc_cls)} - set(pesc_option_names())
    add_options(parser, pesc_cls, skip=skip)
    pesc_group = parser.groups.get(pesc_cls.__name__)
    if pesc_group is not None:
        pesc_group.title = (
            "PESC options (--method pesc / pesc_lora; --num_experts, --top_k, --scale, --layers, "
            "--keep_first_dense, --keep_last_dense and --seed apply too)"
        )


def _where_option(e: ConfigError) -> ConfigError:
    """Point a config error at the command-line option (``PescConfig.adapter_dim`` -> ``--adapter_dim``)."""
    where = e.where or ""
    for prefix in ("UpcycleConfig.", "PescConfig."):
        if where.startswith(prefix):
            return ConfigError(e.what, where="--" + where[len(prefix) :], fix=e.fix)
    return e


def upcycle_config(cfg: Namespace) -> UpcycleConfig:
    """The ``UpcycleConfig`` of parsed options (``--attention_top_k`` implies ``--attention_moe``)."""
    kw: dict[str, Any] = {}
    if cfg.attention_top_k is not None:
        kw["attention_moe"] = True
    try:
        return build(UpcycleConfig, cfg, **kw)
    except ConfigError as e:
        raise _where_option(e) from e


def pesc_config(cfg: Namespace, layers: list[int] | str | None = None):
    """The ``PescConfig`` of parsed options for ``--method pesc/pesc_lora``."""
    kw = values(cfg, [*pesc_option_names(), "num_experts", "top_k", "seed"])
    kw["variant"] = PESC_METHODS[cfg.method]
    kw["layers"] = cfg.layers if layers is None else layers
    if cfg.scale is not None:
        kw["scale"] = cfg.scale
    try:
        return _pesc_config_class()(**kw)
    except ConfigError as e:
        raise _where_option(e) from e


def _check_method_options(cfg: Namespace) -> None:
    """Refuse options that the chosen method ignores (rather than silently dropping them)."""
    pesc = cfg.method in PESC_METHODS
    if pesc:
        upcycle_only = [f.name for f in dataclasses.fields(UpcycleConfig) if f.name not in SHARED_WITH_PESC]
        stray = non_default(cfg, UpcycleConfig, [n for n in upcycle_only if n != "method"])
        if cfg.calibration is not None:
            stray.append("calibration")
        if cfg.streaming == "on":
            stray.append("streaming")
        if cfg.format != "moe-app":
            stray.append("format")
        fix = "drop them: PESC needs no calibration data and is built in memory"
    else:
        stray = non_default(cfg, _pesc_config_class(), pesc_option_names())
        fix = "use --method pesc or pesc_lora, or drop them"
    if stray:
        raise ConfigError(
            f"{', '.join('--' + s for s in stray)} do(es) not apply to --method {cfg.method}",
            where="--method",
            fix=fix,
        )


def _check_paths(run: UpcycleRun) -> None:
    src, out = Path(run.model).expanduser(), Path(run.out).expanduser()
    if src.exists() and out.resolve() == src.resolve():
        raise ConfigError("--out is the source model dir", where="--out", fix="write to a new directory")
    if out.exists() and any(out.iterdir()) and not run.overwrite:
        raise ConfigError(
            "output dir exists and is not empty", where=str(out), fix="pass --overwrite or a new --out"
        )


def calibration_batches(
    source: str, tokenizer: Any, seq_len: int, max_tokens: int, seed: int = 0
) -> list[dict]:
    """Padded ``{"input_ids", "attention_mask"}`` batches of ``source`` until ``max_tokens`` real tokens.

    ``source`` is read like ``moe-app prune --data`` (builtin, builtin:<domain>, a local
    json/jsonl/parquet/csv file or directory), examples in a seeded order, encoded with the model's
    tokenizer and template.
    """
    from moe_app.core.pruning.calibration import calibration_examples, encode_batches, num_tokens

    # Every example has >= 1 token, so max_tokens examples always reach the budget.
    examples = calibration_examples(source, max_tokens, seed)
    batches: list[dict] = []
    total = 0
    for i in range(0, len(examples), CALIBRATION_BATCH):
        try:
            chunk = encode_batches(tokenizer, examples[i : i + CALIBRATION_BATCH], seq_len, CALIBRATION_BATCH)
        except DataError:
            continue  # nothing to encode in this chunk (e.g. replies cut away); try the next
        batches.extend(chunk)
        total += num_tokens(chunk)
        if total >= max_tokens:
            break
    if not batches:
        raise DataError(
            "no calibration tokens after tokenisation",
            where=source,
            fix="use calibration data with text (or conversations with an assistant reply)",
        )
    return batches


def run(cfg: Namespace) -> int:
    opts = build(UpcycleRun, cfg)
    _check_method_options(cfg)
    if cfg.method in PESC_METHODS:
        pesc_config(cfg)  # validate before loading anything
        _check_paths(opts)
        return _run_pesc(cfg, opts)
    return _run_upcycle(upcycle_config(cfg), opts)


def _run_upcycle(ucfg: UpcycleConfig, opts: UpcycleRun) -> int:
    from moe_app.checkpoint.hub import check_local_model_dir, is_local
    from moe_app.checkpoint.model_dir import save_moe_checkpoint
    from moe_app.checkpoint.pretrained import read_lineage
    from moe_app.checkpoint.streaming import (
        check_stock_options,
        streaming_reason,
        upcycle_checkpoint_streaming,
    )
    from moe_app.core.spec import spec_of
    from moe_app.core.upcycling import upcycle

    _check_paths(opts)
    local = is_local(opts.model)
    if local:
        check_local_model_dir(opts.model)
    if ucfg.needs_calibration and not opts.calibration:
        raise ConfigError(
            f"split={ucfg.split!r} / router_init={ucfg.router_init!r} needs calibration text",
            where="--calibration",
            fix="pass --calibration builtin or --calibration FILE (.jsonl/.json/.parquet/.csv)",
        )
    stock = opts.format != "moe-app"
    if stock:
        check_stock_options(ucfg, opts.format)  # before anything is read
    reason = streaming_reason(ucfg) or (None if local else "the source is a hub id")
    if opts.streaming == "on" and reason:
        raise ConfigError(
            f"--streaming on is impossible: {reason}", where="--streaming", fix="use --streaming auto"
        )
    streaming = opts.streaming != "off" and reason is None and opts.dtype in ("auto", None)
    if stock:
        return _run_stock(ucfg, opts, streaming, local)
    if streaming:
        spec = upcycle_checkpoint_streaming(
            opts.model,
            opts.out,
            ucfg,
            max_shard_size=opts.max_shard_size,
            trust_remote_code=opts.trust_remote_code,
        )
        mode = "streaming"
    else:
        model, tokenizer, calibration, data = _load_for_surgery(ucfg, opts)
        upcycle(model, ucfg, calibration, data_description=data)
        save_moe_checkpoint(
            model,
            opts.out,
            tokenizer=None if local else tokenizer,
            tokenizer_dir=opts.model if local else None,
            max_shard_size=opts.max_shard_size,
            lineage=read_lineage(opts.model) if local else None,  # the dense model's own stages first
        )
        spec = spec_of(model)
        mode = "in-memory"
    moe = spec.moe_layers()
    print(
        f"[moe-app] upcycled {opts.model} -> {opts.out} ({mode}): method={ucfg.method}, "
        f"{len(moe)} MoE layers {moe}, {ucfg.num_experts} experts, top-{ucfg.top_k}, "
        f"scale {ucfg.resolved_scale:g}"
    )
    return 0


def _load_for_surgery(
    ucfg: UpcycleConfig, opts: UpcycleRun
) -> tuple[Any, Any, list[dict] | None, dict | None]:
    """The dense model, its tokenizer and (if the split/router init needs it) calibration batches."""
    from moe_app.checkpoint.hub import load_hf_causal_lm, load_tokenizer

    model = load_hf_causal_lm(opts.model, dtype=opts.dtype, trust_remote_code=opts.trust_remote_code)
    tokenizer = load_tokenizer(opts.model, trust_remote_code=opts.trust_remote_code)
    calibration, data = None, None
    if ucfg.needs_calibration:
        if tokenizer is None:
            raise ConfigError(
                "calibration needs the model's tokenizer, but the source has none",
                where=opts.model,
                fix="save the tokenizer next to the model, or use a data-free split/router init",
            )
        calibration = calibration_batches(
            opts.calibration, tokenizer, opts.seq_len, ucfg.calibration_tokens, ucfg.seed
        )
        data = {
            "calibration": opts.calibration,
            "tokens": sum(int(b["attention_mask"].sum()) for b in calibration),
        }
    return model, tokenizer, calibration, data


def _run_stock(ucfg: UpcycleConfig, opts: UpcycleRun, streaming: bool, local: bool) -> int:
    """``--format mixtral|qwen2_moe|qwen3_moe``: the stock checkpoint in one pass, refusals first."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_app.checkpoint.export import export_checkpoint
    from moe_app.checkpoint.streaming import check_stock_upcycle, upcycle_to_stock_streaming
    from moe_app.core.upcycling import upcycle

    fmt = opts.format
    if streaming:
        res = upcycle_to_stock_streaming(
            opts.model,
            opts.out,
            ucfg,
            fmt,
            max_shard_size=opts.max_shard_size,
            trust_remote_code=opts.trust_remote_code,
        )
        moe, mode = res.moe_layers, "streaming"
    else:
        config = AutoConfig.from_pretrained(opts.model, trust_remote_code=opts.trust_remote_code)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config, trust_remote_code=opts.trust_remote_code)
        a = check_stock_upcycle(config, meta, ucfg, fmt)  # refuse before loading any weight
        del meta
        model, tokenizer, calibration, data = _load_for_surgery(ucfg, opts)
        upcycle(model, ucfg, calibration, data_description=data)
        export_checkpoint(
            model,
            opts.out,
            fmt,
            tokenizer=None if local else tokenizer,
            tokenizer_dir=opts.model if local else None,
            max_shard_size=opts.max_shard_size,
        )
        moe, mode = sorted(a.moe), "in-memory"
    print(
        f"[moe-app] upcycled {opts.model} -> {opts.out} ({mode}, stock {fmt}): method={ucfg.method}, "
        f"{len(moe)} MoE layers {moe}, {ucfg.num_experts} experts, top-{ucfg.top_k}, "
        f"scale {ucfg.resolved_scale:g} (folded into the experts)"
    )
    return 0


def _run_pesc(cfg: Namespace, opts: UpcycleRun) -> int:
    from moe_app.checkpoint.hub import check_local_model_dir, is_local, load_hf_causal_lm, load_tokenizer
    from moe_app.checkpoint.pesc import save_pesc_full
    from moe_app.core.models.layers import find_decoder_layers
    from moe_app.core.pesc.surgery import build_pesc

    if is_local(opts.model):
        check_local_model_dir(opts.model)
    model = load_hf_causal_lm(opts.model, dtype=opts.dtype, trust_remote_code=opts.trust_remote_code)
    tokenizer = load_tokenizer(opts.model, trust_remote_code=opts.trust_remote_code)
    _, layers = find_decoder_layers(model)
    # The layer choice is UpcycleConfig's (--layers, --keep_first_dense, --keep_last_dense).
    try:
        chosen = UpcycleConfig(
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            layers=cfg.layers,
            keep_first_dense=cfg.keep_first_dense,
            keep_last_dense=cfg.keep_last_dense,
        ).select_layers(len(layers))
    except ConfigError as e:
        raise _where_option(e) from e
    pcfg = pesc_config(cfg, layers=chosen)
    build_pesc(model, pcfg)
    save_pesc_full(model, opts.out, cfg=pcfg, tokenizer=tokenizer, source=opts.model)
    print(
        f"[moe-app] upcycled {opts.model} -> {opts.out} (in-memory): method={cfg.method} "
        f"(PESC variant {pcfg.variant}), {len(chosen)} PESC layers {chosen}, {pcfg.num_experts} experts, "
        f"top-{pcfg.top_k}, scale {pcfg.scale:g}"
    )
    return 0
