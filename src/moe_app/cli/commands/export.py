"""``moe-app export``: a moe-app checkpoint -> a standard HF MoE checkpoint (Mixtral / Qwen2-MoE / Qwen3-MoE).

The result loads with stock ``transformers.AutoModelForCausalLM.from_pretrained`` and reproduces
moe-app's logits; where the model is not exactly representable in the asked format the command
refuses with the reason (exit code 2) and writes nothing. See ``moe_app.checkpoint.export``.
A PESC ``variant: lora`` checkpoint (``moe-app upcycle --method pesc_lora``) is merged into full
experts first, exactly (in memory); every other checkpoint is converted layer by layer from its
memory-mapped shards (``moe_app.checkpoint.export_streaming``: peak memory about one decoder layer).
A failure part-way (a full disk, an input shard that vanishes) is a one-line error (exit code 2)
that leaves nothing at ``--out`` and keeps a previous ``--out`` intact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser, Namespace

from moe_app.checkpoint.export import FORMATS
from moe_app.checkpoint.spec_file import read_spec
from moe_app.cli.commands import OFFLINE_COMMANDS
from moe_app.cli.commands._options import add_options, build
from moe_app.errors import CheckpointError, ConfigError

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


def run(cfg: Namespace) -> int:
    from moe_app.checkpoint.export import export_checkpoint
    from moe_app.checkpoint.hub import check_local_model_dir

    opts = build(ExportOptions, cfg)
    src, out = Path(opts.ckpt).expanduser(), Path(opts.out).expanduser()
    check_local_model_dir(src)
    read_spec(src)  # a clear error if this is not a moe-app checkpoint
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        raise ConfigError(
            "output dir exists and is not empty", where=str(out), fix="pass --overwrite or a new --out"
        )
    if out.resolve() == src.resolve():
        raise ConfigError("--out is the checkpoint dir", where="--out", fix="write to a new directory")
    try:
        result = export_checkpoint(src, out, opts.format, max_shard_size=opts.max_shard_size)
    except OSError as e:  # config / tokenizer files, fsync, rename: the output is rolled back
        raise CheckpointError(
            f"writing the export failed ({e.strerror or e})",
            where=str(out),
            fix="free disk space or pick another --out, then run again (nothing partial was kept)",
        ) from e
    print(f"[moe-app] exported {src} -> {result.path} as {result.format}")
    return 0
