"""Checkpoint I/O: moe-app checkpoint dirs, HF loading, export to standard HF MoE formats."""

from moe_app.checkpoint.model_dir import load_model, save_moe_checkpoint
from moe_app.core.spec import SPEC_FILE, AttentionMoeSpec, LayerSpec, MlpMoeSpec, MoeSpec

__all__ = [
    "SPEC_FILE",
    "AttentionMoeSpec",
    "LayerSpec",
    "MlpMoeSpec",
    "MoeSpec",
    "load_model",
    "save_moe_checkpoint",
]
