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

from moe_app.errors import CheckpointError
from moe_app.lightning.modules.lm import GenerationConfig, ModelSource
from moe_app.lightning.modules.moe import FreezeConfig, MoeLMModule, RouterLossConfig
from moe_app.lightning.modules.optim import OptimConfig


def check_init_from(
    path: str | Path, *, expect_architecture: str | None = None, requires_stage: str | None = None
) -> dict[str, Any]:
    """Check that ``path`` is a complete MoE model directory; return its ``config.json``.

    Raises ``CheckpointError`` naming the missing file or the mismatch and how to fix it.
    """
    path = Path(path)
    where = f"init_from={str(path)!r}"
    if not path.is_dir():
        raise CheckpointError(
            "the directory does not exist.",
            where=where,
            fix="run the previous stage first (see `python scripts/pipeline.py --list`) or fix the path",
        )
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(
            "config.json is missing: this is not a model directory (or an interrupted write).",
            where=where,
            fix="point init_from at the `model` directory the previous stage wrote",
        )
    config = json.loads(cfg_file.read_text())
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (path / s).exists())
        if missing:
            raise CheckpointError(
                f"weight shards listed in model.safetensors.index.json are missing: {', '.join(missing)}.",
                where=where,
                fix="re-run the stage that produced it",
            )
    elif not any(path.glob("*.safetensors")) and not (path / "adapter_model.safetensors").exists():
        raise CheckpointError(
            "no safetensors weights found.", where=where, fix="re-run the stage that produced it"
        )
    archs = config.get("architectures") or [config.get("model_type", "?")]
    if expect_architecture is not None and expect_architecture not in archs:
        raise CheckpointError(
            f"architecture {archs[0]!r} does not match the expected {expect_architecture!r}.",
            where=where,
            fix="start from a checkpoint of the same base family, or change expect_architecture",
        )
    moe_spec = path / "moe_app.json"
    is_stock_moe = any(k in config for k in ("num_local_experts", "num_experts"))
    if not moe_spec.exists() and not is_stock_moe and not (path / "pesc_adapters.json").exists():
        raise CheckpointError(
            f"{archs[0]} is a dense model, but post-training needs a Mixture-of-Experts.",
            where=where,
            fix="upcycle it first (configs/tiny/upcycle.yaml or `moe-app upcycle`), or start from a PESC or "
            "stock MoE checkpoint",
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


class PostTrainModule(MoeLMModule):
    """One post-training stage of an MoE from any construction (copy, partition, attention, PESC).

    Args:
        init_from: the previous stage's output directory (moe-app checkpoint or stock HF MoE).
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
        router_losses: RouterLossConfig | None = None,
        freeze: FreezeConfig | None = None,
        optim: OptimConfig | None = None,
        generation: GenerationConfig | None = None,
        log_load_every_n_steps: int = 50,
        save_dir: str | None = "model",
        seed: int = 0,
    ) -> None:
        super().__init__(
            source=_with_pretrained(source, init_from),
            upcycle=None,
            router_losses=router_losses,
            freeze=freeze,
            log_load_every_n_steps=log_load_every_n_steps,
            optim=optim,
            generation=generation,
            save_dir=save_dir,
            seed=seed,
        )
        self.init_from = init_from
        self.stage = stage
        self.requires_stage = requires_stage
        self.expect_architecture = expect_architecture
        self.hparams.pop("upcycle", None)  # not an argument of this class (always null here)
        self.hparams.update(
            {
                "init_from": init_from,
                "stage": stage,
                "requires_stage": requires_stage,
                "expect_architecture": expect_architecture,
                "log_load_every_n_steps": log_load_every_n_steps,
            }
        )

    def build_model(self) -> torch.nn.Module:
        check_init_from(
            self.init_from, expect_architecture=self.expect_architecture, requires_stage=self.requires_stage
        )
        return super().build_model()

    def lineage_entry(self) -> dict[str, Any]:
        entry = super().lineage_entry()
        entry["stage"] = self.stage
        entry["init_from"] = str(self.init_from)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        describe = getattr(dm, "describe", None)
        entry["data"] = describe() if callable(describe) else _describe_data(dm)
        return entry


def _with_pretrained(source: ModelSource | None, init_from: str) -> ModelSource:
    if source is None:
        return ModelSource(pretrained=init_from)
    return dataclasses.replace(source, pretrained=init_from, arch=None)


def _describe_data(dm: Any) -> dict[str, Any] | None:
    if dm is None:
        return None
    sources = getattr(dm, "sources", None) or []
    out: dict[str, Any] = {"class": type(dm).__name__}
    names = []
    for s in sources:
        name = getattr(s, "name", None)
        origin = getattr(s, "path", None) or getattr(s, "hub", None) or getattr(s, "builtin", None)
        names.append({"name": name, "from": origin})
    out["sources"] = names
    weights = getattr(dm, "current_weights", None)
    if callable(weights):
        out["final_weights"] = weights()
    return out
