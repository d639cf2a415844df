"""Dense causal-LM LightningModule: the base every moe-app training module extends.

It owns the model's life cycle (load or build in ``configure_model``, idempotently), the LM loss,
the optimiser and schedule, logging (loss, learning rate, tokens per second, parameter counts), the
HF-style model directory written at the end of ``fit`` and the per-domain test report
(loss, perplexity, exact match from greedy generation).

Subclasses change the model and the loss through three hooks, never by overriding the steps:

* :meth:`build_model` returns the ``PreTrainedModel`` to train (e.g. after MoE surgery);
* :meth:`extra_losses` returns named auxiliary losses computed after the forward (router losses);
* :meth:`save_model_dir` writes the model directory (moe-app checkpoint vs plain HF).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from moe_app.checkpoint.gguf import fetchable_model_for
from moe_app.checkpoint.pretrained import read_lineage, save_pretrained_dir
from moe_app.core.spec import utc_now
from moe_app.core.utils.dtypes import DTYPES
from moe_app.core.utils.params import count_parameters
from moe_app.core.utils.paths import resolve_output_path
from moe_app.errors import ConfigError, MoeAppError
from moe_app.lightning.modules.evaluation import EvaluationMixin
from moe_app.lightning.modules.optim import OptimConfig, build_optimizer
from moe_app.lightning.protocols import NonFiniteLossHandler
from moe_app.lightning.strategies.fsdp import DecoderLayerFSDPStrategy, unsharded_model

log = logging.getLogger("moe_app.lightning.modules")


def rebuildable(build_model):
    """Mark a ``build_model`` whose result the other ranks can rebuild from its config and MoE
    spec alone, so that under FSDP only rank 0 builds it (:meth:`CausalLMModule.configure_model`).
    A subclass that overrides ``build_model`` without this mark keeps the old path (every rank
    builds the whole model, then shards it)."""
    build_model.rebuildable = True
    return build_model


@dataclass
class GenerationConfig:
    """Greedy generation used by ``test`` (exact-match accuracy) and ``predict``."""

    max_new_tokens: int = 24
    """Upper bound on generated tokens per prompt; answers in the built-in suite are short."""
    enabled: bool = True
    """Set false to report only loss/perplexity in ``test`` (faster on big models)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(
                f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}.",
                fix="set a positive number of tokens, e.g. 24",
            )


def _fetchable(path: str) -> bool:

    return fetchable_model_for(path) is not None


@dataclass
class ModelSource:
    """Where the model comes from: a checkpoint directory / hub id, or an inline architecture."""

    pretrained: str | None = None
    """Local directory (HF or moe-app checkpoint), hub id, or a ``.gguf`` file (dequantised to float;
    its tokenizer is used too). Takes precedence over ``arch``."""
    arch: dict[str, Any] | None = None
    """Inline ``LlamaConfig`` fields for a fresh random model (tiny runs), e.g. hidden_size: 128."""
    tokenizer: str | None = None
    """Tokenizer dir / hub id; ``builtin`` for the suite tokenizer. Default: the checkpoint's own,
    or ``builtin`` when building from ``arch``."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16 (use bf16-mixed precision for mixed training)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint's repository. Off unless you trust it."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of storing them (less memory,
    about a third more compute). Uses the HF model's non-reentrant gradient checkpointing."""

    def __post_init__(self) -> None:
        p = self.pretrained
        # A hub id is "org/name"; anything that looks like a filesystem path must exist, checked
        # here so a typo fails before data is tokenised.
        if (
            p is not None
            and (p.startswith((".", "/", "~")) or p.count("/") != 1)
            and not Path(p).expanduser().exists()
            and not _fetchable(p)  # a model `moe-app fetch` downloads: its loader says so if absent
        ):
            raise ConfigError(
                f"source.pretrained={p!r} does not exist.",
                where="model.init_args.source.pretrained",
                fix="point it at a model directory (e.g. runs/tiny-dense/model from `moe-app fit -c "
                "configs/tiny/dense.yaml`) or a hub id like Qwen/Qwen2.5-0.5B",
            )
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"unknown dtype {self.dtype!r}.",
                where="model.source.dtype",
                fix=f"use one of {sorted(DTYPES)}",
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class CausalLMModule(EvaluationMixin, L.LightningModule):
    """Train and evaluate a dense HF causal LM.

    Test and predict (per-domain report, greedy generation) are
    :class:`~moe_app.lightning.modules.evaluation.EvaluationMixin`'s.

    Args:
        source: where the model and tokenizer come from.
        optim: optimiser and learning-rate schedule.
        generation: greedy generation settings for ``test``.
        save_dir: where ``fit`` writes the final model directory; relative paths are resolved
            against ``trainer.default_root_dir``. ``null`` disables it.
        seed: seed for fresh model initialisation (inline ``arch``).
    """

    def __init__(
        self,
        source: ModelSource,
        optim: OptimConfig | None = None,
        generation: GenerationConfig | None = None,
        save_dir: str | None = "model",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.source = source
        self.optim = optim or OptimConfig()
        self.generation = generation or GenerationConfig()
        self.save_dir = save_dir
        self.seed = seed
        # Plain types only: Lightning checkpoints are loaded with weights_only=True. `_class_path`
        # lets `moe-app test --ckpt_path FILE` re-parse them as this subclass, not the base class.
        self.save_hyperparameters(
            {
                "_class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "source": asdict(source),
                "optim": asdict(self.optim),
                "generation": asdict(self.generation),
                "save_dir": save_dir,
                "seed": seed,
            }
        )
        self.model: torch.nn.Module | None = None
        self._tokenizer = None
        self._report = None  # the per-domain test report, made in on_test_start
        self._tps_t0: float | None = None

    def record_hparams(self, **values: Any) -> None:
        """Add a subclass's own init arguments to the saved hyper-parameters (dataclasses as dicts):
        the one place that makes them plain types (checkpoints load with ``weights_only=True``)."""
        self.hparams.update({k: asdict(v) if is_dataclass(v) else v for k, v in values.items()})

    # ------------------------------------------------------------------ model life cycle
    @property
    def tokenizer(self):
        """The tokenizer, loaded on first use (the data module asks for it in ``setup``)."""
        if self._tokenizer is None:
            self._tokenizer = self.load_tokenizer()
        return self._tokenizer

    def load_tokenizer(self):
        name = self.source.tokenizer
        if name is None:
            name = self.source.pretrained if self.source.pretrained is not None else "builtin"
        if name == "builtin":
            from moe_app.core.data.tokenizer import suite_tokenizer

            return suite_tokenizer()
        from transformers import AutoTokenizer

        if name.lower().endswith(".gguf"):  # the tokenizer stored in a GGUF file
            from moe_app.checkpoint.hub import load_tokenizer

            return load_tokenizer(name, required=True)
        try:
            return AutoTokenizer.from_pretrained(name, trust_remote_code=self.source.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load a tokenizer from {name!r}: {exc}",
                where="model.source.tokenizer",
                fix="point it at a directory with tokenizer files, or use 'builtin'",
            ) from exc

    @rebuildable
    def build_model(self) -> torch.nn.Module:
        """Return the model to train. Subclasses wrap this (e.g. apply MoE surgery)."""
        return self.load_base_model()

    def build_weight_source(self):
        """Rank 0's :class:`~moe_app.core.utils.weights.WeightSource` for sharded loading: by
        default the whole ``build_model()``; a subclass can serve its weights piece by piece."""
        from moe_app.core.utils.weights import ModuleWeights

        return ModuleWeights(self.build_model())

    def rebuilds_on_meta(self) -> bool:
        """Whether under FSDP only rank 0 builds the model: ``build_model`` is marked
        :func:`rebuildable`. A subclass narrows it where one configuration cannot be rebuilt (e.g.
        a 4-bit base); the answer must be the same on every rank (it decides a collective)."""
        return getattr(type(self).build_model, "rebuildable", False)

    def _sharded_strategy(self) -> DecoderLayerFSDPStrategy | None:
        strategy = self._trainer.strategy if self._trainer is not None else None
        sharded = isinstance(strategy, DecoderLayerFSDPStrategy)
        return strategy if sharded and self.rebuilds_on_meta() else None

    def load_base_model(self) -> torch.nn.Module:
        src = self.source
        if src.pretrained is None and src.arch is None:
            raise ConfigError(
                "the model has no source: neither source.pretrained nor source.arch is set.",
                where="model.init_args.source",
                fix="set --model.init_args.source.pretrained DIR_OR_HUB_ID, or give an inline arch "
                "(see configs/tiny/dense.yaml)",
            )
        if src.pretrained is not None:
            from moe_app import load_model

            if src.arch is not None:
                rank_zero_info("model.source.pretrained is set: the inline arch is ignored.")
            return load_model(src.pretrained, dtype=src.torch_dtype, trust_remote_code=src.trust_remote_code)
        from transformers import AutoModelForCausalLM, LlamaConfig

        tok = self.tokenizer
        arch = dict(src.arch or {})
        arch.setdefault("vocab_size", len(tok))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tok, key, None) is not None:
                arch.setdefault(key, getattr(tok, key))
        try:
            config = LlamaConfig(**arch)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid inline architecture: {exc}", where="model.source.arch") from exc
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=src.torch_dtype)
        return model

    def configure_model(self) -> None:
        # Idempotent: Lightning may call it more than once (e.g. fit then test in one process).
        if self.model is not None:
            return
        fsdp = self._sharded_strategy()
        if fsdp is not None:  # rank 0 builds, the others get the structure on meta; setup fills shards
            model = fsdp.sharded_model(self.build_weight_source, self.source.trust_remote_code)
        else:
            model = self.build_model()
        if self.source.activation_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ConfigError(
                    f"{type(model).__name__} does not support activation checkpointing.",
                    where="model.source.activation_checkpointing",
                    fix="set it to false",
                )
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        # from_pretrained returns eval mode and Lightning preserves module modes: without this,
        # dropout, router noise and jitter would silently stay off during training.
        model.train()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # ------------------------------------------------------------------ losses
    def extra_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Weighted auxiliary losses to add to the LM loss (already multiplied by their coefficients)."""
        return {}

    def _step(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        )
        extras = self.extra_losses(batch)
        return out.loss, extras

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        lm_loss, extras = self._step(batch)
        loss = lm_loss + sum(extras.values(), torch.zeros((), device=lm_loss.device))
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", lm_loss, prog_bar=True, batch_size=bs)
        for name, value in extras.items():
            self.log(f"train/{name}", value, batch_size=bs)
        bad = not bool(torch.isfinite(loss))
        if self.trainer.world_size > 1 and not self._guard_handles_nonfinite():
            # raise on every rank together, or the others would wait in the gradient all-reduce
            bad = bool(self.trainer.strategy.reduce_boolean_decision(bad, all=False))
        if bad:
            self._on_non_finite(loss, batch_idx)
        return loss

    def _guard_handles_nonfinite(self) -> bool:
        return self._trainer is not None and any(
            isinstance(cb, NonFiniteLossHandler) and cb.handles_nonfinite_loss
            for cb in self._trainer.callbacks
        )

    def _on_non_finite(self, loss: Tensor, batch_idx: int) -> None:

        if self._guard_handles_nonfinite():
            return  # NumericalGuard stops the run before backward, after a diagnostic checkpoint
        ranks = ", on at least one rank" if self._trainer is not None and self.trainer.world_size > 1 else ""
        raise MoeAppError(
            f"non-finite training loss ({loss.item()}{ranks}) at global step {self.global_step} (batch {batch_idx}) "
            f"in {type(self).__name__}.",
            fix="lower the learning rate, enable gradient clipping (--trainer.gradient_clip_val 1.0) or use bf16 "
            "instead of fp16",
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        lm_loss, extras = self._step(batch)
        bs = batch["input_ids"].shape[0]
        self.log("val/loss", lm_loss, prog_bar=True, sync_dist=True, batch_size=bs)
        for name, value in extras.items():
            self.log(f"val/{name}", value, sync_dist=True, batch_size=bs)
        return lm_loss

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(
                "no trainable parameters: every parameter is frozen.",
                fix="check the freezing options of the module (e.g. freeze_router, train_experts)",
            )
        total = int(self.trainer.estimated_stepping_batches) if self.trainer is not None else 1
        return build_optimizer(params, self.optim, total_steps=max(total, 1))

    def configure_gradient_clipping(
        self,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global norm inside the fused AdamW step where that is safe (one pass over every
        expert's gradient fewer: :mod:`moe_app.core.utils.clipping`); otherwise as Lightning does."""
        from moe_app.core.utils.clipping import can_fold, clip_grad_norm_folded

        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        by_norm = gradient_clip_algorithm in (None, "norm")
        if gradient_clip_val and by_norm and scaler is None and can_fold(optimizer):
            clip_grad_norm_folded(optimizer, self.parameters(), float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        from moe_app.core.utils.clipping import release

        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:  # a folded clip coefficient belongs to this step only
            release(getattr(optimizer, "optimizer", optimizer))

    # ------------------------------------------------------------------ logging and saving
    def on_fit_start(self) -> None:
        self.resolved_save_dir()  # a bad output path fails now, not after training
        if not isinstance(self.trainer.strategy, DecoderLayerFSDPStrategy):
            from moe_app.core.utils.allocator import keep_freed_memory

            keep_freed_memory()  # the training loop reuses its freed buffers (see the module for why)
        counts = count_parameters(self.model)
        rank_zero_info(f"[moe-app] {type(self).__name__}: {counts.describe()}")
        self.param_counts = counts

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._tps_t0 = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        if self._tps_t0 is None:
            return
        dt = time.perf_counter() - self._tps_t0
        tokens = int(batch["attention_mask"].sum()) * max(self.trainer.world_size, 1)
        self.log("train/tokens_per_s", tokens / max(dt, 1e-9), batch_size=batch["input_ids"].shape[0])
        opt = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if opt is not None:
            self.log("train/lr", opt.param_groups[0]["lr"], prog_bar=False)

    def on_train_end(self) -> None:
        path = self.resolved_save_dir()
        if path is None:
            return

        self.trainer.strategy.barrier("moe_app_save")
        full = unsharded_model(self.trainer, self.model)  # gathers shards under FSDP (all ranks)
        if self.trainer.is_global_zero:
            self.save_model_dir(path, full)
            rank_zero_info(f"[moe-app] saved model to {path}")
        self.trainer.strategy.barrier("moe_app_saved")

    def resolved_save_dir(self) -> Path | None:
        """``save_dir`` under ``trainer.default_root_dir``; a relative path may not escape it
        (``../x`` or a symlink out is refused); an absolute path is the user's explicit choice."""
        if self.save_dir is None:
            return None
        if self.trainer is None:
            return Path(self.save_dir)

        return resolve_output_path(
            self.save_dir, self.trainer.default_root_dir, key="model.init_args.save_dir", allow_absolute=True
        )

    def save_model_dir(self, path: Path, model: torch.nn.Module | None = None) -> None:
        """Write ``model`` (default: the training model) and the tokenizer as an HF-style directory
        (atomic). Under FSDP, ``on_train_end`` passes the gathered full model."""

        save_pretrained_dir(
            model if model is not None else self.model, path, tokenizer=self.tokenizer, lineage=self.lineage()
        )

    def lineage(self) -> list[dict[str, Any]]:
        """The source model's lineage plus this stage's entry."""

        previous = read_lineage(self.source.pretrained) if self.source.pretrained else []
        return [*previous, self.lineage_entry()]

    def lineage_entry(self) -> dict[str, Any]:
        """What produced this model: which stage, from what, with which settings."""

        return {
            "stage": type(self).__name__,
            "time": utc_now(),
            "init": self.source.pretrained or "fresh(arch)",
            "global_step": int(self.global_step),
            "hparams": dict(self.hparams),
        }


__all__ = ["CausalLMModule", "GenerationConfig", "ModelSource"]
