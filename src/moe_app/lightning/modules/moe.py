"""MoE training modules: upcycling with continual pre-training, and MoE fine-tuning in general.

``MoeLMModule`` trains any MoE model moe-app can load (a moe-app checkpoint from ``moe-app
upcycle``, or a dense checkpoint upcycled on the fly when ``upcycle`` is given) with

    loss = LM loss + balance_coef * L_balance + z_coef * L_z [+ cv_coef * L_cv]

where the router losses are the core's (``moe_app.core.moe.losses``), averaged over MoE layers, with
padding excluded. Unlike the PESC and LLaMA-MoE v2 reference code, ``L_balance`` uses the full
softmax for ``P_e`` so it is not a constant (ALGORITHMS.md section 1).

Per-layer expert load (share of routed tokens per expert) is logged every ``log_load_every_n_steps``
steps, and the router can be frozen (LLaMA-MoE v1 SFT froze the gate; post-training stages choose).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from moe_app.checkpoint.model_dir import save_moe_checkpoint
from moe_app.core.data.collate import take_batches
from moe_app.core.moe.block import find_moe_blocks
from moe_app.core.moe.losses import RouterLossConfig, weighted_router_losses
from moe_app.core.moe.stats import expert_load
from moe_app.core.upcycling.config import UpcycleConfig
from moe_app.errors import ConfigError
from moe_app.lightning.modules.lm import CausalLMModule, ModelSource, rebuildable


@dataclass
class FreezeConfig:
    """Which parameter groups are frozen during this stage."""

    router: bool = False
    """Freeze the routers (LLaMA-MoE v1 SFT froze the gate). Only router parameters are matched,
    not the experts' W_gate (the reference's name-based freezing froze both by accident)."""
    experts: bool = False
    """Freeze the routed experts."""
    attention: bool = False
    """Freeze attention projections."""
    embeddings: bool = False
    """Freeze token embeddings and the LM head."""


class MoeLMModule(CausalLMModule):
    """Continual pre-training / fine-tuning of a Mixture-of-Experts LM.

    Args:
        source: the model: a moe-app checkpoint (already MoE) or a dense checkpoint plus ``upcycle``.
        upcycle: surgery to apply to a dense ``source`` before training; ``null`` when the source is
            already an MoE.
        router_losses: auxiliary loss coefficients.
        freeze: parameter groups to freeze.
        log_load_every_n_steps: how often the per-layer expert load is logged.
    """

    def __init__(
        self,
        source: ModelSource,
        upcycle: UpcycleConfig | None = None,
        router_losses: RouterLossConfig | None = None,
        freeze: FreezeConfig | None = None,
        log_load_every_n_steps: int = 50,
        **kwargs: Any,
    ) -> None:
        super().__init__(source, **kwargs)
        self.upcycle_cfg = upcycle
        self.router_losses = router_losses or RouterLossConfig()
        self.freeze = freeze or FreezeConfig()
        self.log_load_every_n_steps = log_load_every_n_steps
        self.record_hparams(
            upcycle=upcycle,
            router_losses=self.router_losses,
            freeze=self.freeze,
            log_load_every_n_steps=log_load_every_n_steps,
        )

    # ------------------------------------------------------------------ model
    @rebuildable
    def build_model(self) -> torch.nn.Module:

        model = self.load_base_model()
        self._check_source(model)
        if self.upcycle_cfg is not None:
            from moe_app.core.upcycling import upcycle

            calibration = self._calibration_batches() if self.upcycle_cfg.needs_calibration else None
            model = upcycle(model, self.upcycle_cfg, calibration=calibration)
        self._apply_freezing(model)
        return model

    def build_weight_source(self):
        """Under FSDP, rank 0 upcycles the dense model one decoder layer at a time while the shards
        fill, so no rank holds the whole upcycled model (``LayerwiseUpcycle``)."""
        if self.upcycle_cfg is None or type(self).build_model is not MoeLMModule.build_model:
            return super().build_weight_source()
        from moe_app.checkpoint.lazy_dense import lazy_dense_model
        from moe_app.core.upcycling.layerwise import LayerwiseUpcycle

        src, lazy = self.source, None
        if src.pretrained is not None and not self.upcycle_cfg.needs_calibration:
            lazy = lazy_dense_model(src.pretrained, src.torch_dtype, src.trust_remote_code)
        model, fetch = lazy if lazy is not None else (self.load_base_model(), None)  # dense read per layer
        self._check_source(model)
        calibration = self._calibration_batches() if self.upcycle_cfg.needs_calibration else None
        source = LayerwiseUpcycle(model, self.upcycle_cfg, calibration=calibration, fetch=fetch)
        self._apply_freezing(source.skeleton)
        return source

    def _check_source(self, model: torch.nn.Module) -> None:
        already_moe = any(True for _ in find_moe_blocks(model))
        if self.upcycle_cfg is not None:
            if already_moe:
                raise ConfigError(
                    f"model.source.pretrained={self.source.pretrained!r} is already a Mixture-of-Experts, "
                    "but an upcycle section is configured.",
                    where="model.upcycle",
                    fix="set --model.init_args.upcycle null to continue training the MoE, or start from a "
                    "dense checkpoint",
                )
        elif not already_moe:
            raise ConfigError(
                f"model.source.pretrained={self.source.pretrained!r} is a dense model and no upcycle section "
                "is configured.",
                where="model.upcycle",
                fix="add an upcycle section (see configs/tiny/upcycle.yaml) or run `moe-app upcycle` first",
            )

    def _calibration_batches(self, n: int = 8) -> list[dict[str, Tensor]]:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            raise ConfigError(
                "this upcycling needs calibration data (importance split or kmeans router init) but no data "
                "module is available.",
                fix="run through `moe-app fit` with a data section, or use `moe-app upcycle --calibration`",
            )
        return take_batches(dm.train_dataloader(), n, keys=("input_ids", "attention_mask"))

    def _apply_freezing(self, model: torch.nn.Module) -> None:
        f = self.freeze
        for name, p in model.named_parameters():
            if (
                (f.router and ".router." in name)
                or (f.experts and (".experts." in name or ".shared_expert." in name))
                or (f.attention and ".self_attn." in name and ".router." not in name)
                or (f.embeddings and ("embed_tokens" in name or "lm_head" in name))
            ):
                p.requires_grad_(False)

    # ------------------------------------------------------------------ losses and logging
    def extra_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return weighted_router_losses(self.model, batch["attention_mask"], self.router_losses)

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        n = self.log_load_every_n_steps
        if n <= 0 or self.global_step % n != 0:
            return

        mask = batch["attention_mask"].reshape(-1).bool()  # (T,)
        for i, (name, block) in enumerate(find_moe_blocks(self.model)):
            r = block.last_routing
            if r is None or r.indices.shape[0] != mask.shape[0]:
                continue
            load = expert_load(r.indices, r.num_experts, mask)
            load = load / load.sum().clamp_min(1.0)  # (E,)
            layer = _layer_tag(name, i)
            for e, v in enumerate(load.tolist()):
                self.log(f"load/{layer}/e{e}", v, batch_size=batch["input_ids"].shape[0])
            self.log(
                f"load/{layer}/max_over_mean", float(load.max() * r.num_experts), batch_size=mask.shape[0]
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()

        blocks = list(find_moe_blocks(self.model))
        rank_zero_info(
            f"[moe-app] {len(blocks)} MoE blocks; "
            + ", ".join(
                f"{_layer_tag(n, i)}: {b.num_experts} experts top-{b.top_k}"
                for i, (n, b) in enumerate(blocks[:4])
            )
            + (" ..." if len(blocks) > 4 else "")
        )

    # ------------------------------------------------------------------ saving
    def lineage_entry(self) -> dict[str, Any]:
        entry = super().lineage_entry()
        if self.upcycle_cfg is not None:
            entry["stage"] = f"upcycle:{self.upcycle_cfg.method}"
            entry["upcycle"] = asdict(self.upcycle_cfg)
        else:
            entry["stage"] = "moe_train"
        return entry

    def save_model_dir(self, path: Path, model: torch.nn.Module | None = None) -> None:

        save_moe_checkpoint(
            model if model is not None else self.model, path, tokenizer=self.tokenizer, lineage=self.lineage()
        )


def _layer_tag(name: str, i: int) -> str:
    parts = name.split(".")
    if "layers" in parts:
        j = parts.index("layers")
        if j + 1 < len(parts):
            kind = "attn" if "self_attn" in parts else "mlp"
            return f"L{parts[j + 1]}_{kind}"
    return f"moe{i}"
