"""Export a moe-app MoE as a standard Hugging Face checkpoint: Mixtral, Qwen2-MoE or Qwen3-MoE.

The exported directory (config.json with ``architectures``, sharded safetensors + index, tokenizer
files) loads with stock ``transformers.AutoModelForCausalLM.from_pretrained`` (and vLLM / lm-eval)
without custom code, and reproduces moe-app's eval-mode logits. Only *exact* mappings are used;
anything else is refused with the reason (``UnsupportedModelError``). The mappings:

* **scale** ``s``: folded into every routed expert's W_down (``s * sum w_i E_i = sum w_i (s E_i)``).
* **routing rule**: Mixtral renormalises the top-k weights; Qwen2/3-MoE renormalise iff
  ``norm_topk_prob``. ``softmax_topk`` with ``k = E`` equals renormalisation (weights already sum
  to one), so that case also maps onto Mixtral.
* **ungated shared expert** (LLaMA-MoE v2 residual MoE) -> Qwen2-MoE ``shared_expert`` with
  ``shared_expert_gate`` weight 0: ``sigmoid(0) = 1/2`` exactly, so W_down is doubled (a power of
  two: exact in floating point). A "large gate bias" would only approximate 1 and is not used.
  Mixtral and Qwen3-MoE have no shared expert: refused.
* **dense layers** of a partially upcycled model: Qwen2/3-MoE list them in ``mlp_only_layers``.
  Mixtral has none, but E copies of the dense FFN under renormalised routing reproduce it exactly
  (weights sum to one), provided its ``d_ff`` equals the expert size; otherwise refused.
* **different expert / shared sizes across layers**: padded with zero neurons (``act(0) * 0 = 0``),
  exact. Different ``E`` or ``k`` across layers (after pruning) cannot be expressed: refused.
* **base family**: LLaMA / Mistral (no attention bias) -> Mixtral, or Qwen2-MoE with
  ``qkv_bias=False``; Qwen2 (q/k/v bias) -> Qwen2-MoE; Qwen3 (q/k RMSNorm) -> Qwen3-MoE only.
  RoPE parameters, head_dim, sliding window and tied embeddings are carried over.
* **not representable**: attention MoE, dynamic skipping thresholds, adapters (merge first), MLP
  sublayers removed by layer drop (no stock config can say "this layer has no MLP").
  Noisy gating and jitter act only in training and are dropped: the eval-mode function is exact.

Every tensor's shape is checked against the target architecture (instantiated on the meta device)
before anything is written; the output directory is written atomically. A checkpoint dir is
exported layer by layer without loading the model (``export_streaming.py``, same mappings).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_app.checkpoint.keymaps import FORMAT_ARCHITECTURES, FORMAT_KEYMAPS
from moe_app.checkpoint.model_dir import load_model, unique_state_dict, write_model_dir
from moe_app.checkpoint.pretrained import lineage_plus, read_lineage
from moe_app.checkpoint.shards import DEFAULT_MAX_SHARD_SIZE
from moe_app.core.models.dropped import DroppedMlp
from moe_app.core.models.layers import find_decoder_layers
from moe_app.core.moe.block import SparseMoeBlock
from moe_app.core.moe.experts import SwiGLUExperts
from moe_app.core.moe.pesc import LoraExpertsMoeBlock
from moe_app.core.moe.router import TopKRouter
from moe_app.core.spec import spec_of
from moe_app.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

FORMATS = ("auto", "mixtral", "qwen2_moe", "qwen3_moe")
KNOWN_BASES = ("llama", "mistral", "qwen2", "qwen3")
COMMON_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


@dataclass(frozen=True)
class MoeShape:
    """The shape of one MoE layer as far as the stock formats care."""

    num_experts: int
    top_k: int
    rule: str
    expert_f: int
    shared_f: int = 0


@dataclass
class _Analysis:
    """Facts about a moe-app model (or a planned upcycling) that decide which formats represent it exactly.

    Built from live modules (:func:`_analyse`, the in-memory export) or from metadata alone
    (:func:`stock_analysis`, the one-pass streaming upcycle); both then share :func:`check_format`,
    :func:`stock_config` and :func:`stock_mlp_tensors`.
    """

    model_type: str
    moe: dict[int, MoeShape] = field(default_factory=dict)
    dense: dict[int, int] = field(default_factory=dict)  # layer -> dense d_ff
    common: list[str] = field(default_factory=list)  # reasons no format can represent it
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    head_dim: int = 0
    num_experts: int = 0
    top_k: int = 0
    rules: set[str] = field(default_factory=set)
    expert_f: int = 0
    shared_f: int = 0
    dense_f: set[int] = field(default_factory=set)
    training_only: list[str] = field(default_factory=list)  # router parts the eval function ignores


def log_dropped_training_parts(a: _Analysis) -> None:
    """Say what the export leaves out because it acts only in training (the eval function is exact)."""
    for note in a.training_only:
        logger.info("export: %s", note)


def _analyse(model: nn.Module) -> _Analysis:
    """The analysis of a live moe-app model."""
    cfg = model.config
    a = _Analysis(model_type=str(getattr(cfg, "model_type", "")))
    path, layers = find_decoder_layers(model)
    _check_base(a, path)
    spec = spec_of(model)
    if spec is not None and spec.adapters:
        a.common.append("the model has adapters (PESC); merge them into full experts first")
    attn0 = layers[0].self_attn
    removed: list[int] = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if hasattr(attn, "router"):
            a.common.append(
                f"layer {i} has an attention MoE (LLaMA-MoE v2), which no stock HF format can express"
            )
            attn0 = getattr(attn, "attention", attn0)
        mlp = layer.mlp
        if isinstance(mlp, DroppedMlp):
            removed.append(i)
            continue
        if isinstance(mlp, SparseMoeBlock):
            if not isinstance(mlp.experts, SwiGLUExperts) or not isinstance(mlp.router, TopKRouter):
                a.common.append(f"layer {i}'s MoE uses custom experts/router ({type(mlp.experts).__name__})")
                continue
            noisy, jitter = mlp.router.noise_weight is not None, float(mlp.router.jitter)
            if noisy or jitter:
                parts = ["noisy gating" if noisy else "", f"jitter {jitter:g}" if jitter else ""]
                a.training_only.append(
                    f"layer {i}: {' and '.join(p for p in parts if p)} act only in training and are not "
                    "exported (stock routers have neither); the exported eval-mode logits are exact"
                )
            if mlp.router.skip_beta is not None:
                a.common.append(
                    f"layer {i} uses dynamic expert skipping (beta={mlp.router.skip_beta:.3g}), "
                    "which stock routers cannot do; remove `skipping` from moe_app.json to export without it"
                )
            a.moe[i] = MoeShape(
                num_experts=mlp.num_experts,
                top_k=mlp.top_k,
                rule=mlp.router.rule,
                expert_f=mlp.experts.intermediate_size,
                shared_f=mlp.shared_expert.intermediate_size if mlp.shared_expert is not None else 0,
            )
        else:
            _add_dense(a, i, mlp)
    if removed:
        a.common.append(
            f"layer drop removed the MLP of layers {removed}, and the stock MoE formats have no per-layer "
            "'no MLP' option (Mixtral has none; Qwen2/3-MoE's mlp_only_layers / decoder_sparse_step choose a "
            "dense MLP, not an absent one)"
        )
    _summarise(a)
    _attention_facts(a, attn0, cfg)
    return a


def stock_analysis(config: Any, meta: nn.Module, moe: dict[int, MoeShape]) -> _Analysis:
    """The analysis of a dense model (``meta``: its structure, e.g. on the meta device) whose layers
    ``moe`` are to become MoE layers of the given shapes: what the one-pass upcycle to a stock format
    checks and maps with, before reading any tensor."""
    a = _Analysis(model_type=str(getattr(config, "model_type", "")))
    path, layers = find_decoder_layers(meta)
    _check_base(a, path)
    for i, layer in enumerate(layers):
        if i in moe:
            a.moe[i] = moe[i]
        else:
            _add_dense(a, i, layer.mlp)
    _summarise(a)
    _attention_facts(a, layers[0].self_attn, config)
    return a


def _check_base(a: _Analysis, path: str) -> None:
    if path != "model.layers":
        a.common.append(f"decoder layers live at `{path}`, not `model.layers`")
    if a.model_type not in KNOWN_BASES:
        a.common.append(
            f"base family {a.model_type!r} has no exact counterpart among the stock MoE formats "
            f"(supported bases: {', '.join(KNOWN_BASES)})"
        )


def _add_dense(a: _Analysis, i: int, mlp: nn.Module) -> None:
    if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        if any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
            a.common.append(f"layer {i}'s dense MLP has biases")
        a.dense[i] = mlp.gate_proj.weight.shape[0]
        a.dense_f.add(mlp.gate_proj.weight.shape[0])
    else:
        a.common.append(f"layer {i}'s MLP is a {type(mlp).__name__}, which has no stock equivalent")


def _summarise(a: _Analysis) -> None:
    if not a.moe:
        a.common.append("no layer is a Mixture-of-Experts; export the dense model as it is")
        return
    es = {m.num_experts for m in a.moe.values()}
    ks = {m.top_k for m in a.moe.values()}
    if len(es) > 1 or len(ks) > 1:
        a.common.append(
            f"layers differ in experts/top-k (E in {sorted(es)}, k in {sorted(ks)}); the stock formats "
            "use one value for all layers"
        )
    a.num_experts, a.top_k = max(es), max(ks)
    a.rules = {m.rule for m in a.moe.values()}
    a.expert_f = max(m.expert_f for m in a.moe.values())
    a.shared_f = max(m.shared_f for m in a.moe.values())


def _attention_facts(a: _Analysis, attn0: nn.Module, cfg: Any) -> None:
    a.qkv_bias = attn0.q_proj.bias is not None
    if {attn0.k_proj.bias is not None, attn0.v_proj.bias is not None} != {a.qkv_bias}:
        a.common.append("q/k/v projections disagree on having a bias")
    a.o_bias = attn0.o_proj.bias is not None
    a.qk_norm = hasattr(attn0, "q_norm") and hasattr(attn0, "k_norm")
    a.head_dim = int(getattr(attn0, "head_dim", 0) or cfg.hidden_size // cfg.num_attention_heads)


def _uses_sliding(cfg: Any) -> bool:
    types = getattr(cfg, "layer_types", None) or []
    if getattr(cfg, "model_type", "") == "mistral":
        return getattr(cfg, "sliding_window", None) is not None
    return bool(getattr(cfg, "use_sliding_window", False)) or "sliding_attention" in types


def _reasons(fmt: str, a: _Analysis, cfg: Any) -> list[str]:
    r: list[str] = []
    renorm_equiv = a.rules == {"softmax_topk_renorm"} or a.top_k == a.num_experts
    if fmt == "mixtral":
        if a.model_type not in ("llama", "mistral"):
            r.append(f"Mixtral attention matches LLaMA/Mistral, not {a.model_type!r}")
        if a.qkv_bias or a.o_bias:
            r.append("Mixtral attention has no biases but the base has attention biases")
        if a.qk_norm:
            r.append("Mixtral has no q/k norms (use qwen3_moe)")
        if not renorm_equiv:
            r.append(
                "Mixtral always renormalises the top-k weights but the model uses softmax_topk with k < E"
            )
        if a.shared_f:
            r.append("Mixtral has no shared expert (use qwen2_moe)")
        bad = sorted(f for f in a.dense_f if f != a.expert_f)
        if a.dense and bad:
            r.append(
                f"dense layers {sorted(a.dense)} have d_ff={bad[0]} but experts have {a.expert_f}; Mixtral "
                "has no dense layers and E copies only reproduce a dense FFN of the expert size (use qwen2_moe)"
            )
    elif fmt == "qwen2_moe":
        if a.model_type not in ("llama", "mistral", "qwen2"):
            r.append(f"Qwen2-MoE attention matches Qwen2/LLaMA, not {a.model_type!r}")
        if a.o_bias:
            r.append("Qwen2-MoE has no o_proj bias but the base has one")
        if a.qk_norm:
            r.append("Qwen2-MoE has no q/k norms (use qwen3_moe)")
        if a.model_type == "mistral" and _uses_sliding(cfg):
            r.append("Mistral's sliding window is exported to mixtral, not qwen2_moe")
    elif fmt == "qwen3_moe":
        if a.model_type != "qwen3" or not a.qk_norm:
            r.append("Qwen3-MoE attention has q/k RMSNorms, which only a Qwen3 base has")
        if a.shared_f:
            r.append("Qwen3-MoE has no shared expert (use qwen2_moe)")
        if _uses_sliding(cfg):
            r.append("the base uses per-layer sliding-window attention, which Qwen3-MoE cannot express")
    if fmt in ("qwen2_moe", "qwen3_moe") and len(a.dense_f) > 1:
        r.append(f"dense layers have different d_ff {sorted(a.dense_f)}")
    if len(a.rules) > 1:
        r.append(f"layers use different routing rules {sorted(a.rules)}")
    return r


def choose_format(model: nn.Module, fmt: str = "auto") -> str:
    """The format to export to; raises ``UnsupportedModelError`` with every reason if none fits."""
    if fmt not in FORMATS:
        raise UnsupportedModelError(
            f"unknown export format {fmt!r}", fix=f"choose one of {', '.join(FORMATS)}"
        )
    return check_format(_analyse(model), model.config, fmt)


def check_format(
    a: _Analysis,
    config: Any,
    fmt: str,
    *,
    where: str | None = None,
    fix: str = "pick another --format (auto tries all), or keep the moe-app checkpoint",
) -> str:
    """The first of ``fmt``'s candidate formats that represents ``a`` exactly; raises
    ``UnsupportedModelError`` with every reason otherwise."""
    where = where or f"export --format {fmt}"
    if a.common:
        raise UnsupportedModelError(
            "cannot export exactly: " + "; ".join(dict.fromkeys(a.common)),
            where=where,
            fix="export a model without these features, or keep it as a moe-app checkpoint (moe_app.load_model)",
        )
    candidates = ["mixtral", "qwen2_moe", "qwen3_moe"] if fmt == "auto" else [fmt]
    why: dict[str, list[str]] = {}
    for c in candidates:
        why[c] = _reasons(c, a, config)
        if not why[c]:
            return c
    detail = " | ".join(f"{c}: " + "; ".join(rs) for c, rs in why.items())
    raise UnsupportedModelError(
        f"the model is not exactly representable as {fmt if fmt != 'auto' else 'any stock MoE format'} ({detail})",
        where=where,
        fix=fix,
    )


def target_config(model: nn.Module, fmt: str) -> Any:
    """The stock config of the exported model."""
    return stock_config(_analyse(model), model.config, fmt, next(model.parameters()).dtype)


def stock_config(a: _Analysis, base: Any, fmt: str, dtype: torch.dtype | None) -> Any:
    """The stock ``fmt`` config of the dense config ``base`` with the MoE layers described by ``a``."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    kw = {k: getattr(base, k) for k in COMMON_CONFIG_FIELDS if hasattr(base, k)}
    kw["head_dim"] = a.head_dim
    kw["num_experts_per_tok"] = a.top_k
    kw["router_aux_loss_coef"] = float(getattr(base, "router_aux_loss_coef", 0.001))
    dense = sorted(a.dense)
    if fmt == "mixtral":
        cfg = MixtralConfig(
            **kw,
            intermediate_size=a.expert_f,
            num_local_experts=a.num_experts,
            sliding_window=getattr(base, "sliding_window", None) if a.model_type == "mistral" else None,
            router_jitter_noise=0.0,
        )
    else:
        norm = a.rules == {"softmax_topk_renorm"}
        common = dict(
            intermediate_size=next(iter(a.dense_f)) if a.dense_f else int(base.intermediate_size),
            moe_intermediate_size=a.expert_f,
            num_experts=a.num_experts,
            norm_topk_prob=norm,
            decoder_sparse_step=1,
            mlp_only_layers=dense,
        )
        if fmt == "qwen2_moe":
            sliding = dict(use_sliding_window=False)
            if a.model_type == "qwen2":
                sliding = {
                    k: getattr(base, k)
                    for k in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
                    if hasattr(base, k)
                }
            cfg = Qwen2MoeConfig(
                **kw, **common, **sliding, shared_expert_intermediate_size=a.shared_f, qkv_bias=a.qkv_bias
            )
        else:
            cfg = Qwen3MoeConfig(
                **kw,
                **common,
                use_sliding_window=False,
                attention_bias=bool(getattr(base, "attention_bias", False)),
            )
    cfg.architectures = [FORMAT_ARCHITECTURES[fmt]]
    if dtype is not None:
        cfg.dtype = dtype
    return cfg


def _pad_rows(t: Tensor, n: int) -> Tensor:
    return t if t.shape[0] == n else torch.cat([t, t.new_zeros(n - t.shape[0], *t.shape[1:])])


def _pad_cols(t: Tensor, n: int) -> Tensor:
    return t if t.shape[1] == n else torch.cat([t, t.new_zeros(t.shape[0], n - t.shape[1])], dim=1)


def _scaled(t: Tensor, s: float) -> Tensor:
    return t if s == 1.0 else (t.float() * s).to(t.dtype)


def _layer_tensors(fmt: str, i: int, mlp: nn.Module, a: _Analysis, is_moe: bool) -> dict[str, Tensor]:
    """The stock tensors of layer ``i`` of a live moe-app model."""
    if not is_moe:
        return stock_mlp_tensors(
            fmt,
            i,
            a,
            dense=tuple(getattr(mlp, n).weight.detach() for n in ("gate_proj", "up_proj", "down_proj")),
        )
    block: SparseMoeBlock = mlp
    ex = block.experts
    se = block.shared_expert
    return stock_mlp_tensors(
        fmt,
        i,
        a,
        router=block.router.weight.detach(),
        gate_up=ex.gate_up_proj.detach(),
        down=ex.down_proj.detach(),
        scale=block.scale,
        shared=None
        if se is None
        else tuple(getattr(se, n).weight.detach() for n in ("gate_proj", "up_proj", "down_proj")),
        shared_gate=block.shared_gate.weight.detach() if block.shared_gate is not None else None,
    )


def stock_mlp_tensors(
    fmt: str,
    i: int,
    a: _Analysis,
    *,
    dense: tuple[Tensor, Tensor, Tensor] | None = None,
    router: Tensor | None = None,
    gate_up: Tensor | None = None,
    down: Tensor | None = None,
    scale: float = 1.0,
    shared: tuple[Tensor, Tensor, Tensor] | None = None,
    shared_gate: Tensor | None = None,
) -> dict[str, Tensor]:
    """The stock ``fmt`` tensors of decoder layer ``i``'s MLP, by their on-disk names.

    A dense layer passes ``dense = (W_gate, W_up, W_down)``; an MoE layer passes moe-app's expert
    tensors: ``router (E, d)``, ``gate_up (E, 2F, d)``, ``down (E, d, F)``, the block ``scale`` and
    optionally the shared expert ``(gate, up, down)`` and its sigmoid gate ``(1, d)``. Shared by the
    in-memory export and the one-pass streaming upcycle, so both write the same bytes.
    """
    km = FORMAT_KEYMAPS[fmt]
    out: dict[str, Tensor] = {}
    if dense is not None:
        g, u, dn = dense
        if fmt != "mixtral":  # listed in mlp_only_layers: same keys as a dense MLP
            for n, t in zip(("gate_proj", "up_proj", "down_proj"), dense):
                out[km[f"dense_{n}"].format(i=i)] = t
            return out
        # Mixtral: E copies of the dense FFN under any router reproduce it (weights sum to one).
        out[km["router"].format(i=i)] = g.new_zeros(a.num_experts, g.shape[1])
        for j in range(a.num_experts):
            out[km["expert_gate_proj"].format(i=i, j=j)] = g
            out[km["expert_up_proj"].format(i=i, j=j)] = u
            out[km["expert_down_proj"].format(i=i, j=j)] = dn
        return out
    assert router is not None and gate_up is not None and down is not None
    num_experts, two_f, d = gate_up.shape
    f = two_f // 2
    dtype = gate_up.dtype
    out[km["router"].format(i=i)] = router.to(dtype)
    for j in range(num_experts):
        gu = gate_up[j]  # (2F, d)
        out[km["expert_gate_proj"].format(i=i, j=j)] = _pad_rows(gu[:f], a.expert_f)
        out[km["expert_up_proj"].format(i=i, j=j)] = _pad_rows(gu[f:], a.expert_f)
        dj = _scaled(down[j], scale)  # (d, F)
        out[km["expert_down_proj"].format(i=i, j=j)] = _pad_cols(dj, a.expert_f)
    if fmt == "qwen2_moe":
        if shared is None:
            g = torch.zeros(a.shared_f, d, dtype=dtype, device=gate_up.device)
            u, dn = g.clone(), torch.zeros(d, a.shared_f, dtype=dtype, device=gate_up.device)
            gate = torch.zeros(1, d, dtype=dtype, device=gate_up.device)
        else:
            g, u, dn = shared
            if shared_gate is not None:
                gate = shared_gate
            else:
                gate = torch.zeros(1, d, dtype=dtype, device=gate_up.device)  # sigmoid(0) = 1/2 exactly ...
                dn = _scaled(dn, 2.0)  # ... compensated by a power-of-two scale: exact
        out[km["shared_gate_proj"].format(i=i)] = _pad_rows(g, a.shared_f)
        out[km["shared_up_proj"].format(i=i)] = _pad_rows(u, a.shared_f)
        out[km["shared_down_proj"].format(i=i)] = _pad_cols(dn, a.shared_f)
        out[km["shared_expert_gate"].format(i=i)] = gate
    return out


_EXPERT_KEY = re.compile(
    r"^(.*)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)


def check_against_target(cfg: Any, tensors: dict[str, tuple[int, ...]]) -> None:
    """Assert every exported key feeds a target parameter with a matching shape, and none is missing."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(cfg)
    want = {k: tuple(v.shape) for k, v in unique_state_dict(target).items()}
    covered: set[str] = set()
    for k, shape in tensors.items():
        m = _EXPERT_KEY.match(k)
        if m:
            prefix, _, kind = m.groups()
            fused = "gate_up_proj" if kind in ("w1", "w3", "gate_proj", "up_proj") else "down_proj"
            tk = f"{prefix}.mlp.experts.{fused}"
            _, rows, cols = want.get(tk, (0, 0, 0))
            expect = (rows // 2, cols) if fused == "gate_up_proj" else (rows, cols)
        else:
            tk = k.replace(".block_sparse_moe.", ".mlp.")
            expect = want.get(tk)
        if expect is None or tuple(shape) != tuple(expect):
            raise AssertionError(f"export produced {k} {tuple(shape)} but the target expects {tk} {expect}")
        covered.add(tk)
    missing = sorted(set(want) - covered)
    if missing:
        raise AssertionError(f"export misses target parameters {missing[:8]}")


@dataclass
class ExportResult:
    path: Path
    format: str


def _merge_lora_experts_if_any(model: nn.Module) -> nn.Module:
    """PESC LoRA-expert blocks (MixLoRA-style) merge exactly into full experts; merge them first.

    Adapter-variant PESC blocks cannot be merged and stay as they are (the analysis refuses them
    with the reason).
    """

    if any(isinstance(m, LoraExpertsMoeBlock) for m in model.modules()):
        from moe_app.core.pesc.merge import merge_pesc

        model = merge_pesc(model)
    return model


def export_checkpoint(
    src: str | Path | nn.Module,
    out_dir: str | Path,
    format: str = "auto",
    *,
    tokenizer: Any = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    streaming: bool = True,
) -> ExportResult:
    """Write ``src`` (a moe-app checkpoint dir or an upcycled model) as a stock HF MoE checkpoint.

    A checkpoint dir is exported layer by layer from its memory-mapped shards (peak memory about one
    decoder layer: :mod:`moe_app.checkpoint.export_streaming`) unless ``streaming=False`` or it holds
    PESC adapters, which are merged (or refused) on the live model; a live model is exported as it is.
    """
    src_dir = None
    if isinstance(src, nn.Module):
        model = src
    else:
        src_dir = Path(src)
        if streaming:
            # Imported here: the streaming exporter is built on this module's mappings.
            from moe_app.checkpoint.export_streaming import (
                export_checkpoint_streaming,
                streaming_export_reason,
            )

            if streaming_export_reason(src_dir) is None:
                return export_checkpoint_streaming(
                    src_dir,
                    out_dir,
                    format,
                    tokenizer=tokenizer,
                    tokenizer_dir=tokenizer_dir,
                    max_shard_size=max_shard_size,
                )
        model = load_model(src_dir)
    model = _merge_lora_experts_if_any(model)
    fmt = choose_format(model, format)
    a = _analyse(model)
    log_dropped_training_parts(a)
    cfg = target_config(model, fmt)
    mlp_prefixes = {f"model.layers.{i}.mlp.": i for i in (*a.moe, *a.dense)}
    state = unique_state_dict(model)

    def tensors():
        done: set[int] = set()
        for k, v in state.items():
            prefix = k[: k.find(".mlp.") + 5] if ".mlp." in k else None
            if prefix in mlp_prefixes:
                i = mlp_prefixes[prefix]
                if i not in done:
                    done.add(i)
                    yield from _layer_tensors(fmt, i, model.model.layers[i].mlp, a, i in a.moe).items()
                continue
            yield k, v.detach()

    check_against_target(cfg, {k: tuple(v.shape) for k, v in tensors()})
    spec = spec_of(model)
    previous = read_lineage(src_dir) if src_dir is not None else (list(spec.lineage) if spec else [])
    lineage = lineage_plus(previous, "export", {"format": fmt})
    out_dir = write_model_dir(
        out_dir,
        cfg,
        tensors(),
        generation_config=getattr(model, "generation_config", None),
        tokenizer=tokenizer,
        tokenizer_dir=tokenizer_dir if tokenizer_dir is not None else src_dir,
        max_shard_size=max_shard_size,
        lineage=lineage,
    )
    return ExportResult(path=out_dir, format=fmt)
