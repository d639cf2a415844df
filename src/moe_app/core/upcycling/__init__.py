"""Dense -> MoE surgery: sparse upcycling, Drop-Upcycling, neuron partition, attention MoE.

Pure functions on ``nn.Module`` (never inside a LightningModule); see ``surgery.upcycle``.
"""

from moe_app.core.upcycling.config import METHODS, ROUTER_INITS, SPLITS, UpcycleConfig, parse_layer_selection
from moe_app.core.upcycling.surgery import upcycle

__all__ = ["METHODS", "ROUTER_INITS", "SPLITS", "UpcycleConfig", "parse_layer_selection", "upcycle"]
