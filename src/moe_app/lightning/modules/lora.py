"""Dense LoRA fine-tuning: the baseline PESC is measured against (issue: PESC vs dense LoRA).

Same base, same data, a LoRA rank chosen for a trainable-parameter budget similar to PESC's
adapters + routers (QLoRA, Dettmers et al. 2023; LoRA, Hu et al. 2021). LoRA is injected with peft
in place, so the model stays a ``PreTrainedModel``; at the end of fit it is merged exactly into the
base weights and saved as an ordinary HF directory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from moe_app.checkpoint.pretrained import save_pretrained_dir
from moe_app.core.pesc.config import PeftLoraOptions
from moe_app.core.pesc.merge import merge_peft_lora
from moe_app.core.pesc.surgery import inject_peft_lora
from moe_app.lightning.modules.lm import CausalLMModule, ModelSource, rebuildable


class LoraModule(CausalLMModule):
    """Fine-tune a dense causal LM with LoRA adapters only.

    Args:
        source: the dense base model.
        lora: rank, alpha, dropout and target modules (``enabled`` is implied).
    """

    def __init__(self, source: ModelSource, lora: PeftLoraOptions | None = None, **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        self.lora = lora or PeftLoraOptions(enabled=True)
        self.record_hparams(lora=self.lora)

    @rebuildable
    def build_model(self) -> torch.nn.Module:
        """The base with LoRA injected. Under FSDP only rank 0 runs this; the other ranks rebuild
        the same peft modules on meta from the LoRA options peft records on the model."""
        model = self.load_base_model()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            inject_peft_lora(model, self.lora)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        return model

    def save_model_dir(self, path: Path, model: torch.nn.Module | None = None) -> None:

        # merge into a copy: the training model keeps its adapters (an FSDP replica is already one)
        model = model if model is not None else self.model
        merged = merge_peft_lora(copy.deepcopy(model) if model is self.model else model)
        save_pretrained_dir(merged, path, tokenizer=self.tokenizer, lineage=self.lineage())

    def lineage_entry(self):
        entry = super().lineage_entry()
        entry["stage"] = "lora"
        return entry
