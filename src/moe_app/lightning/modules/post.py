"""Two-stage post-training of an MoE (LLaMA-MoE v2, Qu et al. 2024; ALGORITHMS.md section 6).

A stage is a :class:`PostTrainModule` run: it starts from the previous stage's output directory
(``init_from``), checks that the directory holds a complete, compatible MoE model before anything
heavy happens, trains with the stage's own learning rate, schedule, router freezing and
balance-loss weight on the stage's data mixture (any data module, typically
``MixtureDataModule``), and records lineage: which stage, config and data produced the model.

Stage 1 is broad general instruction data; stage 2 a smaller, higher-quality, math/code-leaning
mix. The v2 recipe (lr 2e-5, cosine, 3% warm-up, router trainable) is in ``configs/post_stage*.yaml``;
the tiny pipeline uses ``configs/tiny/post_stage1.yaml`` and ``post_stage2.yaml``. Unlike the
reference, the balance loss here is the working one (full-softmax ``P_e``), so a non-zero weight
actually balances.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from moe_app.checkpoint.hub import check_local_model_dir, is_local
from moe_app.checkpoint.model_dir import is_moe_checkpoint
from moe_app.checkpoint.names import CONFIG_FILE, PESC_ADAPTER_FILE, PESC_META
from moe_app.checkpoint.pesc import is_pesc_adapter_dir, read_pesc_meta
from moe_app.checkpoint.shards import open_shard
from moe_app.core.mixing.protocols import MixtureLineage
from moe_app.errors import CheckpointError
from moe_app.lightning.data.instruction import InstructionDataModule
from moe_app.lightning.modules.lm import ModelSource, rebuildable
from moe_app.lightning.modules.moe import MoeLMModule


def check_init_from(
    path: str | Path, *, expect_architecture: str | None = None, requires_stage: str | None = None
) -> dict[str, Any]:
    """Check that ``path`` is a complete MoE model directory; return its (base's) ``config.json``.

    Accepted: a moe-app checkpoint dir or a PESC adapter-only dir (its manifest, its adapter tensors
    and the dense base it names are checked). A stock HF MoE (Mixtral, Qwen2-MoE, ...) is refused:
    its MoE blocks are transformers' own, whose routing and balance losses moe-app's training does not
    drive. Raises ``CheckpointError`` naming the missing / truncated file or the mismatch and how to
    fix it.
    """

    path = Path(path)
    where = f"init_from={str(path)!r}"
    if not path.is_dir():
        raise CheckpointError(
            "the directory does not exist.",
            where=where,
            fix="run the previous stage first (see `python scripts/pipeline.py --list`) or fix the path",
        )
    is_pesc = (path / PESC_META).exists() or (path / PESC_ADAPTER_FILE).exists()
    config = _check_pesc_adapter_dir(path, where) if is_pesc else _check_model_dir(path, where)
    archs = config.get("architectures") or [config.get("model_type", "?")]
    if expect_architecture is not None and expect_architecture not in archs:
        raise CheckpointError(
            f"architecture {archs[0]!r} does not match the expected {expect_architecture!r}.",
            where=where,
            fix="start from a checkpoint of the same base family, or change expect_architecture",
        )
    is_stock_moe = any(k in config for k in ("num_local_experts", "num_experts"))
    if not (is_pesc or is_moe_checkpoint(path)):
        if is_stock_moe:
            raise CheckpointError(
                f"{archs[0]} is a stock transformers MoE: post-training continues a moe-app MoE (its own "
                "routers, balance losses and expert layout), not transformers' MoE blocks.",
                where=where,
                fix="point init_from at the moe-app checkpoint the stock one was exported from, or upcycle "
                "the dense base with moe-app",
            )
        raise CheckpointError(
            f"{archs[0]} is a dense model, but post-training needs a Mixture-of-Experts.",
            where=where,
            fix="upcycle it first (configs/tiny/upcycle.yaml or `moe-app upcycle`), or start from a PESC "
            "checkpoint",
        )
    if requires_stage is not None:
        from moe_app.checkpoint.pretrained import read_lineage

        stages = [str(e.get("stage")) for e in read_lineage(path)]
        if requires_stage not in stages:
            raise CheckpointError(
                f"the model was not produced by stage {requires_stage!r} (its lineage: "
                f"{' -> '.join(stages) or 'none recorded'}).",
                where=where,
                fix=f"run {requires_stage} first and point init_from at its output, or set requires_stage null",
            )
    return config


def _check_model_dir(path: Path, where: str, what: str = "") -> dict[str, Any]:
    """``check_local_model_dir`` (config.json, every listed shard present and readable), re-raised
    with the ``init_from`` location; returns the parsed ``config.json``."""

    try:
        check_local_model_dir(path)
        return json.loads((path / CONFIG_FILE).read_text())
    except CheckpointError as e:
        raise CheckpointError(
            f"{what}{e.what} ({e.where}).",
            where=where,
            fix=f"point init_from at the `model` directory the previous stage wrote, or re-run that stage. {e.fix}",
        ) from e
    except ValueError as e:
        raise CheckpointError(
            f"{what}{CONFIG_FILE} is not valid JSON ({e}).",
            where=where,
            fix="re-run the stage that produced it",
        ) from e


def _check_pesc_adapter_dir(path: Path, where: str) -> dict[str, Any]:
    """A PESC adapter-only dir: manifest + adapter tensors present and readable, and the dense base
    it names a complete model dir (when local); returns the base's ``config.json`` (``{}`` for a hub id)."""

    missing = [n for n in (PESC_META, PESC_ADAPTER_FILE) if not (path / n).is_file()]
    if missing:
        raise CheckpointError(
            f"PESC adapter directory is incomplete: {' and '.join(missing)} missing "
            f"(an adapter dir holds {PESC_META} and {PESC_ADAPTER_FILE}).",
            where=where,
            fix="re-run the PESC stage that wrote it (an interrupted copy?), or point init_from at a complete dir",
        )
    try:
        meta = read_pesc_meta(path)
        with open_shard(path / PESC_ADAPTER_FILE):
            pass
    except CheckpointError as e:
        raise CheckpointError(f"{e.what} ({e.where}).", where=where, fix=e.fix) from e
    base = str(meta.get("base_model") or "")
    if not base:
        raise CheckpointError(
            f"{PESC_META} names no base_model.", where=where, fix="re-run the PESC stage that wrote it"
        )
    if not is_local(base):
        return {}  # a hub id: checked when the base is downloaded
    return _check_model_dir(
        Path(base).expanduser(), where, what=f"the PESC base model named in {PESC_META}: "
    )


class PostTrainModule(MoeLMModule):
    """One post-training stage of an MoE from any construction (copy, partition, attention, PESC).

    Args:
        init_from: the previous stage's output directory (moe-app MoE checkpoint or PESC dir).
        source: model options (dtype, activation checkpointing, ...); its ``pretrained`` is set to
            ``init_from``.
        stage: this stage's name, recorded in the lineage (e.g. ``post_stage1``).
        requires_stage: refuse ``init_from`` unless its lineage contains this stage.
        expect_architecture: refuse ``init_from`` unless its ``architectures`` contains this.
    """

    def __init__(
        self,
        init_from: str,
        source: ModelSource | None = None,
        stage: str = "post_stage1",
        requires_stage: str | None = None,
        expect_architecture: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(_with_pretrained(source, init_from), upcycle=None, **kwargs)
        self.init_from = init_from
        self.stage = stage
        self.requires_stage = requires_stage
        self.expect_architecture = expect_architecture
        self.hparams.pop("upcycle", None)  # not an argument of this class (always null here)
        self.record_hparams(
            init_from=init_from,
            stage=stage,
            requires_stage=requires_stage,
            expect_architecture=expect_architecture,
        )

    @rebuildable
    def build_model(self) -> torch.nn.Module:
        self._check_init_from()
        return super().build_model()

    def _check_init_from(self) -> None:
        check_init_from(
            self.init_from, expect_architecture=self.expect_architecture, requires_stage=self.requires_stage
        )

    def rebuilds_on_meta(self) -> bool:
        """Under FSDP only rank 0 reads ``init_from``; the other ranks rebuild its structure on meta
        from the config, MoE spec (per-layer expert counts, attention MoE, dropped MLPs, skipping
        thresholds, PESC adapters) and PESC config rank 0 broadcasts, which describe every model
        ``load_model`` builds from a moe-app or PESC adapter dir. Except a 4-bit
        (QLoRA) PESC base: that keeps the every-rank path, where the strategy refuses it with the
        reason (4-bit weights cannot be sharded) before anything is broadcast."""
        return super().rebuilds_on_meta() and not _pesc_4bit(self.init_from)

    def build_weight_source(self):
        """Under FSDP, rank 0 reads a moe-app checkpoint one decoder layer at a time while the
        shards fill (:func:`~moe_app.checkpoint.lazy_moe.lazy_moe_model`), so no rank holds the
        whole model; a PESC adapter dir is loaded whole on rank 0."""
        from moe_app.checkpoint.lazy_moe import lazy_moe_model
        from moe_app.core.utils.weights import FetchedWeights

        src = self.source
        lazy = lazy_moe_model(self.init_from, src.torch_dtype, src.trust_remote_code)
        if lazy is None:
            return super().build_weight_source()  # build_model checks init_from
        self._check_init_from()
        model, fetch = lazy
        self._check_source(model)
        self._apply_freezing(model)
        return FetchedWeights(model, fetch)

    def lineage_entry(self) -> dict[str, Any]:
        entry = super().lineage_entry()
        entry["stage"] = self.stage
        entry["init_from"] = str(self.init_from)
        dm = self.trainer.datamodule if self._trainer is not None else None
        # Called when the model dir is written (end of fit), so a mixture's weights are the final ones.
        entry["data"] = dm.describe() if isinstance(dm, MixtureLineage) else describe_plain_data(dm)
        return entry


def _pesc_4bit(path: str | Path) -> bool:
    """Whether ``path`` holds a PESC model with a 4-bit base (an adapter dir's ``pesc.json``, or a
    full dir's ``adapters`` slot). Unreadable or missing files answer ``False``: ``check_init_from``
    then reports them on rank 0."""
    from moe_app.checkpoint.spec_file import read_spec

    try:
        if is_pesc_adapter_dir(path):
            cfg = read_pesc_meta(path).get("pesc") or {}
        elif is_moe_checkpoint(path):
            slot = read_spec(path).adapters or {}
            cfg = slot.get("config") or {}
        else:
            return False
    except (CheckpointError, OSError, ValueError):
        return False
    return bool(cfg.get("quantize_4bit"))


def _with_pretrained(source: ModelSource | None, init_from: str) -> ModelSource:
    if source is None:
        return ModelSource(pretrained=init_from)
    return dataclasses.replace(source, pretrained=init_from, arch=None)


def describe_plain_data(dm: Any) -> dict[str, Any] | None:
    """The lineage ``data`` of a data module that does not mix: its class and, for an
    ``InstructionDataModule``, its sources (public ``sources``: name + where each came from)."""

    if dm is None:
        return None
    out: dict[str, Any] = {"class": type(dm).__name__}
    if isinstance(dm, InstructionDataModule):
        out["sources"] = [{"name": s.name, "from": s.path or s.hub or s.builtin} for s in dm.sources]
    return out
