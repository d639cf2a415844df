"""Route each dataset's dev probe set through an MoE and count what the router does (no Lightning).

The statistics dynamic data mixing needs (Zhu et al., arXiv 2406.11256; ALGORITHMS.md section 7):

* **gate load**: per MoE layer, source and expert, the number of top-k assignments over the real
  (non-padding) tokens of the source's probe rows (skipped slots, index ``-1``, do not count);
* **dev loss**: per source, the summed next-token NLL over the labelled (reply) tokens and their
  count, for the DoReMi-like reference-loss baseline;
* **sentence embeddings**: per source, the sum over its probe rows of each row's mean last hidden
  state over its real (attention-mask) tokens, and the number of rows, for the
  ``sentence_embedding`` baseline (the mean embedding is ``sum / rows``).

Two kinds of model are understood, so the callback works on everything the app trains or loads:
moe-app's own blocks, which record ``last_routing`` on every forward
(:func:`moe_app.core.moe.block.find_moe_blocks`), and stock Hugging Face MoE models (Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, ...), asked for ``output_router_logits=True``: top-k of the softmax
of each layer's router logits, with ``k = config.num_experts_per_tok``.

Probe batches may carry ``row_weight`` 0 for padding rows: under DDP the probe set is sharded
over ranks and every rank runs the same number of forwards (FSDP needs that), the extra rows
counting for nothing. Counts are exact integers in float64, so summing them over ranks is exact
in any order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moe_app.core.moe.block import find_moe_blocks
from moe_app.core.moe.stats import token_nll
from moe_app.errors import ConfigError, UnsupportedModelError

_HF_TOPK_ATTRS = ("num_experts_per_tok", "moe_topk", "top_k")


@dataclass
class ProbeStats:
    """What one probe pass measured (local to a rank until reduced)."""

    counts: list[Tensor]
    """Per selected MoE layer, ``(n, E_l)`` float64 top-k assignment counts over real tokens."""
    loss_sum: Tensor
    """``(n,)`` float64 summed next-token NLL over labelled tokens."""
    tokens: Tensor
    """``(n,)`` float64 number of labelled tokens."""
    embedding_sum: Tensor | None = None
    """``(n, H)`` float64 sum over each source's probe rows of the row's mean last hidden state
    (``None`` unless embeddings were asked for)."""
    embedding_rows: Tensor | None = None
    """``(n,)`` float64 number of probe rows behind ``embedding_sum``."""

    def flat(self) -> Tensor:
        """Everything in one float64 vector (one all-reduce instead of several)."""
        parts = [c.reshape(-1) for c in self.counts] + [self.loss_sum, self.tokens]
        if self.embedding_sum is not None and self.embedding_rows is not None:
            parts += [self.embedding_sum.reshape(-1), self.embedding_rows]
        return torch.cat(parts)

    def with_flat(self, flat: Tensor) -> ProbeStats:
        """The same layout filled from ``flat`` (e.g. after an all-reduce)."""
        flat = flat.detach().to("cpu", torch.float64)
        out, pos = [], 0
        for c in self.counts:
            out.append(flat[pos : pos + c.numel()].reshape(c.shape))
            pos += c.numel()
        n = self.loss_sum.numel()
        loss_sum, tokens = flat[pos : pos + n].clone(), flat[pos + n : pos + 2 * n].clone()
        pos += 2 * n
        emb = rows = None
        if self.embedding_sum is not None and self.embedding_rows is not None:
            size = self.embedding_sum.numel()
            emb = flat[pos : pos + size].reshape(self.embedding_sum.shape).clone()
            rows = flat[pos + size : pos + size + n].clone()
        return ProbeStats(out, loss_sum, tokens, emb, rows)

    def dev_losses(self) -> Tensor:
        """Mean NLL per labelled token ``(n,)``."""
        return self.loss_sum / self.tokens.clamp_min(1.0)


def router_kind(model: nn.Module) -> str | None:
    """``"moe_app"`` (blocks recording ``last_routing``), ``"hf"`` (stock HF MoE) or ``None`` (dense)."""

    if any(True for _ in find_moe_blocks(model)):
        return "moe_app"
    cfg = getattr(model, "config", None)
    if (
        cfg is not None
        and _hf_top_k(cfg) is not None
        and (getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None))
    ):
        return "hf"
    return None


def _hf_top_k(cfg: Any) -> int | None:
    for attr in _HF_TOPK_ATTRS:
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def count_moe_layers(model: nn.Module) -> int | None:
    """Number of moe-app MoE layers; ``None`` for a stock HF MoE (known only after a forward, since
    some keep layers dense), 0 for a dense model."""

    kind = router_kind(model)
    if kind == "moe_app":
        return sum(1 for _ in find_moe_blocks(model))
    return None if kind == "hf" else 0


def select_layers(num_layers: int, layer: int | str) -> list[int]:
    """Positions (in model order) of the MoE layers to read: one index (``-1`` = last) or ``"all"``."""
    if num_layers < 1:
        raise UnsupportedModelError(
            "the model has no Mixture-of-Experts layer, so there is no gate load to measure",
            where="data.mixture.strategy",
            fix="train an MoE (e.g. MoeLMModule from an upcycled checkpoint), or use strategy "
            "uniform/size/static/reference_loss.",
        )
    if layer == "all":
        return list(range(num_layers))
    if isinstance(layer, bool) or not isinstance(layer, int) or not -num_layers <= layer < num_layers:
        raise ConfigError(
            f"layer {layer!r} does not name one of the model's {num_layers} MoE layers",
            where="data.mixture.layer",
            fix=f"use an index in [{-num_layers}, {num_layers - 1}] (-1 = last MoE layer, the paper's) or 'all'.",
        )
    return [layer % num_layers]


def _count(
    indices: Tensor, token_source: Tensor, valid: Tensor, num_sources: int, num_experts: int
) -> Tensor:
    """``(n, E)`` counts of the selected experts ``indices (T, k)`` per token source, real tokens only."""
    k = indices.shape[-1]
    src = token_source[:, None].expand(-1, k)  # (T, k)
    ok = valid[:, None] & (indices >= 0)  # (T, k)
    flat = src[ok] * num_experts + indices[ok]  # (slots,)
    counts = torch.bincount(flat, minlength=num_sources * num_experts)  # (n*E,)
    return counts.to(torch.float64).reshape(num_sources, num_experts)


def _layer_routings(model: nn.Module, kind: str, out: Any, num_tokens: int) -> list[tuple[Tensor, int]]:
    """``(indices (T, k), E)`` for every MoE layer that ran in the last forward, in model order."""
    if kind == "moe_app":
        from moe_app.core.moe.block import find_moe_blocks

        found = []
        for _, block in find_moe_blocks(model):
            r = block.last_routing
            if r is not None and r.indices.shape[0] == num_tokens:
                found.append((r.indices, r.num_experts))
        return found
    logits = getattr(out, "router_logits", None)
    if not logits:
        raise UnsupportedModelError(
            f"{type(model).__name__} returned no router logits with output_router_logits=True",
            fix="use a moe-app MoE or a stock HF MoE (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).",
        )
    k = _hf_top_k(model.config)
    found = []
    for z in logits:
        if isinstance(z, tuple):  # some models return (logits, ...) per layer
            z = z[0]
        z = z.reshape(-1, z.shape[-1])  # (T, E)
        if z.shape[0] != num_tokens:
            continue
        top = z.float().softmax(dim=-1).topk(k, dim=-1).indices  # (T, k)
        found.append((top, z.shape[-1]))
    return found


@torch.no_grad()
def probe_model(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    num_sources: int,
    layer: int | str = -1,
    *,
    need_counts: bool = True,
    need_loss: bool = True,
    need_embeddings: bool = False,
    forward_context: Callable[[], Any] = contextlib.nullcontext,
) -> ProbeStats:
    """Run ``batches`` through ``model`` in eval mode and count gate loads (and dev losses, and
    sentence embeddings with ``need_embeddings``: each row's mean over its real tokens of the last
    hidden state, summed per source, in float64).

    Each batch: ``input_ids``, ``attention_mask``, ``labels`` ``(B, S)``, ``source_ids (B,)`` (the
    source index of each row) and optionally ``row_weight (B,)`` (0 = padding row). The model's
    train/eval mode is restored afterwards. ``counts`` is empty when ``need_counts`` is false; a
    dense model with ``need_counts`` raises :class:`UnsupportedModelError`.
    """
    kind = router_kind(model) if need_counts else None
    if need_counts and kind is None:
        select_layers(0, layer)  # raises: nothing to count
    selected: list[int] | None = None
    device = next(model.parameters()).device
    # Without a loss to compute, the decoder alone suffices: skip the LM head (a large share of the
    # forward for 100k+ vocabularies). HF base models report router logits too. Not under FSDP2:
    # the root unit (the whole model) owns the embeddings, which only its forward gathers.
    from torch.distributed.fsdp import FSDPModule

    sharded = isinstance(model, FSDPModule)
    runner = model if need_loss or sharded else getattr(model, "base_model", model)
    was_training = model.training
    model.eval()
    counts: list[Tensor] | None = None
    loss_sum = torch.zeros(num_sources, dtype=torch.float64)
    tokens = torch.zeros(num_sources, dtype=torch.float64)
    emb_sum: Tensor | None = None
    emb_rows = torch.zeros(num_sources, dtype=torch.float64)
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)  # (B, S)
            mask = batch["attention_mask"].to(device)  # (B, S)
            src = batch["source_ids"].to(device)  # (B,)
            row_w = batch.get("row_weight")
            row_ok = (row_w.to(device) > 0) if row_w is not None else torch.ones_like(src, dtype=torch.bool)
            kwargs: dict[str, Any] = {"use_cache": False}
            if kind == "hf":
                kwargs["output_router_logits"] = True
            if need_embeddings:
                kwargs["output_hidden_states"] = True
            with forward_context():
                out = runner(input_ids=ids, attention_mask=mask, **kwargs)
            B, S = ids.shape
            token_src = src[:, None].expand(B, S).reshape(-1)  # (T,)
            valid = (mask.bool() & row_ok[:, None]).reshape(-1)  # (T,)
            if kind is not None:
                routings = _layer_routings(model, kind, out, B * S)
                if selected is None:  # from what the model reported (HF models may keep layers dense)
                    selected = select_layers(len(routings), layer)
                if len(routings) <= max(selected):
                    raise UnsupportedModelError(
                        f"only {len(routings)} MoE layer(s) reported routing, expected {max(selected) + 1}",
                        where="mixture probe",
                        fix="check that the MoE layers run on every token (no layer drop during probing).",
                    )
                batch_counts = [
                    _count(routings[i][0], token_src, valid, num_sources, routings[i][1]).cpu()
                    for i in selected
                ]
                counts = batch_counts if counts is None else [a + b for a, b in zip(counts, batch_counts)]
            if need_embeddings:
                hidden = _last_hidden(model, out)  # (B, S, H)
                m = (mask.bool() & row_ok[:, None]).to(torch.float64)  # (B, S)
                row_emb = (hidden.to(torch.float64) * m[:, :, None]).sum(dim=1)  # (B, H)
                row_emb = row_emb / m.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, H) mean over real tokens
                if emb_sum is None:
                    emb_sum = torch.zeros(num_sources, row_emb.shape[-1], dtype=torch.float64)
                emb_sum.index_add_(0, src.cpu(), row_emb.cpu())
                emb_rows.index_add_(0, src.cpu(), row_ok.to(torch.float64).cpu())
            if need_loss:
                nll, lab = token_nll(out.logits, batch["labels"].to(device))  # (B, S-1)
                lab = lab & row_ok[:, None]
                loss_sum.index_add_(0, src.cpu(), (nll * lab).sum(dim=1).double().cpu())
                tokens.index_add_(0, src.cpu(), lab.sum(dim=1).double().cpu())
    finally:
        model.train(was_training)
    if counts is None:  # counts not asked for (or no batch)
        counts = []
    if need_embeddings and emb_sum is None:
        raise ConfigError("the probe set is empty: no sentence embedding to measure", where="data.mixture")
    return ProbeStats(
        counts=counts,
        loss_sum=loss_sum,
        tokens=tokens,
        embedding_sum=emb_sum if need_embeddings else None,
        embedding_rows=emb_rows if need_embeddings else None,
    )


def _last_hidden(model: nn.Module, out: Any) -> Tensor:
    """The last hidden state ``(B, S, H)`` of a forward run with ``output_hidden_states=True``: the
    decoder's output (after the final norm in HF models), whether ``out`` came from the base model
    (``last_hidden_state``) or the causal-LM wrapper (``hidden_states[-1]``)."""
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        states = getattr(out, "hidden_states", None)
        hidden = states[-1] if states else None
    if hidden is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} returned no hidden states with output_hidden_states=True",
            where="data.mixture.strategy",
            fix="use a Hugging Face (or moe-app) causal LM, or another strategy than sentence_embedding.",
        )
    return hidden


__all__ = ["ProbeStats", "count_moe_layers", "probe_model", "router_kind", "select_layers"]
