"""Router initialisation for upcycled layers.

* ``normal``: ``N(0, std)`` (std 0.02 as in the LLaMA-MoE / Mixtral initialisers).
* ``zeros``: uniform routing; with ``top_k = E`` every weight is ``1 / E`` (renormalised or not),
  the setting under which neuron partition is exactly dense.
* ``kmeans`` (LLaMA-MoE v2): centroids of balanced k-means over the layer's MLP-input hidden states
  on calibration data. We cluster directions (cosine k-means) and rescale each unit centroid to the
  row norm a ``normal(0, std)`` row has on average (``std * sqrt(d)``), so logits start at the same
  magnitude as the default init while the argmax already sends each token to the expert of its
  nearest cluster. With the importance split the same clusters define the expert groups, so
  router row ``c`` points at the tokens expert ``c`` was built for.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moe_app.core.upcycling.rng import layer_generator


def init_router_weight(
    method: str,
    num_experts: int,
    hidden_size: int,
    *,
    std: float = 0.02,
    seed: int = 0,
    layer: int = 0,
    purpose: str = "router",
    centroids: Tensor | None = None,
) -> Tensor:
    """Router weight ``(E, d)`` in float32 on CPU (the caller casts and moves it)."""
    if method == "zeros":
        return torch.zeros(num_experts, hidden_size)
    if method == "normal":
        g = layer_generator(seed, layer, purpose)
        return torch.randn(num_experts, hidden_size, generator=g) * std  # (E, d)
    if method == "kmeans":
        if centroids is None or centroids.shape != (num_experts, hidden_size):
            raise ValueError(f"kmeans router init needs centroids of shape ({num_experts}, {hidden_size})")
        unit = torch.nn.functional.normalize(centroids.float().cpu(), dim=-1)  # (E, d)
        return unit * (std * math.sqrt(hidden_size))
    raise ValueError(f"unknown router init {method!r}")
