"""``InstructionDataModule``: sources -> tokenised rows -> padded batches for every Trainer stage.

Init arguments are plain types and dataclasses (LightningCLI / jsonargparse friendly, no
instances as defaults). With no ``sources`` it serves the built-in offline suite's instruction
domains; with no ``tokenizer`` it takes ``trainer.lightning_module.tokenizer`` in :meth:`setup`
(so the model and the data can never disagree on the vocabulary); outside a Trainer, call
:meth:`set_tokenizer`. The batch contract is documented in :mod:`moe_app.core.data.collate`.

Training rows of all sources are concatenated and shuffled by a sampler seeded with
``(seed, epoch)``; with ``packing`` each source's rows are packed into ``max_length`` blocks
(blocks never mix sources, so per-source weighting stays possible). Validation and test rows are
never packed and keep their ``source`` and ``domain``; the test split also yields generation
prompts and references for exact-match evaluation.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from moe_app.core.data.collate import Collator, RowDataset, SeededShuffleSampler
from moe_app.core.data.packing import pack_sequences
from moe_app.core.data.sources import SourceConfig, builtin_sources, load_examples
from moe_app.core.data.templates import encode_examples
from moe_app.errors import ConfigError
from moe_app.lightning.data.resumable import ResumableDataLoader

logger = logging.getLogger("moe_app.core.data")


class InstructionDataModule(L.LightningDataModule):
    """Instruction/text data for fit, validate, test and predict.

    Args:
        sources: Datasets to use (``None``: one source per built-in suite instruction domain).
        tokenizer: ``"builtin"`` (the suite BPE), a local tokenizer dir or a hub id; ``None``: the
            LightningModule's ``tokenizer`` attribute, read in ``setup``.
        max_length: Tokens per row; longer examples are cut on the right.
        batch_size: Training rows per batch.
        eval_batch_size: Validation/test/predict rows per batch (``None``: ``batch_size``).
        packing: Pack short training examples into ``max_length`` blocks.
        num_workers: DataLoader worker processes.
        seed: Seed of the training shuffle (combined with the epoch).
        max_eval_examples_per_source: Cap on validation/test/predict examples per source.
    """

    def __init__(
        self,
        sources: list[SourceConfig] | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        packing: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        max_eval_examples_per_source: int | None = None,
    ) -> None:
        super().__init__()
        for key, value in (
            ("max_length", max_length),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if value is not None and value < (2 if key == "max_length" else 1):
                raise ConfigError(
                    f"data.{key} must be positive, got {value}", fix=f"set data.{key} to e.g. 16."
                )
        if num_workers < 0:
            raise ConfigError(
                f"data.num_workers must be >= 0, got {num_workers}", fix="set data.num_workers: 0."
            )
        if max_eval_examples_per_source is not None and max_eval_examples_per_source < 1:
            raise ConfigError(
                "data.max_eval_examples_per_source must be >= 1", fix="set it to a positive number or null."
            )
        self.sources = list(sources) if sources is not None else builtin_sources()
        names = [s.name for s in self.sources]
        if not names:
            raise ConfigError(
                "data.sources is an empty list", fix="list at least one source, or null for the suite."
            )
        if len(set(names)) != len(names):
            raise ConfigError(
                f"data.sources has duplicate names {names}", fix="give every source its own name."
            )
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.packing = packing
        self.num_workers = num_workers
        self.seed = seed
        self.max_eval_examples_per_source = max_eval_examples_per_source
        self._tokenizer: Any = None
        self._rows: dict[str, list[dict[str, Any]]] = {}

    # ----------------------------------------------------------------------------------------
    # Tokenizer.

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use this tokenizer (e.g. outside a Trainer); drops rows tokenised with another one."""
        self._tokenizer = tokenizer
        self._rows.clear()

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self._resolve_tokenizer()
        return self._tokenizer

    def _resolve_tokenizer(self) -> Any:
        if self.tokenizer_name == "builtin":
            from moe_app.core.data.tokenizer import suite_tokenizer

            return suite_tokenizer()
        if self.tokenizer_name is not None:
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(self.tokenizer_name)
            except Exception as err:
                raise ConfigError(
                    f"could not load tokenizer {self.tokenizer_name!r}: {err}",
                    fix="set data.tokenizer to 'builtin', a local tokenizer directory, or a cached hub id.",
                ) from err
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        tok = getattr(module, "tokenizer", None)
        if tok is None:
            raise ConfigError(
                "the data module has no tokenizer",
                fix="set data.tokenizer ('builtin' or a path), give the LightningModule a `tokenizer` "
                "attribute, or call set_tokenizer(tok) before setup.",
            )
        return tok

    def _pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ConfigError(
                "the tokenizer has neither a pad nor an eos token",
                fix="set tokenizer.pad_token before training.",
            )
        return pad

    # ----------------------------------------------------------------------------------------
    # Rows.

    def _encode(self, source: SourceConfig, split: str) -> list[dict[str, Any]]:
        examples = load_examples(source, split)
        if split != "train" and self.max_eval_examples_per_source is not None:
            examples = examples[: self.max_eval_examples_per_source]
        encoded = encode_examples(self.tokenizer, examples, self.max_length)
        rows = []
        dropped = 0
        for ex, enc in zip(examples, encoded):
            if enc is None:
                dropped += 1
                continue
            rows.append(
                {
                    "input_ids": enc.input_ids,
                    "labels": enc.labels,
                    "prompt_ids": enc.prompt_ids,
                    "reference": enc.reference,
                    "source": source.name,
                    "domain": ex.domain or source.name,
                }
            )
        if dropped:
            logger.warning(
                "data source %r (%s): dropped %d example(s) whose replies lie beyond max_length=%d",
                source.name,
                split,
                dropped,
                self.max_length,
            )
        return rows

    def _build(self, split: str) -> list[dict[str, Any]]:
        if split in self._rows:
            return self._rows[split]
        rows: list[dict[str, Any]] = []
        for source in self.sources:
            source_rows = self._encode(source, split)
            if split == "train" and self.packing:
                blocks = pack_sequences([(r["input_ids"], r["labels"]) for r in source_rows], self.max_length)
                source_rows = [
                    {"input_ids": i, "labels": lab, "prompt_ids": None, "reference": None}
                    | {"source": source.name, "domain": source.name}
                    for i, lab in blocks
                ]
            rows += source_rows
        if split == "train" and not rows:
            raise ConfigError("no training rows", fix="check data.sources and data.max_length.")
        self._rows[split] = rows
        return rows

    def prepare_data(self) -> None:
        """Build the cached suite tokenizer once (rank 0) before every rank's ``setup`` loads it."""
        if self.tokenizer_name == "builtin" and self._tokenizer is None:
            from moe_app.core.data.tokenizer import suite_tokenizer

            suite_tokenizer()

    def setup(self, stage: str | None = None) -> None:
        """Tokenise what ``stage`` needs (``fit``: train+val, ``validate``: val, ``test``/``predict``: test)."""
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in needed.get(stage or "", ("train", "val", "test")):
            self._build(split)

    def domain_names(self) -> list[str]:
        """Every domain of the test split, sorted (implements
        :class:`~moe_app.core.data.protocols.DomainNames`).

        Read from the tokenised test rows (built here if ``setup("test")`` has not run yet), so it
        is known before any batch and is the same list on every rank: every rank tokenises the
        whole split and only the sampler shards it. A row's domain is its record's ``domain``, else
        its source's name (plain-text rows included): exactly what the test batches carry.
        """
        return sorted({row["domain"] for row in self._build("test")})

    def source_sizes(self, split: str = "train") -> dict[str, int]:
        """Rows per source in ``split`` (after packing, for train)."""
        sizes: dict[str, int] = {s.name: 0 for s in self.sources}
        for row in self._build(split):
            sizes[row["source"]] += 1
        return sizes

    # ----------------------------------------------------------------------------------------
    # Loaders.

    def _loader(self, rows: list[dict[str, Any]], kind: str) -> DataLoader:
        sampler = None
        if kind == "train":
            sampler = SeededShuffleSampler(len(rows), self.seed)
        # Training: the position within the epoch is checkpointed, so a mid-epoch resume continues
        # where the run stopped instead of replaying the epoch (moe_app.lightning.data.resumable).
        loader_cls = ResumableDataLoader if kind == "train" else DataLoader
        return loader_cls(
            RowDataset(rows),
            batch_size=self.batch_size if kind == "train" else self.eval_batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=Collator(self._pad_id(), kind),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._build("train"), "train")

    def val_dataloader(self) -> DataLoader | list:
        rows = self._build("val")
        return self._loader(rows, "val") if rows else []

    def test_dataloader(self) -> DataLoader | list:
        rows = self._build("test")
        return self._loader(rows, "test") if rows else []

    def predict_dataloader(self) -> DataLoader | list:
        rows = [r for r in self._build("test") if r["prompt_ids"] is not None]
        return self._loader(rows, "predict") if rows else []
