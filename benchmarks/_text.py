"""Real English prose available offline, tokenised and split into disjoint evaluation slices.

No data set can be downloaded here, and the project's synthetic suite is not natural language, so
perplexity claims about real checkpoints use the prose of the Python reference documentation that
ships with every CPython: ``pydoc_data.topics.topics`` (a dict of ~80 topic names to the plain-text
help pages that ``help("with")`` etc. print; ~465k characters of English with some code samples).

The text is the topics in sorted-key order joined by blank lines, tokenised once, and cut into
consecutive non-overlapping blocks of ``seq_len`` tokens (the ragged tail is dropped). Blocks are
then dealt out, in order, to the named slices: the first ``eval`` blocks are the held-out
evaluation slice, the next ``calibration`` blocks feed data-driven surgery (importance split), the
next ``train`` blocks are continued pre-training data. The slices never share a token.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

SOURCE = "pydoc_data.topics.topics (CPython {version} reference docs), topics in sorted-key order"


def pydoc_text() -> str:
    """The Python reference documentation's topic pages, sorted by key, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def source_description() -> str:
    import platform

    return SOURCE.format(version=platform.python_version())


@dataclass
class TextSlices:
    """Disjoint ``(blocks, seq_len)`` int64 token slices of one tokenised text."""

    total_tokens: int
    """Tokens in the whole text (before cutting into blocks)."""
    seq_len: int
    slices: dict[str, Tensor]

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {t.shape[0]} x {self.seq_len} = {t.numel()} tokens" for name, t in self.slices.items()
        )
        return f"{self.total_tokens} tokens in all; blocks of {self.seq_len} in order: {parts}"


def split_blocks(ids: Tensor, seq_len: int, sizes: dict[str, int]) -> TextSlices:
    """Cut the 1-D token stream ``ids`` into blocks and deal ``sizes[name]`` blocks to each slice, in order."""
    n_blocks = ids.numel() // seq_len
    need = sum(sizes.values())
    if need > n_blocks:
        raise ValueError(
            f"asked for {need} blocks of {seq_len} tokens but the text has only {n_blocks}; "
            "lower the slice sizes or the sequence length"
        )
    blocks = ids[: n_blocks * seq_len].reshape(n_blocks, seq_len)  # (n_blocks, S)
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = blocks[start : start + n].clone()
        start += n
    return TextSlices(total_tokens=ids.numel(), seq_len=seq_len, slices=out)


def pydoc_slices(tokenizer, seq_len: int, sizes: dict[str, int]) -> TextSlices:
    """Tokenise :func:`pydoc_text` with ``tokenizer`` (no special tokens) and split it (:func:`split_blocks`)."""
    ids = tokenizer(pydoc_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return split_blocks(ids.long(), seq_len, sizes)


__all__ = ["TextSlices", "pydoc_slices", "pydoc_text", "source_description", "split_blocks"]
