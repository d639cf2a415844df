"""Parameter accounting: total, trainable and active-per-token counts.

Active-per-token counts what one token touches in a forward pass: for every routed expert set only
``k`` of ``E`` experts run, so ``(E - k) / E`` of the routed expert parameters are inactive.
This is the number MoE papers quote beside the total (e.g. Mixtral-8x7B: 47B total, 13B active).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    active: int

    def describe(self) -> str:
        return (
            f"parameters: total {human(self.total)} | active per token {human(self.active)} | "
            f"trainable {human(self.trainable)} ({100.0 * self.trainable / max(self.total, 1):.2f}%)"
        )


def human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _numel(p: nn.Parameter) -> int:
    # bitsandbytes 4-bit parameters store packed bytes; report the logical element count.
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        n = 1
        for s in quant_state.shape:
            n *= int(s)
        return n
    return p.numel()


def count_parameters(model: nn.Module) -> ParamCounts:
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    inactive = 0
    for module in model.modules():
        shape = _routed_shape(module)
        if shape is None:
            continue
        n_exp, k = shape
        expert_params = sum(_numel(p) for p in module.experts.parameters())
        inactive += expert_params * (n_exp - k) // max(n_exp, 1)
    return ParamCounts(total=total, trainable=trainable, active=total - inactive)


def _routed_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(E, k)`` of a routed-experts block: moe-app blocks (``.router``) or stock HF MoE blocks
    (Mixtral / Qwen-MoE / OLMoE: ``.gate`` with an ``(E, d)`` weight and ``top_k`` on the block)."""
    if getattr(module, "experts", None) is None:
        return None
    router = getattr(module, "router", None)
    if router is not None and hasattr(router, "top_k"):
        return int(router.num_experts), int(router.top_k)
    gate = getattr(module, "gate", None)
    weight = getattr(gate, "weight", None)
    top_k = getattr(module, "top_k", None) or getattr(gate, "top_k", None)
    if weight is not None and weight.ndim == 2 and top_k is not None:
        return int(weight.shape[0]), int(top_k)
    return None
