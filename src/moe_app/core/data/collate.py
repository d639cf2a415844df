"""Datasets of pre-tokenised rows, the seeded shuffle sampler, and the batch collator.

Rows are plain dicts made once in ``setup`` (tokenising the tiny suite takes well under a second);
batches are padded to the longest row of the batch, not to ``max_length``.

Batch contract (every tensor ``torch.long``):

* ``input_ids (B, S)``, ``attention_mask (B, S)`` (1 = token, 0 = pad), ``labels (B, S)``
  (aligned with ``input_ids``; ``-100`` = no loss); right-padded with the tokenizer's pad id;
* val/test add ``source: list[str]`` (source name per row) and ``domain: list[str]``;
* test/predict add ``prompt_ids: list[list[int]]`` (the generation prompt, unpadded; ``[]`` for
  plain-text rows), ``reference: list[str]`` (expected answer; ``""`` for plain text), and the
  prompts left-padded for batched ``generate``: ``prompt_input_ids (B, P)``,
  ``prompt_attention_mask (B, P)``;
* predict batches carry only the prompt keys, ``reference``, ``domain`` and ``source``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from moe_app.core.data.templates import IGNORE_INDEX


class RowDataset(Dataset):
    """A list of pre-tokenised row dicts (``input_ids``, ``labels``, ``source``, ...)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


class SeededShuffleSampler(Sampler[int]):
    """A random permutation fixed by ``(seed, epoch)``: reruns see the same order.

    Lightning calls :meth:`set_epoch` at the start of every epoch (also under DDP, through its
    sampler wrapper); outside Lightning, call it yourself to get a new order.
    """

    def __init__(self, num_rows: int, seed: int = 0) -> None:
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_rows, generator=g).tolist())


def _pad(seqs: Sequence[Sequence[int]], value: int, *, left: bool = False) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if left:
                out[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            else:
                out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


class Collator:
    """Pads rows into the batch dict above. ``kind``: ``"train"``, ``"val"``, ``"test"``, ``"predict"``."""

    def __init__(self, pad_id: int, kind: str = "train") -> None:
        if kind not in ("train", "val", "test", "predict"):
            raise ValueError(f"unknown collator kind {kind!r}")
        self.pad_id = pad_id
        self.kind = kind

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        if self.kind != "predict":
            ids = [r["input_ids"] for r in rows]
            batch["input_ids"] = _pad(ids, self.pad_id)  # (B, S)
            batch["attention_mask"] = _pad([[1] * len(s) for s in ids], 0)  # (B, S)
            batch["labels"] = _pad([r["labels"] for r in rows], IGNORE_INDEX)  # (B, S)
        if self.kind == "train":
            return batch
        batch["source"] = [r["source"] for r in rows]
        batch["domain"] = [r["domain"] for r in rows]
        if self.kind in ("test", "predict"):
            prompts = [r["prompt_ids"] or [] for r in rows]
            batch["prompt_ids"] = prompts
            batch["reference"] = [r["reference"] or "" for r in rows]
            batch["prompt_input_ids"] = _pad(prompts, self.pad_id, left=True)  # (B, P)
            batch["prompt_attention_mask"] = _pad([[1] * len(p) for p in prompts], 0, left=True)  # (B, P)
        return batch


def take_batches(
    loader: Iterable[dict[str, Any]], n: int, keys: Sequence[str] = ("input_ids", "attention_mask", "labels")
) -> list[dict[str, Any]]:
    """The first ``n`` batches of ``loader``, each reduced to the ``keys`` it has (calibration, probes)."""
    return [{k: batch[k] for k in keys if k in batch} for batch in itertools.islice(loader, n)]
