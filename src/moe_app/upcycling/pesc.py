"""PESC surgery: dense decoder -> shared frozen FFN + routed adapters, and its checkpoints.

Parameter-efficient sparsity crafting (Wu et al. 2024, "Parameter-Efficient Sparsity Crafting from
Dense to Mixture-of-Experts for Instruction Tuning on General Tasks", arXiv 2401.02731; ALGORITHMS.md
section 5) turns every selected decoder layer's MLP into a :class:`~moe_app.moe.pesc.PescMoeBlock`
(``variant: adapter``) or a MixLoRA-style :class:`~moe_app.moe.pesc.LoraExpertsMoeBlock`
(``variant: lora``), freezes the base, and optionally quantises the base to 4-bit NF4 and adds a
QLoRA (peft) on the base linears, as the paper's recipe does.

What trains, what an adapter-only checkpoint holds and what a merge touches are all selected by one
fixed set of parameter-name markers, :data:`TRAINABLE_MARKERS` (the peft convention):
``.mlp.router.``, ``.mlp.adapters.``, ``.mlp.expert_lora.`` and peft's ``lora_``.

peft and the shared FFN: peft's LoRA is injected in place (``inject_adapter_in_model``, so the
model stays a plain ``PreTrainedModel``) and may wrap the shared FFN's ``gate_proj/up_proj/down_proj``
inside a PESC block. That is deliberate and safe: the blocks call the shared FFN through its modules,
never through ``.weight``, so a wrapped (or 4-bit) linear simply adds the shared QLoRA delta the paper
trains. peft never touches the routers or adapters: they are stacked parameters, not linears.

Checkpoints: the adapter-only directory (:func:`save_pesc_adapters`) holds the trainable tensors in
safetensors plus ``pesc.json`` (the :class:`PescConfig` and the base model path) and reloads on top of
the dense base with identical logits (a 4-bit base is re-quantised deterministically). A full
checkpoint (:func:`save_pesc_full`) is a moe-app checkpoint dir whose ``moe_app.json`` carries the
PESC config in its ``adapters`` slot; :func:`pesc_skeleton` rebuilds the structure from that slot.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_app.errors import CheckpointError, ConfigError, UnsupportedModelError
from moe_app.moe.adapters import IMPLS, BottleneckAdapters, LoraExperts
from moe_app.moe.pesc import LoraExpertsMoeBlock, PescMoeBlock, merge_lora_experts
from moe_app.moe.router import TopKRouter
from moe_app.upcycling.config import parse_layer_selection
from moe_app.upcycling.layers import dense_mlp_parts, find_decoder_layers, hidden_act
from moe_app.upcycling.quantize import COMPUTE_DTYPES, is_4bit, model_is_quantized, quantize_base_4bit
from moe_app.upcycling.rng import layer_generator

log = logging.getLogger("moe_app.upcycling")

VARIANTS = ("adapter", "lora")
TRAINABLE_MARKERS = (".mlp.router.", ".mlp.adapters.", ".mlp.expert_lora.", "lora_")
QLORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_FILE = "pesc_adapters.safetensors"
ADAPTER_META = "pesc.json"
ADAPTER_FORMAT = "moe-app-pesc-adapters"
SPEC_KIND = "pesc"
PESC_BLOCKS = (PescMoeBlock, LoraExpertsMoeBlock)


@dataclass
class PeftLoraOptions:
    """Shared (non-expert) LoRA on the frozen base linears through peft; QLoRA with a 4-bit base."""

    enabled: bool = False
    """Add LoRA to ``target_modules`` (the paper's recipe: yes, on a 4-bit base)."""
    rank: int = 64
    """LoRA rank ``r`` (QLoRA / PESC recipe: 64)."""
    alpha: float = 16.0
    """LoRA ``alpha``; the update is scaled by ``alpha / r`` (QLoRA / PESC recipe: 16)."""
    dropout: float = 0.1
    """Dropout on the LoRA input (QLoRA / PESC recipe: 0.1)."""
    target_modules: list[str] = field(default_factory=lambda: list(QLORA_TARGETS))
    """Linear names (suffixes) that get LoRA; the shared FFN's gate/up/down inside PESC blocks match too."""

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0:
            raise ConfigError(
                f"rank={self.rank}, alpha={self.alpha} must be positive",
                where="PescConfig.peft_lora",
                fix="use rank 64, alpha 16",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                f"dropout={self.dropout} not in [0, 1)", where="PescConfig.peft_lora.dropout", fix="use 0.1"
            )
        if not self.target_modules:
            raise ConfigError(
                "empty target_modules", where="PescConfig.peft_lora", fix=f"e.g. {QLORA_TARGETS}"
            )


@dataclass
class PescConfig:
    """How to craft a PESC (or MixLoRA-style) sparse model from a dense decoder."""

    variant: str = "adapter"
    """``adapter``: PESC, experts are bottleneck adapters in series after the shared FFN (Camelidae).
    ``lora``: MixLoRA-style, experts are per-expert LoRA deltas on the shared FFN's gate/up/down;
    mergeable into full experts and exportable as a stock Mixtral."""
    num_experts: int = 8
    """Experts ``E`` per PESC layer (paper: 8)."""
    top_k: int = 2
    """Experts per token ``k`` (paper: 2)."""
    adapter_dim: int = 64
    """``adapter``: bottleneck width ``r``. The Camelidae training script used 64; the released
    Camelidae configs use 512 (with ``scale`` 0.25)."""
    scale: float = 1.0
    """Multiplier ``s`` on the routed part: ``y = F(x) + s * sum w_i A_i(F(x))`` for ``adapter``,
    ``y = s * sum w_i E_i(x)`` for ``lora`` (keep 1.0 there to start equal to the dense model).
    The Camelidae training script used 1.0; the released configs 0.25."""
    dropout: float = 0.1
    """``adapter``: dropout on the adapter input (paper: 0.1)."""
    lora_rank: int = 8
    """``lora``: rank of every expert's LoRA pairs (MixLoRA: 8)."""
    lora_alpha: float = 16.0
    """``lora``: LoRA alpha; expert deltas are scaled by ``alpha / rank``."""
    lora_dropout: float = 0.05
    """``lora``: dropout on the input of the expert LoRA ``A`` matrices (MixLoRA: 0.05)."""
    layers: str | list[int] = "all"
    """Decoder layers to convert: ``all``, ``every:N``, ``"0,2,5-7"`` or ``[0, 2]``."""
    balance_loss_coef: float = 0.0
    """Coefficient of the load-balancing loss (Switch form, padding excluded). 0 = off, as in the
    paper (whose reference loss had zero gradient anyway, see ALGORITHMS.md section 1)."""
    z_loss_coef: float = 0.0
    """Coefficient of the router z-loss (ST-MoE); 0 = off."""
    peft_lora: PeftLoraOptions = field(default_factory=PeftLoraOptions)
    """Optional shared QLoRA on the base linears (``enabled: true`` for the paper's recipe)."""
    quantize_4bit: bool = False
    """Store the frozen base linears in 4-bit NF4 with double quantisation (QLoRA; paper: yes).
    The LM head, embeddings, routers and adapters stay in full precision."""
    quant_compute_dtype: str = "auto"
    """4-bit compute dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``float32``, ``bfloat16``, ``float16``."""
    impl: str = "auto"
    """Expert dispatch: ``auto`` (``F.grouped_mm`` where shapes allow, else a loop over experts),
    ``grouped_mm`` or ``loop``."""
    seed: int = 0
    """Seed of the router and adapter initialisation (per layer streams, order independent)."""

    def __post_init__(self) -> None:
        def bad(key: str, what: str, fix: str) -> ConfigError:
            return ConfigError(what, where=f"PescConfig.{key}", fix=fix)

        if isinstance(self.peft_lora, dict):
            self.peft_lora = PeftLoraOptions(**self.peft_lora)
        if self.variant not in VARIANTS:
            raise bad("variant", f"unknown variant {self.variant!r}", f"choose one of {', '.join(VARIANTS)}")
        if self.num_experts < 1:
            raise bad("num_experts", f"num_experts={self.num_experts} must be >= 1", "use e.g. num_experts=8")
        if not 1 <= self.top_k <= self.num_experts:
            raise bad(
                "top_k",
                f"top_k={self.top_k} is not in [1, num_experts={self.num_experts}]",
                f"choose 1 <= top_k <= num_experts (paper: top_k=2 of {max(self.num_experts, 2)})",
            )
        if self.adapter_dim <= 0:
            raise bad(
                "adapter_dim", f"adapter_dim={self.adapter_dim} must be > 0", "use 64 (paper script) or 512"
            )
        if not self.scale > 0:
            raise bad("scale", f"scale={self.scale} must be > 0", "use 1.0 (paper script) or 0.25 (released)")
        for key in ("dropout", "lora_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise bad(key, f"{key}={getattr(self, key)} not in [0, 1)", "use 0.1 (adapter) / 0.05 (lora)")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise bad(
                "lora_rank",
                f"lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha} must be > 0",
                "use 8 / 16",
            )
        if self.balance_loss_coef < 0 or self.z_loss_coef < 0:
            raise bad(
                "balance_loss_coef",
                "router loss coefficients must be >= 0",
                "use 0 (off), or e.g. 0.01 / 1e-3",
            )
        if self.quant_compute_dtype not in COMPUTE_DTYPES:
            raise bad(
                "quant_compute_dtype",
                f"unknown dtype {self.quant_compute_dtype!r}",
                f"use one of {list(COMPUTE_DTYPES)}",
            )
        if self.impl not in IMPLS:
            raise bad("impl", f"unknown impl {self.impl!r}", f"use one of {', '.join(IMPLS)}")
        parse_layer_selection(self.layers)  # validates the syntax

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PescConfig:
        return cls(**d)


# ---------------------------------------------------------------------- surgery
def is_pesc_trainable(name: str) -> bool:
    """Whether a parameter name belongs to what PESC trains (and what its adapter checkpoint holds)."""
    return any(marker in name for marker in TRAINABLE_MARKERS)


def pesc_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PESC_BLOCKS)]


def _new_block(layer: nn.Module, where: str, index: int, cfg: PescConfig, act: str) -> nn.Module:
    gate, _, _ = dense_mlp_parts(layer, where)  # raises naming the missing module
    ffn_dim, hidden = gate.weight.shape
    router = TopKRouter(hidden, cfg.num_experts, cfg.top_k)
    with torch.no_grad():
        router.weight.copy_(
            torch.randn(router.weight.shape, generator=layer_generator(cfg.seed, index, "pesc_router")) * 0.02
        )
    g = layer_generator(cfg.seed, index, "pesc_experts")
    if cfg.variant == "adapter":
        adapters = BottleneckAdapters(cfg.num_experts, hidden, cfg.adapter_dim, cfg.dropout, impl=cfg.impl)
        adapters.reset_parameters(g)
        block: nn.Module = PescMoeBlock(layer.mlp, router, adapters, scale=cfg.scale)
    else:
        lora = LoraExperts(
            cfg.num_experts, hidden, ffn_dim, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, impl=cfg.impl
        )
        lora.reset_parameters(g)
        block = LoraExpertsMoeBlock(layer.mlp, router, lora, scale=cfg.scale, act=act)
    # New parameters follow the base MLP's device and dtype (the router still computes in fp32).
    block.router.to(device=gate.weight.device, dtype=gate.weight.dtype)
    block.experts.to(device=gate.weight.device, dtype=gate.weight.dtype)
    return block


def build_pesc(model: nn.Module, cfg: PescConfig) -> nn.Module:
    """Apply PESC to ``model`` in place and return it: blocks, optional 4-bit base, optional peft LoRA, freezing.

    At initialisation the result computes exactly the dense function (zero ``U`` / zero LoRA ``B``).
    Afterwards only :data:`TRAINABLE_MARKERS` parameters have ``requires_grad``.
    """
    if pesc_blocks(model):
        raise ConfigError(
            f"{type(model).__name__} already has PESC blocks",
            where="build_pesc",
            fix="apply build_pesc to the dense model once",
        )
    path, layers = find_decoder_layers(model)
    chosen = parse_layer_selection(cfg.layers, len(layers))
    if not chosen:
        raise ConfigError(
            f"layers={cfg.layers!r} selects no layer", where="PescConfig.layers", fix="use 'all'"
        )
    act = hidden_act(model)
    for i in chosen:
        layer = layers[i]
        layer.mlp = _new_block(layer, f"{path}.{i}", i, cfg, act)
    if cfg.quantize_4bit:
        quantize_base_4bit(model, compute_dtype=cfg.quant_compute_dtype)
    if cfg.peft_lora.enabled:
        inject_peft_lora(model, cfg.peft_lora)
    trainable = mark_pesc_trainable(model)
    model.pesc_config = cfg
    log.info("PESC (%s): %d layers, %d trainable tensors", cfg.variant, len(chosen), len(trainable))
    return model


def inject_peft_lora(model: nn.Module, opts: PeftLoraOptions) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    lora_cfg = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=list(opts.target_modules),
        bias="none",
    )
    try:
        inject_adapter_in_model(lora_cfg, model)
    except ValueError as e:
        raise UnsupportedModelError(
            f"peft could not add LoRA to {opts.target_modules} in {type(model).__name__}: {e}",
            fix="set PescConfig.peft_lora.target_modules to linear names the model has (e.g. q_proj, v_proj)",
        ) from e


def mark_pesc_trainable(model: nn.Module) -> list[str]:
    """Freeze everything except :data:`TRAINABLE_MARKERS` parameters; return the trainable names."""
    names = []
    for name, p in model.named_parameters():
        train = is_pesc_trainable(name) and p.dtype.is_floating_point
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names


# ---------------------------------------------------------------------- merging (lora variant)
def merge_peft_lora(model: nn.Module) -> nn.Module:
    """Fold peft LoRA layers into their base linears and remove the wrappers (in place)."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in wrapped:
        base = module.get_base_layer()
        if is_4bit(base):
            raise UnsupportedModelError(
                f"cannot merge LoRA into the 4-bit `{name}` exactly",
                fix="train without quantize_4bit to export a merged model",
            )
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    return model


def merge_pesc(model: nn.Module) -> nn.Module:
    """Turn a ``variant: lora`` PESC model into a plain SparseMoeBlock MoE (in place), exactly.

    peft LoRA is merged into the base first, then every ``LoraExpertsMoeBlock`` becomes a
    ``SparseMoeBlock`` with ``W + (alpha/r) B_i A_i`` experts. The result saves with
    ``moe_app.io.save_moe_checkpoint`` and exports to a stock Mixtral.
    """
    blocks = pesc_blocks(model)
    if any(isinstance(b, PescMoeBlock) for _, b in blocks):
        raise UnsupportedModelError(
            "PESC adapter experts (variant=adapter) are a nonlinear adapter in series after the FFN; they "
            "do not merge into standard SwiGLU experts",
            fix="keep the adapter-only or full moe-app checkpoint, or train with variant: lora to export a Mixtral",
        )
    if model_is_quantized(model):
        raise UnsupportedModelError(
            "the base is 4-bit quantised; merged experts would not equal the trained model",
            fix="train with quantize_4bit: false to export a merged model",
        )
    merge_peft_lora(model)
    for name, block in blocks:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, merge_lora_experts(block))
    if hasattr(model, "pesc_config"):
        del model.pesc_config
    return model


# ---------------------------------------------------------------------- adapter-only checkpoint
def pesc_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable PESC tensors (routers, adapters / expert LoRA, peft LoRA), detached on CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if is_pesc_trainable(n)}


def _resolve_base(base_model: str | Path) -> str:
    p = Path(base_model).expanduser()
    return str(p.resolve()) if p.exists() else str(base_model)


def save_pesc_adapters(
    model: nn.Module,
    path: str | Path,
    *,
    base_model: str | Path,
    cfg: PescConfig | None = None,
    tokenizer: Any = None,
    lineage: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``ADAPTER_FILE`` (trainable tensors) and ``ADAPTER_META`` (config + base path) atomically."""
    from safetensors.torch import save_file

    from moe_app.utils.atomic import atomic_directory

    cfg = cfg or getattr(model, "pesc_config", None)
    if cfg is None:
        raise ConfigError("the model carries no PESC config", where="save_pesc_adapters", fix="pass cfg=")
    tensors = pesc_state_dict(model)
    if not tensors:
        raise CheckpointError(
            "the model has no PESC parameters", where="save_pesc_adapters", fix="apply build_pesc first"
        )
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": 1,
        "base_model": _resolve_base(base_model),
        "pesc": cfg.to_dict(),
        "num_tensors": len(tensors),
        "lineage": lineage or [],
    }
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def is_pesc_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_META).is_file() and (Path(path) / ADAPTER_FILE).is_file()


def read_pesc_meta(path: str | Path) -> dict[str, Any]:
    f = Path(path) / ADAPTER_META
    if not is_pesc_adapter_dir(path):
        raise CheckpointError(
            f"not a PESC adapter checkpoint (needs {ADAPTER_META} and {ADAPTER_FILE})",
            where=str(path),
            fix="point at a directory written by save_pesc_adapters / PescModule",
        )
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"invalid JSON ({e})", where=str(f), fix="repair or regenerate the file") from e
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(
            f"unknown format {meta.get('format')!r}", where=str(f), fix="regenerate the checkpoint"
        )
    return meta


@torch.no_grad()
def load_pesc_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy the tensors of an adapter checkpoint into a ``build_pesc`` model; keys must match exactly."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(path) / ADAPTER_FILE))
    params = {n: p for n, p in model.named_parameters() if is_pesc_trainable(n)}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"adapter keys do not match the model: missing {missing[:6]}, unexpected {unexpected[:6]}",
            where=str(path),
            fix="load on the same base model with the PescConfig stored in pesc.json",
        )
    for name, p in params.items():
        t = tensors[name]
        if t.shape != p.shape:
            raise CheckpointError(
                f"`{name}` has shape {tuple(t.shape)}, the model {tuple(p.shape)}",
                where=str(path),
                fix="load on the same base model with the PescConfig stored in pesc.json",
            )
        p.copy_(t.to(device=p.device, dtype=p.dtype))
    return model


def load_pesc_model(
    path: str | Path,
    base_model: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Dense base (``base_model`` or the one recorded in ``pesc.json``) + PESC surgery + saved tensors, eval mode."""
    from moe_app import load_model

    meta = read_pesc_meta(path)
    cfg = PescConfig.from_dict(meta["pesc"])
    model = load_model(base_model or meta["base_model"], dtype=dtype)
    if device is not None:
        model.to(device)  # before build_pesc: 4-bit quantisation happens on the weights' device
    build_pesc(model, cfg)
    load_pesc_adapters(model, path)
    return model.eval()


# ---------------------------------------------------------------------- full checkpoint (moe-app dir)
def pesc_spec_slot(cfg: PescConfig) -> dict[str, Any]:
    """What goes into ``moe_app.json``'s ``adapters`` slot for a PESC model."""
    return {"kind": SPEC_KIND, "config": cfg.to_dict()}


def pesc_skeleton(model: nn.Module, slot: dict[str, Any]) -> nn.Module:
    """Rebuild the PESC structure described by an ``adapters`` slot on a bare base (weights to be loaded).

    Meant for the loader's registry of adapter kinds (``slot["kind"] == "pesc"``).
    """
    if slot.get("kind") != SPEC_KIND:
        raise CheckpointError(
            f"adapters slot of kind {slot.get('kind')!r}, not {SPEC_KIND!r}", where="moe_app.json"
        )
    if pesc_blocks(model):
        return model  # already rebuilt (idempotent)
    return build_pesc(model, PescConfig.from_dict(slot["config"]))


def save_pesc_full(
    model: nn.Module,
    path: str | Path,
    *,
    cfg: PescConfig | None = None,
    tokenizer: Any = None,
    source: str | None = None,
    stage: str = "pesc",
) -> Path:
    """Write the whole model as a moe-app checkpoint dir (``moe_app.json`` + sharded safetensors).

    Unmerged PESC models record their config in the ``adapters`` slot (structure rebuilt by
    :func:`pesc_skeleton`); merged ``lora`` models are plain MoE layers described per layer.
    """
    from moe_app.io.checkpoint import save_moe_checkpoint
    from moe_app.io.spec import MoeSpec

    if model_is_quantized(model):
        raise ConfigError(
            "a full checkpoint of a 4-bit base would store quantisation internals, not a loadable model",
            where="save_full",
            fix="save the adapter-only checkpoint (the base is re-quantised on load), or train without quantize_4bit",
        )
    cfg = cfg or getattr(model, "pesc_config", None)
    slot = pesc_spec_slot(cfg) if pesc_blocks(model) and cfg is not None else None
    spec = MoeSpec(
        base_architecture=type(model).__name__,
        base_model_type=getattr(model.config, "model_type", "unknown"),
        layers=[],
        source=_resolve_base(source) if source else None,
        adapters=slot,
    )
    return save_moe_checkpoint(
        model, path, spec, tokenizer=tokenizer, stage=stage, stage_config=cfg.to_dict() if cfg else None
    )


def load_pesc_full(path: str | Path, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Load a full PESC checkpoint dir (until ``moe_app.load_model`` dispatches the ``adapters`` slot itself)."""
    from transformers import AutoConfig

    from moe_app.io.checkpoint import build_empty_model, load_state_dict_strict
    from moe_app.io.hub import resolve_dtype
    from moe_app.io.shards import checkpoint_dtype
    from moe_app.io.spec import MoeSpec

    spec = MoeSpec.load(path)
    resolved = resolve_dtype(dtype)
    if resolved in (None, "auto"):
        resolved = checkpoint_dtype(path) or torch.float32
    model = build_empty_model(AutoConfig.from_pretrained(str(path)), spec, resolved)
    if spec.adapters:
        pesc_skeleton(model, spec.adapters)
    load_state_dict_strict(model, path)
    return model.eval()


__all__ = [
    "ADAPTER_FILE",
    "ADAPTER_META",
    "QLORA_TARGETS",
    "TRAINABLE_MARKERS",
    "VARIANTS",
    "PeftLoraOptions",
    "PescConfig",
    "build_pesc",
    "is_pesc_adapter_dir",
    "is_pesc_trainable",
    "load_pesc_adapters",
    "load_pesc_full",
    "load_pesc_model",
    "mark_pesc_trainable",
    "merge_peft_lora",
    "merge_pesc",
    "pesc_blocks",
    "pesc_skeleton",
    "pesc_spec_slot",
    "pesc_state_dict",
    "save_pesc_adapters",
    "save_pesc_full",
]
