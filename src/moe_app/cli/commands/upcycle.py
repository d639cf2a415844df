"""``moe-app upcycle``: offline surgery of a dense HF checkpoint into a moe-app checkpoint dir.

Data-free methods on a local safetensors checkpoint are converted in streaming mode (shard by
shard; peak memory about one shard, see ``upcycling/streaming.py``); data-driven ones (importance
split, k-means router init), attention MoE and hub ids go through in-memory ``upcycle`` +
``save_moe_checkpoint``. Both give the same files. Options and their help text come from
``UpcycleConfig`` (one source of truth for CLI, YAML configs and the Python API).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import textwrap
from pathlib import Path

from moe_app.errors import ConfigError

HELP = "turn a dense HF checkpoint into a Mixture-of-Experts checkpoint (copy, drop, partition, attention)"

# UpcycleConfig fields exposed as flags, with argparse types.
_FLAGS = {
    "method": str,
    "num_experts": int,
    "top_k": int,
    "rule": str,
    "scale": float,
    "noise_std": float,
    "drop_ratio": float,
    "split": str,
    "shared_experts": int,
    "router_init": str,
    "router_std": float,
    "layers": str,
    "keep_first_dense": int,
    "keep_last_dense": int,
    "attention_top_k": int,
    "attention_scale": float,
    "calibration_tokens": int,
    "kmeans_iters": int,
    "seed": int,
}


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal following each field in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for a, b in itertools.pairwise(body):
        is_field = isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
        is_doc = (
            isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)
        )
        if is_field and is_doc:
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def build_parser(parser: argparse.ArgumentParser) -> None:
    from moe_app.core.upcycling.config import UpcycleConfig

    docs = {k: v.replace("%", "%%") for k, v in field_docs(UpcycleConfig).items()}  # argparse formats help
    defaults = {f.name: f.default for f in dataclasses.fields(UpcycleConfig)}
    parser.add_argument("--model", required=True, help="dense source: local HF model dir or hub id")
    parser.add_argument("--out", required=True, help="output moe-app checkpoint dir (written atomically)")
    for name, typ in _FLAGS.items():
        default = defaults[name]
        parser.add_argument(
            f"--{name}", type=typ, default=None, help=f"{docs.get(name, '')} (default: {default})"
        )
    parser.add_argument("--attention_moe", action="store_true", help=docs.get("attention_moe"))
    parser.add_argument("--noisy_gating", action="store_true", help=docs.get("noisy_gating"))
    parser.add_argument(
        "--calibration",
        default=None,
        help="calibration text for split=importance / router_init=kmeans: 'builtin' (offline suite) "
        "or a local .jsonl/.txt file",
    )
    parser.add_argument("--seq_len", type=int, default=512, help="calibration sequence length (default 512)")
    parser.add_argument(
        "--dtype", default="auto", help="load/save dtype: auto (the checkpoint's), bf16, fp32"
    )
    parser.add_argument("--max_shard_size", default="5GB", help="output shard size (default 5GB)")
    parser.add_argument(
        "--streaming",
        choices=("auto", "on", "off"),
        default="auto",
        help="shard-by-shard conversion for data-free methods (auto: whenever possible)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the source's custom code")


def config_from_args(args: argparse.Namespace):
    from moe_app.core.upcycling.config import UpcycleConfig

    kw = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    if isinstance(kw.get("layers"), str):
        kw["layers"] = kw["layers"].strip().strip("[]").strip() or "all"
    if args.attention_moe or args.attention_top_k is not None:
        kw["attention_moe"] = True
    if args.noisy_gating:
        kw["noisy_gating"] = True
    return UpcycleConfig(**kw)


def _check_paths(args: argparse.Namespace) -> None:
    src, out = Path(args.model).expanduser(), Path(args.out).expanduser()
    if src.exists() and out.resolve() == src.resolve():
        raise ConfigError("--out is the source model dir", where="--out", fix="write to a new directory")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(
            "output dir exists and is not empty", where=str(out), fix="pass --overwrite or a new --out"
        )


def run(args: argparse.Namespace) -> int:
    from moe_app.checkpoint.hub import check_local_model_dir, is_local, load_hf_causal_lm, load_tokenizer
    from moe_app.checkpoint.model_dir import save_moe_checkpoint
    from moe_app.checkpoint.streaming import streaming_reason, upcycle_checkpoint_streaming
    from moe_app.core.upcycling import upcycle

    cfg = config_from_args(args)
    _check_paths(args)
    local = is_local(args.model)
    if local:
        check_local_model_dir(args.model)
    if cfg.needs_calibration and not args.calibration:
        raise ConfigError(
            f"split={cfg.split!r} / router_init={cfg.router_init!r} needs calibration text",
            where="--calibration",
            fix="pass --calibration builtin or --calibration FILE.jsonl",
        )
    reason = streaming_reason(cfg) or (None if local else "the source is a hub id")
    if args.streaming == "on" and reason:
        raise ConfigError(
            f"--streaming on is impossible: {reason}", where="--streaming", fix="use --streaming auto"
        )
    if args.streaming != "off" and reason is None and args.dtype in ("auto", None):
        spec = upcycle_checkpoint_streaming(
            args.model,
            args.out,
            cfg,
            max_shard_size=args.max_shard_size,
            trust_remote_code=args.trust_remote_code,
        )
        mode = "streaming"
    else:
        model = load_hf_causal_lm(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
        calibration, data = None, None
        if cfg.needs_calibration:
            from moe_app.core.upcycling.calibration_data import calibration_texts, tokenize_calibration

            if tokenizer is None:
                raise ConfigError(
                    "calibration needs the model's tokenizer, but the source has none",
                    where=args.model,
                    fix="save the tokenizer next to the model, or use a data-free split/router init",
                )
            calibration = tokenize_calibration(
                calibration_texts(args.calibration), tokenizer, args.seq_len, cfg.calibration_tokens
            )
            data = {
                "calibration": args.calibration,
                "tokens": sum(b["input_ids"].numel() for b in calibration),
            }
        upcycle(model, cfg, calibration, data_description=data)
        spec = save_moe_checkpoint(
            model,
            args.out,
            tokenizer=None if local else tokenizer,
            tokenizer_dir=args.model if local else None,
            max_shard_size=args.max_shard_size,
        )
        spec = model.moe_app_spec
        mode = "in-memory"
    moe = spec.moe_layers()
    print(
        f"[moe-app] upcycled {args.model} -> {args.out} ({mode}): method={cfg.method}, "
        f"{len(moe)} MoE layers {moe}, {cfg.num_experts} experts, top-{cfg.top_k}, scale {cfg.resolved_scale:g}"
    )
    return 0
