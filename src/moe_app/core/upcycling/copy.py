"""Experts by copying the dense FFN: sparse upcycling, noisy copies and Drop-Upcycling.

* ``copy`` (Komatsuzaki et al. 2023, "Sparse Upcycling"): every expert is the dense SwiGLU FFN.
  With renormalised top-k routing the combine weights sum to one, so the MoE computes exactly the
  dense function at initialisation, whatever the router (ALGORITHMS.md section 2).
* ``noise``: copies plus Gaussian noise, std relative to each source matrix's std, to break the
  symmetry between experts.
* ``drop`` (Nakamura et al., ICLR 2025, "Drop-Upcycling"): for each expert re-initialise a random
  fraction ``r`` of the intermediate neurons (rows of W_gate / W_up, columns of W_down) from a
  normal with the source matrix's mean and std. Experts start diverse yet keep most of the
  dense knowledge; the paper uses ``r = 0.5``.

Randomness is computed in float32 on CPU from per-(layer, expert) generators and cast back to the
source dtype, so results are independent of device and processing order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_app.core.upcycling.rng import layer_generator


def copy_experts(
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    num_experts: int,
    *,
    method: str = "copy",
    noise_std: float = 0.0,
    drop_ratio: float = 0.5,
    seed: int = 0,
    layer: int = 0,
) -> tuple[Tensor, Tensor]:
    """Build stacked expert weights from one dense FFN.

    ``w_gate``/``w_up`` ``(F, d)``, ``w_down`` ``(d, F)``. Returns ``gate_up (E, 2F, d)`` and
    ``down (E, d, F)`` in the dtype and device of the inputs.
    """
    if method == "copy" or (method == "noise" and noise_std == 0) or (method == "drop" and drop_ratio == 0):
        f = w_gate.shape[0]
        # Written in place (no (2F, d) temporary): streaming conversion's peak is one layer's experts.
        gate_up = w_gate.new_empty(num_experts, 2 * f, w_gate.shape[1])  # (E, 2F, d)
        gate_up[:, :f] = w_gate
        gate_up[:, f:] = w_up
        return gate_up, w_down.unsqueeze(0).expand(num_experts, -1, -1).clone()  # (E, d, F)
    if method == "noise":
        return _noisy(w_gate, w_up, w_down, num_experts, noise_std, seed, layer)
    if method == "drop":
        return _drop(w_gate, w_up, w_down, num_experts, drop_ratio, seed, layer)
    raise ValueError(f"copy_experts does not build method {method!r}")


def _noisy(w_gate, w_up, w_down, num_experts, noise_std, seed, layer) -> tuple[Tensor, Tensor]:
    gate_ups, downs = [], []
    for e in range(num_experts):
        g = layer_generator(seed, layer, "noise", e)
        mats = []
        for w in (w_gate, w_up, w_down):
            w32 = w.detach().float().cpu()
            noise = torch.randn(w32.shape, generator=g) * (noise_std * w32.std())
            mats.append((w32 + noise).to(dtype=w.dtype, device=w.device))
        gate_ups.append(torch.cat(mats[:2], dim=0))  # (2F, d)
        downs.append(mats[2])  # (d, F)
    return torch.stack(gate_ups), torch.stack(downs)


def drop_indices(num_neurons: int, ratio: float, generator: torch.Generator) -> Tensor:
    """The ``round(ratio * num_neurons)`` neuron indices one expert re-initialises (sorted)."""
    n_drop = round(ratio * num_neurons)
    return torch.randperm(num_neurons, generator=generator)[:n_drop].sort().values


def _drop(w_gate, w_up, w_down, num_experts, ratio, seed, layer) -> tuple[Tensor, Tensor]:
    f = w_gate.shape[0]
    stats = [(w.detach().float().mean(), w.detach().float().std()) for w in (w_gate, w_up, w_down)]
    gate_ups, downs = [], []
    for e in range(num_experts):
        g = layer_generator(seed, layer, "drop", e)
        idx = drop_indices(f, ratio, g)  # (n,)
        n = idx.numel()
        gate, up, down = (w.detach().clone() for w in (w_gate, w_up, w_down))
        (mg, sg), (mu, su), (md, sd) = stats
        gate[idx] = (torch.randn(n, gate.shape[1], generator=g) * sg + mg).to(gate.dtype).to(gate.device)
        up[idx] = (torch.randn(n, up.shape[1], generator=g) * su + mu).to(up.dtype).to(up.device)
        down[:, idx] = (torch.randn(down.shape[0], n, generator=g) * sd + md).to(down.dtype).to(down.device)
        gate_ups.append(torch.cat([gate, up], dim=0))  # (2F, d)
        downs.append(down)  # (d, F)
    return torch.stack(gate_ups), torch.stack(downs)
