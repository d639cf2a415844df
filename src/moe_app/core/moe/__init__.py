"""MoE core: routing, experts, blocks, attention MoE, router losses. Pure PyTorch; never imports lightning."""

from moe_app.core.moe.attention import AttentionMoe
from moe_app.core.moe.block import SparseMoeBlock, find_moe_blocks
from moe_app.core.moe.experts import SwiGLUExperts, experts_forward_naive, grouped_mm_supported
from moe_app.core.moe.losses import (
    collect_routing,
    cv_squared_loss,
    load_balancing_loss,
    model_router_losses,
    router_z_loss,
    routing_stats,
)
from moe_app.core.moe.router import ROUTING_RULES, RoutingOutput, TopKRouter

__all__ = [
    "ROUTING_RULES",
    "AttentionMoe",
    "RoutingOutput",
    "SparseMoeBlock",
    "SwiGLUExperts",
    "TopKRouter",
    "collect_routing",
    "cv_squared_loss",
    "experts_forward_naive",
    "find_moe_blocks",
    "grouped_mm_supported",
    "load_balancing_loss",
    "model_router_losses",
    "router_z_loss",
    "routing_stats",
]
