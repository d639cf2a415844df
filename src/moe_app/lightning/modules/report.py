"""Per-domain test report: loss, perplexity and exact-match accuracy, reduced with torchmetrics.

Sums are kept as torchmetrics ``SumMetric`` states so the report is correct under DDP (each rank
holds a shard of the test set; ``compute`` all-reduces).

The states are indexed by a domain's position in the list given at construction, and the
all-reduce sums them by position: that list must be the same on every rank and fixed before any
batch (:class:`moe_app.core.data.protocols.DomainNames`). A rank may see the domains in any order,
or not see one at all, and the table is still the one-process table. The report never adds a
domain at update time (a rank that did would shift its indices and sum other domains, or wait
forever in a collective the others never join): an unannounced domain goes to ``fallback`` when
one is given, and is an error otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import SumMetric

from moe_app.errors import DataError


class DomainReport(nn.Module):
    """Token-weighted loss, perplexity and exact match per domain, plus an ``ALL`` row.

    Args:
        domains: every domain the test set may contain, in the same order on every rank (e.g.
            ``datamodule.domain_names()``); the table lists them in this order.
        fallback: where rows of a domain not in ``domains`` are counted (it must be one of
            ``domains``); ``None``: such a row raises :class:`~moe_app.errors.DataError`.
    """

    def __init__(self, domains: list[str], fallback: str | None = None) -> None:
        super().__init__()
        self.domains = list(domains)
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"DomainReport needs distinct domain names, got {self.domains}")
        if fallback is not None and fallback not in self.domains:
            raise ValueError(f"fallback domain {fallback!r} is not one of {self.domains}")
        self.fallback = fallback
        self._index = {d: i for i, d in enumerate(self.domains)}
        self.metrics = nn.ModuleDict(
            {
                name: SumMetric()
                for d in range(len(self.domains))
                for name in (f"nll{d}", f"tok{d}", f"ok{d}", f"gen{d}", f"n{d}")
            }
        )

    def _idx(self, domain: str) -> int:
        d = self._index.get(domain)
        if d is not None:
            return d
        if self.fallback is not None:
            return self._index[self.fallback]
        raise DataError(
            f"test row of domain {domain!r}, which is not one of the announced domains {self.domains}: "
            "the per-domain sums are matched across ranks by position, so a domain cannot be added "
            "while batches arrive.",
            fix="have the data module's domain_names() list every domain of its test split",
        )

    def update(
        self, domains: list[str], nll: Tensor, ntok: Tensor, correct: list[bool | None] | None
    ) -> None:
        """Add a batch; ``correct[i]`` is None for rows without a generation check (plain text)."""
        for i, dom in enumerate(domains):
            d = self._idx(dom)
            self.metrics[f"nll{d}"].update(nll[i].detach().double())
            self.metrics[f"tok{d}"].update(ntok[i].detach().double())
            self.metrics[f"n{d}"].update(torch.tensor(1.0, dtype=torch.float64))
            if correct is not None and correct[i] is not None:
                self.metrics[f"ok{d}"].update(torch.tensor(float(correct[i]), dtype=torch.float64))
                self.metrics[f"gen{d}"].update(torch.tensor(1.0, dtype=torch.float64))

    def compute(self) -> list[dict[str, Any]]:
        import warnings

        with warnings.catch_warnings():  # domains announced but absent from this test set
            warnings.filterwarnings("ignore", message=".*compute.*called before the ``update``.*")
            return self._compute()

    def _compute(self) -> list[dict[str, Any]]:
        rows = []
        tot_nll = tot_tok = tot_ok = tot_gen = tot_n = 0.0
        for d, name in enumerate(self.domains):
            nll = float(self.metrics[f"nll{d}"].compute())
            tok = float(self.metrics[f"tok{d}"].compute())
            ok = float(self.metrics[f"ok{d}"].compute())
            gen = float(self.metrics[f"gen{d}"].compute())
            n = float(self.metrics[f"n{d}"].compute())
            if n == 0:
                continue
            rows.append(_row(name, n, nll, tok, ok, gen))
            tot_nll, tot_tok, tot_ok, tot_gen, tot_n = (
                tot_nll + nll,
                tot_tok + tok,
                tot_ok + ok,
                tot_gen + gen,
                tot_n + n,
            )
        if len(rows) > 1:
            rows.append(_row("ALL", tot_n, tot_nll, tot_tok, tot_ok, tot_gen))
        return rows

    @staticmethod
    def format_table(rows: list[dict[str, Any]], title: str = "Test results") -> str:
        header = f"{'domain':<16} {'n':>6} {'loss':>8} {'ppl':>9} {'exact match':>12}"
        lines = [title, header, "-" * len(header)]
        for r in rows:
            acc = f"{100 * r['accuracy']:.1f}%" if r["accuracy"] is not None else "-"
            lines.append(
                f"{r['domain']:<16} {r['n']:>6d} {r['loss']:>8.4f} {r['perplexity']:>9.3f} {acc:>12}"
            )
        return "\n".join(lines)


def _row(name: str, n: float, nll: float, tok: float, ok: float, gen: float) -> dict[str, Any]:
    loss = nll / max(tok, 1.0)
    return {
        "domain": name,
        "n": int(n),
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": ok / gen if gen > 0 else None,
    }
