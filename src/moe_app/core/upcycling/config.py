"""Configuration of dense-to-MoE surgery (``UpcycleConfig``) and decoder-layer selection.

One dataclass covers the upcycling families moe-app implements (ALGORITHMS.md sections 2-4):
sparse upcycling by copying (Komatsuzaki et al. 2023), copy with Gaussian noise, Drop-Upcycling
(Nakamura et al., ICLR 2025), neuron partition (LLaMA-MoE v1/v2, Zhu et al. 2024) and attention
MoE (LLaMA-MoE v2). Every field has a docstring (it becomes CLI help) and ``__post_init__`` rejects
impossible combinations with a ``ConfigError`` that says how to fix them, before any weight is
touched. Checks that need the model (``d_ff`` divisible by ``E``) happen in ``upcycle``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from moe_app.core.moe.router import routing_problem
from moe_app.errors import ConfigError

METHODS = ("copy", "noise", "drop", "partition", "attention")
SPLITS = ("sequential", "random", "clustering", "importance")
ROUTER_INITS = ("normal", "zeros", "kmeans")
DATA_FREE_SPLITS = ("sequential", "random", "clustering")


@dataclass
class UpcycleConfig:
    """How to turn a dense decoder into a Mixture-of-Experts."""

    method: str = "copy"
    """Expert construction: ``copy`` (every expert = the dense FFN), ``noise`` (copy + Gaussian
    noise), ``drop`` (Drop-Upcycling), ``partition`` (split the FFN neurons, LLaMA-MoE) or
    ``attention`` (attention MoE only; the MLPs stay dense)."""
    num_experts: int = 8
    """Routed experts ``E`` per MoE layer."""
    top_k: int = 2
    """Experts per token ``k``."""
    rule: str = "softmax_topk_renorm"
    """Routing rule: ``softmax_topk_renorm`` (Mixtral; needed for copy == dense) or ``softmax_topk``."""
    scale: float | None = None
    """Multiplier on the routed output. Default: 1.0 for copy/noise/drop; ``E / k`` for partition,
    which gives LLaMA-MoE v1's released values (8 for 2-of-16, 4 for 4-of-16) and v2's suggested 4.0
    for 2-of-8 (v1 released 2.0 for 2-of-8). Partition equals the dense model exactly with
    ``top_k = E``, ``router_init = zeros`` and ``scale = E`` (every multiplier ``s * w_i = 1``)."""
    noise_std: float = 0.01
    """``noise``: std of the Gaussian noise relative to each source matrix's std."""
    drop_ratio: float = 0.5
    """``drop``: fraction ``r`` of intermediate neurons re-initialised per expert (paper: 0.5)."""
    split: str = "sequential"
    """``partition``: ``sequential`` (contiguous; v2 default), ``random`` (v1 releases),
    ``clustering`` (balanced k-means on L2-normalised W_up rows) or ``importance`` (calibration data)."""
    shared_experts: int = 0
    """``partition``: neurons for this many expert-sized chunks go into one always-on shared expert
    (residual MoE, v2: 1 shared + 7 routed); ``d_ff`` must divide into ``E + shared_experts`` chunks."""
    router_init: str = "normal"
    """Router weight init: ``normal(0, router_std)``, ``zeros`` (uniform routing) or ``kmeans``
    (centroids of balanced k-means on the layer's MLP inputs over calibration data, v2). Also the
    attention router's unless ``attention_router_init`` says otherwise (see there)."""
    router_std: float = 0.02
    """Std of the ``normal`` router init; ``kmeans`` centroids are rescaled to the same row norm."""
    layers: str | list[int] = "all"
    """Which decoder layers become MoE: ``all``, ``every:N`` (layers with ``(i + 1) % N == 0``, the
    Qwen-MoE ``decoder_sparse_step`` convention), or an explicit list / ``"0,2,5-7"``."""
    keep_first_dense: int = 0
    """Keep the first n decoder layers dense (LLaMA-MoE option)."""
    keep_last_dense: int = 0
    """Keep the last n decoder layers dense."""
    attention_moe: bool = False
    """Also turn attention into an MoE over GQA groups (LLaMA-MoE v2); combines with any MLP method."""
    attention_top_k: int | None = None
    """Attention groups per token; default: all ``G`` groups (``G`` = number of KV heads), with which
    the defaults reproduce dense attention exactly. LLaMA-MoE v2 used 7 of 8 groups."""
    attention_scale: float | None = None
    """Multiplier ``s`` on the attention MoE output; default ``G``, the number of groups. Dense attention
    is the sum of the groups' outputs, so it needs every per-group multiplier ``s * w_g = 1``; with
    all G groups selected the softmax weights sum to one, and the zero router of the default
    ``attention_router_init`` makes each ``w_g = 1/G`` (under either rule), so ``s = G`` gives the
    dense model exactly. (A non-uniform router cannot: its weights differ per group.) With
    ``attention_top_k = k < G`` and renormalised routing the default gives each selected group
    ``G / k`` at uniform weights, making up for the dropped groups like the partition scale ``E / k``.
    LLaMA-MoE v2 used 7 of 8 groups with scale 4.0 (not dense-equivalent)."""
    attention_router_init: str | None = None
    """Attention router init (``normal``, ``zeros``, ``kmeans`` over the attention inputs). Default:
    ``router_init``, except that its default ``normal`` becomes ``zeros`` when all groups are selected
    (uniform weights: dense-equivalent with the default scale; the router still learns, its gradient
    is non-zero). With ``k < G`` a zero router would send every token to the same ``k`` groups."""
    noisy_gating: bool = False
    """Router noisy gating (LLaMA-MoE v1), training only."""
    jitter: float = 0.0
    """Router input jitter (Switch Transformer), training only."""
    calibration_tokens: int = 16384
    """At most this many non-padding calibration tokens are used per layer (kmeans / importance)."""
    kmeans_iters: int = 25
    """Iterations of balanced k-means (clustering split, kmeans router init, importance groups)."""
    seed: int = 0
    """Seed for every random choice; each (layer, purpose) derives its own stream, so results do not
    depend on the order layers are processed in (streaming == in-memory)."""

    def __post_init__(self) -> None:
        def bad(what: str, fix: str) -> ConfigError:
            return ConfigError(what, where="UpcycleConfig", fix=fix)

        if self.method not in METHODS:
            raise bad(f"unknown method {self.method!r}", f"choose one of {', '.join(METHODS)}")
        if self.split not in SPLITS:
            raise bad(f"unknown split {self.split!r}", f"choose one of {', '.join(SPLITS)}")
        if self.router_init not in ROUTER_INITS:
            raise bad(f"unknown router_init {self.router_init!r}", f"choose one of {', '.join(ROUTER_INITS)}")
        # attention MoE routes over KV groups with attention_top_k; top_k is the MLP's
        problem = routing_problem(
            self.num_experts, 1 if self.method == "attention" else self.top_k, self.rule
        )
        if problem:
            what, _, fix = problem.partition("; ")
            raise bad(what, fix)
        if self.scale is not None and not self.scale > 0:
            raise bad(f"scale={self.scale} must be > 0", "omit scale to use the method's default")
        if self.noise_std < 0:
            raise bad(f"noise_std={self.noise_std} must be >= 0", "use e.g. 0.01")
        if not 0.0 <= self.drop_ratio <= 1.0:
            raise bad(f"drop_ratio={self.drop_ratio} not in [0, 1]", "use the paper's 0.5")
        if self.router_std < 0:
            raise bad(f"router_std={self.router_std} must be >= 0", "use 0.02")
        if self.shared_experts < 0:
            raise bad(f"shared_experts={self.shared_experts} must be >= 0", "use 0 or e.g. 1")
        if self.shared_experts and self.method != "partition":
            raise bad(
                f"shared_experts={self.shared_experts} with method={self.method!r}",
                "shared experts are the residual variant of neuron partition: use method=partition",
            )
        if self.shared_experts and self.split == "clustering":
            raise bad(
                "shared_experts with split=clustering (no notion of a neuron shared by clusters)",
                "use split=importance (shared = neurons important for many groups), sequential or random",
            )
        if self.keep_first_dense < 0 or self.keep_last_dense < 0:
            raise bad("keep_first_dense/keep_last_dense must be >= 0", "use 0 to keep none dense")
        if self.attention_top_k is not None and self.attention_top_k < 1:
            raise bad(f"attention_top_k={self.attention_top_k} must be >= 1", "omit it to use all groups")
        if self.attention_scale is not None and not self.attention_scale > 0:
            raise bad(f"attention_scale={self.attention_scale} must be > 0", "omit it for the default")
        if self.attention_router_init is not None and self.attention_router_init not in ROUTER_INITS:
            raise bad(
                f"unknown attention_router_init {self.attention_router_init!r}",
                f"choose one of {', '.join(ROUTER_INITS)}, or omit it for the default",
            )
        if self.calibration_tokens < 1 or self.kmeans_iters < 1:
            raise bad("calibration_tokens and kmeans_iters must be >= 1", "use the defaults")
        if self.method == "attention":
            self.attention_moe = True
        parse_layer_selection(self.layers)  # validates the syntax

    # --------------------------------------------------------------- derived
    @property
    def builds_mlp_moe(self) -> bool:
        return self.method != "attention"

    @property
    def resolved_scale(self) -> float:
        if self.scale is not None:
            return float(self.scale)
        if self.method == "partition":
            return self.num_experts / self.top_k
        return 1.0

    @property
    def needs_calibration(self) -> bool:
        """Whether surgery needs calibration tokens (importance split or kmeans router init)."""
        importance = self.builds_mlp_moe and self.method == "partition" and self.split == "importance"
        mlp_kmeans = self.builds_mlp_moe and self.router_init == "kmeans"
        return importance or mlp_kmeans or self.attention_router_kmeans

    @property
    def attention_router_kmeans(self) -> bool:
        """Whether the attention router is k-means initialised."""
        return self.attention_moe and (self.attention_router_init or self.router_init) == "kmeans"

    def resolved_attention_router_init(self, groups: int) -> str:
        """The attention router init for a model with ``groups`` KV groups."""
        if self.attention_router_init is not None:
            return self.attention_router_init
        if self.router_init == "normal" and (self.attention_top_k or groups) >= groups:
            return "zeros"  # all groups: uniform weights, dense-equivalent with the default scale
        return self.router_init

    def resolved_attention_scale(self, groups: int) -> float:
        """The attention MoE scale for a model with ``groups`` KV groups (default ``groups``)."""
        return float(self.attention_scale) if self.attention_scale is not None else float(groups)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def select_layers(self, num_layers: int) -> list[int]:
        """The decoder layer indices that become MoE for a model with ``num_layers`` layers."""
        chosen = parse_layer_selection(self.layers, num_layers)
        lo, hi = self.keep_first_dense, num_layers - self.keep_last_dense
        chosen = [i for i in chosen if lo <= i < hi]
        if not chosen:
            raise ConfigError(
                f"the layer selection layers={self.layers!r}, keep_first_dense={self.keep_first_dense}, "
                f"keep_last_dense={self.keep_last_dense} leaves no MoE layer in a {num_layers}-layer model",
                where="UpcycleConfig.layers",
                fix="select at least one layer",
            )
        return chosen


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_layer_selection(layers: str | list[int], num_layers: int | None = None) -> list[int]:
    """Parse ``all`` / ``every:N`` / ``"0,2,5-7"`` / ``[0, 2]``; check bounds when ``num_layers`` is known."""

    def bad(what: str) -> ConfigError:
        return ConfigError(
            what, where="UpcycleConfig.layers", fix="use 'all', 'every:N', a list like '0,2,5-7' or [0, 2]"
        )

    if isinstance(layers, (list, tuple)):
        idx = [int(i) for i in layers]
    elif isinstance(layers, str) and layers.strip() == "all":
        return list(range(num_layers)) if num_layers is not None else []
    elif isinstance(layers, str) and layers.strip().startswith("every:"):
        try:
            n = int(layers.split(":", 1)[1])
        except ValueError:
            raise bad(f"bad layer selection {layers!r}") from None
        if n < 1:
            raise bad(f"every:{n} needs N >= 1")
        return [i for i in range(num_layers) if (i + 1) % n == 0] if num_layers is not None else []
    elif isinstance(layers, str):
        idx = []
        for part in layers.split(","):
            m = _RANGE.match(part)
            if not m:
                raise bad(f"bad layer selection {layers!r} (at {part!r})")
            a, b = int(m.group(1)), int(m.group(2) or m.group(1))
            if b < a:
                raise bad(f"empty range {part!r}")
            idx.extend(range(a, b + 1))
    else:
        raise bad(f"bad layer selection {layers!r}")
    if len(set(idx)) != len(idx):
        raise bad(f"duplicate layers in {layers!r}")
    if num_layers is not None:
        out = [i for i in idx if not 0 <= i < num_layers]
        if out:
            raise bad(f"layers {out} out of range for a {num_layers}-layer model")
    return sorted(idx)
