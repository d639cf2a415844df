"""``MixtureDataModule``: several named sources mixed by sampling weights that may adapt in training.

Redundancy-aware dynamic data mixing (Zhu et al., "Dynamic Data Mixing Maximizes Instruction
Tuning for Mixture-of-Experts", arXiv 2406.11256; ALGORITHMS.md section 7): each training
example's source is drawn i.i.d. with the current weights, then an example within the source.
The weights come from a strategy:

* ``uniform`` (``1/n``), ``size`` (proportional to training rows), ``static`` (given ``weights``);
* ``dynamic``: every ``update_every`` steps each source's fixed dev probe set (its first
  ``probe_size`` validation rows) is routed by the MoE in eval mode; the gate load of the last
  MoE layer (``layer``) drives ``w <- norm((1-c) softmax(log w + eta * Delta) + c/n)``, where
  ``Delta_i`` is the mean L2 distance of source ``i``'s normalised load to the others'
  (:mod:`moe_app.core.mixing.rules`), so redundant sources lose weight to distinct ones;
* ``reference_loss`` (DoReMi-like baseline): ``Delta_i`` = dev loss minus the reference loss
  measured once at the start of training (or given);
* the paper's other baselines (ALGORITHMS.md section 7b):

  - ``static_gate_load``: the ``dynamic`` update applied once, in ``on_fit_start`` (before the
    training loader draws its first batch), to the starting weights from the gate loads of the
    model before training; the result is in force from batch 0 and never changes;
  - ``sentence_embedding``: like ``dynamic`` (every ``update_every`` steps, compounding, same
    ``eta``/``c``), with ``Delta_i = (1/n) sum_j (1 - cos(E_i, E_j))``, ``E_i`` the mean over
    source ``i``'s probe rows of the mean last hidden state over each row's real tokens;
  - ``random``: Dirichlet(1) weights drawn once from the data module's ``seed`` (identical on every
    rank), then fixed;
  - ``sequential``: one source after another in the configured order, each for a share of the
    training-batch budget proportional to its training rows (:func:`~moe_app.core.mixing.rules.sequential_plan`).
    The budget is ``trainer.max_steps * accumulate_grad_batches`` batches per rank, else
    ``max_epochs`` epochs of ``batches_per_epoch``, else (no trainer) one epoch. The plan is a
    weight schedule by batch index (one-hot weights), fixed at the first ``setup`` and saved in the
    checkpoint, so a resumed run (even with a longer ``max_steps``) keeps it; past the budget the
    last source continues.

Tokenisation, collation and the validation/test loaders are :class:`InstructionDataModule`'s; this
class replaces the training sampler (:mod:`moe_app.core.mixing.sampler`) and holds the mixture
state. The model-dependent update is done by :class:`moe_app.lightning.callbacks.mixture.MixtureWeightsCallback`,
which ``setup`` adds to the Trainer when it is not configured already.

Correctness contracts: under DDP every rank holds bitwise identical weights (probe statistics
are all-reduced, the update is computed in float64 on the CPU and broadcast from rank 0) while
ranks draw different examples (rank-seeded sampler, not wrapped by Lightning); data-loader
workers need no weight copy (sampling happens in the main process); the weights, their schedule,
the history, the number of batches drawn and the reference losses are in the checkpoint
(:meth:`state_dict`, plain types), so a resumed run draws exactly what the uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from moe_app.core.data.collate import Collator, RowDataset
from moe_app.core.mixing.config import MixtureConfig
from moe_app.core.mixing.rules import (
    check_weights,
    embedding_redundancy_scores,
    gate_load_weights,
    initial_weights,
    layered_redundancy_scores,
    one_hot,
    reference_loss_scores,
    sequential_plan,
    update_weights,
)
from moe_app.core.mixing.sampler import MixtureSampler, WeightSchedule
from moe_app.errors import ConfigError
from moe_app.lightning.callbacks.mixture import MixtureWeightsCallback
from moe_app.lightning.data.instruction import InstructionDataModule

logger = logging.getLogger("moe_app.core.data")


STATE_VERSION = 1


_LOADER_PREFETCH_FACTOR = 2  # torch's default prefetch_factor with workers; apply_delay's default uses it


class MixtureDataModule(InstructionDataModule):
    """Instruction data from several sources, mixed by (possibly adaptive) sampling weights.

    Args: those of :class:`InstructionDataModule`, plus ``mixture`` (:class:`MixtureConfig`).
    """

    def __init__(self, mixture: MixtureConfig | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mixture = mixture or MixtureConfig()
        self.names: list[str] = [s.name for s in self.sources]
        if self.mixture.weights is not None:
            check_weights(self.mixture.weights, self.names)
        if self.mixture.reference_losses is not None and self.mixture.strategy == "reference_loss":
            unknown = sorted(set(self.mixture.reference_losses) ^ set(self.names))
            if unknown:
                raise ConfigError(
                    f"reference_losses must name exactly the sources {self.names}; mismatched: {unknown}",
                    where="data.mixture.reference_losses",
                    fix="give one reference loss per source, or remove reference_losses to measure them.",
                )
        m = self.mixture
        self.apply_delay = (
            m.apply_delay if m.apply_delay is not None else 2 + _LOADER_PREFETCH_FACTOR * self.num_workers
        )
        # Mixture state (all of it is in state_dict).
        self.schedule: WeightSchedule | None = None
        self.history: list[dict[str, Any]] = []
        self.started_batches = 0
        self.last_update_step = 0
        self.start_measured = False
        """``static_gate_load``: whether the one-shot weights have been measured (then frozen)."""
        self.reference: Tensor | None = (
            torch.tensor([float(m.reference_losses[n]) for n in self.names], dtype=torch.float64)
            if m.reference_losses is not None and m.strategy == "reference_loss"
            else None
        )
        self._sampler: MixtureSampler | None = None
        self._probe_cache: dict[tuple[int, int], list[dict[str, Tensor]]] = {}
        self._pending_state: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------------
    # Setup and validation.

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage not in ("fit", None):
            return
        if self.mixture.measured:
            self._check_dev_splits()
        if self.schedule is None:
            w = initial_weights(
                self.mixture.strategy,
                self.names,
                self.source_sizes("train"),
                self.mixture.weights,
                seed=self.seed,
            )
            self.schedule = WeightSchedule(w)
            self.history = [{"step": 0, "weights": self.named(w)}]
            if self.mixture.strategy == "sequential":
                self._plan_sequential()
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        self._attach_callback()

    def sequential_budget(self) -> int:
        """Training batches (per rank) the ``sequential`` plan splits: ``max_steps`` times
        ``accumulate_grad_batches`` if the trainer has ``max_steps``, else ``max_epochs`` epochs,
        else (no trainer) one epoch."""
        trainer = self._trainer_or_none()
        epoch = self._batches_per_epoch()
        if trainer is None:
            return epoch
        accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        max_steps = int(getattr(trainer, "max_steps", -1) or -1)
        if max_steps > 0:
            return max_steps * accumulate
        max_epochs = getattr(trainer, "max_epochs", None)
        if max_epochs is not None and int(max_epochs) > 0:
            return int(max_epochs) * epoch
        raise ConfigError(
            "strategy sequential needs a training length to split between the sources",
            where="trainer.max_steps",
            fix="set trainer.max_steps (or trainer.max_epochs).",
        )

    def _plan_sequential(self) -> None:
        assert self.schedule is not None
        sizes = self.source_sizes("train")
        trainer = self._trainer_or_none()
        accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1)) if trainer else 1
        n = len(self.names)
        plan = sequential_plan([sizes[name] for name in self.names], self.sequential_budget())
        self.schedule = WeightSchedule(one_hot(n, plan[0][1]))
        self.history = []
        for from_batch, src in plan:
            w = one_hot(n, src)
            self.schedule.add(from_batch, w)
            self.history.append(
                {"step": from_batch // accumulate, "weights": self.named(w), "from_batch": from_batch}
            )

    def stage_starts_at(self, batch: int) -> bool:
        """``sequential``: whether a new source's stage starts at training batch ``batch``."""
        assert self.schedule is not None
        return (
            self.mixture.strategy == "sequential"
            and batch > 0
            and not torch.equal(self.schedule.weights_at(batch), self.schedule.weights_at(batch - 1))
        )

    def _check_dev_splits(self) -> None:
        sizes = self.source_sizes("val")
        missing = [n for n in self.names if sizes.get(n, 0) == 0]
        if missing:
            raise ConfigError(
                f"strategy {self.mixture.strategy!r} needs a dev probe set, but source(s) {missing} have no "
                "validation rows",
                where="data.sources",
                fix="give those sources a dev split (dev_path / a val.* file / a hub validation split) or "
                "dev_fraction: 0.05, or use strategy uniform/size/static.",
            )

    def _attach_callback(self) -> None:
        trainer = self._trainer_or_none()
        if trainer is None:
            return

        if any(isinstance(cb, MixtureWeightsCallback) for cb in trainer.callbacks):
            return
        from lightning.pytorch.callbacks import Checkpoint

        # Before the checkpoint callbacks, as Lightning orders them (they should see the step's state).
        pos = next(
            (i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, Checkpoint)),
            len(trainer.callbacks),
        )
        trainer.callbacks.insert(pos, MixtureWeightsCallback())

    def _trainer_or_none(self) -> Any:
        try:
            return self.trainer
        except RuntimeError:
            return None

    # ----------------------------------------------------------------------------------------
    # Weights.

    def named(self, w: Tensor) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.names, w.tolist())}

    @property
    def weights(self) -> Tensor:
        """The latest weights ``(n,)`` float64 (those of the most recent update)."""
        if self.schedule is None:
            raise RuntimeError("call setup('fit') first")
        return self.schedule.latest

    def weights_in_force(self) -> Tensor:
        """Weights of the last batch handed to training (batch 0's before training): for
        ``sequential`` the current stage's, not the last stage's (:attr:`weights`)."""
        if self.schedule is None:
            raise RuntimeError("call setup('fit') first")
        return self.schedule.weights_at(max(self.started_batches - 1, 0))

    def named_weights(self) -> dict[str, float]:
        """The latest weights by name; for ``sequential``, those in force (its plan is in the history)."""
        if self.mixture.strategy == "sequential":
            return self.named(self.weights_in_force())
        return self.named(self.weights)

    def describe(self) -> dict[str, Any]:
        """Sources, strategy and the weights in force now (the final ones after fit): the lineage entry."""
        return {
            "sources": list(self.names),
            "strategy": self.mixture.strategy,
            "weights": self.named_weights() if self.schedule is not None else None,
            "updates": max(len(self.history) - 1, 0),
        }

    def update_due(self, step: int) -> bool:
        """Whether an adaptive update is due at optimizer step ``step`` (not at 0, once per step)."""
        m = self.mixture
        return m.adaptive and step > 0 and step % m.update_every == 0 and step != self.last_update_step

    def compute_update(
        self, counts: list[Tensor], dev_losses: Tensor | None, embeddings: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """New weights and the scores ``Delta`` from reduced probe statistics (pure, float64, CPU).

        ``counts``: per-layer gate loads (``dynamic``, ``static_gate_load``); ``dev_losses``
        (``reference_loss``); ``embeddings``: per-source mean sentence embeddings ``(n, H)``
        (``sentence_embedding``)."""
        m = self.mixture
        if m.strategy == "static_gate_load":
            stacked = torch.stack([c.to(torch.float64).cpu() for c in counts])
            return gate_load_weights(self.weights, stacked, m.resolved_eta, m.resolved_c)
        if m.strategy == "dynamic":
            delta = layered_redundancy_scores(torch.stack([c.to(torch.float64).cpu() for c in counts]))
        elif m.strategy == "sentence_embedding":
            if embeddings is None:
                raise RuntimeError("sentence_embedding update without embeddings")
            delta = embedding_redundancy_scores(embeddings)
        else:
            if self.reference is None or dev_losses is None:
                raise RuntimeError("reference_loss update without reference or dev losses")
            delta = reference_loss_scores(dev_losses, self.reference)
        return update_weights(self.weights, delta, m.resolved_eta, m.resolved_c), delta

    def apply_update(self, step: int, weights: Tensor, delta: Tensor | None = None) -> int:
        """Put ``weights`` in force from batch ``started_batches + apply_delay``; returns that batch."""
        assert self.schedule is not None
        from_batch = self.started_batches + self.apply_delay
        self.schedule.add(from_batch, weights)
        entry: dict[str, Any] = {"step": int(step), "weights": self.named(weights), "from_batch": from_batch}
        if delta is not None:
            entry["delta"] = self.named(delta)
        self.history.append(entry)
        self.last_update_step = int(step)
        return from_batch

    def set_start_weights(self, weights: Tensor, delta: Tensor | None = None) -> None:
        """``static_gate_load``: the one-shot weights, in force from batch 0 (before any is drawn)."""
        assert self.schedule is not None
        if self.started_batches > 0 or (self._sampler is not None and self._sampler.cursor > 0):
            raise RuntimeError("the one-shot mixture weights must be set before the first batch is drawn")
        start = self.history[0]["weights"] if self.history else self.named(self.weights)
        self.schedule.add(0, weights)  # replaces the starting entry in place (the sampler shares it)
        entry: dict[str, Any] = {"step": 0, "weights": self.named(weights), "from_batch": 0, "start": start}
        if delta is not None:
            entry["delta"] = self.named(delta)
        self.history = [entry]
        self.start_measured = True

    def set_reference(self, losses: Tensor) -> None:
        self.reference = torch.as_tensor(losses, dtype=torch.float64).clone()

    # ----------------------------------------------------------------------------------------
    # Batch accounting (called by the callback).

    def note_batch_started(self) -> None:
        """A training batch was handed to the model: weights are final up to ``started + apply_delay``."""
        self.started_batches += 1
        if self._sampler is not None:
            self._sampler.started = self.started_batches
            if self._sampler.horizon is not None:
                self._sampler.horizon = self.started_batches + self.apply_delay

    def start_tracking(self) -> None:
        """From now on the sampler refuses to draw batches whose weights may still change."""
        if self._sampler is not None:
            self._sampler.started = self.started_batches
            self._sampler.horizon = self.started_batches + self.apply_delay if self.mixture.adaptive else None

    def stop_tracking(self) -> None:
        if self._sampler is not None:
            self._sampler.horizon = None

    # ----------------------------------------------------------------------------------------
    # Loaders.

    def _rank_world(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _batches_per_epoch(self) -> int:
        total = self.mixture.samples_per_epoch or len(self._build("train"))
        return math.ceil(total / self.batch_size)

    def sampler(self) -> MixtureSampler:
        """The training sampler (made once; its position follows :attr:`started_batches`)."""
        if self.schedule is None:
            self.setup("fit")
        assert self.schedule is not None
        rank, world = self._rank_world()
        if self._sampler is None or (self._sampler.rank, self._sampler.num_replicas) != (rank, world):
            rows = self._build("train")
            counts = self.source_sizes("train")
            sizes = [counts[n] for n in self.names]
            self._sampler = MixtureSampler(
                sizes,
                self.batch_size,
                self.schedule,
                seed=self.seed,
                rank=rank,
                num_replicas=world,
                batches_per_epoch=self._batches_per_epoch(),
            )
            self._sampler.started = self.started_batches
            self._sampler.record = self.mixture.dump_rank_files
            self._check_row_order(rows)
        return self._sampler

    def _check_row_order(self, rows: list[dict[str, Any]]) -> None:
        # The sampler addresses source i's rows as one contiguous block, in source order.
        expected = [n for n in self.names for _ in range(self.source_sizes("train")[n])]
        if [r["source"] for r in rows] != expected:
            raise RuntimeError("training rows are not grouped by source in source order")

    def train_dataloader(self) -> DataLoader:
        return _ResumableLoader(
            self,
            RowDataset(self._build("train")),
            batch_size=self.batch_size,
            sampler=self.sampler(),
            shuffle=False,
            collate_fn=Collator(self._pad_id(), "train"),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    # ----------------------------------------------------------------------------------------
    # The probe sets.

    def probe_rows(self) -> list[tuple[int, dict[str, Any]]]:
        """``(source index, row)`` of every source's fixed probe set: its first ``probe_size`` dev rows."""
        per: dict[str, list[dict[str, Any]]] = {n: [] for n in self.names}
        for row in self._build("val"):
            if len(per[row["source"]]) < self.mixture.probe_size:
                per[row["source"]].append(row)
        return [(i, row) for i, n in enumerate(self.names) for row in per[n]]

    def probe_batches(self, rank: int = 0, world_size: int = 1) -> list[dict[str, Tensor]]:
        """This rank's share of the probe rows as padded batches with ``source_ids``/``row_weight``.

        Rows are dealt round-robin; every rank gets the same number of rows (padding rows of
        weight 0), so every rank runs the same number of forwards.
        """
        key = (rank, world_size)
        if key in self._probe_cache:
            return self._probe_cache[key]
        rows = self.probe_rows()
        if not rows:
            raise ConfigError(
                "the probe set is empty", where="data.mixture", fix="give the sources dev data."
            )
        per_rank = math.ceil(len(rows) / world_size)
        mine = [(src, row, 1.0) for src, row in rows[rank::world_size]]
        mine += [(rows[0][0], rows[0][1], 0.0)] * (per_rank - len(mine))
        bs = self.mixture.probe_batch_size or self.eval_batch_size
        collate = Collator(self._pad_id(), "train")
        batches = []
        for start in range(0, len(mine), bs):
            chunk = mine[start : start + bs]
            batch = collate([r for _, r, _ in chunk])
            batch["source_ids"] = torch.tensor([s for s, _, _ in chunk], dtype=torch.long)  # (B,)
            batch["row_weight"] = torch.tensor([w for _, _, w in chunk], dtype=torch.float32)  # (B,)
            batches.append(batch)
        self._probe_cache[key] = batches
        return batches

    # ----------------------------------------------------------------------------------------
    # Checkpoint state (plain types: Lightning loads checkpoints with weights_only=True).

    def state_dict(self) -> dict[str, Any]:
        if self.schedule is None:
            return {}
        return {
            "version": STATE_VERSION,
            "sources": list(self.names),
            "strategy": self.mixture.strategy,
            "seed": int(self.seed),
            "started_batches": int(self.started_batches),
            "last_update_step": int(self.last_update_step),
            "start_measured": bool(self.start_measured),
            "schedule": self.schedule.state_dict(),
            "history": [dict(h) for h in self.history],
            "reference_losses": self.reference.tolist() if self.reference is not None else None,
            "config": asdict(self.mixture),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.schedule is None:  # restored before setup: apply once the rows exist
            self._pending_state = dict(state_dict)
            return
        self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        if state.get("sources") != self.names:
            raise ConfigError(
                f"the checkpoint's mixture has sources {state.get('sources')}, this run {self.names}",
                where="data.sources",
                fix="resume with the same data sources in the same order, or start a new run (no --ckpt_path).",
            )
        if state.get("strategy") != self.mixture.strategy:
            raise ConfigError(
                f"the checkpoint's mixture strategy is {state.get('strategy')!r}, this run's "
                f"{self.mixture.strategy!r}",
                where="data.mixture.strategy",
                fix="resume with the same strategy, or start a new run.",
            )
        if int(state["seed"]) != self.seed:
            logger.warning(
                "resuming with data.seed=%d but the checkpoint drew with seed %d: keeping %d so the draws "
                "continue exactly",
                self.seed,
                state["seed"],
                state["seed"],
            )
            self.seed = int(state["seed"])
            self._sampler = None
        self.schedule = WeightSchedule.from_state(state["schedule"])
        self.history = [dict(h) for h in state["history"]]
        self.started_batches = int(state["started_batches"])
        self.last_update_step = int(state["last_update_step"])
        self.start_measured = bool(state.get("start_measured", False))
        ref = state.get("reference_losses")
        self.reference = torch.tensor(ref, dtype=torch.float64) if ref is not None else self.reference
        if self._sampler is not None:
            self._sampler.schedule = self.schedule
            self._sampler.started = self.started_batches


class _ResumableLoader(DataLoader):
    """A DataLoader Lightning recognises as resumable (``state_dict``/``load_state_dict``): its
    position lives in the data module's state, so these only report and check it."""

    def __init__(self, datamodule: MixtureDataModule, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._datamodule = datamodule

    def state_dict(self) -> dict[str, int]:
        return {"started_batches": int(self._datamodule.started_batches)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        pass  # the data module's own state (restored before the loaders) is authoritative


__all__ = ["MixtureConfig", "MixtureDataModule"]
