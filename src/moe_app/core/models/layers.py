"""Finding the decoder layers and their dense SwiGLU MLPs in a Hugging Face causal LM.

Surgery works on any decoder whose layers expose ``mlp.gate_proj / up_proj / down_proj`` (LLaMA,
Mistral, Qwen2, Qwen3 and their many derivatives), so the lookup is structural rather than a list
of classes. Where the structure is missing, the error names the exact module path that was not
found, which is what a user needs to judge whether their model can be supported.
"""

from __future__ import annotations

from torch import nn

from moe_app.errors import UnsupportedModelError

# Paths (relative to the CausalLM) under which HF decoders keep their layer list.
LAYER_LIST_PATHS = ("model.layers", "model.decoder.layers", "layers", "transformer.h", "gpt_neox.layers")
MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(path, layers)``: the dotted path of the decoder layer list and the list itself."""
    for path in LAYER_LIST_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    raise UnsupportedModelError(
        f"could not find the decoder layer list in {type(model).__name__} "
        f"(looked for {', '.join(LAYER_LIST_PATHS)})",
        fix="moe-app supports decoder LMs with a `model.layers` list (LLaMA, Mistral, Qwen2, Qwen3)",
    )


def dense_mlp_parts(layer: nn.Module, where: str) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """Return the ``(gate_proj, up_proj, down_proj)`` linears of a layer's dense SwiGLU MLP."""
    mlp = getattr(layer, "mlp", None)
    if mlp is None:
        raise UnsupportedModelError(
            f"module `{where}.mlp` not found in {type(layer).__name__}",
            fix="moe-app upcycles decoders whose layers have `mlp.gate_proj/up_proj/down_proj`",
        )
    parts = []
    for name in MLP_PARTS:
        lin = getattr(mlp, name, None)
        if not isinstance(lin, nn.Linear):
            have = ", ".join(n for n, _ in mlp.named_children()) or "none"
            raise UnsupportedModelError(
                f"module `{where}.mlp.{name}` not found in {type(mlp).__name__} (children: {have})",
                fix="moe-app upcycles SwiGLU MLPs with gate_proj/up_proj/down_proj "
                "(LLaMA, Mistral, Qwen2, Qwen3 families)",
            )
        if lin.bias is not None:
            raise UnsupportedModelError(
                f"`{where}.mlp.{name}` has a bias; SwiGLU experts are bias-free",
                fix="upcycle a model whose MLP has no bias (e.g. LlamaConfig(mlp_bias=False))",
            )
        if not lin.weight.dtype.is_floating_point or lin.weight.dim() != 2:
            raise UnsupportedModelError(
                f"`{where}.mlp.{name}` holds quantised weights ({lin.weight.dtype})",
                fix="upcycle the full-precision checkpoint, then quantise",
            )
        parts.append(lin)
    gate, up, down = parts
    if gate.weight.shape != up.weight.shape or down.weight.shape[::-1] != gate.weight.shape:
        raise UnsupportedModelError(
            f"`{where}.mlp` has inconsistent shapes gate {tuple(gate.weight.shape)}, "
            f"up {tuple(up.weight.shape)}, down {tuple(down.weight.shape)}",
            fix="only standard SwiGLU MLPs can be upcycled",
        )
    return gate, up, down


def hidden_act(model: nn.Module) -> str:
    """The MLP activation name from the model config (``silu`` for LLaMA-family models)."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None) or "silu"
