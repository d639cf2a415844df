"""Attention Mixture-of-Experts over GQA groups (LLaMA-MoE v2, Qu et al. 2024, arXiv 2411.15708).

One expert per grouped-query-attention group: its key/value head, the query heads that share it,
and the matching column slice of ``W_o``. Dense attention output is the sum over groups of each
group's output through its ``W_o`` slice, so an attention MoE is a re-reading of the dense layer:

    y = scale * sum_{g in topk(x)} w_g(x) * W_o[:, cols(g)] Attn_g(x)  (+ o_proj bias, once)

v2 semantics, implemented here: expert ``g`` attends only among the tokens routed to it. Key ``j``
is visible to query ``i`` in group ``g`` iff the model's own mask allows it (causality, padding,
sliding window) and token ``j`` is routed to ``g``; positions keep their original RoPE index.

How it is computed, and why:

* Only what is selected (ALGORITHMS.md section 4). Per group ``g``: gather the tokens routed to
  it, in their original order, into a padded ``(B, L_g)`` layout (``L_g`` = the most tokens one
  sequence sent to ``g``); project them with ``g``'s rows of ``W_q`` / ``W_k`` / ``W_v`` (one GEMM,
  the three weights' rows side by side); attend among them (SDPA, the group's ``H/G`` query heads
  sharing its KV head); gate by ``scale * w_g``; project with ``g``'s columns of ``W_o`` and
  scatter-add into the tokens. At ``k`` of ``G`` groups that is ``k/G`` of the dense projection
  work and about ``(k/G)^2`` of the attention work; ``benchmarks/attention_moe.py`` measures it.
* Why per group over the tokens that chose it, and not the alternatives, on CPU: grouping tokens
  by their *set* of selected groups gives ``C(G, k)`` sets (70 at 4 of 8), each needing every
  group's keys anyway, so it saves nothing and multiplies small GEMMs. One batched GEMM over all
  groups at once (a ``(G, B, L, d)`` gather) does the same FLOPs but materialises ``k`` copies of
  the hidden states in one tensor: past glibc's 32 MB mmap threshold every such allocation is
  fresh, page-faulted memory, which made it slower than dense attention at ``k = G - 1``; a loop
  over the ``G`` groups keeps each buffer ``k/G`` of that size and runs as fast per FLOP. The
  backward is kept to one gradient buffer per weight and one for the hidden states (``unbind``
  and ``_GatherRows``; slicing and ``index_select`` would allocate ``G`` full-size ones).
* Within a group the gathered tokens keep their order and a row's padding slots come last, so
  plain causality is the lower triangle of the gathered layout: without a padding mask the kernel
  runs with ``is_causal=True``, its fast path. A model mask (padding, sliding window) is gathered
  to ``(B, 1, L_g, L_g)``.
* With every group selected (``top_k == G``) the wrapped module's own path runs unchanged (the
  kernel of the model's ``attn_implementation``, heads gated by ``scale * w_g`` before ``o_proj``),
  so it equals dense attention to the last bit when ``scale * w_g = 1``.
* Projections that are not plain ``nn.Linear`` (peft LoRA wrappers, bitsandbytes 4-bit) cannot be
  sliced by rows; they run on every token and the per-group slices are gathered from their output
  (and ``o_proj`` runs once on the scattered, gated heads), which is exact for any linear map and
  still saves the attention work.
* A query whose group leaves it no visible key (only a padding query can be in that state) gets a
  zero output rather than a NaN, so padding can never poison the gradients. (The former masked
  formulation gave such a query the model's own row instead; outputs differ only at padding.)
* KV cache, exact: under the v2 semantics a later token routed to ``g`` sees only earlier tokens
  routed to ``g``, so the keys/values of tokens *not* routed to ``g`` are never needed; what is
  needed is which past tokens were routed where, which a plain cache does not keep. Each group's
  cached key of a token not routed to it is stored as NaN (never computed); the NaN marks the
  membership, travels with every cache operation (crop, beam reorder, sliding-window eviction)
  and is read back with ``isnan`` on the next step. Greedy ``generate(use_cache=True)`` equals
  ``use_cache=False`` (tests/test_generation_cache.py). Real keys are never NaN (they would make
  the model's output NaN anyway). Dynamic, sliding-window and static caches work; a quantized
  cache cannot store NaN and is refused with ``top_k < G``. The alternative of caching every
  group's keys for every token would cost the full K/V projection and still not say which past
  tokens a group may see.
* Supported attention implementations: ``eager`` and ``sdpa`` (their masks are 4D or none); the
  sparse path runs torch's ``scaled_dot_product_attention`` for both, so it returns no attention
  weights (``output_attentions`` gives ``None``). Others (flash, flex) work only when every token
  is routed to every group.
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
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import cache_utils
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


def _routed_slots(member: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per group of ``member`` ``(G, B, S)``: the positions routed to it, in order, per sequence.

    Returns, for each group, ``index`` ``(B, L)`` (int64 positions; after a sequence's routed ones
    come unrouted positions, distinct within the row) and ``valid`` ``(B, L)``, ``L`` = the group's
    largest per-sequence count (at least 1).
    """
    counts = member.sum(dim=-1)  # (G, B)
    widths = counts.amax(dim=1).clamp(min=1).tolist()
    # A stable descending sort of the 0/1 flags lists a row's routed positions first, in order.
    order = torch.sort(member.to(torch.int8), dim=-1, descending=True, stable=True).indices  # (G, B, S)
    valid = torch.arange(member.shape[-1], device=member.device) < counts.unsqueeze(-1)  # (G, B, S)
    return [(order[g, :, :w], valid[g, :, :w]) for g, w in enumerate(widths)]


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, i)`` for several index vectors, with ONE gradient buffer for ``x``.

    Autograd's own ``index_select`` backward allocates a zero tensor the size of ``x`` per call and
    then sums them: ``G`` full-size buffers per layer.
    """

    @staticmethod
    def forward(ctx, x: Tensor, *indices: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(*indices)
        ctx.x_shape = x.shape
        return tuple(x.index_select(0, index) for index in indices)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        indices = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = grads[0].new_zeros(ctx.x_shape)
            for index, g in zip(indices, grads):
                grad.index_add_(0, index, g)
        return (grad, *([None] * len(indices)))


def _split(linear: nn.Module, groups: int, dim: int) -> list[tuple[Tensor, Tensor | None]] | None:
    """Each group's slice of a plain ``nn.Linear`` (rows for ``dim=0``, columns for ``dim=1``), as views.

    ``unbind`` rather than slicing: its backward stacks the ``G`` gradients into one buffer, where
    each slice's backward would allocate a full-size zero tensor. ``None`` for anything that is not
    exactly ``nn.Linear`` (peft LoRA wrappers, bitsandbytes 4-bit): those cannot be sliced.
    """
    if type(linear) is not nn.Linear:
        return None
    out_f, in_f = linear.weight.shape
    if dim == 0:
        weights = linear.weight.view(groups, out_f // groups, in_f).unbind(0)
        biases = linear.bias.view(groups, -1).unbind(0) if linear.bias is not None else [None] * groups
    else:  # the bias of o_proj is added once, not per group
        weights = linear.weight.view(out_f, groups, in_f // groups).unbind(1)
        biases = [None] * groups
    return list(zip(weights, biases))


class AttentionMoe(RoutedBlock):
    """Wrap an HF ``LlamaAttention`` / ``MistralAttention`` / ``Qwen2Attention`` / ``Qwen3Attention``
    as a GQA-group MoE.

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
        B, S, d = hidden_states.shape
        G = self.num_groups
        routing = self.route(hidden_states.reshape(-1, d))
        hit = routing.indices.unsqueeze(-1) == torch.arange(G, device=hidden_states.device)  # (T, k, G)
        member = hit.any(dim=1).view(B, S, G)  # (B, S, G) token routed to group
        gate = ((routing.weights.unsqueeze(-1) * hit).sum(dim=1) * self.scale).view(B, S, G)  # float32
        if bool(member.all()) and not self._cache_has_markers(cache):
            return self._dense(hidden_states, position_embeddings, attention_mask, cache, gate, kwargs)
        impl = self.attention.config._attn_implementation or "eager"
        if impl not in _MASKABLE_IMPLS:
            raise NotImplementedError(
                f"attention MoE with top_k < groups needs the model's 4D attention mask, which "
                f"attn_implementation={impl!r} does not give; load the model with attn_implementation='sdpa' "
                "or 'eager'."
            )
        out = self._sparse(hidden_states, position_embeddings, attention_mask, cache, member, gate, kwargs)
        return out, None

    # ------------------------------------------------------------------ every group selected
    def _dense(self, hidden_states, position_embeddings, attention_mask, cache, gate, kwargs):
        """The wrapped module's own computation, heads gated by ``scale * w_g`` before ``o_proj``."""
        attn = self.attention
        B, S, _ = hidden_states.shape
        G, H, hd = self.num_groups, self.num_heads, attn.head_dim
        hidden_shape = (B, S, -1, hd)
        q = self._norm(attn, "q_norm", attn.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        k = self._norm(attn, "k_norm", attn.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, G, S, hd)
        cos, sin = position_embeddings
        q, k = _rope_fn(attn)(q, k, cos, sin)  # (B, H, S, hd), (B, G, S, hd)
        if cache is not None:
            k, v = self._cache_update(cache, k, v, kwargs)
        impl = attn.config._attn_implementation or "eager"
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
        # W_o acting on the gated heads is the sum of the groups' W_o-slice outputs weighted by w_g.
        head_gate = gate.view(B, S, G, 1, 1).expand(B, S, G, H // G, 1).reshape(B, S, H, 1)
        out = out * head_gate.to(out.dtype)  # (B, S, H, hd)
        return attn.o_proj(out.reshape(B, S, -1).contiguous()), weights

    # ------------------------------------------------------------------ only the selected groups
    def _sparse(
        self, hidden_states, position_embeddings, attention_mask, cache, member, gate, kwargs
    ) -> Tensor:
        attn = self.attention
        B, S, d = hidden_states.shape
        G, hd = self.num_groups, attn.head_dim
        r = self.num_heads // G
        rows = torch.arange(B, device=hidden_states.device).unsqueeze(-1)  # (B, 1)
        slots = _routed_slots(member.permute(2, 0, 1))  # per group: index, valid (B, L_g)
        flats = [(rows * S + index).reshape(-1) for index, _ in slots]  # per group: token of each slot

        # Projections of the routed tokens only, each group with its own rows of W_q / W_k / W_v.
        projected = self._project(attn, hidden_states, flats)  # per group: q, k, v (B*L_g, r*hd | hd | hd)
        cos, sin = (t.expand(B, -1, -1).reshape(B * S, -1) for t in position_embeddings)
        queries, keys, values = [], [], []
        for (index, _), flat, (q, k, v) in zip(slots, flats, projected):
            L = index.shape[1]
            q = self._norm(attn, "q_norm", q.view(B, L, r, hd)).transpose(1, 2)  # (B, r, L, hd)
            k = self._norm(attn, "k_norm", k.view(B, L, 1, hd)).transpose(1, 2)  # (B, 1, L, hd)
            c, s = cos.index_select(0, flat).view(B, L, -1), sin.index_select(0, flat).view(B, L, -1)
            q, k = _rope_fn(attn)(q, k, c, s)
            queries.append(q)
            keys.append(k)
            values.append(v.view(B, L, 1, hd).transpose(1, 2))  # (B, 1, L, hd)

        window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
        key_slots, offset = slots, 0
        if cache is not None:
            keys, values, key_slots, key_len = self._cache_exchange(
                cache, keys, values, slots, rows, S, kwargs
            )
            offset = key_len - S  # the queries are the last S of the keys
        # Within a group the gathered tokens keep their order and its padding slots come last, so
        # plain causality is the lower triangle of the gathered layout.
        causal = cache is None and attention_mask is None and (window is None or window >= S)
        dropout = attn.attention_dropout if self.training else 0.0
        w_o = _split(attn.o_proj, G, dim=1)
        if w_o is not None:
            out = hidden_states.new_zeros(B * S, d)
        else:
            out = hidden_states.new_zeros(B * S, G, r * hd)
        for g in range(G):
            (index, valid), (k_index, k_valid), flat = slots[g], key_slots[g], flats[g]
            mask = live = None
            if not causal:
                mask, live = self._gathered_mask(attention_mask, index, offset, k_index, k_valid, window)
            o = F.scaled_dot_product_attention(
                queries[g],
                keys[g],
                values[g],
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=attn.scaling,
                enable_gqa=True,  # the group's r query heads share its one KV head
            )  # (B, r, L, hd)
            o = o.transpose(1, 2).reshape(-1, r * hd)  # (B*L, r*hd)
            w = gate[..., g].gather(1, index) * valid  # (B, L) float32; padding slots weigh 0
            if live is not None:
                w = w * live
            o = o * w.reshape(-1, 1).to(o.dtype)
            if w_o is not None:  # group g's columns of W_o, summed into the tokens
                out.index_add_(0, flat, F.linear(o, w_o[g][0]))
            else:  # o_proj is not sliceable: place the gated heads, project once below
                out[:, g].index_add_(0, flat, o)
        if w_o is None:
            return attn.o_proj(out.view(B, S, -1))
        if attn.o_proj.bias is not None:
            out = out + attn.o_proj.bias
        return out.view(B, S, d)

    def _project(
        self, attn, hidden_states: Tensor, flats: list[Tensor]
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per group: its rows of q/k/v_proj applied to its gathered tokens, ``(B*L_g, out / G)`` each."""
        G = self.num_groups
        d = hidden_states.shape[-1]
        linears = (attn.q_proj, attn.k_proj, attn.v_proj)
        sizes = [linear.out_features // G for linear in linears]
        fusable = all(type(lin) is nn.Linear for lin in linears) and (
            all(lin.bias is None for lin in linears) or all(lin.bias is not None for lin in linears)
        )
        if fusable:
            # One GEMM per group for q, k and v: its rows of the three weights side by side (a copy of
            # the weights per call, cheap next to the GEMMs; three narrow GEMMs were ~10% slower).
            weight = torch.cat([lin.weight.view(G, -1, d) for lin in linears], dim=1)  # (G, (r+2)*hd, d)
            weight = weight.unbind(0)
            bias = [None] * G
            if attn.q_proj.bias is not None:
                bias = torch.cat([lin.bias.view(G, -1) for lin in linears], dim=1).unbind(0)
            xs = _GatherRows.apply(hidden_states.reshape(-1, d), *flats)  # per group (B*L_g, d)
            return [tuple(F.linear(x, w, b).split(sizes, dim=-1)) for x, w, b in zip(xs, weight, bias)]
        xs = None
        per_linear = []
        for linear in linears:
            parts = _split(linear, G, dim=0)
            if parts is not None:
                if xs is None:
                    xs = _GatherRows.apply(hidden_states.reshape(-1, d), *flats)
                per_linear.append([F.linear(x, w, b) for x, (w, b) in zip(xs, parts)])
            else:  # any linear map (LoRA, 4-bit): every token, then each group's slice of its output
                full = linear(hidden_states).reshape(-1, G, linear.out_features // G)  # (B*S, G, f)
                per_linear.append([full[:, g].index_select(0, flat) for g, flat in enumerate(flats)])
        return list(zip(*per_linear))

    # ------------------------------------------------------------------ the KV cache and masks
    def _cache_update(self, cache: Cache, k: Tensor, v: Tensor, kwargs: dict) -> tuple[Tensor, Tensor]:
        if self._cache_arg == "cache":
            # transformers >= 5.24 hands the layer's kwargs to the cache (sliding windows, offsets).
            return cache.update(k, v, self.layer_idx, kwargs=kwargs)
        return cache.update(k, v, self.layer_idx)

    def _cache_has_markers(self, cache: Cache | None) -> bool:
        """Whether this layer's cached keys hold NaN membership markers (some past token skipped a group)."""
        if cache is None:
            return False
        try:
            keys = cache.layers[self.layer_idx].keys
        except (AttributeError, IndexError, TypeError):
            return False  # nothing cached for this layer yet
        if not isinstance(keys, Tensor) or keys.numel() == 0:
            return False
        return bool(torch.isnan(keys[..., 0]).any())

    def _cache_exchange(self, cache, keys, values, slots, rows, S, kwargs):
        """Store this call's keys/values (NaN keys where a token skipped a group, never computed) and
        gather each group's visible keys/values back from the cache. Returns per group ``(B, 1, Lk, hd)``
        keys and values, their slots (positions on the cache's key axis, valid), and that axis' length."""
        layers = getattr(cache, "layers", None) or []
        layer = (
            layers[self.layer_idx] if self.layer_idx is not None and self.layer_idx < len(layers) else None
        )
        if isinstance(layer, getattr(cache_utils, "BaseQuantizedLayer", ())):
            raise NotImplementedError(
                "attention MoE with top_k < groups marks the groups a token skipped with NaN keys, which a "
                f"quantized KV cache ({type(layer).__name__}) cannot store; generate with the default cache "
                "(no cache_implementation='quantized')."
            )
        B = rows.shape[0]
        new_k, new_v = [], []
        for (index, valid), k, v in zip(slots, keys, values):
            keep = valid.unsqueeze(-1)  # (B, L, 1)
            where = (rows.expand_as(index), index)  # distinct (b, position) pairs
            full_k = k.new_full((B, S, k.shape[-1]), float("nan"))
            new_k.append(full_k.index_put(where, torch.where(keep, k[:, 0], float("nan"))))
            new_v.append(v.new_zeros((B, S, v.shape[-1])).index_put(where, torch.where(keep, v[:, 0], 0.0)))
        k_all, v_all = self._cache_update(cache, torch.stack(new_k, 1), torch.stack(new_v, 1), kwargs)
        key_slots = _routed_slots(~torch.isnan(k_all[..., 0]).permute(1, 0, 2))  # k_all: (B, G, K, hd)
        keys, values = [], []
        for g, (index, valid) in enumerate(key_slots):
            keep = valid.unsqueeze(-1)
            keys.append(torch.where(keep, k_all[rows, g, index], 0.0).unsqueeze(1))  # (B, 1, Lk, hd)
            values.append(torch.where(keep, v_all[rows, g, index], 0.0).unsqueeze(1))
        return keys, values, key_slots, k_all.shape[2]

    @staticmethod
    def _gathered_mask(base, q_index, offset, k_pos, k_valid, window) -> tuple[Tensor, Tensor]:
        """The model's mask restricted to one group's gathered queries and keys, ``(B, 1, Lq, Lk)`` (bool,
        or additive like ``base``), and ``live`` ``(B, Lq)``: the query sees at least one key.

        ``q_index`` ``(B, Lq)`` and ``k_pos`` ``(B, Lk)`` index the mask's query and key axes; query
        ``i`` sits at key position ``i + offset`` (the keys of a cache come first)."""
        values = None
        if base is None:
            # SDPA drops the mask when it is plain causal; rebuild it from the positions, honouring a
            # sliding window if the model has one.
            kp, qp = k_pos.unsqueeze(-2), q_index.unsqueeze(-1) + offset  # (B, 1, Lk), (B, Lq, 1)
            allowed = kp <= qp
            if window is not None:
                allowed = allowed & (kp > qp - window)
        else:
            if base.dim() != 4 or base.shape[1] != 1:
                raise NotImplementedError(
                    f"attention MoE with top_k < groups reads a (batch, 1, queries, keys) attention mask; got "
                    f"shape {tuple(base.shape)}; use attn_implementation='sdpa' or 'eager' with the model's own mask."
                )
            B = q_index.shape[0]
            rows = torch.arange(B, device=q_index.device).view(B, 1, 1)
            values = base[:, 0].expand(B, -1, -1)[
                rows, q_index.unsqueeze(-1), k_pos.unsqueeze(-2)
            ]  # (B, Lq, Lk)
            if values.dtype == torch.bool:
                allowed, values = values, None
            else:  # additive: 0 keeps, the dtype's min drops
                allowed = values > torch.finfo(values.dtype).min / 2
        allowed = allowed & k_valid.unsqueeze(-2)  # (B, Lq, Lk)
        live = allowed.any(dim=-1)  # (B, Lq)
        allowed = allowed | ~live.unsqueeze(-1)  # a row with no visible key: any finite output, zeroed after
        mask = allowed if values is None else values.masked_fill(~allowed, torch.finfo(values.dtype).min)
        return mask.unsqueeze(1), live

    @staticmethod
    def _norm(attn: nn.Module, name: str, x: Tensor) -> Tensor:
        """Qwen3's per-head RMSNorm on queries / keys (before RoPE), where the module has one."""
        norm = getattr(attn, name, None)
        return x if norm is None else norm(x)
