"""Fully-sharded data parallel for every recipe: FSDP2 on decoder layers, full HF checkpoints out.

``--trainer.strategy fsdp`` (or ``-c configs/presets/fsdp.yaml``) selects
:class:`DecoderLayerFSDPStrategy`. It is Lightning's ``ModelParallelStrategy`` (PyTorch's
per-parameter FSDP2, ``torch.distributed.fsdp.fully_shard``) with the sharding applied for the
user: every decoder layer is one FSDP unit and the model is the root unit, so the preset composes
with every recipe and model family without naming ``LlamaDecoderLayer`` or ``Qwen2DecoderLayer``.

Why FSDP2 rather than Lightning's ``FSDPStrategy`` (FSDP1):

* FSDP2 shards each parameter on its own (DTensor), so frozen and trainable parameters live in the
  same unit without ``use_orig_params`` flat-parameter tricks: PESC and LoRA work as they are.
* Module and parameter names are unchanged (no ``_fsdp_wrapped_module`` prefixes), so a gathered
  full state dict loads straight into the unsharded model.
* It runs on CPU with the gloo backend, so CI trains a real 2-process sharded fit and checks the
  saved model against DDP; FSDP1 refuses any non-accelerator device.

No process builds the full model only to shard it (ZeRO-3's point, Rajbhandari et al. 2020): a
module whose model can be rebuilt from its config and MoE spec (:meth:`sharded_model`) has rank 0
produce a :class:`~moe_app.core.utils.weights.WeightSource` (the loaded model, a moe-app
checkpoint read one decoder layer at a time, or for on-the-fly upcycling the dense model upcycled
one decoder layer at a time), the other ranks build the same
structure on the ``meta`` device from rank 0's config and spec, every rank shards its meta model,
allocates only its shards, and rank 0 scatters the real weights one FSDP unit (decoder layer) at
a time. Rank 0's peak is its shards plus one upcycled layer (plus the dense model where it cannot
be read layer by layer, e.g. a GGUF file or calibration-based upcycling); the other ranks hold
their shards plus one tensor in flight.

The saved model directory must be an ordinary full checkpoint, not rank 0's shard. Before sharding,
the strategy keeps a *skeleton* of the model whose parameters live on the ``meta`` device (no
memory); :meth:`DecoderLayerFSDPStrategy.unsharded_model` gathers the full state dict (a
collective: every rank calls it) and rank 0 loads it into the skeleton. The module's save code then
runs unchanged on that plain model.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from moe_app.core.spec import MoeSpec, spec_of
from moe_app.core.utils.dtypes import DTYPES
from moe_app.core.utils.progress import progress
from moe_app.core.utils.weights import WeightSource, meta_copy
from moe_app.errors import ConfigError, MoeAppError


def decoder_layer_classes(module: nn.Module) -> set[type[nn.Module]]:
    """Classes of the modules held in the model's decoder ``layers`` ModuleList(s)."""
    classes: set[type[nn.Module]] = set()
    for name, child in module.named_modules():
        if name.endswith("layers") and isinstance(child, nn.ModuleList) and len(child) > 0:
            classes.update(type(layer) for layer in child)
    return classes


def check_shardable(model: nn.Module) -> None:
    """Refuse models FSDP cannot shard here: bitsandbytes 4-bit weights (QLoRA).

    A ``Params4bit`` packs two weights per byte with per-block statistics beside it; sharding it
    as a plain tensor would split those blocks. QLoRA already fits a 4-bit base on each GPU, so
    DDP is the strategy for it.
    """
    quantized = [n for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"]
    if quantized:
        raise ConfigError(
            f"FSDP cannot shard bitsandbytes 4-bit weights ({len(quantized)} found, e.g. {quantized[0]}).",
            where="trainer.strategy",
            fix="train QLoRA with --trainer.strategy ddp (the 4-bit base fits on each GPU), or set "
            "--model.init_args.pesc.quantize_4bit false to shard a 16/32-bit base",
        )


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s structure whose parameters are on ``meta`` (no storage is copied);
    buffers are copied for real (see :func:`moe_app.core.utils.weights.meta_copy`)."""
    return meta_copy(model)


def _structure(model: nn.Module) -> dict[str, Any]:
    """What the other ranks need to rebuild ``model`` on meta: config, MoE spec, the PESC config
    and peft LoRA options of surgery done in memory (not recorded in a spec), and every
    parameter's name, shape, dtype and trainability (JSON types only: it is broadcast)."""
    from moe_app.core.pesc.config import pesc_config_of

    gen = getattr(model, "generation_config", None)
    spec = spec_of(model)
    pesc = pesc_config_of(model)
    if pesc is not None and pesc.quantize_4bit:
        raise ConfigError(
            "FSDP cannot shard bitsandbytes 4-bit weights (PESC with quantize_4bit).",
            where="trainer.strategy",
            fix="train QLoRA with --trainer.strategy ddp (the 4-bit base fits on each GPU), or set "
            "--model.init_args.pesc.quantize_4bit false to shard a 16/32-bit base",
        )
    return {
        "config": model.config.to_dict(),
        "generation": gen.to_dict() if gen is not None else None,
        "spec": spec.to_dict() if spec is not None else None,
        "pesc": pesc.to_dict() if pesc is not None else None,
        "peft_lora": _peft_lora_options(model) if pesc is None else None,  # PESC's own is in its config
        "params": [
            [n, list(p.shape), str(p.dtype).removeprefix("torch."), p.requires_grad]
            for n, p in model.named_parameters()
        ],
    }


def _peft_lora_options(model: nn.Module) -> dict[str, Any] | None:
    """The :class:`~moe_app.core.pesc.config.PeftLoraOptions` of a LoRA that
    :func:`~moe_app.core.pesc.surgery.inject_peft_lora` put into ``model`` (peft records its
    ``LoraConfig`` as ``model.peft_config``); ``None`` without one. The name and shape check of
    :func:`rebuild_on_meta` refuses a LoRA these options do not rebuild."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    if len(configs) != 1:
        raise MoeAppError(
            f"{len(configs)} peft adapters cannot be rebuilt on the other ranks",
            where="trainer.strategy",
            fix="train with one LoRA adapter, or with --trainer.strategy ddp",
        )
    (cfg,) = configs.values()
    return {
        "rank": int(cfg.r),
        "alpha": float(cfg.lora_alpha),
        "dropout": float(cfg.lora_dropout),
        "target_modules": sorted(cfg.target_modules),
    }


def rebuild_on_meta(structure: dict[str, Any], trust_remote_code: bool = False) -> nn.Module:
    """The model :func:`_structure` describes, parameters on ``meta``, checked name by name."""
    from transformers import AutoConfig, GenerationConfig

    from moe_app.checkpoint.model_dir import build_empty_model
    from moe_app.core.pesc.config import PeftLoraOptions, PescConfig
    from moe_app.core.pesc.surgery import build_pesc, inject_peft_lora, pesc_blocks

    cfg = dict(structure["config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    spec = MoeSpec.from_dict(structure["spec"]) if structure["spec"] is not None else None
    params = structure["params"]
    dtypes = [getattr(torch, d) for _, _, d, _ in params]
    with torch.device("meta"):
        model = build_empty_model(config, spec, max(set(dtypes), key=dtypes.count), trust_remote_code)
        if structure.get("pesc") is not None and not pesc_blocks(model):  # PESC done in memory
            build_pesc(model, PescConfig.from_dict(structure["pesc"]))
        if structure.get("peft_lora") is not None:
            inject_peft_lora(model, PeftLoraOptions(enabled=True, **structure["peft_lora"]))
    if structure["generation"] is not None:
        model.generation_config = GenerationConfig.from_dict(structure["generation"])
    mine = dict(model.named_parameters())
    if list(mine) != [n for n, *_ in params] or any(list(mine[n].shape) != shape for n, shape, *_ in params):
        theirs = {n: shape for n, shape, *_ in params}
        diff = sorted(
            n for n in mine.keys() | theirs.keys() if list(getattr(mine.get(n), "shape", [])) != theirs.get(n)
        )
        raise MoeAppError(
            f"rank 0's model cannot be rebuilt from its config and MoE spec (differs in {diff[:4]})",
            where="trainer.strategy",
            fix="please report this; meanwhile train this model with --trainer.strategy ddp",
        )
    for (name, _, _, trainable), dtype in zip(params, dtypes, strict=True):
        p = mine[name]
        if p.dtype != dtype:
            p.data = torch.empty_like(p, dtype=dtype)
        p.requires_grad_(trainable)
    return model


def _rng_digest(state: torch.Tensor) -> str:
    return hashlib.sha256(state.numpy().tobytes()).hexdigest()


def _rng_encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _rng_decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _tie(model: nn.Module) -> None:
    tie = getattr(model, "tie_weights", None)
    if callable(tie) and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        tie()


class DecoderLayerFSDPStrategy(ModelParallelStrategy):
    """FSDP2 over all processes, one unit per decoder layer, full checkpoints by default.

    Args:
        reshard_after_forward: free each layer's gathered weights after its forward (ZeRO-3
            memory; recomputes the all-gather in backward). ``false`` keeps them until backward
            (ZeRO-2-like: faster, more memory).
        param_dtype: dtype the gathered weights are cast to for compute (e.g. ``bfloat16`` with
            float32 master weights); ``null`` leaves them as stored.
        reduce_dtype: dtype of the gradient reduce-scatter; ``null`` follows ``param_dtype``.
        save_distributed_checkpoint: Lightning checkpoints as a directory of shards (fast for
            very large models) instead of one full file on rank 0. The default ``false`` keeps
            ``last.ckpt`` one file, written atomically and resumable on any number of devices.
        **kwargs: ``process_group_backend`` and ``timeout`` as in ``ModelParallelStrategy``.
    """

    strategy_name = "moe_app_fsdp"

    def __init__(
        self,
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        save_distributed_checkpoint: bool = False,
        **kwargs: Any,
    ) -> None:
        for key, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value is not None and value not in DTYPES:
                raise ConfigError(
                    f"unknown {key} {value!r}",
                    where=f"trainer.strategy.init_args.{key}",
                    fix=f"one of {sorted(DTYPES)}",
                )
        # Pure data parallel: the mesh is (world_size data-parallel x 1 tensor-parallel); the
        # sizes are fixed in setup_environment, once the number of processes is known.
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self._skeleton: nn.Module | None = None
        self._source: WeightSource | None = None  # rank 0's weights for a model built on meta

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        module = self.lightning_module
        model = getattr(module, "model", None)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"{type(module).__name__} has no `model` to shard", where="trainer.strategy", fix="use ddp"
            )
        if not isinstance(model, FSDPModule):
            check_shardable(model)
            self._skeleton = meta_skeleton(model)
            on_meta = any(p.is_meta for p in model.parameters())
            if on_meta and self._source is None and self.global_rank == 0:
                raise RuntimeError("the model is on the meta device but was not built by sharded_model()")
            rank0_buffers = on_meta and self.global_rank == 0  # to_empty() wipes them
            buffers = {n: b.detach().clone() for n, b in model.named_buffers()} if rank0_buffers else {}
            if any(b.is_meta for b in buffers.values()):
                raise RuntimeError(
                    "rank 0's weight source has buffers on meta: build it with params_on_meta()"
                )
            mesh = self.device_mesh["data_parallel"]
            policy = MixedPrecisionPolicy(
                param_dtype=DTYPES.get(self.param_dtype or ""),
                reduce_dtype=DTYPES.get(self.reduce_dtype or self.param_dtype or ""),
            )
            kwargs = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": self.reshard_after_forward}
            classes = tuple(decoder_layer_classes(model))
            if not classes:
                rank_zero_warn(
                    f"{type(model).__name__} has no decoder `layers` list: FSDP shards it as one unit, "
                    "so every step gathers the whole model on each rank"
                )
            for sub in model.modules():
                if classes and isinstance(sub, classes):
                    fully_shard(sub, **kwargs)
            fully_shard(model, **kwargs)
            if on_meta:
                self._fill_shards(model, classes, buffers)
        super().setup(trainer)

    # ------------------------------------------------------------------ loading into shards
    def sharded_model(
        self, make_source: Callable[[], WeightSource], trust_remote_code: bool = False
    ) -> nn.Module:
        """The model to train, with its parameters on ``meta`` on every rank; ``setup`` fills the
        shards from the :class:`WeightSource` that ``make_source`` builds on rank 0 only.

        A collective, called from ``configure_model``: rank 0 broadcasts the config, MoE spec and
        parameter list of ``make_source().skeleton`` and the other ranks rebuild it on meta
        (:func:`rebuild_on_meta`). An error on rank 0 is re-raised on every rank.

        Building may draw from the global CPU generator (peft's LoRA init, PESC's modules) and a
        rebuild on meta draws nothing, so a rank that started from rank 0's generator state
        (``seed_everything``) takes rank 0's state after the build: each rank's later draws
        (dropout, router jitter) are those it made when every rank built the model.
        """
        payload: str | None = None
        rng_before = _rng_digest(torch.get_rng_state())
        if self.global_rank == 0:
            try:
                self._source = make_source()
                rng = {"before": rng_before, "after": _rng_encode(torch.get_rng_state())}
                payload = json.dumps(
                    {"structure": _structure(self._source.skeleton), "rng": rng}, default=str
                )
            except BaseException:
                self.broadcast(None)  # release the other ranks before raising
                raise
        payload = self.broadcast(payload)
        if payload is None:
            raise MoeAppError(
                "building the model failed on rank 0 (see its error above)", where="configure_model"
            )
        if self.global_rank == 0:
            return self._source.skeleton
        sent = json.loads(payload)
        model = rebuild_on_meta(sent["structure"], trust_remote_code)
        if sent["rng"]["before"] == rng_before:
            torch.set_rng_state(_rng_decode(sent["rng"]["after"]))
        return model

    @torch.no_grad()
    def _fill_shards(
        self, model: nn.Module, classes: tuple[type, ...], buffers: dict[str, torch.Tensor]
    ) -> None:
        """Allocate this rank's shards and fill them from rank 0's source, one FSDP unit at a time.

        Rank 0 materialises one unit (a decoder layer) in full, the others at most one tensor's
        worth of scatter buffers at a time; every rank keeps its ``1 / world_size`` slice. Buffers
        (rotary tables) are not sharded: rank 0's are broadcast.
        """
        from torch.distributed.tensor import distribute_tensor

        rank0 = self.global_rank == 0
        source = self._source
        self._source = None
        model.to_empty(device=self.root_device)
        params = dict(model.named_parameters())
        prefixes = [f"{n}." for n, m in model.named_modules() if classes and isinstance(m, classes)]
        groups = [[n for n in params if n.startswith(p)] for p in prefixes]
        in_layers = {n for g in groups for n in g}
        groups.append([n for n in params if n not in in_layers])
        for names in progress(groups, desc="fsdp: loading shards", total=len(groups), unit="unit"):
            full = source.tensors(names) if rank0 else {}
            for name in names:
                p = params[name]
                if rank0:
                    t = full.pop(name).to(self.root_device, p.dtype).contiguous()
                else:
                    t = torch.empty(p.shape, dtype=p.dtype, device=self.root_device)
                shard = distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=0)
                p.to_local().copy_(shard.to_local())
                del t, shard
        for name, b in model.named_buffers():
            if rank0:
                b.copy_(buffers[name])
            torch.distributed.broadcast(b, src=0)

    def unsharded_model(self) -> nn.Module | None:
        """A new plain module with the trained full weights on rank 0 (``None`` on other ranks).

        A collective: every rank must call it. Each call gathers again and returns a fresh
        replica, so a caller may modify it (the pruning callbacks prune it in place).
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        module = self.lightning_module
        if self._skeleton is None:
            raise RuntimeError("unsharded_model() called before the strategy sharded the model")
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(module.model, options=options)  # full on rank 0, empty elsewhere
        if self.global_rank != 0:
            return None
        replica = copy.deepcopy(self._skeleton)
        replica.load_state_dict(state, strict=True, assign=True)
        _tie(replica)
        for name, buf in module.model.named_buffers():
            owner, _, leaf = name.rpartition(".")
            target = replica.get_submodule(owner) if owner else replica
            target._buffers[leaf] = buf.detach().to("cpu", copy=True)
        return replica.to("cpu")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loader, held to moe-app's rules: ``weights_only`` loads only (no pickle).

        The strategy loads the weights itself and drops ``state_dict`` from what the module's
        ``on_load_checkpoint`` sees; the tensor names go along as ``state_dict_keys`` so modules
        can still check what a partial checkpoint holds (PESC saves only trainable tensors).
        """
        if weights_only is False:
            raise ConfigError(
                "checkpoints are loaded with weights_only=True only",
                where="weights_only",
                fix="re-save the checkpoint without pickled objects",
            )
        from pathlib import Path

        path = Path(self.broadcast(checkpoint_path))
        keys: list[str] | None = None
        if path.is_file():  # memory-mapped: only the index is read here
            keys = list(
                torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("state_dict", {})
            )
        checkpoint = super().load_checkpoint(path, weights_only=True)
        if keys is not None:
            checkpoint.setdefault("state_dict_keys", keys)
        return checkpoint


def unsharded_model(trainer: Any, model: nn.Module) -> nn.Module | None:
    """``model`` with full weights on rank 0, ``None`` on other ranks; every rank must call it.

    Under :class:`DecoderLayerFSDPStrategy` this gathers the shards; under any other strategy the
    local module already holds the full weights and is returned as is.
    """
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, DecoderLayerFSDPStrategy):
        return strategy.unsharded_model()
    return model if getattr(trainer, "is_global_zero", True) else None


__all__ = [
    "DecoderLayerFSDPStrategy",
    "check_shardable",
    "decoder_layer_classes",
    "meta_skeleton",
    "rebuild_on_meta",
    "unsharded_model",
]
