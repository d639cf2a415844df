"""PESC configuration (Wu et al. 2024, arXiv 2401.02731): what to craft, and which parameters train.

What trains, what an adapter-only checkpoint holds and what a merge touches are all selected by one
fixed set of parameter-name markers, :data:`TRAINABLE_MARKERS` (the peft convention):
``.mlp.router.``, ``.mlp.adapters.``, ``.mlp.expert_lora.`` and peft's ``lora_``. The fixed masks of
sparse adapters (``adapter_sparsity > 0``) are buffers, not parameters: they never train, but an
adapter-only checkpoint holds them too (:func:`is_pesc_saved_buffer`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from moe_app.core.moe.adapters import IMPLS, MASK_SCORES
from moe_app.core.moe.losses import RouterLossConfig
from moe_app.core.moe.pesc import LoraExpertsMoeBlock, PescMoeBlock
from moe_app.core.pesc.quantize import COMPUTE_DTYPES
from moe_app.core.upcycling.config import parse_layer_selection
from moe_app.errors import ConfigError

VARIANTS = ("adapter", "lora")


TRAINABLE_MARKERS = (".mlp.router.", ".mlp.adapters.", ".mlp.expert_lora.", "lora_")


SAVED_BUFFER_SUFFIXES = (".mlp.adapters.down_mask", ".mlp.adapters.up_mask")
"""Buffers an adapter-only checkpoint holds besides the trainable parameters: the SparseAdapter masks."""


QLORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    adapter_sparsity: float = 0.0
    """``adapter``: SparseAdapter (He et al. 2022, arXiv 2210.04284), the fraction ``s`` in ``[0, 1)`` of
    every expert's ``D`` and ``U`` entries masked to zero by a mask fixed at initialisation (exactly
    ``round((1 - s) r d)`` kept per expert and tensor); 0 = dense adapters. The trainable non-zeros
    are ``(1 - s)`` times those of a dense adapter of the same ``adapter_dim``, so for the budget of a
    dense width-``r`` adapter use ``adapter_dim = r / (1 - s)`` ("Large-Sparse"; e.g. ``r = 64``:
    ``s = 0.5`` with ``adapter_dim = 128``, ``s = 0.75`` with ``256``; :func:`equal_budget_adapter_dim`).
    The stored tensors (and optimizer state) stay dense ``(E, adapter_dim, d)``."""
    adapter_mask: str = "magnitude"
    """``adapter``, with ``adapter_sparsity > 0``: how the fixed mask is chosen, from ``seed``.
    ``magnitude``: keep the largest ``|D|`` at initialisation (``U`` starts at zero, so its mask is
    seeded-random); ``random``: seeded-random for both."""
    lora_rank: int = 8
    """``lora``: rank of every expert's LoRA pairs (MixLoRA: 8)."""
    lora_alpha: float = 16.0
    """``lora``: LoRA alpha; expert deltas are scaled by ``alpha / rank``."""
    lora_dropout: float = 0.05
    """``lora``: dropout on the input of the expert LoRA ``A`` matrices (MixLoRA: 0.05)."""
    layers: str | list[int] = "all"
    """Decoder layers to convert: ``all``, ``every:N``, ``"0,2,5-7"`` or ``[0, 2]``."""
    router_losses: RouterLossConfig = field(default_factory=lambda: RouterLossConfig(balance=0.0, z=0.0))
    """Router loss coefficients, as for every MoE trainer. Off by default, as in the paper (whose
    reference balance loss had zero gradient anyway, see ALGORITHMS.md section 1)."""
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
        if isinstance(self.router_losses, dict):
            self.router_losses = RouterLossConfig(**self.router_losses)
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
        if isinstance(self.adapter_sparsity, bool) or not isinstance(self.adapter_sparsity, (int, float)):
            raise bad(
                "adapter_sparsity",
                f"adapter_sparsity={self.adapter_sparsity!r} is not a number",
                "use a fraction in [0, 1), e.g. 0.5 (0 = dense adapters)",
            )
        if not 0.0 <= self.adapter_sparsity < 1.0:
            raise bad(
                "adapter_sparsity",
                f"adapter_sparsity={self.adapter_sparsity} not in [0, 1)",
                "use a fraction in [0, 1), e.g. 0.5 with adapter_dim doubled for the dense budget (0 = dense)",
            )
        if self.adapter_mask not in MASK_SCORES:
            raise bad(
                "adapter_mask",
                f"unknown adapter_mask {self.adapter_mask!r}",
                f"use one of {', '.join(MASK_SCORES)}",
            )
        if self.adapter_sparsity > 0 and self.variant != "adapter":
            raise bad(
                "adapter_sparsity",
                f"adapter_sparsity={self.adapter_sparsity} applies to variant 'adapter' only, not {self.variant!r}",
                "set adapter_sparsity: 0 for the lora variant, or use variant: adapter",
            )
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise bad(
                "lora_rank",
                f"lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha} must be > 0",
                "use 8 / 16",
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


def is_pesc_saved_buffer(name: str) -> bool:
    """Whether a buffer name is one an adapter-only checkpoint holds (a sparse adapter's fixed mask)."""
    return name.endswith(SAVED_BUFFER_SUFFIXES)


def equal_budget_adapter_dim(dense_dim: int, sparsity: float) -> int:
    """``adapter_dim`` whose sparse adapter has (about) the trainable non-zeros of a dense ``dense_dim`` one.

    ``round(dense_dim / (1 - sparsity))``; exact when ``1 - sparsity`` divides ``dense_dim``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(
            f"sparsity={sparsity} not in [0, 1)", where="PescConfig.adapter_sparsity", fix="use e.g. 0.5"
        )
    return max(1, round(dense_dim / (1.0 - sparsity)))


_CONFIG_ATTR = "moe_app_pesc_config"


def attach_pesc_config(model: Any, cfg: PescConfig | None) -> None:
    """Record (or, with ``None``, remove) the PESC config a model was crafted with."""
    if cfg is None:
        model.__dict__.pop(_CONFIG_ATTR, None)
    else:
        object.__setattr__(model, _CONFIG_ATTR, cfg)  # a plain attribute, never a submodule


def pesc_config_of(model: Any) -> PescConfig | None:
    """The PESC config attached by :func:`~moe_app.core.pesc.surgery.build_pesc`, if any."""
    cfg = model.__dict__.get(_CONFIG_ATTR)
    return cfg if isinstance(cfg, PescConfig) else None
