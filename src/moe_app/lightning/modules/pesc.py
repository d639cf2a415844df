"""PESC instruction tuning as a LightningModule (Wu et al. 2024, arXiv 2401.02731; Camelidae).

``PescModule`` is the dense :class:`~moe_app.lightning.modules.lm.CausalLMModule` with a different model and
loss, through the base class's hooks only:

* :meth:`build_model` loads the dense base, applies :func:`~moe_app.core.pesc.surgery.build_pesc`
  (routed adapters or LoRA experts, optional 4-bit NF4 base, optional shared QLoRA) so only the
  PESC parameters train;
* :meth:`extra_losses` adds the optional load-balancing and z losses from
  :mod:`moe_app.core.moe.losses`, padding excluded (both off by default, as in the paper);
* :meth:`save_model_dir` writes the adapter-only checkpoint (trainable tensors + ``pesc.json``
  naming the base), or a full moe-app checkpoint with ``save_full: true``.

Lightning checkpoints (``.ckpt``) hold only the trainable tensors too: the frozen base is rebuilt
from ``source`` by ``configure_model`` on resume, so a 7B run does not write 13 GB per checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from moe_app.checkpoint.pesc import (
    is_pesc_adapter_dir,
    load_pesc_model,
    read_pesc_meta,
    save_pesc_adapters,
    save_pesc_full,
)
from moe_app.core.moe.losses import weighted_router_losses
from moe_app.core.pesc.config import PescConfig, is_pesc_trainable, pesc_config_of
from moe_app.core.pesc.surgery import build_pesc, mark_pesc_trainable
from moe_app.core.utils.params import human
from moe_app.errors import CheckpointError, ConfigError
from moe_app.lightning.modules.lm import CausalLMModule, ModelSource, rebuildable


class PescModule(CausalLMModule):
    """Parameter-efficient sparsity crafting on a dense base.

    Args:
        source: the dense base (``pretrained`` dir / hub id), or a PESC adapter dir to continue from.
        pesc: the PESC surgery (experts, adapter size, 4-bit base, QLoRA, router losses).
        save_full: write a full moe-app checkpoint at the end of ``fit`` instead of the adapter-only one.
        optim: optimiser and schedule (paper: lr 2e-4, constant, 200 warm-up steps).
        generation: greedy generation settings for ``test``.
        save_dir: where ``fit`` writes the final checkpoint (relative to ``trainer.default_root_dir``).
        seed: seed for a fresh base built from ``source.arch``.
    """

    def __init__(
        self,
        source: ModelSource,
        pesc: PescConfig | None = None,
        save_full: bool = False,
        save_dir: str | None = "model",
        **kwargs: Any,
    ) -> None:
        super().__init__(source, save_dir=save_dir, **kwargs)
        self.pesc = pesc or PescConfig()
        self.save_full = save_full
        if save_dir is not None and not save_full and source.pretrained is None:
            raise ConfigError(
                "an adapter-only checkpoint needs a base checkpoint to load on top of, but the model is built "
                "from an inline arch",
                where="model.init_args.source",
                fix="set source.pretrained to the dense model dir, or save_full: true",
            )
        self.record_hparams(pesc=self.pesc, save_full=save_full)
        # The .ckpt holds only trainable tensors; the frozen base comes back from `source`.
        self.strict_loading = False

    # ------------------------------------------------------------------ model
    @rebuildable
    def build_model(self) -> torch.nn.Module:
        src = self.source.pretrained
        if src is not None and is_pesc_adapter_dir(src):
            saved = read_pesc_meta(src)
            rank_zero_info(f"[moe-app] continuing from PESC adapters {src} (base {saved['base_model']})")
            model = load_pesc_model(src, dtype=self.source.torch_dtype, device=self._quantize_device())
            self.pesc = PescConfig.from_dict(saved["pesc"])
            mark_pesc_trainable(model)
            return model.train()
        model = self.load_base_model()
        device = self._quantize_device()
        if device is not None:
            model.to(device)  # bitsandbytes quantises on the weights' device
        return build_pesc(model, self.pesc)

    def rebuilds_on_meta(self) -> bool:
        """Under FSDP only rank 0 loads the base and crafts PESC; the other ranks rebuild the
        blocks, adapters, routers and any peft LoRA on meta from the broadcast config and
        :class:`PescConfig`. A 4-bit base (QLoRA) keeps the every-rank path, where the strategy
        refuses it with the reason: bitsandbytes blocks cannot be sharded."""
        return super().rebuilds_on_meta() and not self._effective_pesc().quantize_4bit

    def _effective_pesc(self) -> PescConfig:
        """The config ``build_model`` will use: the saved one when continuing from adapters."""
        src = self.source.pretrained
        if src is not None and is_pesc_adapter_dir(src):
            return PescConfig.from_dict(read_pesc_meta(src)["pesc"])
        return self.pesc

    def configure_model(self) -> None:
        super().configure_model()
        # Continuing from adapters, build_model adopts the saved PescConfig; under FSDP the other
        # ranks did not run it and take the config their rebuilt model carries (router losses).
        cfg = pesc_config_of(self.model)
        if cfg is not None:
            self.pesc = cfg

    def _quantize_device(self) -> torch.device | None:
        if not self.pesc.quantize_4bit or self._trainer is None:
            return None
        device = self.trainer.strategy.root_device
        return device if device.type == "cuda" else None

    # ------------------------------------------------------------------ losses
    def extra_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return weighted_router_losses(self.model, batch["attention_mask"], self.pesc.router_losses)

    # ------------------------------------------------------------------ logging and saving
    def on_fit_start(self) -> None:
        super().on_fit_start()
        counts = {"routers": 0, "experts": 0, "peft_lora": 0}
        for name, p in self.model.named_parameters():
            if p.requires_grad and is_pesc_trainable(name):
                counts[_trainable_group(name)] += p.numel()
        rank_zero_info(
            f"[moe-app] PESC ({self.pesc.variant}, E={self.pesc.num_experts}, k={self.pesc.top_k}, "
            f"4-bit base={self.pesc.quantize_4bit}) trainable: "
            + ", ".join(f"{g} {human(n)}" for g, n in counts.items())
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = {k: v for k, v in state.items() if is_pesc_trainable(k)}

    def _base_model_path(self) -> str | None:
        src = self.source.pretrained
        if src is None:
            return None
        return read_pesc_meta(src)["base_model"] if is_pesc_adapter_dir(src) else src

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # strict_loading is off (the base is not in the .ckpt), so check the trainable part ourselves.
        if self.model is None:
            return
        # Under FSDP the strategy has already loaded the tensors and passes only their names.
        state = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint.get("state_dict_keys")
        if state is None:  # a sharded (directory) checkpoint: the strategy's loader checked it
            return
        state = set(state)
        missing = [n for n, _ in self.named_parameters() if is_pesc_trainable(n) and n not in state]
        if missing:
            raise CheckpointError(
                f"the checkpoint lacks {len(missing)} trainable PESC tensors, e.g. {missing[:3]}",
                where="ckpt_path",
                fix="resume with the same PescConfig (model.init_args.pesc) the checkpoint was trained with",
            )

    def save_model_dir(self, path: Path, model: torch.nn.Module | None = None) -> None:
        model = model if model is not None else self.model
        if self.save_full:
            save_pesc_full(
                model, path, cfg=self.pesc, tokenizer=self.tokenizer, source=self.source.pretrained
            )
            return
        save_pesc_adapters(
            model,
            path,
            base_model=self._base_model_path(),
            cfg=self.pesc,
            tokenizer=self.tokenizer,
            lineage=self.lineage(),
        )


def _trainable_group(name: str) -> str:
    if ".mlp.router." in name:
        return "routers"
    if ".mlp.adapters." in name or ".mlp.expert_lora." in name:
        return "experts"
    return "peft_lora"


__all__ = ["PescModule"]
