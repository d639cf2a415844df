"""Packing short tokenised examples into ``max_length`` blocks (fewer pad tokens per batch).

Best-fit decreasing: examples are taken longest first and each goes into the open block with the
least room that still fits it (O(n * max_length) with one bucket per free-space size), so blocks
are well filled and the result is deterministic. Examples are never split across blocks.

Packed examples attend to earlier examples of the same block (plain concatenation packing, no
block-diagonal mask: the batch contract has no ``position_ids``), but no loss is taken on
predicting an example's first token from the previous example: its label is set to ``-100``.
"""

from __future__ import annotations

from collections.abc import Sequence

from moe_app.core.data.templates import IGNORE_INDEX


def pack_sequences(
    sequences: Sequence[tuple[list[int], list[int]]], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """Pack ``(input_ids, labels)`` pairs (each at most ``max_length`` long) into blocks.

    Returns ``(input_ids, labels)`` blocks, each at most ``max_length`` tokens, holding every input
    token exactly once.
    """
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i][0]), i))
    blocks: list[list[int]] = []  # indices of the sequences in each block
    free_to_blocks: list[list[int]] = [[] for _ in range(max_length + 1)]  # free space -> block ids
    free_of: list[int] = []
    for i in order:
        n = len(sequences[i][0])
        if n > max_length:
            raise ValueError(f"sequence {i} has {n} tokens > max_length {max_length}; truncate first")
        if n == 0:
            continue
        target = next((f for f in range(n, max_length + 1) if free_to_blocks[f]), None)
        if target is None:
            b = len(blocks)
            blocks.append([])
            free_of.append(max_length)
        else:
            b = free_to_blocks[target].pop()
        blocks[b].append(i)
        free_of[b] -= n
        free_to_blocks[free_of[b]].append(b)
    packed = []
    for members in blocks:
        ids: list[int] = []
        labels: list[int] = []
        for j, i in enumerate(members):
            seq_ids, seq_labels = sequences[i]
            ids += seq_ids
            # Position 0 of a later example would be "predicted" from the previous example.
            labels += ([IGNORE_INDEX, *seq_labels[1:]]) if j > 0 else seq_labels
        packed.append((ids, labels))
    return packed
