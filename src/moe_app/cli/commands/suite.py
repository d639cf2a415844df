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

import argparse
import json

from moe_app.errors import ConfigError

HELP = "write the built-in offline instruction suite (and its pretraining text) as JSONL files"


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    parser.add_argument(
        "--train_size", type=int, default=None, help="train records per domain (default 2000)"
    )
    parser.add_argument(
        "--eval_size", type=int, default=None, help="val and test records per domain (default 100)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (the lookup world is fixed)")
    parser.add_argument(
        "--domains",
        nargs="+",
        default=None,
        help="instruction domains to write (default: all, plus pretrain)",
    )


def run(args: argparse.Namespace) -> int:
    from moe_app.core.data.synthetic import PRETRAIN, SPLITS, SUITE_DOMAINS, generate_domain
    from moe_app.core.utils.atomic import atomic_directory

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
