"""``moe-app export``: a moe-app checkpoint -> a standard HF MoE checkpoint (Mixtral / Qwen2-MoE / Qwen3-MoE).

The result loads with stock ``transformers.AutoModelForCausalLM.from_pretrained`` and reproduces
moe-app's logits; where the model is not exactly representable in the asked format the command
refuses with the reason (exit code 2) and writes nothing. See ``moe_app.checkpoint.export``.
A PESC ``variant: lora`` checkpoint (``moe-app upcycle --method pesc_lora``) is merged into full
experts first, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser, Namespace

from moe_app.checkpoint.export import FORMATS
from moe_app.cli.commands import OFFLINE_COMMANDS
from moe_app.cli.commands._options import add_options, build
from moe_app.errors import ConfigError

HELP = OFFLINE_COMMANDS["export"]

Format = Literal[FORMATS]  # type: ignore[valid-type]


@dataclass
class ExportOptions:
    """What to export, and where."""

    ckpt: str
    """moe-app checkpoint dir (from ``moe-app upcycle`` or training)."""
    out: str
    """Output dir for the standard HF checkpoint (written atomically)."""
    format: Format = "auto"
    """Target format; ``auto`` picks the closest exact one (LLaMA/Mistral -> mixtral, Qwen2 ->
    qwen2_moe, Qwen3 -> qwen3_moe)."""
    max_shard_size: str = "5GB"
    """Output shard size."""
    overwrite: bool = False
    """Replace ``--out`` if it exists."""


def build_parser(parser: ArgumentParser) -> None:
    add_options(parser, ExportOptions)


def _merged_pesc_model(src: Path):
    """A PESC-lora checkpoint loaded and merged into plain experts, or ``None`` for any other checkpoint.

    ``export_checkpoint`` merges LoRA experts itself but keeps the spec's ``adapters`` slot, which
    its analysis then refuses; the merged model has no adapters left, so the slot is dropped here.
    """
    from moe_app.checkpoint.model_dir import load_model
    from moe_app.core.moe.pesc import LoraExpertsMoeBlock
    from moe_app.core.pesc.merge import merge_pesc
    from moe_app.core.spec import MoeSpec, spec_of

    if (MoeSpec.load(src).adapters or {}).get("kind") != "pesc":
        return None
    model = load_model(src)
    if not any(isinstance(m, LoraExpertsMoeBlock) for m in model.modules()):
        return None  # adapter variant: export_checkpoint refuses it with the reason
    model = merge_pesc(model)
    spec = spec_of(model)
    if spec is not None:
        spec.adapters = None
    return model


def run(cfg: Namespace) -> int:
    from moe_app.checkpoint.export import export_checkpoint
    from moe_app.checkpoint.hub import check_local_model_dir, load_tokenizer
    from moe_app.core.spec import MoeSpec

    opts = build(ExportOptions, cfg)
    src, out = Path(opts.ckpt).expanduser(), Path(opts.out).expanduser()
    check_local_model_dir(src)
    MoeSpec.load(src)  # a clear error if this is not a moe-app checkpoint
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        raise ConfigError(
            "output dir exists and is not empty", where=str(out), fix="pass --overwrite or a new --out"
        )
    if out.resolve() == src.resolve():
        raise ConfigError("--out is the checkpoint dir", where="--out", fix="write to a new directory")
    merged = _merged_pesc_model(src)
    if merged is not None:
        result = export_checkpoint(
            merged, out, opts.format, tokenizer=load_tokenizer(src), max_shard_size=opts.max_shard_size
        )
    else:
        result = export_checkpoint(src, out, opts.format, max_shard_size=opts.max_shard_size)
    print(f"[moe-app] exported {src} -> {result.path} as {result.format}")
    return 0
