"""The always-on shared expert of a residual MoE (LLaMA-MoE v2; DeepSeekMoE; Qwen2-MoE).

A plain bias-free SwiGLU MLP ``S(x) = W_down(act(W_gate x) * W_up x)`` with the same parameter
names as the HF LLaMA MLP (``gate_proj/up_proj/down_proj``), so its keys map one-to-one onto
Qwen2-MoE's ``shared_expert.*`` on export.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers.activations import ACT2FN


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu") -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))  # (..., d)
