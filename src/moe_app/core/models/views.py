"""One view over every kind of MoE layer moe-app prunes: what the pruning algorithms need to know.

Expert pruning and skipping (Lu et al. 2024, "Not All Experts are Equal", arXiv 2402.14800) and the
saliency scores of He et al. 2024 (arXiv 2406.02500) and REAP (arXiv 2510.13999) only need a few
facts about an MoE layer: the routing rule and ``k``, the router logits of a token, what each
expert would add for that token, what is added whatever the routing (a shared expert, PESC's shared
FFN), and how to remove experts. Every layer kind moe-app meets writes its output as

    y(x) = base(x) + sum_{i in topk(x)} (s * w_i(x)) * o_i(x)

with ``w`` the combine weights of the routing rule (ALGORITHMS.md section 1), ``s`` the block's
scale (``weight_scale``; applied to the float32 weights, as the blocks do) and ``o_i`` the expert's
output. :class:`MoeLayerView` exposes exactly that,
so the algorithms are written once for:

* moe-app :class:`~moe_app.core.moe.block.SparseMoeBlock` (``o_i = E_i(x)``, base = gated shared expert);
* PESC :class:`~moe_app.core.moe.pesc.PescMoeBlock` (``o_i = A_i(F(x))``, base = the shared FFN ``F(x)``)
  and the MixLoRA :class:`~moe_app.core.moe.pesc.LoraExpertsMoeBlock` (``o_i = s E_i(x)``);
* stock transformers 5.x ``MixtralSparseMoeBlock`` (renormalised top-k), ``Qwen2MoeSparseMoeBlock``
  (shared expert with a sigmoid gate), ``Qwen3MoeSparseMoeBlock`` and ``OlmoeSparseMoeBlock``
  (``norm_topk_prob`` picks the rule), whose experts are fused 3-D parameters
  ``experts.gate_up_proj (E, 2F, d)`` / ``experts.down_proj (E, d, F)`` and router ``gate.weight (E, d)``.

``keep(idx)`` removes every other expert *in place*: it slices the expert parameters and the router
rows (so the kept experts' logits, hence their softmax among themselves, are unchanged) and updates
the modules' expert counts. With ``idx = range(E)`` it is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_app.core.models.layers import find_decoder_layers
from moe_app.core.moe.block import SparseMoeBlock
from moe_app.core.moe.experts import SwiGLUExperts
from moe_app.core.moe.pesc import LoraExpertsMoeBlock, PescMoeBlock
from moe_app.core.moe.router import combine_weights
from moe_app.core.spec import spec_of
from moe_app.errors import UnsupportedModelError

HF_MOE_BLOCKS = (
    "MixtralSparseMoeBlock",
    "Qwen2MoeSparseMoeBlock",
    "Qwen3MoeSparseMoeBlock",
    "OlmoeSparseMoeBlock",
)


def _slice_param(module: nn.Module, name: str, idx: Tensor) -> None:
    """Replace ``module.<name>`` by its rows ``idx`` (dim 0), keeping it a Parameter with its flags."""
    old = getattr(module, name)
    new = nn.Parameter(
        old.detach().index_select(0, idx.to(old.device)).clone(), requires_grad=old.requires_grad
    )
    setattr(module, name, new)


class MoeLayerView:
    """Uniform access to one MoE layer (see the module docstring for the output formula)."""

    kind: str = "abstract"

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    # ------------------------------------------------------------------ routing
    @property
    def num_experts(self) -> int:
        raise NotImplementedError

    @property
    def top_k(self) -> int:
        raise NotImplementedError

    @property
    def rule(self) -> str:
        """``softmax_topk_renorm`` or ``softmax_topk`` (``moe_app.core.moe.router.ROUTING_RULES``)."""
        raise NotImplementedError

    @property
    def router_weight(self) -> Tensor:
        """Router matrix ``(E, d)``."""
        raise NotImplementedError

    def router_logits(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        """Router logits ``(T, E)`` in float32 for tokens ``x (T, d)`` (no noise: eval routing).

        ``rows`` restricts to those experts ``(T, len(rows))``, computed from the sliced router
        matrix, i.e. bit for bit what the router of the pruned layer will compute.
        """
        w = self.router_weight if rows is None else self.router_weight.index_select(0, rows)
        return F.linear(x.float(), w.float())  # (T, E)

    @property
    def weight_scale(self) -> float:
        """The block's scale ``s`` on the combine weights (1 for stock HF blocks)."""
        return float(getattr(self.module, "scale", 1.0))

    def routing(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(weights (T, k), indices (T, k))`` of the layer's rule for ``logits (T, E)`` (no skipping)."""
        probs = logits.float().softmax(dim=-1)  # (T, E)
        top_p, idx = probs.topk(self.top_k, dim=-1)  # (T, k)
        return combine_weights(top_p, self.rule), idx

    # ------------------------------------------------------------------ computation
    def expert_outputs(self, x: Tensor) -> Tensor:
        """Every expert's output ``o_e(x)`` (before weights and scale): ``(T, d)`` -> ``(E, T, d)``."""
        raise NotImplementedError

    def base_output(self, x: Tensor) -> Tensor | None:
        """The always-on part of the output (shared expert, PESC's FFN) ``(T, d)``, or ``None``."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        """The block itself on ``x (T, d)`` -> ``(T, d)`` (the module's own code path)."""
        return self.module(x.unsqueeze(0)).reshape(x.shape)

    # ------------------------------------------------------------------ surgery
    def keep(self, experts: Sequence[int]) -> None:
        """Keep only ``experts`` (sorted, distinct), in place: experts and router rows are sliced."""
        raise NotImplementedError

    @property
    def skip_beta(self) -> float | None:
        """Dynamic-skipping threshold (moe-app routers only)."""
        return None

    @skip_beta.setter
    def skip_beta(self, beta: float | None) -> None:
        raise UnsupportedModelError(
            f"dynamic expert skipping cannot be stored in a stock {type(self.module).__name__}: "
            "transformers' routers have no skipping threshold",
            fix="prune without --skipping, or convert the model to a moe-app checkpoint first",
        )

    def _check_keep(self, experts: Sequence[int]) -> Tensor:
        idx = sorted({int(e) for e in experts})
        if len(idx) != len(experts) or not idx or idx[0] < 0 or idx[-1] >= self.num_experts:
            raise ValueError(
                f"invalid experts to keep {list(experts)} for a layer of {self.num_experts} experts"
            )
        if len(idx) < self.top_k:
            raise ValueError(f"cannot keep {len(idx)} experts in a top-{self.top_k} layer")
        return torch.tensor(idx, dtype=torch.long)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(E={self.num_experts}, k={self.top_k}, rule={self.rule})"


class _MoeAppRouterMixin:
    """Routers of moe-app blocks are :class:`~moe_app.core.moe.router.TopKRouter`."""

    module: nn.Module

    @property
    def num_experts(self) -> int:
        return self.module.router.num_experts

    @property
    def top_k(self) -> int:
        return self.module.router.top_k

    @property
    def rule(self) -> str:
        return self.module.router.rule

    @property
    def router_weight(self) -> Tensor:
        return self.module.router.weight

    @property
    def skip_beta(self) -> float | None:
        return self.module.router.skip_beta

    @skip_beta.setter
    def skip_beta(self, beta: float | None) -> None:
        self.module.router.skip_beta = None if beta is None else float(beta)

    def _keep_router(self, idx: Tensor) -> None:
        router = self.module.router
        _slice_param(router, "weight", idx)
        if router.noise_weight is not None:
            _slice_param(router, "noise_weight", idx)
        router.num_experts = len(idx)


class SparseMoeBlockView(_MoeAppRouterMixin, MoeLayerView):
    """moe-app ``SparseMoeBlock`` with ``SwiGLUExperts``."""

    kind = "moe-app"

    def expert_outputs(self, x: Tensor) -> Tensor:
        return self.module.experts.all_experts_forward(x)  # (E, T, d)

    def base_output(self, x: Tensor) -> Tensor | None:
        block = self.module
        if block.shared_expert is None:
            return None
        shared = block.shared_expert(x)  # (T, d)
        if block.shared_gate is not None:
            shared = block.shared_gate(x).sigmoid() * shared
        return shared

    def keep(self, experts: Sequence[int]) -> None:
        idx = self._check_keep(experts)
        ex = self.module.experts
        _slice_param(ex, "gate_up_proj", idx)
        _slice_param(ex, "down_proj", idx)
        ex.num_experts = len(idx)
        self._keep_router(idx)


class PescBlockView(_MoeAppRouterMixin, MoeLayerView):
    """PESC ``PescMoeBlock``: experts are bottleneck adapters in series after the shared FFN."""

    kind = "pesc"

    def expert_outputs(self, x: Tensor) -> Tensor:
        block = self.module
        f = block.ffn(x)  # (T, d)
        ad = block.adapters
        z = F.gelu(torch.matmul(f.unsqueeze(0), ad.down.to(f.dtype).transpose(1, 2)))  # (E, T, r)
        return torch.matmul(z, ad.up.to(f.dtype).transpose(1, 2))  # (E, T, d)

    def base_output(self, x: Tensor) -> Tensor:
        return self.module.ffn(x)  # (T, d)

    def keep(self, experts: Sequence[int]) -> None:
        idx = self._check_keep(experts)
        ad = self.module.adapters
        _slice_param(ad, "down", idx)
        _slice_param(ad, "up", idx)
        for name in ("down_mask", "up_mask"):  # SparseAdapter's fixed masks go with their experts
            mask = getattr(ad, name, None)
            if mask is not None:
                setattr(ad, name, mask.index_select(0, idx.to(mask.device)).clone())
        ad.num_experts = len(idx)
        self._keep_router(idx)


class LoraExpertsBlockView(_MoeAppRouterMixin, MoeLayerView):
    """MixLoRA ``LoraExpertsMoeBlock``: expert ``i`` is the shared SwiGLU with its own LoRA deltas."""

    kind = "lora-experts"

    def expert_outputs(self, x: Tensor) -> Tensor:
        block = self.module
        lora, ffn = block.expert_lora, block.ffn
        gate, up = ffn.gate_proj(x), ffn.up_proj(x)  # (T, F) each, shared by every expert
        outs = []
        for e in range(lora.num_experts):
            h = block.act_fn(gate + lora.expert_delta("gate", e, x)) * (
                up + lora.expert_delta("up", e, x)
            )  # (T, F)
            outs.append(ffn.down_proj(h) + lora.expert_delta("down", e, h))  # (T, d)
        return torch.stack(outs)  # (E, T, d)

    def keep(self, experts: Sequence[int]) -> None:
        idx = self._check_keep(experts)
        lora = self.module.expert_lora
        for p in lora.PROJECTIONS:
            _slice_param(lora, f"{p}_A", idx)
            _slice_param(lora, f"{p}_B", idx)
        lora.num_experts = len(idx)
        self._keep_router(idx)


class HfMoeBlockView(MoeLayerView):
    """Stock transformers MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) with fused 3-D experts."""

    kind = "hf"

    @property
    def num_experts(self) -> int:
        return self.module.gate.weight.shape[0]

    @property
    def top_k(self) -> int:
        return int(self.module.gate.top_k)

    @property
    def rule(self) -> str:
        # Mixtral always renormalises; the Qwen / OLMoE routers follow config.norm_topk_prob.
        renorm = getattr(self.module.gate, "norm_topk_prob", True)
        return "softmax_topk_renorm" if renorm else "softmax_topk"

    @property
    def router_weight(self) -> Tensor:
        return self.module.gate.weight

    def router_logits(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        # As transformers does: the product in the model dtype, the softmax in float32.
        w = self.router_weight if rows is None else self.router_weight.index_select(0, rows)
        return F.linear(x, w).float()  # (T, E)

    def expert_outputs(self, x: Tensor) -> Tensor:
        ex = self.module.experts
        gate_up = torch.matmul(x.unsqueeze(0), ex.gate_up_proj.transpose(1, 2))  # (E, T, 2F)
        gate, up = gate_up.chunk(2, dim=-1)  # (E, T, F) each
        return torch.matmul(ex.act_fn(gate) * up, ex.down_proj.transpose(1, 2))  # (E, T, d)

    def base_output(self, x: Tensor) -> Tensor | None:
        shared = getattr(self.module, "shared_expert", None)
        if shared is None:
            return None
        out = shared(x)  # (T, d)
        gate = getattr(self.module, "shared_expert_gate", None)
        return out if gate is None else F.sigmoid(gate(x)) * out

    def keep(self, experts: Sequence[int]) -> None:
        idx = self._check_keep(experts)
        block = self.module
        _slice_param(block.gate, "weight", idx)
        _slice_param(block.experts, "gate_up_proj", idx)
        _slice_param(block.experts, "down_proj", idx)
        for owner in (block, block.gate, block.experts):
            if hasattr(owner, "num_experts"):
                owner.num_experts = len(idx)


def view_of(module: nn.Module) -> MoeLayerView | None:
    """The view of ``module`` if it is an MoE MLP block moe-app can prune, else ``None``."""

    if isinstance(module, SparseMoeBlock):
        if not isinstance(module.experts, SwiGLUExperts):
            raise UnsupportedModelError(
                f"SparseMoeBlock with {type(module.experts).__name__} experts cannot be pruned",
                fix="use SwiGLUExperts (what moe-app upcycling builds)",
            )
        return SparseMoeBlockView(module)
    if isinstance(module, PescMoeBlock):
        return PescBlockView(module)
    if isinstance(module, LoraExpertsMoeBlock):
        return LoraExpertsBlockView(module)
    if type(module).__name__ in HF_MOE_BLOCKS:
        return HfMoeBlockView(module)
    return None


def moe_layer_views(model: nn.Module) -> list[tuple[int, MoeLayerView]]:
    """``(decoder layer index, view)`` for every layer whose ``mlp`` is a prunable MoE block."""

    _, layers = find_decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        view = view_of(getattr(layer, "mlp", None)) if getattr(layer, "mlp", None) is not None else None
        if view is not None:
            out.append((i, view))
    return out


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (e.g. to prune while keeping the original).

    Blocks' recorded ``last_routing`` is dropped first: after a training step it holds non-leaf
    autograd tensors, which ``copy.deepcopy`` refuses.
    """
    import copy

    for m in model.modules():
        if getattr(m, "last_routing", None) is not None:
            m.last_routing = None
    return copy.deepcopy(model)


def model_kind(model: nn.Module) -> str:
    """``moe-app`` (carries a ``MoeSpec``: :func:`~moe_app.core.spec.spec_of`), ``hf`` (stock transformers MoE) or ``dense``."""
    views = moe_layer_views(model)
    if not views:
        return "dense"
    if spec_of(model) is not None or views[0][1].kind != "hf":
        return "moe-app"
    return "hf"


__all__ = [
    "HF_MOE_BLOCKS",
    "HfMoeBlockView",
    "LoraExpertsBlockView",
    "MoeLayerView",
    "PescBlockView",
    "SparseMoeBlockView",
    "clone_model",
    "model_kind",
    "moe_layer_views",
    "view_of",
]
