"""Calibration token batches for data-driven surgery (importance split, k-means router init).

Sources: ``"builtin"`` (the offline suite of ``moe_app.core.data``: its pre-training text plus the
instruction domains rendered as plain text), or a local ``.jsonl`` file (``text``, ``messages``,
``prompt``/``response`` or ``instruction``/``input``/``output`` records) or ``.txt`` file
(paragraphs separated by blank lines). Texts are tokenised and packed into ``(1, seq_len)``
rows (no padding, every token counts) until ``max_tokens`` tokens are collected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moe_app.errors import ConfigError, DataError


def _record_text(rec: Any, where: str) -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict):
        if isinstance(rec.get("text"), str):
            return rec["text"]
        if isinstance(rec.get("messages"), list):
            return "\n".join(str(m.get("content", "")) for m in rec["messages"] if isinstance(m, dict))
        for a, b in (("prompt", "response"), ("prompt", "completion"), ("question", "answer")):
            if a in rec:
                return f"{rec[a]}\n{rec.get(b, '')}"
        if "instruction" in rec:
            return "\n".join(str(rec.get(k, "")) for k in ("instruction", "input", "output") if rec.get(k))
    raise DataError(
        "calibration record has no text",
        where=where,
        fix="give each line a 'text' field (or 'messages', 'prompt'/'response', 'instruction'/'output')",
    )


def builtin_texts(n: int = 256, seed: int = 0) -> list[str]:
    """Plain texts from the built-in offline suite (pre-training documents + instruction examples)."""
    from moe_app.core.data.synthetic import generate_pretrain, generate_suite

    texts = [ex.text for ex in generate_pretrain("train", n, seed)]
    for ex in generate_suite("train", max(1, n // 8), seed):
        texts.append("\n".join(m.content for m in ex.messages) if ex.messages else ex.text)
    return texts


def calibration_texts(source: str) -> list[str]:
    """The texts of a calibration source: ``builtin`` or a local .jsonl / .txt path."""
    if source == "builtin":
        return builtin_texts()
    p = Path(source).expanduser()
    if not p.is_file():
        raise ConfigError(
            "calibration file not found", where=str(p), fix="pass an existing .jsonl/.txt file or 'builtin'"
        )
    texts = []
    if p.suffix in (".jsonl", ".json"):
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"invalid JSON ({e.msg})", where=f"{p}:{n}", fix="one JSON object per line"
                ) from e
            texts.append(_record_text(rec, f"{p}:{n}"))
    else:
        texts = [t.strip() for t in p.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    if not texts:
        raise DataError("calibration file holds no text", where=str(p), fix="add some text")
    return texts


def tokenize_calibration(
    texts: list[str], tokenizer: Any, seq_len: int = 512, max_tokens: int = 16384
) -> list[dict[str, torch.Tensor]]:
    """Tokenise and pack texts into ``(1, seq_len)`` batches, at most ``max_tokens`` tokens in all."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for t in texts:
        stream.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(int(eos))
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    if not stream:
        raise DataError("calibration text tokenised to nothing", where="calibration", fix="pass more text")
    batches = []
    for i in range(0, len(stream), seq_len):
        ids = torch.tensor(stream[i : i + seq_len], dtype=torch.long).unsqueeze(0)  # (1, S)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches
