"""The two statistics every layer above computes from a forward: token NLL and expert load.

One implementation each, used by the training modules (loss, test report, load logging), the
mixture probe (dev losses, gate loads), pruning (evaluation loss) and the router losses, so that
"loss" and "load" mean the same thing in every table the project prints.

* Next-token NLL: position ``t`` predicts label ``t + 1`` (Hugging Face labels are aligned with
  ``input_ids``, the shift happens here); labels equal to ``IGNORE_INDEX`` (-100) do not count.
  Computed in float32 whatever the logits' dtype.
* Expert load: routing slots per expert over the real tokens; ``-1`` marks a skipped slot
  (dynamic skipping) and is not counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def labels_from_mask(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Language-model labels that count every real token: ``input_ids`` with padding set to -100."""
    return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token NLL per position (0 where unlabelled) and the label mask: ``(B, S-1)``, ``(B, S-1)``."""
    shift_logits = logits[:, :-1].float()  # (B, S-1, V)
    shift_labels = labels[:, 1:]  # (B, S-1)
    mask = shift_labels != IGNORE_INDEX
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels.clamp_min(0), reduction="none")
    return nll * mask, mask  # (B, S-1), (B, S-1)


def example_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token NLL and number of labelled tokens per example: ``(B,)``, ``(B,)``."""
    nll, mask = token_nll(logits, labels)
    return nll.sum(dim=1), mask.sum(dim=1)


def expert_load(indices: Tensor, num_experts: int, mask: Tensor | None = None) -> Tensor:
    """Float32 ``(E,)`` routing slots per expert over the tokens ``mask`` keeps (all if ``None``).

    ``indices (T, k)`` are the routed experts, ``-1`` for a skipped slot; ``mask (T,)`` is bool.
    """
    slots = (indices if mask is None else indices[mask]).reshape(-1)  # (T'*k,)
    slots = slots[slots >= 0]
    return torch.bincount(slots, minlength=num_experts).float()  # (E,)


__all__ = ["IGNORE_INDEX", "example_nll", "expert_load", "labels_from_mask", "token_nll"]
