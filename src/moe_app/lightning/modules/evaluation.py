"""Test-time evaluation of a causal LM: the per-domain report, greedy generation, expert load.

:class:`EvaluationMixin` holds the ``test`` and ``predict`` hooks of
:class:`~moe_app.lightning.modules.lm.CausalLMModule` (which inherits from it): per-example loss,
exact match from greedy generation, tokens routed to each expert, the table printed at the end of
``test`` and ``<default_root_dir>/test_results.json``.

Domains under DDP: the report's sums are all-reduced by position, so the list of domains is fixed
before the first batch and is the same on every rank, whatever order a rank meets the domains in
and even if its shard lacks one. It comes from a data module implementing
:class:`~moe_app.core.data.protocols.DomainNames` (the domains of its whole test split). Without
one (e.g. plain dataloaders given to ``trainer.test``) nothing rank-consistent is known before the
batches, so every row is counted in a single domain ``"all"`` rather than a per-rank guess.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moe_app.core.data.protocols import DomainNames
from moe_app.core.data.synthetic import check
from moe_app.core.data.templates import extract_answer, stop_token_ids
from moe_app.core.moe.block import find_moe_blocks
from moe_app.core.moe.stats import example_nll, expert_load
from moe_app.core.utils.atomic import atomic_write_text
from moe_app.core.utils.params import count_parameters
from moe_app.lightning.modules.report import DomainReport
from moe_app.lightning.strategies.fsdp import DecoderLayerFSDPStrategy

ALL_DOMAINS = "all"
"""The single domain of the report when the data module announces none."""


class EvaluationMixin:
    """``test`` and ``predict`` for a LightningModule with ``model``, ``tokenizer``, ``generation``
    (:class:`~moe_app.lightning.modules.lm.GenerationConfig`) and ``source``; it must come before
    ``LightningModule`` in the bases so that its hooks are the ones Lightning calls."""

    # ------------------------------------------------------------------ test: per-domain report
    def on_test_start(self) -> None:
        self._report = self.new_domain_report().to(self.device)
        self._eval_time, self._eval_tokens = 0.0, 0
        self._expert_load: dict[str, Tensor] = {}

    def new_domain_report(self) -> DomainReport:
        """A report over the data module's domains (the same list on every rank), else over the
        single domain ``"all"`` into which every row is counted."""
        dm = self.trainer.datamodule
        if isinstance(dm, DomainNames):
            names = list(dm.domain_names())
            if names:
                return DomainReport(names)
        return DomainReport([ALL_DOMAINS], fallback=ALL_DOMAINS)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # lm imports this module, so its helper is imported when the first batch arrives
        assert self._report is not None
        t0 = time.perf_counter()
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        self._eval_time += time.perf_counter() - t0
        self._eval_tokens += int(batch["attention_mask"].sum())
        self._accumulate_expert_load(batch["attention_mask"])
        nll, ntok = example_nll(logits, batch["labels"])  # (B,), (B,)
        domains = batch.get("domain") or [ALL_DOMAINS] * len(nll)
        correct: list[bool | None] = [None] * len(domains)
        rows = [i for i, p in enumerate(batch.get("prompt_ids", [])) if p]  # conversations, not plain text
        generate = self.generation.enabled and bool(rows)
        if self.generation.enabled and self._sharded_across_ranks():
            # Generation is collective under FSDP: if any rank has prompts, every rank generates
            # (one with only plain-text rows decodes a throw-away prompt and discards it).
            generate = bool(self.trainer.strategy.reduce_boolean_decision(bool(rows), all=False))
        if generate and rows:
            preds = self.generate_answers(
                batch["prompt_input_ids"][rows], batch["prompt_attention_mask"][rows]
            )
            for i, pred in zip(rows, preds):
                correct[i] = check_answer(domains[i], pred, batch["reference"][i])
        elif generate:
            self.generate_answers(batch["input_ids"][:1, :1], batch["attention_mask"][:1, :1])
        self._report.update(domains, nll, ntok, correct)

    def _accumulate_expert_load(self, attention_mask: Tensor) -> None:
        """Add this batch's top-k assignments per (MoE layer, expert), padding excluded."""
        mask = attention_mask.reshape(-1).bool()  # (T,)
        for name, block in find_moe_blocks(self.model):
            routing = block.last_routing
            if routing is None or routing.indices.shape[0] != mask.shape[0]:
                continue
            counts = expert_load(routing.indices, routing.num_experts, mask).double().cpu()  # (E,)
            prev = self._expert_load.get(name)
            self._expert_load[name] = counts if prev is None or prev.shape != counts.shape else prev + counts

    def on_test_epoch_end(self) -> None:
        assert self._report is not None
        rows = self._report.compute()  # all-reduced: the same rows, in the same order, on every rank
        for row in rows:
            name = row["domain"]
            # Every rank logs the same already-reduced value; the max over ranks is that value
            # exactly (a mean may be off by an ulp), and sync_dist=True is what Lightning asks of
            # epoch-level values in a distributed run.
            self.log(f"test/{name}/loss", row["loss"], sync_dist=True, reduce_fx="max")
            if row["accuracy"] is not None:
                self.log(f"test/{name}/accuracy", row["accuracy"], sync_dist=True, reduce_fx="max")
        self.test_results = rows
        if self.trainer.is_global_zero:
            print(self._report.format_table(rows, title=f"Test results ({type(self).__name__})"))
            self._write_test_results(rows)

    def _write_test_results(self, rows: list[dict[str, Any]]) -> None:
        """``<default_root_dir>/test_results.json``: what the pipeline summary reads."""
        import json

        counts = count_parameters(self.model)
        payload = {
            "module": type(self).__name__,
            "model": self.source.pretrained or "fresh(arch)",
            "parameters": {"total": counts.total, "active": counts.active, "trainable": counts.trainable},
            "eval_tokens_per_s": self._eval_tokens / max(self._eval_time, 1e-9),
            "rows": rows,
            # layer name -> tokens routed to each expert over the test set (layer x expert heatmaps)
            "expert_load": {name: counts.tolist() for name, counts in self._expert_load.items()},
        }
        atomic_write_text(
            Path(self.trainer.default_root_dir) / "test_results.json", json.dumps(payload, indent=2)
        )

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_answers(self, input_ids: Tensor, attention_mask: Tensor) -> list[str]:
        """Greedy-decode an answer for each left-padded prompt row ``(B, P)``; returns the texts."""

        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        was_training = self.model.training
        self.model.eval()
        gen = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=self.generation.max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=stop_token_ids(tok),
            # Sharded weights are gathered collectively at every decoding step: a rank whose answers
            # are finished keeps stepping until all ranks are, or the others would wait forever.
            synced_gpus=self._sharded_across_ranks(),
        )
        self.model.train(was_training)
        return [extract_answer(tok, row) for row in gen[:, input_ids.shape[1] :].tolist()]

    def _sharded_across_ranks(self) -> bool:
        if self._trainer is None or self.trainer.world_size < 2:
            return False

        return isinstance(self.trainer.strategy, DecoderLayerFSDPStrategy)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        preds = self.generate_answers(batch["prompt_input_ids"], batch["prompt_attention_mask"])
        prompts = [self.tokenizer.decode(p, skip_special_tokens=False) for p in batch["prompt_ids"]]
        return [
            {"domain": d, "prompt": p, "prediction": a, "reference": r}
            for d, p, a, r in zip(batch["domain"], prompts, preds, batch["reference"])
        ]


def check_answer(domain: str, prediction: str, reference: str) -> bool:
    """Exact match under the suite's per-domain checker (whitespace-normalised for other sources)."""

    return bool(check(domain, prediction, reference))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


__all__ = ["ALL_DOMAINS", "EvaluationMixin", "check_answer", "perplexity"]
