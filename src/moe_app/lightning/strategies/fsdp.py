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

The saved model directory must be an ordinary full checkpoint, not rank 0's shard. Before sharding,
the strategy keeps a *skeleton* of the model whose parameters live on the ``meta`` device (no
memory); :meth:`DecoderLayerFSDPStrategy.unsharded_model` gathers the full state dict (a
collective: every rank calls it) and rank 0 loads it into the skeleton. The module's save code then
runs unchanged on that plain model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from moe_app.core.utils.dtypes import DTYPES
from moe_app.errors import ConfigError


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
    """A copy of ``model``'s structure whose parameters are on ``meta`` (no storage is copied).

    Parameters are pre-seeded into ``deepcopy``'s memo, so tied parameters stay tied and the copy
    costs only the Python objects. Buffers are copied for real: they are small (rotary tables,
    routing statistics) and FSDP does not shard them.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


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
        super().setup(trainer)

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
    "unsharded_model",
]
