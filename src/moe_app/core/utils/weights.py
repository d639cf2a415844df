"""Weights handed out a few tensors at a time, for loading a model straight into its shards.

A sharded data-parallel run (FSDP, ZeRO-3; Rajbhandari et al. 2020) only needs ``1 / world_size``
of the model on each process, but the usual recipe still builds the full model on every process
and shards it afterwards, so the loading peak is the full model per process. The cure is to build
the model's *structure* with parameters on the ``meta`` device (no storage) everywhere, shard it,
and fill the shards from one process that produces the real tensors piece by piece.

:class:`WeightSource` is what that process holds: a skeleton (the structure, parameters on meta)
and a way to get the full value of some parameters by name. :class:`ModuleWeights` serves them
from a model that was built whole; ``moe_app.core.upcycling.layerwise`` serves an upcycled model
one decoder layer at a time without ever building it whole.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class WeightSource(Protocol):
    """The full values of a model's parameters, asked for a group at a time."""

    skeleton: nn.Module
    """The model's structure: parameters on ``meta`` (names, shapes, dtypes, ``requires_grad``),
    buffers real, the MoE spec attached."""

    def tensors(self, names: Sequence[str]) -> dict[str, Tensor]:
        """Full values of the named skeleton parameters. Each name is asked for once; a source may
        free what it no longer needs after answering (callers ask one decoder layer at a time)."""
        ...


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on ``meta`` and their buffers for real.

    ``with torch.device("meta")`` would put buffers there too, and some are computed at
    construction and never saved (rotary ``inv_freq``), so they could not be filled later. Each
    parameter is moved to meta as it is registered: at most one is ever allocated (and, under
    ``transformers``' ``no_init_weights``, never written, so it costs no resident memory).
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s structure whose parameters are on ``meta`` (no storage is copied).

    Parameters are pre-seeded into ``deepcopy``'s memo, so tied parameters stay tied and the copy
    costs only the Python objects. Buffers are copied for real: they are small (rotary tables,
    masks) and sharding leaves them whole.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


class ModuleWeights:
    """A :class:`WeightSource` over a model that exists in full (e.g. loaded from a checkpoint).

    Each parameter is released (its storage replaced by an empty tensor) once it has been handed
    out, so the holder's memory falls while the shards fill instead of adding up.
    """

    def __init__(self, model: nn.Module) -> None:
        self.skeleton = meta_copy(model)
        self._params: dict[str, nn.Parameter] = dict(model.named_parameters())

    def tensors(self, names: Sequence[str]) -> dict[str, Tensor]:
        out = {}
        for name in names:
            p = self._params.pop(name)
            out[name] = p.detach()
            p.data = torch.empty(0, dtype=p.dtype)  # the caller's reference keeps the value alive
        return out


class FetchedWeights:
    """A :class:`WeightSource` over a checkpoint that is read, not loaded: ``skeleton`` was built
    from the checkpoint's config (parameters on meta, buffers real and already filled) and
    ``fetch(names)`` reads the named tensors from its files when asked, so the holder's peak is
    one decoder layer instead of the whole model."""

    def __init__(self, skeleton: nn.Module, fetch: Callable[[Sequence[str]], dict[str, Tensor]]) -> None:
        self.skeleton = skeleton
        self._fetch = fetch

    def tensors(self, names: Sequence[str]) -> dict[str, Tensor]:
        return self._fetch(names)


__all__ = ["FetchedWeights", "ModuleWeights", "WeightSource", "meta_copy", "params_on_meta"]
