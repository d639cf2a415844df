"""4-bit NF4 quantisation of a model's frozen base linears (QLoRA, Dettmers et al. 2023, arXiv 2305.14314).

PESC trains only adapters, routers and (optionally) LoRA; the paper's recipe stores the frozen base
in 4-bit NormalFloat with double quantisation (the quantisation constants themselves quantised)
and computes in bf16. This replaces every ``nn.Linear`` of the base with a bitsandbytes
``Linear4bit`` holding a ``Params4bit`` weight, except the modules that must stay in full precision:
the LM head (and the embeddings, which are not linears), and anything PESC trains (routers and
adapters are stacked parameters, not linears, so they are never touched; a ``skip`` pattern can keep
out more).

Quantisation happens on the device the weights are on (bitsandbytes quantises when a
``Params4bit`` is moved to a real device; version 0.50 has a CPU backend, so tiny models train with
a 4-bit base on a laptop). ``compute_dtype="auto"`` picks bf16 on CUDA and fp32 on CPU: NF4
dequantises into the compute dtype before each matmul.

Every 4-bit layer moe-app builds or loads is pinned to bitsandbytes' standard layout
(:func:`pin_4bit_layout`): on CPUs with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids) bitsandbytes
0.50 otherwise rewrites a weight for its inference kernel on the first forward in eval mode, after
which training silently loses gradients through that layer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from moe_app.core.utils.dtypes import DTYPES
from moe_app.errors import ConfigError, UnsupportedModelError

log = logging.getLogger("moe_app.core.upcycling")

COMPUTE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, **DTYPES}
QUANT_TYPES = ("nf4", "fp4")
DEFAULT_SKIP = ("lm_head", "router", "adapters", "expert_lora", "lora_")


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere; otherwise the named dtype."""
    if name not in COMPUTE_DTYPES:
        raise ConfigError(
            f"unknown 4-bit compute dtype {name!r}",
            where="quant_compute_dtype",
            fix=f"use one of {list(COMPUTE_DTYPES)}",
        )
    dtype = COMPUTE_DTYPES[name]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise UnsupportedModelError(
            f"4-bit quantisation needs bitsandbytes ({e})",
            fix="pip install 'bitsandbytes>=0.50' or set quantize_4bit: false",
        ) from e
    return bnb


def is_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit linear."""
    return type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state")


def model_is_quantized(model: nn.Module) -> bool:
    return any(is_4bit(m) for m in model.modules())


def pin_4bit_layout(model: nn.Module) -> None:
    """Keep every bitsandbytes ``Linear4bit`` of ``model`` on the standard dequantise-and-matmul path.

    On a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks a ``Linear4bit``'s weight in place the
    first time the module runs in eval mode without autograd (Lightning's sanity-check validation
    does exactly that), for a faster inference kernel, and keeps the packed form. From then on:

    * the forward runs an op with no autograd kernel, so the layer's input gradient is dropped
      (PyTorch only warns): a QLoRA or PESC fit trains its adapters on wrong gradients;
    * the block statistics are rounded to bf16, so eval outputs differ from the training forward's,
      and a ``state_dict`` taken afterwards holds the rounded (and re-quantised) statistics;
    * a weight whose ``in_features`` is below the block size (64) fails with a reshape error.

    Clearing the module's ``support_avx512bf16_for_cpu`` (set from the CPU in its ``__init__``) keeps
    one code path, and so the same numbers, on every CPU, in training and in eval. A layer that was
    already repacked is refused rather than unpacked: the unpacking cannot restore its statistics.
    """
    for name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
            raise UnsupportedModelError(
                f"the 4-bit layer {name or type(model).__name__} was repacked by bitsandbytes' CPU inference "
                "kernel before moe-app could pin it; its statistics are rounded to bf16",
                fix="load or quantise the model again and pass it to moe-app before running it in eval mode",
            )
        module.support_avx512bf16_for_cpu = False


def quantize_linear_4bit(
    linear: nn.Linear, compute_dtype: torch.dtype, *, double_quant: bool = True, quant_type: str = "nf4"
) -> nn.Module:
    """A frozen ``bnb.nn.Linear4bit`` holding ``linear``'s weight (and bias) quantised, on its device."""
    bnb = _bnb()
    device = linear.weight.device
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    q.weight = bnb.nn.Params4bit(
        linear.weight.data.detach().to("cpu", copy=True),
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.detach().to(compute_dtype), requires_grad=False)
    q = q.to(device)  # moving the Params4bit to a real device quantises it
    pin_4bit_layout(q)
    state = getattr(q.weight, "quant_state", None)
    if state is None or tuple(state.shape) != tuple(linear.weight.shape):
        import bitsandbytes

        got = None if state is None else tuple(state.shape)
        raise UnsupportedModelError(
            f"bitsandbytes {bitsandbytes.__version__} quantised a {tuple(linear.weight.shape)} weight into a "
            f"4-bit state of shape {got} on {device}",
            fix="install the bitsandbytes version pinned in requirements.lock, or set quantize_4bit: false",
        )
    return q


def quantize_base_4bit(
    model: nn.Module,
    *,
    compute_dtype: str = "auto",
    double_quant: bool = True,
    quant_type: str = "nf4",
    skip: Sequence[str] = DEFAULT_SKIP,
) -> list[str]:
    """Replace the base's ``nn.Linear`` modules by 4-bit ones in place; return the replaced names.

    A linear is kept in full precision when any dotted component of its name contains one of the
    ``skip`` patterns (default: the LM head and everything PESC trains).
    """
    if quant_type not in QUANT_TYPES:
        raise ConfigError(
            f"unknown quant_type {quant_type!r}", where="quant_type", fix=f"use one of {QUANT_TYPES}"
        )
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if any(pat in part for part in name.split(".") for pat in skip):
            continue
        targets.append(name)
    if not targets:
        raise UnsupportedModelError(
            f"no nn.Linear to quantise in {type(model).__name__} (already quantised?)",
            fix="set quantize_4bit: false, or quantise a full-precision model",
        )
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        dtype = resolve_compute_dtype(compute_dtype, linear.weight.device)
        setattr(
            parent,
            child,
            quantize_linear_4bit(linear, dtype, double_quant=double_quant, quant_type=quant_type),
        )
    log.info("quantised %d linears to 4-bit %s (double_quant=%s)", len(targets), quant_type, double_quant)
    return targets


__all__ = [
    "is_4bit",
    "model_is_quantized",
    "pin_4bit_layout",
    "quantize_base_4bit",
    "quantize_linear_4bit",
    "resolve_compute_dtype",
]
