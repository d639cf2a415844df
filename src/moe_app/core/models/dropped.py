"""A decoder layer's MLP sublayer removed by layer drop (He et al. 2024, arXiv 2406.02500).

Hugging Face decoder layers compute ``h + mlp(norm(h))`` with no switch to skip the MLP, so a
removed MLP is a parameter-free :class:`DroppedMlp` returning zeros: the residual stream passes
through unchanged (``h + 0 == h`` exactly) and nothing of the MLP is left in the module tree, the
state dict or the checkpoint.

The norm in front of it is removed too (:class:`DroppedNorm`, a parameter-free identity) where the
layer's ``forward`` uses it for nothing but the MLP's input. That is read from the source of the
layer class (:func:`mlp_norm_removable`): the norm's output is assigned to ``hidden_states`` and
overwritten on the next line by ``self.mlp(hidden_states)``, the pre-norm LLaMA layout that LLaMA,
Mistral, Qwen2/3, Mixtral, Qwen2/3-MoE, OLMoE and Phi-3 share in transformers. Elsewhere (OLMo2
and Gemma-2/3, whose ``post_attention_layernorm`` normalises the *attention* output, or a source
that cannot be read) the norm stays with its weight and keeps running: removing it there would
change the model, and skipping it otherwise would mean patching transformers' code.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor, nn

MLP_NORM = "post_attention_layernorm"
"""The attribute name of the norm in front of the MLP in the pre-norm LLaMA layout."""

_NORM_LINE = f"hidden_states = self.{MLP_NORM}(hidden_states)"
_MLP_LINE = "hidden_states = self.mlp(hidden_states)"


class DroppedMlp(nn.Module):
    """A removed MLP sublayer: no parameters, ``x -> zeros_like(x)`` so that ``h + mlp(.) == h``."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return torch.zeros_like(hidden_states)


class DroppedNorm(nn.Identity):
    """The pre-MLP norm of a removed MLP: its output only fed the MLP, so it is not computed."""


@functools.cache
def _norm_feeds_only_mlp(cls: type) -> bool:
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    lines = [ln.strip() for ln in src.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    uses = [i for i, ln in enumerate(lines) if f"self.{MLP_NORM}" in ln]
    calls = [ln for ln in lines if "self.mlp(" in ln]
    if len(uses) != 1 or len(calls) != 1:
        return False
    i = uses[0]
    return lines[i] == _NORM_LINE and i + 1 < len(lines) and lines[i + 1] == _MLP_LINE


def mlp_norm_removable(layer: nn.Module) -> bool:
    """Whether ``layer.post_attention_layernorm`` feeds nothing but ``layer.mlp`` (see module doc)."""
    norm = getattr(layer, MLP_NORM, None)
    return isinstance(norm, nn.Module) and _norm_feeds_only_mlp(type(layer))


def is_dropped(layer: nn.Module) -> bool:
    """Whether ``layer``'s MLP sublayer has been removed."""
    return isinstance(getattr(layer, "mlp", None), DroppedMlp)


def norm_dropped(layer: nn.Module) -> bool:
    """Whether ``layer``'s pre-MLP norm has been removed along with its MLP."""
    return isinstance(getattr(layer, MLP_NORM, None), DroppedNorm)


def remove_mlp(layer: nn.Module, norm: bool | None = None) -> bool:
    """Replace ``layer.mlp`` by :class:`DroppedMlp` and, if ``norm`` (default: where
    :func:`mlp_norm_removable`), the norm in front of it by :class:`DroppedNorm`.

    Returns whether the norm was removed. ``norm=True`` where the layout does not allow it raises
    ``ValueError`` (a checkpoint saved under a transformers whose layer layout allowed it).
    """
    removable = norm_dropped(layer) or mlp_norm_removable(layer)
    if norm is None:
        norm = removable
    if norm and not removable:
        raise ValueError(
            f"{type(layer).__name__}.forward does not feed `{MLP_NORM}` only to the MLP, so the norm cannot be removed"
        )
    layer.mlp = DroppedMlp()
    if norm:
        setattr(layer, MLP_NORM, DroppedNorm())
    return bool(norm)


__all__ = [
    "MLP_NORM",
    "DroppedMlp",
    "DroppedNorm",
    "is_dropped",
    "mlp_norm_removable",
    "norm_dropped",
    "remove_mlp",
]
