"""Run a causal LM one decoder layer at a time, for pruning checkpoints larger than memory.

Lu et al. 2024 ("Not All Experts are Equal", arXiv 2402.14800) prune expert layers one after the
other: the calibration activations of layer ``i + 1`` are the outputs of layer ``i`` (already
pruned, in the progressive variant). That order needs only *one* layer's weights at a time if the
hidden states ``(B, S, d)`` of the calibration batches are carried from layer to layer instead of
re-running the model. This module is the model side of that loop (the checkpoint side, reading one
layer's tensors from memory-mapped shards and writing the result, is
:mod:`moe_app.checkpoint.prune_streaming`):

* :class:`LayerRunner` computes what the whole model computes for one layer: the input
  embeddings, one decoder layer's output, or the logits of the final hidden state. A layer is run
  *inside its model's own forward* (``inputs_embeds`` = the carried states, every other layer
  replaced by a pass-through, the final norm by the identity), so the attention mask, rotary
  embeddings and per-layer attention type (sliding window layers) are built by transformers
  exactly as in a full forward: the result is bitwise the whole model's, whatever the architecture.
* :func:`record_block_io` / :func:`block_inputs` record an MoE block's input ``X`` and output ``Z``
  on the non-padding tokens, one ``(T_b, d)`` tensor per batch, as
  :func:`~moe_app.core.pruning.calibration.capture_block_io` does on the whole model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from moe_app.core.models.layers import find_decoder_layers
from moe_app.core.moe.stats import labels_from_mask, token_nll
from moe_app.errors import UnsupportedModelError


class _PassThrough(nn.Module):
    """Stands in for the layers not being run: returns its input unchanged."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


class LayerRunner:
    """Embeddings, one decoder layer, or the LM head of ``model``, each as the full forward computes it.

    Only the modules a call uses need real weights; the rest of ``model`` may stay on the ``meta``
    device (except the non-persistent buffers the base model's forward reads, e.g. rotary frequencies).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        path, layers = find_decoder_layers(model)
        parent, _, self.attr = path.rpartition(".")
        self.base = model.get_submodule(parent) if parent else model
        self.path = path
        self.num_layers = len(layers)
        if not isinstance(getattr(self.base, "norm", None), nn.Module):
            raise UnsupportedModelError(
                f"{type(self.base).__name__} has no final `norm` module next to `{path}`",
                fix="layer-streamed pruning supports LLaMA-style decoders (Mixtral, Qwen-MoE, OLMoE, moe-app)",
            )

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.base, self.attr)

    @torch.no_grad()
    def embed(self, input_ids: Tensor) -> Tensor:
        """The input embeddings ``(B, S, d)`` of ``input_ids (B, S)``."""
        return self.model.get_input_embeddings()(input_ids)

    @torch.no_grad()
    def layer(self, index: int, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Decoder layer ``index`` (the module now at that position) on ``hidden (B, S, d)`` -> ``(B, S, d)``."""
        layers, norm = self.layers, self.base.norm
        only = nn.ModuleList([_PassThrough()] * index + [layers[index]])
        setattr(self.base, self.attr, only)
        self.base.norm = nn.Identity()
        try:
            out = self.base(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False)
        finally:
            setattr(self.base, self.attr, layers)
            self.base.norm = norm
        return out[0]

    @torch.no_grad()
    def logits(self, hidden: Tensor) -> Tensor:
        """``lm_head(norm(hidden))``: ``(B, S, V)``, what the causal LM returns for the final states."""
        return self.model.get_output_embeddings()(self.base.norm(hidden))

    @torch.no_grad()
    def loss_terms(self, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[float, int]:
        """``(summed next-token NLL, counted tokens)`` of one batch, as
        :func:`~moe_app.core.pruning.calibration.eval_loss` sums them."""
        nll, counted = token_nll(self.logits(hidden), labels_from_mask(input_ids, attention_mask))
        return float(nll.sum()), int(counted.sum())


def block_io_hook(
    module: nn.Module, mask: Callable[[], Tensor], xs: list[Tensor], zs: list[Tensor] | None = None
) -> Any:
    """A forward hook on ``module`` (returned: its handle) appending, on every forward, its input (and
    output) on the tokens where ``mask()`` ``(B*S,)`` is true to ``xs`` (and ``zs``): ``(T_b, d)``
    CPU tensors."""

    def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        keep = mask()
        xs.append(x.reshape(-1, x.shape[-1])[keep].detach().cpu())  # (T_b, d)
        if zs is not None:
            z = out[0] if isinstance(out, (tuple, list)) else out
            zs.append(z.reshape(-1, z.shape[-1])[keep].detach().cpu())  # (T_b, d)

    return module.register_forward_hook(hook, with_kwargs=True)


@contextlib.contextmanager
def record_block_io(
    module: nn.Module, mask: Callable[[], Tensor], xs: list[Tensor], zs: list[Tensor] | None = None
) -> Iterator[None]:
    """:func:`block_io_hook` while the context is active."""
    handle = block_io_hook(module, mask, xs, zs)
    try:
        yield
    finally:
        handle.remove()


class _Stop(Exception):
    """Ends a layer's forward once the block input is recorded."""


@torch.no_grad()
def block_inputs(
    runner: LayerRunner, index: int, module: nn.Module, hidden: Tensor, attention_mask: Tensor
) -> Tensor:
    """The input ``(T_b, d)`` of ``module`` (inside layer ``index``) on the non-padding tokens,
    without running the block itself."""
    got: list[Tensor] = []
    keep = attention_mask.reshape(-1).bool()

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        got.append(x.reshape(-1, x.shape[-1])[keep].detach().cpu())  # (T_b, d)
        raise _Stop

    handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with contextlib.suppress(_Stop):
            runner.layer(index, hidden, attention_mask)
    finally:
        handle.remove()
    return got[0]


__all__ = ["LayerRunner", "block_inputs", "block_io_hook", "record_block_io"]
