"""Attention Mixture-of-Experts over GQA groups (LLaMA-MoE v2, Qu et al. 2024, arXiv 2411.15708).

One expert per grouped-query-attention group: its key/value head, the query heads that share it,
and the matching column slice of ``W_o``. Dense attention output is the sum over groups of each
group's output through its ``W_o`` slice, so an attention MoE is a re-reading of the dense layer:

    y = scale * sum_{g in topk(x)} w_g(x) * W_o[:, cols(g)] Attn_g(x)  (+ o_proj bias, once)

v2 semantics, implemented here: expert ``g`` attends only among the tokens routed to it. Key ``j``
is visible to query ``i`` in group ``g`` iff the model's own mask allows it (causality, padding,
sliding window) and token ``j`` is routed to ``g``; positions keep their original RoPE index.

Why it is written this way:

* Dense compute with per-group masks: every head is computed for every token and the routing
  enters as a ``(B, H, S_q, S_k)`` mask plus a per-head gate on the attention output before
  ``o_proj``. That costs as much as dense attention (no FLOP saving) but reuses transformers'
  own eager / SDPA kernels, so with every group selected and unit multipliers the result equals
  dense attention to float rounding (exactly, in fact: the model's mask is passed through
  unchanged when every token is routed to every group). A gather-based sparse kernel is future
  work.
* A query not routed to ``g`` may still see its own key in ``g``, so no row is fully masked (a
  fully masked SDPA row is NaN, and ``NaN * 0`` would poison the output); its output is gated by
  zero anyway.
* Supported attention implementations: ``eager`` and ``sdpa`` (4D float or bool masks, or none).
  Others (flash, flex) cannot take per-group masks; they work only when every token is routed to
  every group.
* KV cache: prefill works (the cache is filled as usual). Incremental decoding with routing that
  drops groups would need the routing of every cached token, which a cache does not keep, so it
  raises with the fix (``use_cache=False``); with every group selected decoding is dense and works.
* The wrapper follows a private call signature (the decoder layer calls ``self_attn(...)`` by
  keyword, and transformers renamed the cache argument from ``past_key_values`` to ``cache`` in
  5.24). The name is read from the wrapped module's ``forward`` when the block is built, and the
  build fails there if the signature is one this wrapper does not know. At call time a ``Cache``
  arriving under any other name is an error, never silently dropped: dropping it once made
  cached generation diverge from uncached generation without any error.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache

from moe_app.core.moe.block import RoutedBlock
from moe_app.core.moe.router import TopKRouter
from moe_app.errors import UnsupportedModelError

_MASKABLE_IMPLS = ("eager", "sdpa")
# Names transformers has used for the KV-cache argument of ``XAttention.forward``, newest first.
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value")
_REQUIRED_ARGS = ("hidden_states", "position_embeddings", "attention_mask")


def _cache_argument(attention: nn.Module) -> str:
    """The name under which ``attention.forward`` takes the KV cache; fail at build time if unknown."""
    params = inspect.signature(type(attention).forward).parameters
    found = [name for name in _CACHE_ARGS if name in params]
    missing = [name for name in _REQUIRED_ARGS if name not in params]
    if len(found) != 1 or missing:
        import transformers

        raise UnsupportedModelError(
            f"attention MoE cannot wrap {type(attention).__name__} of transformers {transformers.__version__}: "
            f"its forward({', '.join(params)}) is not a signature this wrapper follows (it needs "
            f"{', '.join(_REQUIRED_ARGS)} and one cache argument among {', '.join(_CACHE_ARGS)})",
            fix="install the transformers version pinned in requirements.lock, or report the new signature",
        )
    return found[0]


def _rope_fn(attention: nn.Module):
    """The wrapped model's own ``apply_rotary_pos_emb`` (LLaMA's where the module has none)."""
    module = sys.modules.get(type(attention).__module__)
    if hasattr(module, "apply_rotary_pos_emb"):
        return module.apply_rotary_pos_emb
    from transformers.models.llama import modeling_llama

    return modeling_llama.apply_rotary_pos_emb


def _attention_fn(impl: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, modeling_llama.eager_attention_forward)


class AttentionMoe(RoutedBlock):
    """Wrap an HF ``LlamaAttention`` / ``MistralAttention`` / ``Qwen2Attention`` as a GQA-group MoE.

    ``router.num_experts`` must equal the number of KV heads. The call signature and return value
    are the wrapped module's: ``forward(hidden_states, position_embeddings, attention_mask,
    <cache>=None, **kwargs) -> (attn_output, attn_weights)``, where ``<cache>`` is whatever name
    the installed transformers gives it (``cache`` from 5.24, ``past_key_values`` before). Each call records
    ``last_routing`` (flattened ``B*S`` tokens) for the router losses.
    """

    def __init__(self, attention: nn.Module, router: TopKRouter, scale: float = 1.0) -> None:
        config = attention.config
        groups = config.num_key_value_heads
        if router.num_experts != groups:
            raise ValueError(
                f"attention MoE has one expert per KV head: router has {router.num_experts} experts but "
                f"the attention has {groups} KV heads; build TopKRouter(num_experts={groups})."
            )
        if router.hidden_size != config.hidden_size:
            raise ValueError(
                f"router hidden size {router.hidden_size} != model hidden size {config.hidden_size}."
            )
        self._cache_arg = _cache_argument(attention)
        super().__init__(router, scale)
        self.num_heads = config.num_attention_heads
        self.num_groups = groups
        self.attention = attention
        self.layer_idx = getattr(attention, "layer_idx", None)

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, heads={self.num_heads}, scale={self.scale}"

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        cache = kwargs.pop(self._cache_arg, None)
        stray = [name for name, value in kwargs.items() if isinstance(value, Cache)]
        if stray:
            raise TypeError(
                f"attention MoE got a KV cache as {stray[0]!r} but the wrapped "
                f"{type(self.attention).__name__} takes it as {self._cache_arg!r}; rebuild the model with the "
                "installed transformers (a cache passed under an unknown name would be silently ignored)"
            )
        attn = self.attention
        B, S, d = hidden_states.shape
        G, H = self.num_groups, self.num_heads
        hd = attn.head_dim

        routing = self.route(hidden_states.reshape(-1, d))
        hit = routing.indices.unsqueeze(-1) == torch.arange(G, device=hidden_states.device)  # (T, k, G)
        member = hit.any(dim=1).view(B, S, G)  # (B, S, G) token routed to group
        gate = (routing.weights.unsqueeze(-1) * hit).sum(dim=1) * self.scale  # (T, G) float32
        everyone = bool(member.all())

        hidden_shape = (B, S, -1, hd)
        q = attn.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, S, hd)
        k = attn.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, G, S, hd)
        v = attn.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, G, S, hd)
        cos, sin = position_embeddings
        q, k = _rope_fn(attn)(q, k, cos, sin)

        past_len = 0
        if cache is not None:
            past_len = cache.get_seq_length(self.layer_idx)
            if past_len > 0 and not everyone:
                raise NotImplementedError(
                    "attention MoE with top_k < number of KV groups cannot decode with a KV cache (the "
                    "cache does not keep which group each past token was routed to); call the model / "
                    "generate() with use_cache=False."
                )
            if self._cache_arg == "cache":
                # transformers >= 5.24 hands the layer's kwargs to the cache (sliding windows, offsets).
                k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
            else:
                k, v = cache.update(k, v, self.layer_idx)

        impl = attn.config._attn_implementation or "eager"
        if not everyone:
            if impl not in _MASKABLE_IMPLS:
                raise NotImplementedError(
                    f"attention MoE with top_k < groups needs per-group masks, which attn_implementation="
                    f"{impl!r} cannot take; load the model with attn_implementation='sdpa' or 'eager'."
                )
            attention_mask = self._group_mask(attention_mask, member, q.shape[2], k.shape[2], attn)
        out, weights = _attention_fn(impl)(
            attn,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else attn.attention_dropout,
            scaling=attn.scaling,
            **kwargs,
        )  # out (B, S, H, hd)
        # Gate each head by its group's routing weight: W_o acting on the gated heads is the sum of
        # the groups' W_o-slice outputs weighted by w_g.
        head_gate = gate.view(B, S, G, 1, 1).expand(B, S, G, H // G, 1).reshape(B, S, H, 1)  # (B, S, H, 1)
        out = out * head_gate.to(out.dtype)  # (B, S, H, hd)
        out = attn.o_proj(out.reshape(B, S, -1).contiguous())  # (B, S, d)
        return out, weights

    def _group_mask(self, base: Tensor | None, member: Tensor, q_len: int, k_len: int, attn) -> Tensor:
        """The model's mask restricted per group to routed keys: ``(B, H, S_q, S_k)``, same kind as ``base``."""
        G = member.shape[-1]
        H = self.num_heads
        device = member.device
        if base is None:
            # SDPA drops the mask when it is plain causal (is_causal=True); rebuild it, honouring a
            # sliding window if the model has one. Queries are the last q_len of the k_len keys.
            qi = torch.arange(k_len - q_len, k_len, device=device).unsqueeze(-1)  # (S_q, 1)
            kj = torch.arange(k_len, device=device)  # (S_k,)
            allowed = kj <= qi  # (S_q, S_k)
            window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
            if window is not None:
                allowed = allowed & (kj > qi - window)
            allowed = allowed.view(1, 1, q_len, k_len)
        elif base.dtype == torch.bool:
            allowed = base  # (B|1, 1|H, S_q, S_k)
        else:
            allowed = base > torch.finfo(base.dtype).min / 2  # additive mask: 0 keeps, min drops
        key_member = member.permute(0, 2, 1)  # (B, G, S): keys of this call (no past here)
        own = torch.eye(q_len, k_len, dtype=torch.bool, device=device)  # (S_q, S_k) own key
        routed = key_member.unsqueeze(2) | own  # (B, G, S_q, S_k)
        routed = routed.repeat_interleave(H // G, dim=1)  # (B, H, S_q, S_k)
        grouped = allowed & routed  # (B, H, S_q, S_k)
        # Keep the model's own row where the group leaves nothing (e.g. padded queries).
        grouped = torch.where(grouped.any(dim=-1, keepdim=True), grouped, allowed)
        if base is None or base.dtype == torch.bool:
            return grouped
        return torch.where(grouped, base, torch.finfo(base.dtype).min)  # (B, H, S_q, S_k) additive
