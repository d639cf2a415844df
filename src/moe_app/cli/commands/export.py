"""``moe-app export``: a moe-app checkpoint -> a standard HF MoE checkpoint (Mixtral / Qwen2-MoE / Qwen3-MoE).

The result loads with stock ``transformers.AutoModelForCausalLM.from_pretrained`` and reproduces
moe-app's logits; where the model is not exactly representable in the asked format the command
refuses with the reason (exit code 2) and writes nothing. See ``moe_app.checkpoint.export``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_app.errors import ConfigError

HELP = "export a moe-app checkpoint as a stock HF Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint"


def build_parser(parser: argparse.ArgumentParser) -> None:
    from moe_app.checkpoint.export import FORMATS

    parser.add_argument(
        "--ckpt", required=True, help="moe-app checkpoint dir (from `moe-app upcycle` or training)"
    )
    parser.add_argument("--out", required=True, help="output dir for the standard HF checkpoint (atomic)")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="target format; auto picks the closest exact one (LLaMA/Mistral -> mixtral, "
        "Qwen2 -> qwen2_moe, Qwen3 -> qwen3_moe)",
    )
    parser.add_argument("--max_shard_size", default="5GB", help="output shard size (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from moe_app.checkpoint.export import export_checkpoint
    from moe_app.checkpoint.hub import check_local_model_dir
    from moe_app.core.spec import MoeSpec

    src, out = Path(args.ckpt).expanduser(), Path(args.out).expanduser()
    check_local_model_dir(src)
    MoeSpec.load(src)  # a clear error if this is not a moe-app checkpoint
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(
            "output dir exists and is not empty", where=str(out), fix="pass --overwrite or a new --out"
        )
    if out.resolve() == src.resolve():
        raise ConfigError("--out is the checkpoint dir", where="--out", fix="write to a new directory")
    result = export_checkpoint(src, out, args.format, max_shard_size=args.max_shard_size)
    print(f"[moe-app] exported {src} -> {result.path} as {result.format}")
    return 0
