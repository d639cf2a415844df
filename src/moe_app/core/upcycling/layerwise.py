"""Upcycling one decoder layer at a time, for loading an upcycled model straight into shards.

:func:`~moe_app.core.upcycling.surgery.upcycle` replaces every selected MLP in place, so the
upcycled model (E copies of every FFN, about ``E`` times the dense FFN memory) exists in full at
once. Under sharded training (FSDP) that full model is never needed: each process keeps only its
``1 / world_size`` slice of every tensor. :class:`LayerwiseUpcycle` therefore splits the surgery:

* the *structure* of the upcycled model is built on the ``meta`` device (the same ``_operate``
  code on a meta copy of the dense model), with the same ``MoeSpec`` attached;
* the *weights* of decoder layer ``i`` are made when they are asked for (:meth:`tensors`), by
  running the same surgery on that one layer of the real dense model, and the layer is released
  right after, so the holder's peak is the dense model plus one upcycled layer. With ``fetch``
  (a reader of named dense tensors, e.g. ``moe_app.checkpoint.lazy_dense``) the dense model itself
  stays on meta too and each layer is read from disk when it is upcycled: the peak is one layer.

Everything data-dependent (calibration for ``split='importance'`` or k-means router inits) is
measured up front on the whole dense model, exactly as ``upcycle`` does, so the layer-by-layer
weights equal ``upcycle``'s bit for bit (sparse upcycling, Komatsuzaki et al. 2023; the per-layer
seeds of ``moe_app.core.upcycling.rng`` make every layer independent of the others).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from moe_app.core.spec import attach_spec, spec_of
from moe_app.core.upcycling.config import UpcycleConfig
from moe_app.core.upcycling.surgery import _calibrate, _operate, _plan, _record
from moe_app.core.utils.weights import meta_copy


class LayerwiseUpcycle:
    """A :class:`~moe_app.core.utils.weights.WeightSource` for ``upcycle(model, cfg)``.

    ``skeleton`` is the upcycled structure (parameters on meta, spec attached); :meth:`tensors`
    gives the real upcycled values, computing each decoder layer when one of its parameters is
    first asked for. ``model`` (the dense model) is consumed: its layers are released as they are
    served. Validation and calibration happen in the constructor, before anything is changed.
    With ``fetch``, ``model`` may be on meta: layer ``i``'s dense weights are read with
    ``fetch(names)`` just before it is upcycled (not with calibration, which needs them all).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: UpcycleConfig,
        calibration: Iterable[Any] | None = None,
        *,
        data_description: Any = None,
        fetch: Callable[[Sequence[str]], dict[str, Tensor]] | None = None,
    ) -> None:
        if fetch is not None and cfg.needs_calibration:
            raise ValueError("calibration runs the whole dense model: pass it loaded, without fetch")
        self.cfg = cfg
        self._model = model
        self._fetch = fetch
        self._plan = _plan(model, cfg)
        self._stats = _calibrate(model, cfg, self._plan, calibration)
        previous = spec_of(model)
        skeleton = meta_copy(model)
        meta_plan = _plan(skeleton, cfg)
        _operate(skeleton, cfg, meta_plan, self._stats)
        attach_spec(skeleton, _record(skeleton, cfg, meta_plan, previous, data_description))
        self.skeleton = skeleton
        self._layer_re = re.compile(rf"^{re.escape(self._plan.path)}\.(\d+)\.")
        self._pending: dict[int, dict[str, Tensor]] = {}
        self._rest: dict[str, Tensor] | None = None

    def _layer_of(self, name: str) -> int | None:
        m = self._layer_re.match(name)
        return int(m.group(1)) if m else None

    def _make_layer(self, i: int) -> dict[str, Tensor]:
        """Upcycle layer ``i`` of the dense model for real, take its parameters, release the layer."""
        plan = self._plan
        layer = plan.layers[i]
        if self._fetch is not None:  # read this dense layer now (it is on meta until then)
            prefix = f"{plan.path}.{i}."
            dense = self._fetch([prefix + n for n, _ in layer.named_parameters()])
            layer.load_state_dict(
                {n.removeprefix(prefix): t for n, t in dense.items()}, strict=False, assign=True
            )
        one = dataclasses.replace(plan, selected=[i] if i in plan.selected else [])
        _operate(self._model, self.cfg, one, self._stats)
        out = {f"{plan.path}.{i}.{n}": p.detach() for n, p in layer.named_parameters()}
        # drop every reference to the real layer: the model's list gets its meta twin
        container = self._model.get_submodule(plan.path)
        container[i] = meta_copy(layer)
        plan.layers[i] = container[i]
        plan.parts.pop(i, None)
        return out

    def tensors(self, names: Sequence[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in names:
            i = self._layer_of(name)
            if i is None:
                if self._rest is None:  # embeddings, final norm, LM head: unchanged by the surgery
                    params = self._model.named_parameters()
                    self._rest = {n: p.detach() for n, p in params if self._layer_of(n) is None}
                    if self._fetch is not None:
                        self._rest = self._fetch(list(self._rest))
                out[name] = self._rest.pop(name)
                continue
            if i not in self._pending:
                self._pending[i] = self._make_layer(i)
            layer = self._pending[i]
            out[name] = layer.pop(name)
            if not layer:
                del self._pending[i]
        return out


__all__ = ["LayerwiseUpcycle"]
