"""Where examples come from: local files, Hugging Face hub datasets, or the built-in suite.

A :class:`SourceConfig` names one dataset; :func:`load_examples` returns its examples for one
logical split (``"train"``, ``"val"``, ``"test"``).

* **Local files** (``path``: a file, or a directory of them): ``.jsonl``/``.json`` are parsed
  here, line by line, so a broken line is reported as ``file line N`` and one odd record cannot
  fail a whole file on Arrow's schema unification; ``.parquet``/``.csv``/``.tsv`` go through
  ``datasets.load_dataset`` (one file at a time, so a bad row is reported as ``file row N``).
  In a directory, files named after a split (``train.*``, ``val.*``/``validation.*``/``dev.*``,
  ``test.*``) are used for that split; with no such names, every data file is training data.
* **Hub datasets** (``hub``): ``datasets.load_dataset(hub, subset)``; works offline on a local
  dataset directory or the HF cache too.
* **Built-in suite** (``builtin``): a domain of :mod:`moe_app.core.data.synthetic`, ``"all"`` of them,
  or ``"pretrain"`` (plain text).

A split that a file/hub source does not provide can be held out of the training data with
``dev_fraction`` / ``test_fraction`` (a fixed, seeded choice: the same records every run).
"""

from __future__ import annotations

import functools
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_app.core.data.formats import BAD_RECORD_POLICIES, FORMATS, Example, parse_records
from moe_app.core.data.synthetic import PRETRAIN, SUITE_DOMAINS, generate_domain
from moe_app.errors import ConfigError, DataError

logger = logging.getLogger("moe_app.core.data")

SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "dev": "val",
    "validation": "val",
    "valid": "val",
    "test": "test",
}
_FILE_SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "valid", "dev"), "test": ("test",)}
JSON_SUFFIXES = (".jsonl", ".json")
TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
DATA_SUFFIXES = (*JSON_SUFFIXES, *TABLE_SUFFIXES)
BUILTIN_CHOICES: tuple[str, ...] = (*SUITE_DOMAINS, "all", PRETRAIN)


@dataclass
class SourceConfig:
    """One dataset of the mixture. Exactly one of ``path``, ``hub``, ``builtin`` is set."""

    name: str
    """Short name; rows of this source are tagged with it (metrics, mixture weights)."""
    path: str | None = None
    """Local ``.jsonl``/``.json``/``.parquet``/``.csv``/``.tsv`` file, or a directory of them."""
    hub: str | None = None
    """Hugging Face dataset id (or local dataset dir) loaded with ``datasets.load_dataset``."""
    builtin: str | None = None
    """A built-in suite domain, ``"all"`` (every instruction domain) or ``"pretrain"`` (text)."""
    format: str = "auto"
    """Row format: auto, alpaca, messages, sharegpt, pesc or text (see ``moe_app.core.data.formats``)."""
    subset: str | None = None
    """Hub dataset configuration name (the ``name=`` of ``load_dataset``), e.g. ``"main"``."""
    train_split: str = "train"
    """Hub split used for training."""
    dev_split: str | None = "validation"
    """Hub split used for validation (``None``: none; if absent, ``dev_fraction`` is held out)."""
    test_split: str | None = "test"
    """Hub split used for testing (``None``: none; if absent, ``test_fraction`` is held out)."""
    dev_path: str | None = None
    """Validation file/dir for a ``path`` source (else ``val.*`` in the dir, else ``dev_fraction``)."""
    test_path: str | None = None
    """Test file/dir for a ``path`` source (else ``test.*`` in the dir, else ``test_fraction``)."""
    dev_fraction: float = 0.0
    """Fraction of training records held out for validation when no validation data is given."""
    test_fraction: float = 0.0
    """Fraction of training records held out for testing when no test data is given."""
    seed: int = 0
    """Seed of the held-out choice and of the built-in generator."""
    max_records: int | None = None
    """Keep at most this many records per split (the first ones, after hold-out)."""
    builtin_train_size: int = 2000
    """Records per domain generated for a ``builtin`` source's train split."""
    builtin_eval_size: int = 100
    """Records per domain generated for a ``builtin`` source's val and test splits."""
    on_bad_record: str = "error"
    """``"error"``: stop at the first malformed record; ``"skip"``: drop it and log a count."""

    def __post_init__(self) -> None:
        where = f"data source {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError("a data source needs a non-empty `name`", fix="set name: my_dataset.")
        given = [k for k in ("path", "hub", "builtin") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"exactly one of path/hub/builtin must be set, got {given or 'none'}",
                where=where,
                fix="keep one of `path: FILE_OR_DIR`, `hub: DATASET_ID`, `builtin: DOMAIN`.",
            )
        if self.builtin is not None and self.builtin not in BUILTIN_CHOICES:
            raise ConfigError(
                f"unknown builtin {self.builtin!r}", where=where, fix=f"use one of {list(BUILTIN_CHOICES)}."
            )
        if self.format not in FORMATS:
            raise ConfigError(
                f"unknown format {self.format!r}", where=where, fix=f"use one of {list(FORMATS)}."
            )
        if self.on_bad_record not in BAD_RECORD_POLICIES:
            raise ConfigError(
                f"unknown on_bad_record {self.on_bad_record!r}",
                where=where,
                fix=f"use one of {list(BAD_RECORD_POLICIES)}.",
            )
        if (self.dev_path or self.test_path) and self.path is None:
            raise ConfigError(
                "dev_path/test_path only apply to a `path` source",
                where=where,
                fix="remove them or use `path`.",
            )
        for key in ("dev_fraction", "test_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(
                    f"{key} must be in [0, 1), got {value}", where=where, fix=f"set {key}: 0.05."
                )
        if self.dev_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                "dev_fraction + test_fraction must leave training data",
                where=where,
                fix="lower the fractions.",
            )
        for key in ("max_records", "builtin_train_size", "builtin_eval_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(
                    f"{key} must be >= 1, got {value}", where=where, fix=f"set {key} to 1 or more."
                )


def builtin_sources(domains: tuple[str, ...] = SUITE_DOMAINS) -> list[SourceConfig]:
    """One source per built-in instruction domain (the DataModule's default)."""
    return [SourceConfig(name=d, builtin=d) for d in domains]


def canonical_split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise ConfigError(f"unknown split {split!r}", fix=f"use one of {list(SPLITS)}.") from None


# --------------------------------------------------------------------------------------------
# Reading local files.


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path} line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"invalid JSON ({err.msg} at column {err.colno})",
                    where=f"{path} line {lineno}",
                    fix="write one complete JSON object per line (JSON Lines); check quotes and brackets.",
                ) from None
    return rows


def _read_json(path: Path) -> list[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) > 1 and lines[0].lstrip().startswith("{"):
            return _read_jsonl(path)  # JSON Lines saved with a .json suffix
        raise DataError(
            f"invalid JSON ({err.msg} at column {err.colno})",
            where=f"{path} line {err.lineno}",
            fix="the file must hold a JSON list of records (or be JSON Lines).",
        ) from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            return [(f"{path} record 0", data)]
        data = data[lists[0]]  # e.g. {"data": [...]}
    if not isinstance(data, list):
        raise DataError(
            f"expected a JSON list of records, got {type(data).__name__}",
            where=str(path),
            fix="write a list of records: [{...}, {...}], or JSON Lines.",
        )
    return [(f"{path} record {i}", row) for i, row in enumerate(data)]


def _read_table(path: Path) -> list[tuple[str, Any]]:
    import datasets

    builder = TABLE_SUFFIXES[path.suffix.lower()]
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as err:
        raise DataError(
            f"could not read the {builder} file: {err}",
            where=str(path),
            fix=f"check that it is a valid {builder} file with one record per row.",
        ) from err
    return [(f"{path} row {i + 1}", row) for i, row in enumerate(ds)]


def read_rows(path: Path) -> list[tuple[str, Any]]:
    """``(where, row)`` pairs of one local data file."""
    if not path.is_file():
        raise DataError(
            "data file not found", where=str(path), fix="check the path (relative to the working dir)."
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
    except UnicodeDecodeError as err:  # found by tests/test_reliability_fuzz.py
        raise DataError(
            f"the file is not UTF-8 text (byte {err.start}: {err.reason})",
            where=str(path),
            fix="re-save the file with UTF-8 encoding.",
        ) from None
    except RecursionError:
        raise DataError(
            "a record is nested too deeply to parse", where=str(path), fix="flatten or remove that record."
        ) from None
    if suffix in TABLE_SUFFIXES:
        return _read_table(path)
    raise DataError(
        f"unsupported data file type {suffix!r}", where=str(path), fix=f"use one of {list(DATA_SUFFIXES)}."
    )


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)


def _files_for(cfg: SourceConfig, split: str) -> list[Path] | None:
    """Files holding ``split`` of a ``path`` source, or ``None`` if it has none."""
    explicit = {"val": cfg.dev_path, "test": cfg.test_path}.get(split)
    root = Path(explicit or cfg.path)  # type: ignore[arg-type]
    if not root.exists():
        raise DataError(
            "data path not found",
            where=f"data source {cfg.name!r}: {root}",
            fix="check the path and working dir.",
        )
    if root.is_file():
        return [root] if explicit or split == "train" else None
    files = _data_files(root)
    if not files:
        raise DataError(
            "directory has no data files",
            where=f"data source {cfg.name!r}: {root}",
            fix=f"put {list(DATA_SUFFIXES)} files in it.",
        )
    if explicit:
        return files
    by_split = {s: [f for f in files if f.stem.lower() in names] for s, names in _FILE_SPLIT_NAMES.items()}
    if not any(by_split.values()):
        return files if split == "train" else None
    return by_split[split] or None


def _parse_files(cfg: SourceConfig, files: list[Path]) -> list[Example]:
    rows = [row for f in files for row in read_rows(f)]
    if not rows:
        raise DataError(
            "dataset is empty (no records)",
            where=f"data source {cfg.name!r}: {', '.join(map(str, files))}",
            fix="point the source at a file with records.",
        )
    examples = parse_records(rows, cfg.format, on_bad_record=cfg.on_bad_record, source=cfg.name)
    if not examples:
        raise DataError(
            f"all {len(rows)} records are malformed (skipped)",
            where=f"data source {cfg.name!r}: {', '.join(map(str, files))}",
            fix="fix the records or the source's `format`; run with on_bad_record='error' to see the first problem.",
        )
    return examples


# --------------------------------------------------------------------------------------------
# Hub datasets.


@functools.lru_cache(maxsize=8)
def _load_hub(hub: str, subset: str | None):
    import datasets

    try:
        return datasets.load_dataset(hub, subset)
    except Exception as err:
        raise DataError(
            f"could not load the hub dataset: {type(err).__name__}: {err}",
            where=f"hub dataset {hub!r}" + (f" (subset {subset!r})" if subset else ""),
            fix="check the dataset id/subset; offline, it must be in the HF cache or a local directory.",
        ) from err


def _hub_examples(cfg: SourceConfig, split_name: str) -> list[Example]:
    dd = _load_hub(cfg.hub, cfg.subset)
    ds = dd[split_name]
    where = f"hub dataset {cfg.hub!r} split {split_name!r}"
    if len(ds) == 0:
        raise DataError(
            "dataset split is empty (no records)", where=where, fix="choose a split with records."
        )
    rows = ((f"{where} record {i}", row) for i, row in enumerate(ds))
    return parse_records(rows, cfg.format, on_bad_record=cfg.on_bad_record, source=cfg.name)


def _hub_split_name(cfg: SourceConfig, split: str) -> str | None:
    dd = _load_hub(cfg.hub, cfg.subset)
    name = {"train": cfg.train_split, "val": cfg.dev_split, "test": cfg.test_split}[split]
    if split == "train" and name not in dd:
        raise DataError(
            f"split {name!r} not found (available: {sorted(dd)})",
            where=f"hub dataset {cfg.hub!r}",
            fix="set `train_split` to one of the available splits.",
        )
    return name if name is not None and name in dd else None


# --------------------------------------------------------------------------------------------
# Hold-out and the public entry point.


def _holdout(cfg: SourceConfig, examples: list[Example], carve: dict[str, bool]) -> dict[str, list[Example]]:
    """Split ``examples`` into train/val/test by the configured fractions (seeded, fixed)."""
    order = list(range(len(examples)))
    random.Random(f"{cfg.seed}|{cfg.name}|holdout").shuffle(order)
    counts = {}
    for split, frac in (("val", cfg.dev_fraction), ("test", cfg.test_fraction)):
        counts[split] = max(1, round(frac * len(examples))) if carve[split] and frac > 0 else 0
    if counts["val"] + counts["test"] >= len(examples):
        raise DataError(
            f"too few records ({len(examples)}) to hold out dev/test fractions",
            where=f"data source {cfg.name!r}",
            fix="lower dev_fraction/test_fraction or provide separate dev/test data.",
        )
    val_idx = set(order[: counts["val"]])
    test_idx = set(order[counts["val"] : counts["val"] + counts["test"]])
    out: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for i, ex in enumerate(examples):  # keep file order inside each split
        out["val" if i in val_idx else "test" if i in test_idx else "train"].append(ex)
    return out


def _builtin_examples(cfg: SourceConfig, split: str) -> list[Example]:
    n = cfg.builtin_train_size if split == "train" else cfg.builtin_eval_size
    if cfg.builtin == PRETRAIN:
        return generate_domain(PRETRAIN, split, n, cfg.seed)
    domains = SUITE_DOMAINS if cfg.builtin == "all" else (cfg.builtin,)
    return [ex for d in domains for ex in generate_domain(d, split, n, cfg.seed)]


def _external_examples(cfg: SourceConfig, split: str) -> list[Example]:
    """A file or hub source: its own split if it has one, else the held-out share of train."""
    if cfg.path is not None:
        own: dict[str, Any] = {s: _files_for(cfg, s) for s in SPLITS}
    else:
        own = {s: _hub_split_name(cfg, s) for s in SPLITS}

    def load(s: str) -> list[Example]:
        return _parse_files(cfg, own[s]) if cfg.path is not None else _hub_examples(cfg, own[s])

    if split != "train" and own[split] is not None:
        return load(split)
    carve = {s: own[s] is None for s in ("val", "test")}
    fraction = {"train": 1.0, "val": cfg.dev_fraction, "test": cfg.test_fraction}[split]
    if fraction == 0:
        return []
    return _holdout(cfg, load("train"), carve)[split]


def load_examples(cfg: SourceConfig, split: str) -> list[Example]:
    """The source's examples for ``split`` (``train``/``val``/``test``; ``dev``/``validation`` alias
    ``val``). A split the source does not provide gives ``[]``; an empty file or an empty training
    split raises :class:`DataError`. Examples without a domain get the source's name."""
    split = canonical_split(split)
    if cfg.builtin is not None:
        examples = _builtin_examples(cfg, split)
    else:
        examples = _external_examples(cfg, split)
    if split == "train" and not examples:
        raise DataError(
            "no usable training records",
            where=f"data source {cfg.name!r}",
            fix="check the data and `on_bad_record` (all records may have been skipped).",
        )
    if cfg.max_records is not None:
        examples = examples[: cfg.max_records]
    for ex in examples:
        if ex.domain is None:
            ex.domain = cfg.name
    logger.info("data source %r: %d %s example(s)", cfg.name, len(examples), split)
    return examples
