"""Router auxiliary losses and routing statistics (ALGORITHMS.md section 1).

Pure functions on the pieces of a :class:`~moe_app.core.moe.router.RoutingOutput`, each taking an
optional token ``mask (T,)`` (true / 1 = real token) so that padding never enters a statistic:

* :func:`load_balancing_loss`: Switch Transformer / GShard (Fedus et al. 2021, Lepikhin et al.
  2020) ``L = E * sum_e f_e * P_e``, ``f_e`` the fraction of routing slots sent to ``e`` and
  ``P_e`` the mean FULL softmax probability of ``e``. It equals 1 at perfect balance and its
  gradient flows through ``P``. The PESC and LLaMA-MoE v2 reference code compute ``P`` from the
  renormalised top-k weights instead, which makes the loss the constant ``E`` with zero gradient;
  we do not.
* :func:`cv_squared_loss`: LLaMA-MoE v1 (Zhu et al. 2024), after Shazeer et al. 2017,
  ``CV^2(importance) + CV^2(load)``.
* :func:`router_z_loss`: ST-MoE (Zoph et al. 2022) ``mean(logsumexp(z)^2)``, keeps logits small
  so the float32 softmax stays well conditioned.

:func:`model_router_losses` averages them over every MoE layer of a model, reading the
``last_routing`` each block records on itself during the forward (never global lists).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe_app.core.moe.block import find_moe_blocks
from moe_app.core.moe.router import RoutingOutput
from moe_app.core.moe.stats import expert_load
from moe_app.errors import ConfigError

LOSS_KINDS = ("balance", "z", "cv")


def _token_mask(mask: Tensor | None, num_tokens: int, device: torch.device) -> Tensor:
    """A bool ``(T,)`` mask of real tokens; ``None`` means every token counts."""
    if mask is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    mask = mask.reshape(-1).to(device=device).bool()  # (T,)
    if mask.numel() != num_tokens:
        raise ValueError(
            f"mask has {mask.numel()} entries but the routing covers {num_tokens} tokens; pass the "
            "attention mask of the same batch, flattened to (batch * seq,)."
        )
    return mask


def load_balancing_loss(
    probs: Tensor, indices: Tensor, num_experts: int, mask: Tensor | None = None
) -> Tensor:
    """``E * sum_e f_e * P_e`` over the real tokens; 0 when there are none.

    ``probs (T, E)`` full softmax, ``indices (T, k)`` with -1 for skipped slots. ``f`` carries no
    gradient (it counts); the gradient reaches the router through ``P``.
    """
    valid = _token_mask(mask, probs.shape[0], probs.device)  # (T,)
    counts = expert_load(indices, num_experts, valid)  # (E,)
    n_tokens = valid.sum()
    if n_tokens == 0 or counts.sum() == 0:
        return probs.sum() * 0.0
    f = counts / counts.sum()  # (E,)
    P = probs.float()[valid].mean(dim=0)  # (E,)
    return num_experts * (f * P).sum()


def cv_squared(v: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``Var(v) / (mean(v)^2 + eps)`` (unbiased variance, as Shazeer's code)."""
    if v.numel() < 2:
        return v.sum() * 0.0
    v = v.float()
    return v.var() / (v.mean() ** 2 + eps)


def cv_squared_loss(
    weights: Tensor, indices: Tensor, probs: Tensor, num_experts: int, mask: Tensor | None = None
) -> Tensor:
    """LLaMA-MoE v1 balance loss ``CV^2(importance) + CV^2(load)`` (multiply by 0.01 as v1 does).

    importance_e = sum over real tokens of the sparse top-k combine weight given to ``e``
    (differentiable). load_e = number of real tokens routed to ``e``: this is v1's own choice when
    noise is off (``_gates_to_load``). v1's smooth ``P(e in top-k)`` load needs the clean logits
    and the noise scale, which a ``RoutingOutput`` does not carry, so we count in every mode; the
    load term then carries no gradient and the gradient comes from the importance term.
    ``probs`` is accepted for signature symmetry with :func:`load_balancing_loss` and unused.
    """
    del probs
    valid = _token_mask(mask, weights.shape[0], weights.device)  # (T,)
    idx = indices[valid]  # (T_valid, k)
    w = weights[valid].float() * (idx >= 0)  # (T_valid, k), skipped slots weigh nothing
    importance = w.new_zeros(num_experts).index_add(0, idx.clamp_min(0).reshape(-1), w.reshape(-1))  # (E,)
    load = expert_load(indices, num_experts, valid)  # (E,)
    return cv_squared(importance) + cv_squared(load)


def router_z_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """``mean_t logsumexp(z_t)^2`` over the real tokens; 0 when there are none."""
    valid = _token_mask(mask, logits.shape[0], logits.device)  # (T,)
    if not valid.any():
        return logits.sum() * 0.0
    lse = torch.logsumexp(logits.float()[valid], dim=-1)  # (T_valid,)
    return (lse**2).mean()


@torch.no_grad()
def routing_stats(routing: RoutingOutput, mask: Tensor | None = None) -> dict[str, Tensor]:
    """Detached statistics of one routing over the real tokens.

    ``tokens_per_expert (E,)`` slot counts, ``load (E,)`` their fractions (sum 1), ``entropy`` the
    mean router entropy in nats (``log E`` for a uniform router), ``skip_fraction`` the fraction of
    slots dropped by dynamic skipping.
    """
    E = routing.num_experts
    valid = _token_mask(mask, routing.probs.shape[0], routing.probs.device)  # (T,)
    counts = expert_load(routing.indices, E, valid)  # (E,)
    total = counts.sum().clamp_min(1.0)
    probs = routing.probs.float()[valid]  # (T_valid, E)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)  # (T_valid,)
    n_slots = valid.sum() * routing.indices.shape[-1]
    return {
        "tokens_per_expert": counts,
        "load": counts / total,
        "entropy": entropy.mean() if entropy.numel() else probs.new_zeros(()),
        "skip_fraction": 1.0 - counts.sum() / n_slots.clamp_min(1),
    }


def collect_routing(model: nn.Module) -> list[tuple[str, RoutingOutput]]:
    """``(name, last_routing)`` of every MoE layer that ran in the last forward, in model order."""
    return [
        (name, block.last_routing) for name, block in find_moe_blocks(model) if block.last_routing is not None
    ]


def model_router_losses(
    model: nn.Module, mask: Tensor | None = None, kinds: Iterable[str] = ("balance", "z")
) -> dict[str, Tensor]:
    """Each requested loss (``balance``, ``z``, ``cv``) averaged over the model's MoE layers.

    ``mask`` is the batch's attention mask flattened to ``(B*S,)`` (or ``None``). Layers that did
    not run in the last forward are left out; with none at all every loss is a zero tensor, so
    callers can always add ``coef * loss``.
    """
    kinds = tuple(kinds)
    for kind in kinds:
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown router loss {kind!r}; choose from {', '.join(LOSS_KINDS)}.")
    routings = collect_routing(model)
    if not routings:
        param = next(model.parameters(), None)
        device = param.device if param is not None else None
        return {kind: torch.zeros((), device=device) for kind in kinds}
    sums: dict[str, Tensor] = {}
    for _, r in routings:
        for kind in kinds:
            if kind == "balance":
                loss = load_balancing_loss(r.probs, r.indices, r.num_experts, mask)
            elif kind == "z":
                loss = router_z_loss(r.logits, mask)
            else:
                loss = cv_squared_loss(r.weights, r.indices, r.probs, r.num_experts, mask)
            sums[kind] = sums[kind] + loss if kind in sums else loss
    return {kind: total / len(routings) for kind, total in sums.items()}


@dataclass
class RouterLossConfig:
    """Auxiliary router loss coefficients (0 disables a loss); one config for every MoE trainer."""

    balance: float = 0.01
    """Switch/GShard load-balancing loss ``E * sum_e f_e P_e`` (OLMoE 0.01; Mixtral/Qwen3 0.001)."""
    z: float = 0.001
    """ST-MoE router z-loss ``mean(logsumexp(z)^2)``."""
    cv: float = 0.0
    """LLaMA-MoE v1's ``CV^2(importance) + CV^2(load)`` loss (they used 0.01)."""

    def __post_init__(self) -> None:
        for name in ("balance", "z", "cv"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"router_losses.{name} must be >= 0, got {getattr(self, name)}",
                    where=f"router_losses.{name}",
                    fix="use 0 (off), or e.g. balance 0.01, z 0.001",
                )

    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in ("balance", "z", "cv") if getattr(self, k) > 0)


def weighted_router_losses(
    model: nn.Module, attention_mask: Tensor, cfg: RouterLossConfig
) -> dict[str, Tensor]:
    """``{"balance_loss": c_b * L_b, "z_loss": ..., "cv_loss": ...}`` over the model's MoE blocks,
    padding excluded; only the losses with a positive coefficient. The names are what is logged."""
    kinds = cfg.kinds()
    if not kinds:
        return {}
    mask = attention_mask.reshape(-1).bool()  # (T,)
    raw = model_router_losses(model, mask, kinds=kinds)
    return {f"{k}_loss": getattr(cfg, k) * v for k, v in raw.items()}
