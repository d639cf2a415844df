"""``moe-app suite``: write the built-in offline suite as JSONL files, to read or to use as sources.

Layout under ``--out DIR`` (``messages`` format, one record per line, with ``domain`` and
``reference`` keys)::

    DIR/arithmetic/train.jsonl  DIR/arithmetic/val.jsonl  DIR/arithmetic/test.jsonl
    ...                                                    (one directory per instruction domain)
    DIR/pretrain/train.jsonl    DIR/pretrain/val.jsonl     DIR/pretrain/test.jsonl   ({"text": ...})

Each domain directory works as a file source as is (``path: DIR/arithmetic``: the split files
are picked up by name). The output directory is written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from jsonargparse import ArgumentParser, Namespace

from moe_app.cli.commands import OFFLINE_COMMANDS
from moe_app.cli.commands._options import add_options, build
from moe_app.errors import ConfigError

HELP = OFFLINE_COMMANDS["suite"]


@dataclass
class SuiteOptions:
    """What to write, and where."""

    out: str
    """Output directory (replaced if it exists)."""
    train_size: int | None = None
    """Train records per domain (default 2000)."""
    eval_size: int | None = None
    """Val and test records per domain (default 100)."""
    seed: int = 0
    """Sampling seed (the lookup world is fixed)."""
    domains: list[str] | None = None
    """Instruction domains to write (default: all, plus pretrain)."""


def build_parser(parser: ArgumentParser) -> None:
    add_options(parser, SuiteOptions)


def run(cfg: Namespace) -> int:
    from moe_app.core.data.synthetic import PRETRAIN, SPLITS, SUITE_DOMAINS, generate_domain
    from moe_app.core.utils.atomic import atomic_directory

    args = build(SuiteOptions, cfg)

    domains = list(args.domains) if args.domains else [*SUITE_DOMAINS, PRETRAIN]
    unknown = [d for d in domains if d not in (*SUITE_DOMAINS, PRETRAIN)]
    if unknown:
        raise ConfigError(
            f"unknown suite domain(s) {unknown}",
            where="--domains",
            fix=f"choose from {[*SUITE_DOMAINS, PRETRAIN]}.",
        )
    for flag in ("train_size", "eval_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {value}", fix=f"pass --{flag} 100 or omit it.")
    counts: dict[str, int] = {}
    with atomic_directory(args.out) as tmp:
        for domain in domains:
            (tmp / domain).mkdir()
            for split in SPLITS:
                n = args.train_size if split == "train" else args.eval_size
                examples = generate_domain(domain, split, n, args.seed)
                with open(tmp / domain / f"{split}.jsonl", "w", encoding="utf-8") as f:
                    for ex in examples:
                        f.write(json.dumps(ex.to_record(), ensure_ascii=False) + "\n")
                counts[f"{domain}/{split}"] = len(examples)
    total = sum(counts.values())
    print(f"wrote {total} records in {len(counts)} files to {args.out}")
    return 0
