"""Weight-only quantisation of expert weights, written as a checkpoint stock transformers loads.

He et al. 2024 (arXiv 2406.02500) pair expert trimming with 4-bit weights of the experts (their
6.05x / 20 GB Mixtral-8x7B figure is block drop plus 4-bit). Here the format is bitsandbytes NF4
(``nf4``) or LLM.int8 (``int8``) with transformers' own ``quantization_config`` in ``config.json``,
so ``AutoModelForCausalLM.from_pretrained(out)`` rebuilds the quantised model with no extra code.

What can be quantised is decided by transformers, not by us. transformers 5.24's bitsandbytes
integration (``replace_with_bnb_linear``) swaps ``nn.Linear`` modules only; the routed experts of
every stock MoE it ships (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) are *fused 3-D parameters*
(``experts.gate_up_proj (E, 2F, d)``, ``experts.down_proj (E, d, F)``), which it loads and saves in
full precision whatever the config says. (bitsandbytes 0.50 can parametrise such a tensor in 4 bit,
``bnb.nn.parametrize``, but transformers neither writes nor reads that form.) So:

* a stock checkpoint whose experts include ``nn.Linear`` modules (Qwen2-MoE's shared expert) gets
  exactly those quantised; every other linear (attention, the routers, ``shared_expert_gate``,
  ``lm_head``) is listed in ``llm_int8_skip_modules`` and stays in full precision, and the result is
  checked after quantising (the set of quantised modules must be the expert linears, nothing else);
* a stock checkpoint whose experts are only fused parameters (Mixtral, Qwen3-MoE, OLMoE) is refused:
  an "experts-only" quantisation would quantise nothing;
* a moe-app checkpoint is refused: its experts are fused too and moe-app's loader has no
  bitsandbytes path.

How: the float model is first written (as ``moe-app prune`` would) to a scratch dir next to
``out``, loaded back by transformers with the ``BitsAndBytesConfig`` on the CPU (bitsandbytes 0.50
quantises there), and that model is saved with ``save_pretrained`` into ``out`` (atomically). Using
transformers' own loader and serializer is what guarantees the output loads in stock transformers.
The layer-streamed path (``moe-app prune --streaming``) cannot load the whole model, so it quantises
one decoder layer at a time with the same steps (:func:`quantize_linears`: transformers'
``replace_with_bnb_linear``, then each weight moved to its device as a ``Params4bit`` /
``Int8Params``), and writes the modules' ``state_dict``, which is what ``save_pretrained`` writes;
the tests hold the two outputs' tensors bitwise equal.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_app.checkpoint.pretrained import read_lineage, save_pretrained_dir
from moe_app.core.models.layers import find_decoder_layers
from moe_app.core.models.views import moe_layer_views
from moe_app.core.pesc.quantize import pin_4bit_layout
from moe_app.errors import CheckpointError, ConfigError, UnsupportedModelError

QUANT_SCHEMES = ("nf4", "int8")
_GATES = ("gate", "shared_expert_gate")  # routers / gates of MoE blocks: never quantised


def expert_linears(model: nn.Module) -> list[str]:
    """Full names of the ``nn.Linear`` modules that hold expert weights (inside MoE blocks, not gates)."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for _, view in moe_layer_views(model):
        prefix = names[id(view.module)]
        for sub, mod in view.module.named_modules():
            if type(mod) is nn.Linear and sub.split(".")[-1] not in _GATES and sub != "router":
                out.append(f"{prefix}.{sub}")
    return sorted(out)


def fused_expert_params(model: nn.Module) -> list[str]:
    """Names of the routed experts' fused 3-D parameters (what bitsandbytes-in-transformers cannot quantise)."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for _, view in moe_layer_views(model):
        experts = getattr(view.module, "experts", None)
        if experts is not None:
            out += [f"{names[id(experts)]}.{p}" for p, t in experts.named_parameters() if t.dim() == 3]
    return out


def skip_patterns(model: nn.Module, quantize: list[str]) -> list[str]:
    """``llm_int8_skip_modules`` keeping every linear outside ``quantize`` in full precision.

    transformers matches each entry as a name suffix (or a prefix / regex up to a module boundary),
    so the decoder-layer prefix is stripped: ``self_attn.q_proj``, ``mlp.gate``, ``lm_head``.
    """
    _, layers = find_decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    layer_prefix = {names[id(layer)] + "." for layer in layers}
    keep = set(quantize)
    patterns = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name in keep:
            continue
        rel = name
        for p in layer_prefix:
            if name.startswith(p):
                rel = name[len(p) :]
                break
        patterns.add(rel)
    clash = [q for q in quantize if any(q == p or q.endswith("." + p) for p in patterns)]
    if clash:  # a suffix would also exclude an expert linear: fall back to full names
        patterns = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in keep}
    return sorted(patterns)


def check_quantizable(model: nn.Module, kind: str, scheme: str, where: str) -> list[str]:
    """Refuse what cannot be written as a stock bitsandbytes checkpoint; return the linears to quantise."""
    if scheme not in QUANT_SCHEMES:
        raise ConfigError(
            f"unknown quantisation {scheme!r}",
            where="--quantize",
            fix=f"use one of {', '.join(QUANT_SCHEMES)}",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise UnsupportedModelError(
            f"--quantize needs bitsandbytes ({e})", where="--quantize", fix="pip install 'bitsandbytes>=0.50'"
        ) from e
    fused = fused_expert_params(model)
    if kind != "hf":
        raise UnsupportedModelError(
            "--quantize writes a stock transformers bitsandbytes checkpoint, and a moe-app checkpoint's "
            f"experts are fused 3-D parameters ({fused[0] if fused else 'experts.gate_up_proj'}) that "
            "neither moe-app's loader nor transformers 5.24's bitsandbytes integration (nn.Linear only) "
            "can hold quantised",
            where=where,
            fix="drop --quantize (slim with --slim instead), or export to qwen2_moe when the model has a "
            "shared expert and quantise that stock checkpoint",
        )
    linears = expert_linears(model)
    if not linears:
        raise UnsupportedModelError(
            f"nothing to quantise: this {type(model).__name__}'s experts are fused 3-D parameters "
            f"({fused[0] if fused else 'experts.gate_up_proj'}, ...), and transformers 5.24's bitsandbytes "
            "integration quantises nn.Linear modules only, so it would load them in full precision",
            where=where,
            fix="drop --quantize; quantising only attention is possible at load time with "
            "BitsAndBytesConfig, but that is not expert quantisation",
        )
    return linears


def bnb_config(scheme: str, dtype: torch.dtype, skip: list[str]) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``scheme`` (NF4: no double quantisation, ``dtype`` compute)."""
    from transformers import BitsAndBytesConfig

    if scheme == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` modules of a loaded model."""
    return sorted(n for n, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))


def quantize_linears(root: nn.Module, names: Sequence[str], config: Any) -> dict[str, nn.Module]:
    """Swap ``root``'s ``nn.Linear`` modules ``names`` (relative to ``root``) for bitsandbytes ones
    quantised from their own weights; return the float modules they replaced (:func:`restore_linears`).

    The steps are those of transformers' loader in :func:`write_quantized` (``replace_with_bnb_linear``
    builds the modules from ``config``, then each weight becomes a ``Params4bit`` / ``Int8Params``
    moved to its device, which quantises it), so a layer quantised here holds the same tensors as the
    model transformers loads, and its ``state_dict`` is what ``save_pretrained`` writes. This is
    how ``moe-app prune --streaming`` quantises one decoder layer at a time.
    """
    if not names:  # e.g. a dense layer of Qwen2-MoE's mlp_only_layers
        return {}
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    old = {n: root.get_submodule(n) for n in names}
    others = [n for n, m in root.named_modules() if type(m) is nn.Linear and n not in old]
    replace_with_bnb_linear(root, modules_to_not_convert=others, quantization_config=config)
    got = quantized_modules(root)
    if got != sorted(old):
        restore_linears(root, old)
        raise CheckpointError(
            f"transformers made {got[:3]}... bitsandbytes modules instead of {sorted(old)[:3]}...",
            where="--quantize",
            fix="report this with your transformers / bitsandbytes versions; drop --quantize meanwhile",
        )
    for name, linear in old.items():
        module, w = root.get_submodule(name), linear.weight.detach()
        if config.load_in_4bit:
            module.weight = bnb.nn.Params4bit(w, requires_grad=False, **module.weight.__dict__).to(w.device)
        else:
            kwargs = {k: v for k, v in module.weight.__dict__.items() if k != "SCB"}
            module.weight = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, **kwargs).to(w.device)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        module.train(linear.training)  # a new module trains; bitsandbytes computes differently then
    pin_4bit_layout(root)
    return old


def restore_linears(root: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put back the modules :func:`quantize_linears` replaced."""
    for name, module in modules.items():
        root.set_submodule(name, module)


def write_quantized(
    model: nn.Module,
    out: str | Path,
    scheme: str,
    write_float: Callable[[Path], Any],
    *,
    where: str = "--quantize",
) -> nn.Module:
    """Write ``model`` (a stock HF MoE) to ``out`` with its expert linears quantised; return the quantised model.

    ``write_float(dir)`` writes the float checkpoint (tokenizer and lineage included) into ``dir``;
    it goes to a scratch dir next to ``out`` that is removed afterwards, whatever happens.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out)
    linears = check_quantizable(model, "hf", scheme, where)
    skip = skip_patterns(model, linears)
    dtype = next(model.parameters()).dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.float-", dir=out.parent))
    try:
        float_dir = scratch / "model"
        write_float(float_dir)
        qmodel = AutoModelForCausalLM.from_pretrained(
            float_dir, quantization_config=bnb_config(scheme, dtype, skip), device_map="cpu", dtype=dtype
        ).eval()
        pin_4bit_layout(qmodel)  # it is evaluated after this (``eval_loss_quantized``)
        got = quantized_modules(qmodel)
        if got != linears:
            raise CheckpointError(
                f"transformers quantised {got[:3]}... instead of the expert linears {linears[:3]}...",
                where=where,
                fix="report this with your transformers / bitsandbytes versions; drop --quantize meanwhile",
            )
        save_pretrained_dir(
            qmodel, out, tokenizer_dir=float_dir, lineage=read_lineage(float_dir), max_shard_size="5GB"
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return qmodel


__all__ = [
    "QUANT_SCHEMES",
    "bnb_config",
    "check_quantizable",
    "expert_linears",
    "fused_expert_params",
    "quantize_linears",
    "quantized_modules",
    "restore_linears",
    "skip_patterns",
    "write_quantized",
]
