"""Calibration data for pruning, skipping and dropping, and the activations captured on it.

Lu et al. 2024 (arXiv 2402.14800) calibrate on 128 x 2048 tokens of C4, and show that calibrating
on a task's own text (task-specific pruning) keeps more of that task. So the text comes from any
source moe-app can read (:class:`moe_app.core.data.sources.SourceConfig`): the built-in suite, one of its
domains, or a local jsonl/json/parquet/csv file, tokenised with the checkpoint's own tokenizer and
template (:func:`moe_app.core.data.templates.encode_examples`), padded into ``(B, S)`` batches with an
``attention_mask``. Padding tokens never enter a statistic.

Capture: forward hooks on the MoE blocks record each block's input ``X`` and output ``Z`` for the
non-padding tokens, one ``(T_b, d)`` tensor per batch, on the CPU (a real model's activations for
all layers do not fit on the accelerator next to it). :func:`capture_block_inputs` runs the model
only as far as one block (an exception from the hook stops the forward), which is what progressive
pruning needs after each pruned layer.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moe_app.core.data.sources import BUILTIN_CHOICES, SourceConfig, load_examples
from moe_app.core.data.templates import encode_examples
from moe_app.core.moe.stats import labels_from_mask, token_nll
from moe_app.errors import ConfigError, DataError

logger = logging.getLogger("moe_app.core.pruning")


@dataclass
class CalibrationConfig:
    """Where calibration text comes from and how much of it is used."""

    data: str = "builtin"
    """``builtin`` (every built-in instruction domain plus pre-training text), ``builtin:<domain>``
    (one domain, e.g. ``builtin:arithmetic`` or ``builtin:pretrain``), or a local
    .jsonl/.json/.parquet/.csv file or directory (any format ``moe_app.core.data.sources`` reads)."""
    num_samples: int = 64
    """Number of examples (sequences) used; the paper used 128 sequences of 2048 tokens."""
    max_length: int = 256
    """Tokens per sequence (longer examples are cut on the right)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    seed: int = 0
    """Seed of the choice of examples."""

    def __post_init__(self) -> None:
        for key in ("num_samples", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(
                    f"calibration {key} must be >= 1, got {getattr(self, key)}", fix=f"set {key}: 64"
                )
        if self.max_length < 2:
            raise ConfigError(f"calibration max_length must be >= 2, got {self.max_length}", fix="use 256")
        source_config(self.data)  # validate the spelling early


def source_config(data: str):
    """The :class:`~moe_app.core.data.sources.SourceConfig` of a ``--data`` value."""

    if not isinstance(data, str) or not data:
        raise ConfigError("empty calibration data spec", fix="use builtin, builtin:<domain> or a file path")
    if data == "builtin":
        return None  # the suite mix, see calibration_examples
    if data.startswith("builtin:"):
        domain = data.split(":", 1)[1]
        if domain not in BUILTIN_CHOICES:
            raise ConfigError(
                f"unknown built-in domain {domain!r}",
                where="--data",
                fix=f"use builtin or builtin:<one of {', '.join(BUILTIN_CHOICES)}>",
            )
        return SourceConfig(name=f"calib-{domain}", builtin=domain)
    return SourceConfig(name="calibration", path=data)


def calibration_examples(data: str | Any, num_samples: int, seed: int = 0) -> list[Any]:
    """``num_samples`` examples of a ``--data`` spec or a ``SourceConfig`` (seeded choice)."""

    if isinstance(data, SourceConfig):
        sources = [data]
    else:
        src = source_config(data)
        sources = (
            [
                SourceConfig(name="calib-all", builtin="all"),
                SourceConfig(name="calib-pretrain", builtin="pretrain"),
            ]
            if src is None
            else [src]
        )
    pool: list[Any] = []
    for s in sources:
        pool.extend(load_examples(s, "train"))
    if not pool:
        where = data.name if isinstance(data, SourceConfig) else str(data)
        raise DataError(
            "the calibration data holds no examples", where=where, fix="point --data at non-empty data"
        )
    random.Random(seed).shuffle(pool)
    return pool[:num_samples]


def encode_batches(
    tokenizer: Any, examples: Sequence[Any], max_length: int, batch_size: int
) -> list[dict[str, Tensor]]:
    """Tokenise examples with the model's template and pad them into ``{"input_ids", "attention_mask"}`` batches."""

    encoded = [
        e for e in encode_examples(tokenizer, list(examples), max_length) if e is not None and e.input_ids
    ]
    if not encoded:
        raise DataError(
            "no calibration tokens after tokenisation",
            where="calibration data",
            fix="use data with text (or conversations with an assistant reply)",
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for i in range(0, len(encoded), batch_size):
        rows = [e.input_ids for e in encoded[i : i + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), int(pad), dtype=torch.long)  # (B, S)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, S)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def calibration_batches(tokenizer: Any, cfg: CalibrationConfig) -> list[dict[str, Tensor]]:
    """Calibration batches for ``cfg`` (examples chosen, tokenised, padded)."""
    examples = calibration_examples(cfg.data, cfg.num_samples, cfg.seed)
    return encode_batches(tokenizer, examples, cfg.max_length, cfg.batch_size)


def normalize_batches(batches: Iterable[Any]) -> list[dict[str, Tensor]]:
    """Accept ``input_ids`` tensors, ``(ids, mask)`` pairs or dicts; return dicts with a mask."""
    out = []
    for item in batches:
        if isinstance(item, dict):
            ids, mask = item["input_ids"], item.get("attention_mask")
        elif isinstance(item, (tuple, list)):
            ids, mask = item[0], item[1] if len(item) > 1 else None
        else:
            ids, mask = item, None
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        out.append({"input_ids": ids, "attention_mask": mask})
    if not out or sum(int(b["attention_mask"].sum()) for b in out) == 0:
        raise DataError(
            "empty calibration data (no non-padding tokens)",
            where="calibration data",
            fix="give at least one non-empty sequence (e.g. --data builtin)",
        )
    return out


def num_tokens(batches: Sequence[dict[str, Tensor]]) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_tensor(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_model(
    model: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    current: dict[str, Any] | None = None,
    stop: type[Exception] | None = None,
) -> None:
    """Forward every batch (hooks do the recording); no cache, no loss.

    ``current["mask"]`` holds the running batch's flattened attention mask ``(B*S,)`` on the
    model's device, for hooks that keep non-padding tokens only. ``stop``: an exception a hook
    raises to end a pass early once it has what it wants.
    """
    dev = _device(model)
    for b in batches:
        if current is not None:
            current["mask"] = b["attention_mask"].reshape(-1).bool().to(dev)
        with contextlib.suppress(*((stop,) if stop else ())):
            model(
                input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev), use_cache=False
            )


@torch.no_grad()
def capture_block_io(
    model: nn.Module,
    modules: dict[int, nn.Module],
    batches: Sequence[dict[str, Tensor]],
    outputs: bool = True,
) -> dict[int, tuple[list[Tensor], list[Tensor]]]:
    """``{key: (X per batch, Z per batch)}``: inputs/outputs ``(T_b, d)`` of ``modules`` on non-padding tokens."""
    store: dict[int, tuple[list[Tensor], list[Tensor]]] = {k: ([], []) for k in modules}
    current: dict[str, Tensor] = {}

    def hook(key: int):
        def fn(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            keep = current["mask"]  # (B*S,)
            xs = x.reshape(-1, x.shape[-1])[keep]  # (T_b, d)
            store[key][0].append(xs.detach().cpu())
            if outputs:
                z = _as_tensor(out)
                store[key][1].append(z.reshape(-1, z.shape[-1])[keep].detach().cpu())  # (T_b, d)

        return fn

    handles = [m.register_forward_hook(hook(k), with_kwargs=True) for k, m in modules.items()]
    try:
        run_model(model, batches, current)
    finally:
        for h in handles:
            h.remove()
    return store


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted activations are recorded."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, module: nn.Module, batches: Sequence[dict[str, Tensor]]
) -> list[Tensor]:
    """Inputs ``(T_b, d)`` of one block per batch, running the model only up to that block."""
    xs: list[Tensor] = []
    current: dict[str, Tensor] = {}

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        xs.append(x.reshape(-1, x.shape[-1])[current["mask"]].detach().cpu())  # (T_b, d)
        raise _Stop

    handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        run_model(model, batches, current, stop=_Stop)  # the hook ends each pass at the block
    finally:
        handle.remove()
    return xs


@torch.no_grad()
def eval_loss(model: nn.Module, batches: Sequence[dict[str, Tensor]], *, use_labels: bool = False) -> float:
    """Mean next-token cross-entropy over ``batches``: every real token, or the batches' ``labels``
    (e.g. assistant tokens only) when ``use_labels`` and they are present."""
    dev = _device(model)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()  # no dropout in an evaluation, whatever mode the caller left the model in
    try:
        for b in batches:
            ids, mask = b["input_ids"].to(dev), b["attention_mask"].to(dev)
            labels = b["labels"].to(dev) if use_labels and "labels" in b else labels_from_mask(ids, mask)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, S, V)
            nll, counted = token_nll(logits, labels)  # (B, S-1), (B, S-1)
            total += float(nll.sum())
            count += int(counted.sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


__all__ = [
    "CalibrationConfig",
    "calibration_batches",
    "calibration_examples",
    "capture_block_inputs",
    "capture_block_io",
    "encode_batches",
    "eval_loss",
    "normalize_batches",
    "num_tokens",
    "run_model",
    "source_config",
]
