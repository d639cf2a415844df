"""Sparse MoE feed-forward block assembled from injected parts.

``SparseMoeBlock(router, experts, shared_expert=None, shared_gate=None, scale=1.0)`` computes

    y = scale * sum_{i in topk(x)} w_i(x) E_i(x)  [+ g(x) * S(x)]

where ``S`` is an optional always-on shared expert (residual MoE of LLaMA-MoE v2; Qwen2-MoE's
shared expert) and ``g`` an optional sigmoid gate on it (Qwen2-MoE). The block is a drop-in
replacement for an HF decoder layer's ``mlp`` (same input and output shapes).

Router statistics are recorded per call on the instance (``last_routing``), never in module-level
lists, so validation loops, activation checkpointing and several models in one process are safe.
The caller (a LightningModule, a pruning callback) reads them right after the forward.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from moe_app.core.moe.router import RoutingOutput, TopKRouter


class RoutedBlock(nn.Module):
    """What every moe-app MoE layer shares (FFN, PESC, attention experts): a router, a scale on the
    routed output, and the routing of the last call in ``last_routing`` for the router losses and
    the pruning statistics."""

    def __init__(self, router: TopKRouter, scale: float = 1.0) -> None:
        super().__init__()
        self.router = router
        self.scale = float(scale)
        self.last_routing: RoutingOutput | None = None

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def extra_repr(self) -> str:
        return f"scale={self.scale}"

    def route(self, x: Tensor) -> RoutingOutput:
        """Route ``x`` ``(T, d)`` and keep the decision in ``last_routing``."""
        self.last_routing = self.router(x)
        return self.last_routing


class SparseMoeBlock(RoutedBlock):
    def __init__(
        self,
        router: TopKRouter,
        experts: nn.Module,
        shared_expert: nn.Module | None = None,
        shared_gate: nn.Module | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__(router, scale)
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_gate = shared_gate

    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, d)
        routing = self.route(x)
        weights = (routing.weights * self.scale).to(x.dtype)  # (T, k)
        y = self.experts(x, routing.indices, weights)  # (T, d)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # (T, d)
            if self.shared_gate is not None:
                shared = self.shared_gate(x).sigmoid() * shared
            y = y + shared
        return y.reshape(shape)


def find_moe_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(qualified_name, module)`` for every module that records ``last_routing``.

    This covers :class:`SparseMoeBlock`, the PESC blocks and the attention-MoE wrapper, in model
    order, so loss and statistics code need not know which construction built the model.
    """
    for name, module in model.named_modules():
        if hasattr(module, "last_routing") and hasattr(module, "router"):
            yield name, module
