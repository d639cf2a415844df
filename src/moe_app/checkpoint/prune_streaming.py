"""Layer-streamed pruning: ``moe-app prune`` on checkpoints larger than memory, one decoder layer at a time.

Lu et al. 2024 ("Not All Experts are Equal", arXiv 2402.14800) prune an MoE layer by layer on
calibration activations. Nothing in that loop needs two layers at once, so instead of loading the
model (what :func:`moe_app.checkpoint.pruning.prune_checkpoint` does in memory):

1. the model is built on the ``meta`` device (structure only: the moe-app surgery of ``moe_app.json``
   or the stock transformers class), validated and planned before any tensor is read;
2. the embeddings are read from the memory-mapped safetensors shards (``safe_open``, one tensor at a
   time) and embed the calibration batches; the hidden states ``(B, S, d)`` are then carried from
   layer to layer, in memory or, past an activation budget, in safetensors files in a temporary
   directory next to ``--out``;
3. each decoder layer in turn is materialised from the shards, run on the carried states (the
   original model's states give the block's input ``X`` and target output ``Z``; the progressive
   variant's input comes through the layers already pruned), pruned with the very per-layer step of
   the in-memory path (:func:`~moe_app.core.pruning.experts.prune_layer`: enumeration, frequency,
   REAP, expert drop, HC-SMoE merging), its skipping threshold calibrated, written to the output
   shards, and sent back to ``meta``;
4. the final norm and LM head are read only when the report needs the calibration loss.

Hence the same experts, betas and losses as in memory, and the same tensors on disk. Stock
checkpoints keep their per-expert on-disk names (``block_sparse_moe.experts.{j}.w1`` for
Mixtral, ``mlp.experts.{j}.gate_proj`` for Qwen-MoE / OLMoE, :mod:`moe_app.checkpoint.keymaps`),
which transformers 5.x fuses into ``experts.gate_up_proj (E, 2F, d)`` / ``down_proj (E, d, F)``
on load: each layer is fused the same way when read and split again, experts renumbered, when
written. Peak memory is about one decoder layer plus one output shard plus the calibration
activations (``benchmarks/prune_streamed.py``), and the output is written atomically.

Block drop and layer drop (He et al. 2024, arXiv 2406.02500) score every layer before removing
any, so they take passes of their own, in :func:`~moe_app.checkpoint.pruning.run_job`'s order: the
experts are pruned first into a temporary checkpoint next to ``--out`` (when ``--keep`` is given
too); a scoring pass over it carries the hidden states through every block and accumulates the same
cosines as :func:`~moe_app.core.pruning.drop.block_drop_scores` (hooks shared with it); the chosen
blocks are deleted from the ``meta`` model (config and spec renumbered by the in-memory
:func:`~moe_app.core.pruning.drop.drop_blocks`), and each kept layer is read under its old name and
written under its new one; layer drop is scored the same way over the blocks that are left, then
applied to the ``meta`` model (moe-app: the MLP removed) or, on a stock checkpoint, by zeroing the
MoE sublayer's norm as each layer is read. The last pass slims the experts (``--slim``: each MoE
layer from its block inputs through the layers already slimmed, what
:func:`~moe_app.core.pruning.slim.slim_experts` recomputes in memory), calibrates skipping, measures
the loss after and writes the output. Each pass holds one decoder layer.

Global expert drop (``scope="global"``) ranks the experts of every layer before pruning any: its
scores come from a pass of their own over the original model, and the pruning pass then keeps each
layer's count. ``--quantize`` is applied to each layer of the last pass as it is written: its expert
linears become bitsandbytes modules by the steps of transformers' loader
(:func:`~moe_app.checkpoint.quantized.quantize_linears`; in memory the whole model goes through that
loader), so the shards hold the same tensors, bit for bit, and a stream through the quantised
layers gives the quantised loss. Job options the streamed path does not implement are refused up front
(:func:`streaming_problems`; today none), and ``--streaming auto`` then prunes in memory.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moe_app.checkpoint.hub import load_tokenizer
from moe_app.checkpoint.keymaps import MIXTRAL, QWEN_MOE
from moe_app.checkpoint.model_dir import (
    build_empty_model,
    current_spec,
    is_moe_checkpoint,
    unique_state_dict,
    write_model_dir,
)
from moe_app.checkpoint.pesc import is_pesc_adapter_dir
from moe_app.checkpoint.pretrained import read_lineage, write_lineage_file
from moe_app.checkpoint.pruning import PruneJob, checked_paths, validate_job
from moe_app.checkpoint.quantized import (
    bnb_config,
    expert_linears,
    quantize_linears,
    restore_linears,
    skip_patterns,
)
from moe_app.checkpoint.safetensors_io import StoredTensor, read_header, read_tensor
from moe_app.checkpoint.shards import (
    DEFAULT_MAX_SHARD_SIZE,
    ShardWriter,
    checkpoint_dtype,
    parse_size,
    shard_files,
)
from moe_app.checkpoint.spec_file import read_spec, write_spec
from moe_app.checkpoint.streaming import StreamingUnsupported
from moe_app.core.models.views import MoeLayerView, moe_layer_views, view_of
from moe_app.core.pruning.calibration import calibration_batches, normalize_batches, num_tokens
from moe_app.core.pruning.drop import (
    block_drop_hook,
    drop_blocks,
    drop_entry,
    drop_mlp_layers,
    layer_drop_hooks,
    layer_drop_how,
    mean_scores,
    most_similar,
    zero_mlp_norm,
)
from moe_app.core.pruning.experts import (
    LayerPruneResult,
    PruneReport,
    check_global_scope,
    prune_layer,
    record_pruning,
    sync_expert_count,
)
from moe_app.core.pruning.layerwise import LayerRunner, block_inputs, block_io_hook, record_block_io
from moe_app.core.pruning.saliency import global_keep_counts, saliency_scores
from moe_app.core.pruning.skipping import weight_ratios
from moe_app.core.pruning.slim import LayerSlimResult, SlimReport, slim_layer
from moe_app.core.spec import spec_of, utc_now
from moe_app.core.utils.progress import progress
from moe_app.errors import CheckpointError, ConfigError, UnsupportedModelError

logger = logging.getLogger("moe_app.core.pruning")

STREAMING_MODES = ("auto", "on", "off")
_SUPPORTED_FIELDS = {
    "experts",
    "block_drop",
    "layer_drop",
    "slim",
    "skipping",
    "calibration",
    "quantize",
    "eval_before_after",
}


# --- when to stream ------------------------------------------------------------------------------


def streaming_problems(job: PruneJob) -> list[str]:
    """Why the layer-streamed path cannot run ``job`` (empty: it can).

    Every :class:`PruneJob` option left at its default is fine; any other option outside the
    supported set (expert pruning in either scope, block and layer drop, slimming, skipping,
    calibration, the loss report) is named, so options added to ``moe-app prune`` later are refused
    here until the streamed path implements them.
    """
    problems = []
    for f in dataclasses.fields(job):
        if f.name in _SUPPORTED_FIELDS:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        if getattr(job, f.name) != default:
            problems.append(f"--{f.name} is not supported by the layer-streamed path yet")
    return problems


def checkpoint_nbytes(ckpt_dir: str | Path) -> int:
    """Bytes of a checkpoint's safetensors files."""
    return sum(f.stat().st_size for f in shard_files(ckpt_dir))


def default_memory_budget() -> int:
    """Half of the memory available now (the rest for the OS, page cache and other processes)."""
    import psutil

    return int(psutil.virtual_memory().available // 2)


def resolve_budget(memory_budget: int | str | None) -> int:
    if memory_budget is None:
        return default_memory_budget()
    try:
        budget = parse_size(memory_budget)
    except ValueError as e:
        raise ConfigError(str(e), where="--memory_budget", fix="pass e.g. 8GB or 500MB") from e
    if budget <= 0:
        raise ConfigError("--memory_budget must be > 0", where="--memory_budget", fix="pass e.g. 8GB")
    return budget


def use_streaming(
    src: str | Path, job: PruneJob, mode: str = "auto", memory_budget: int | str | None = None
) -> bool:
    """Whether ``moe-app prune --streaming MODE`` streams ``src``: ``on`` always (refusing what it
    cannot do, with the reasons), ``off`` never, ``auto`` when the checkpoint is larger than the
    memory budget and the job is one the streamed path can run (else it prunes in memory, and says why)."""
    if mode not in STREAMING_MODES:
        raise ConfigError(f"unknown --streaming {mode!r}", where="--streaming", fix="use auto, on or off")
    if mode == "off":
        return False
    problems = streaming_problems(job)
    if is_pesc_adapter_dir(Path(src)):
        problems.append("a PESC adapter dir (base model + adapters) is assembled in memory")
    if mode == "on":
        if problems:
            raise ConfigError(
                "--streaming on cannot run this job: " + "; ".join(problems),
                where="--streaming",
                fix="drop those options, or use --streaming auto / off (prunes in memory)",
            )
        return True
    budget = resolve_budget(memory_budget)
    try:
        size = checkpoint_nbytes(src)
    except CheckpointError:
        return False  # the in-memory loader says what is wrong with the directory
    if size <= budget:
        return False
    if problems:
        logger.warning(
            "the checkpoint (%.2f GB) is larger than the memory budget (%.2f GB) but cannot be pruned "
            "layer by layer (%s): pruning in memory",
            size / 1e9, budget / 1e9, "; ".join(problems),
        )  # fmt: skip
        return False
    return True


# --- activations carried between layers ----------------------------------------------------------


class TensorList(Sequence[Tensor]):
    """Per-batch tensors, in memory or (with ``spill``) in safetensors files read back on access.

    The pruning algorithms only iterate over their ``xs`` / ``zs``, so a list on disk is as good as
    one in memory to them, at one batch of resident memory.
    """

    def __init__(self, spill: Path | None = None) -> None:
        self._spill = spill
        self._items: list[Tensor | Path] = []

    def append(self, t: Tensor) -> None:
        if self._spill is None:
            self._items.append(t)
            return
        path = self._spill / f"{uuid.uuid4().hex}.safetensors"
        save_file({"t": t.contiguous()}, str(path))
        self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        item = self._items[i]
        if isinstance(item, Tensor):
            return item
        # a fresh (allocator-aligned) copy: BLAS kernels pick code paths by alignment, and an
        # unaligned view into the file's buffer can round differently in the last bit
        return load_file(str(item))["t"].clone()

    def __iter__(self) -> Iterator[Tensor]:
        for i in range(len(self._items)):
            yield self[i]

    def release(self) -> None:
        for item in self._items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self._items = []


# --- the checkpoint on disk ------------------------------------------------------------------------

_STOCK_KEYMAPS = (MIXTRAL, QWEN_MOE)


@dataclass
class LayerLayout:
    """How one decoder layer's module tensors are stored: by name, or (stock MoE) expert by expert."""

    prefix: str
    """``model.layers.{i}.``"""
    direct: dict[str, str]
    """Module-local name -> on-disk key, stored as is."""
    keymap: dict[str, str] | None = None
    """Stock per-expert names (:mod:`~moe_app.checkpoint.keymaps`), or ``None``."""
    index: int = 0
    num_experts: int = 0


@dataclass
class _Plan:
    src: Path
    kind: str
    model: nn.Module
    runner: LayerRunner
    dtype: torch.dtype
    stored: dict[str, StoredTensor]
    """Every on-disk tensor: its file and byte offset (from the shard headers)."""
    alias: dict[str, str]
    layouts: list[LayerLayout]
    outside: list[str]
    moe: dict[int, MoeLayerView] = field(default_factory=dict)
    out_layouts: list[LayerLayout] | None = None
    """Where each layer is written, when not where it was read (blocks deleted: layers renumbered)."""
    zero_norm: set[int] = field(default_factory=set)
    """Stock layers whose MoE sublayer is dropped by zeroing its norm as the layer is read."""


def _read(plan: _Plan, key: str) -> Tensor:
    """One tensor from its shard (plain reads: no mapping left behind; aligned as the in-memory
    model's parameters are, so both paths compute the same bits)."""
    return read_tensor(plan.stored[key])


def _read_into(plan: _Plan, key: str, dst: Tensor) -> None:
    """Tensor ``key`` into ``dst`` (one expert's slice of a stacked parameter): read in place when
    the dtype matches, else through a temporary cast."""
    stored = plan.stored[key]
    if stored.info.dtype == dst.dtype and tuple(dst.shape) == stored.info.shape and dst.is_contiguous():
        read_tensor(stored, out=dst)
    else:
        dst.copy_(read_tensor(stored))


def _layout(i: int, prefix: str, disk: set[str], local: dict[str, Tensor]) -> LayerLayout:
    """Map layer ``i``'s module tensors to its on-disk keys (identity, or a stock per-expert layout)."""
    if {prefix + k for k in local} == disk:
        return LayerLayout(prefix, {k: prefix + k for k in local})
    for keymap in _STOCK_KEYMAPS:
        router = keymap["router"].format(i=i)
        if router not in disk:
            continue
        moe_prefix = router[: -len("gate.weight")]  # e.g. model.layers.0.block_sparse_moe.
        n = 0
        while keymap["expert_gate_proj"].format(i=i, j=n) in disk:
            n += 1
        experts = {keymap[p].format(i=i, j=j) for j in range(n) for p in _EXPERT_PARTS}
        direct = {}
        for key in sorted(disk - experts):
            name = "mlp." + key[len(moe_prefix) :] if key.startswith(moe_prefix) else key[len(prefix) :]
            direct[name] = key
        layout = LayerLayout(prefix, direct, keymap, i, n)
        if n and set(direct) | set(_FUSED) == set(local) and not experts - disk:
            return layout
    ours = sorted({prefix + k for k in local} ^ disk)[:6]
    raise StreamingUnsupported(
        f"layer {i}'s on-disk keys match neither its module names nor a known stock MoE layout (e.g. {ours})",
        fix="prune in memory (--streaming off)",
    )


_EXPERT_PARTS = ("expert_gate_proj", "expert_up_proj", "expert_down_proj")
_FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _layer_tensors(plan: _Plan, lay: LayerLayout, local: dict[str, Tensor]) -> dict[str, Tensor]:
    """Layer tensors by module-local name, in the model dtype; stock experts fused as transformers does."""
    out = {}
    for name, meta in local.items():
        if name in lay.direct:
            t = _read(plan, lay.direct[name])
            if tuple(t.shape) != tuple(meta.shape):
                raise CheckpointError(
                    f"{lay.direct[name]} has shape {tuple(t.shape)}, the model expects {tuple(meta.shape)}",
                    where=str(plan.src),
                    fix="config.json and the weights disagree; regenerate the checkpoint",
                )
            out[name] = t.to(meta.dtype) if t.is_floating_point() else t
            continue
        fused = torch.empty(meta.shape, dtype=meta.dtype)  # (E, 2F, d) or (E, d, F)
        assert lay.keymap is not None
        for j in range(lay.num_experts):
            if name.endswith("gate_up_proj"):
                f = meta.shape[1] // 2
                _read_into(plan, lay.keymap["expert_gate_proj"].format(i=lay.index, j=j), fused[j, :f])
                _read_into(plan, lay.keymap["expert_up_proj"].format(i=lay.index, j=j), fused[j, f:])
            else:
                _read_into(plan, lay.keymap["expert_down_proj"].format(i=lay.index, j=j), fused[j])
        out[name] = fused
    return out


def _disk_tensors(lay: LayerLayout, state: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """A (pruned) layer's tensors under the checkpoint's own names: experts split and renumbered.

    A quantised linear's extra tensors (``weight.absmax``, ``SCB``, ...) go next to its weight."""
    for name, t in state.items():
        if lay.keymap is None:
            yield lay.prefix + name, t
        elif name in lay.direct:
            yield lay.direct[name], t
        elif (key := _beside_weight(lay, name)) is not None:
            yield key, t
        elif name not in _FUSED:  # the stacked experts are split below; nothing is dropped unseen
            raise CheckpointError(
                f"no on-disk name for layer {lay.index}'s tensor {name!r}",
                where="prune --streaming",
                fix="report this with the checkpoint's config.json; prune with --streaming off meanwhile",
            )
    if lay.keymap is None:
        return
    gate_up, down = (state[k] for k in _FUSED)
    f = gate_up.shape[1] // 2
    for j in range(gate_up.shape[0]):
        name = lay.keymap
        # clones: a slice would keep the whole stacked tensor alive in the shard writer
        yield name["expert_gate_proj"].format(i=lay.index, j=j), gate_up[j, :f].clone()
        yield name["expert_up_proj"].format(i=lay.index, j=j), gate_up[j, f:].clone()
        yield name["expert_down_proj"].format(i=lay.index, j=j), down[j].clone()


def _beside_weight(lay: LayerLayout, name: str) -> str | None:
    """The on-disk key of a quantised linear's extra tensor (``...gate_proj.weight.absmax``,
    ``...gate_proj.SCB``): next to that linear's weight."""
    for local, key in lay.direct.items():
        module = local[: -len("weight")]  # "mlp.shared_expert.gate_proj."
        if local.endswith(".weight") and name.startswith(module):
            return key[: -len("weight")] + name[len(module) :]
    return None


def _plan(src: Path, trust_remote_code: bool = False) -> _Plan:
    """The model on ``meta``, its dtype, and where each of its tensors is on disk (no tensor read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(src), trust_remote_code=trust_remote_code)
    kind = "moe-app" if is_moe_checkpoint(src) else "hf"
    if kind == "moe-app":
        dtype = checkpoint_dtype(src) or torch.float32
        spec = read_spec(src)
        with torch.device("meta"):
            model = build_empty_model(config, spec, dtype, trust_remote_code)
    else:
        dtype = getattr(config, "dtype", None)
        dtype = dtype if isinstance(dtype, torch.dtype) else checkpoint_dtype(src) or torch.float32
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    stored: dict[str, StoredTensor] = {}
    for f in shard_files(src):
        stored.update(read_header(f)[0])
    alias: dict[str, str] = {}  # tied parameters: every name -> the one saved
    first: dict[int, str] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        alias[k] = first.setdefault(id(v), k)
    runner = LayerRunner(model)
    layers = runner.layers
    layouts = []
    for i, layer in enumerate(layers):
        prefix = f"{runner.path}.{i}."
        disk = {k for k in stored if k.startswith(prefix)}
        layouts.append(_layout(i, prefix, disk, unique_state_dict(layer)))
    in_layers = f"{runner.path}."
    outside = [k for k in unique_state_dict(model) if not k.startswith(in_layers)]
    on_disk = {k for k in stored if not k.startswith(in_layers)}
    if set(outside) != on_disk:
        diff = sorted(set(outside) ^ on_disk)[:6]
        raise StreamingUnsupported(
            f"on-disk keys outside the decoder layers differ from {type(model).__name__}'s ({diff})",
            fix="prune in memory (--streaming off)",
        )
    _rebuild_buffers(model, in_layers)
    plan = _Plan(src, kind, model, runner, dtype, stored, alias, layouts, outside)
    plan.moe = dict(moe_layer_views(model))
    return plan


def _rebuild_buffers(model: nn.Module, in_layers: str) -> None:
    """Recompute the non-persistent buffers outside the layers (rotary frequencies): they are not
    in the checkpoint, and on ``meta`` they have no values. Their modules are rebuilt from the config."""
    for name, module in list(model.named_modules()):
        if not name or (name + ".").startswith(in_layers):
            continue
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        try:
            rebuilt = type(module)(module.config)
        except (AttributeError, TypeError) as e:
            raise StreamingUnsupported(
                f"cannot recompute the buffers of `{name}` ({type(module).__name__}) outside the model",
                fix="prune in memory (--streaming off)",
            ) from e
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, rebuilt)


def _materialise(plan: _Plan, name: str) -> nn.Module:
    """Read module ``name`` (outside the layers) from the shards into the skeleton."""
    module = plan.model.get_submodule(name)
    state = {}
    for local, meta in module.state_dict(keep_vars=True).items():
        t = _read(plan, plan.alias[f"{name}.{local}"])
        state[local] = t.to(meta.dtype) if t.is_floating_point() else t
    module.load_state_dict(state, strict=True, assign=True)
    return module


def _materialise_layer(plan: _Plan, i: int) -> nn.Module:
    layer = plan.runner.layers[i]
    lay = plan.layouts[i]
    layer.load_state_dict(_layer_tensors(plan, lay, unique_state_dict(layer)), strict=True, assign=True)
    meta = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
    if meta:
        raise StreamingUnsupported(
            f"layer {i} holds tensors that are not in the checkpoint ({meta[:4]})",
            fix="prune in memory (--streaming off)",
        )
    if i in plan.zero_norm:
        with torch.no_grad():
            zero_mlp_norm(layer, f"{plan.runner.path}.{i}")
    return layer


def _renumbered(lay: LayerLayout, index: int, prefix: str) -> LayerLayout:
    """``lay`` with its on-disk keys moved to layer ``index`` (``prefix``: ``model.layers.{index}.``)."""
    direct = {name: prefix + key[len(lay.prefix) :] for name, key in lay.direct.items()}
    return LayerLayout(prefix, direct, lay.keymap, index, lay.num_experts)


def _delete_blocks(plan: _Plan, drop: list[int]) -> None:
    """Delete blocks ``drop`` from the ``meta`` model as in memory; the kept layers are still read
    under their old names and will be written under their new ones."""
    written = plan.out_layouts or plan.layouts
    kept = [i for i in range(plan.runner.num_layers) if i not in set(drop)]
    drop_blocks(plan.model, drop)
    plan.runner = LayerRunner(plan.model)
    plan.layouts = [plan.layouts[i] for i in kept]
    plan.out_layouts = [_renumbered(written[i], j, f"{plan.runner.path}.{j}.") for j, i in enumerate(kept)]
    plan.zero_norm = {kept.index(i) for i in plan.zero_norm if i in kept}
    plan.moe = dict(moe_layer_views(plan.model))


def _drop_mlps(plan: _Plan, drop: list[int]) -> None:
    """Drop the MoE sublayers of layers ``drop``: removed from the ``meta`` moe-app model (spec
    updated as in memory), or, in a stock checkpoint, zeroed as each layer is read."""
    if spec_of(plan.model) is not None:
        drop_mlp_layers(plan.model, drop)
    else:
        plan.zero_norm.update(drop)
    plan.moe = dict(moe_layer_views(plan.model))


# --- the pass ------------------------------------------------------------------------------------


def _trim_heap() -> None:
    """Give the memory of the layer just freed back to the OS (glibc ``malloc_trim``).

    glibc raises its mmap threshold after large frees, so the next layers' tensors come from the
    heap, whose freed pages stay resident: without this, resident memory creeps up by a fraction of
    a layer per layer (measured: ~3 MB per 6 MB layer). A no-op where glibc is absent.
    """
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


@dataclass(frozen=True)
class _Variant:
    """How a carried hidden-state stream runs each layer: at which stage of the change, with which
    skip betas."""

    stage: int  # 0: as loaded; 1: experts pruned; 2: pruned and slimmed; 3: as written, quantised
    betas: str  # "existing" (as loaded), "none" (skipping off), "new" (the calibrated ones)


@dataclass
class _Quant:
    """``--quantize``: the expert linears to quantise (full names in the model as written) and
    transformers' ``BitsAndBytesConfig`` (the ``quantization_config`` of the output's config)."""

    linears: list[str]
    config: Any

    @classmethod
    def of(cls, model: nn.Module, scheme: str, dtype: torch.dtype) -> _Quant:
        linears = expert_linears(model)
        return cls(linears, bnb_config(scheme, dtype, skip_patterns(model, linears)))

    def in_layer(self, prefix: str) -> list[str]:
        """The linears of the layer at ``prefix`` (``model.layers.3.``), relative to it."""
        return [n[len(prefix) :] for n in self.linears if n.startswith(prefix)]


def _set_betas(view: MoeLayerView | None, betas: str, existing: float | None, new: float | None) -> None:
    if view is None or view.kind == "hf":
        return
    view.skip_beta = {"existing": existing, "none": None, "new": new if new is not None else existing}[betas]


class _Pass:
    """One layer-by-layer pass over the model, carrying the calibration hidden states.

    Up to six streams of hidden states, each following the layers as one in-memory step sees them:
    ``orig`` (the model as loaded: block inputs and target outputs, loss before), ``prog`` (through
    the pruned layers: progressive pruning's inputs), ``slim`` (through the pruned and slimmed layers:
    slimming's inputs, as :func:`~moe_app.core.pruning.slim.slim_experts` recomputes them), ``calib``
    (the changed model, skipping off: the skipping betas), ``final`` (the result, skipping on: skip
    rates, loss after) and ``quant`` (the result with its expert linears quantised: the quantised
    loss). Streams that run every layer the same way share one list.
    """

    def __init__(
        self,
        plan: _Plan,
        job: PruneJob,
        batches: list[dict[str, Tensor]],
        spill: Path | None,
        after: bool = True,
        quant: _Quant | None = None,
    ):
        self.plan, self.job, self.batches, self.spill, self.quant = plan, job, batches, spill, quant
        spec = spec_of(plan.model)
        self.existing = {int(k): float(v) for k, v in ((spec.skipping or {}) if spec else {}).items()}
        experts = job.experts is not None
        last = 2 if job.slim is not None else int(experts)  # the stage the written layers are at
        none = "none" if self.existing else "existing"
        result = "new" if job.skipping else "existing"  # the betas of the model as written
        wanted = {"orig": _Variant(0, "existing")}
        if experts and job.experts.progressive:
            wanted["prog"] = _Variant(1, "existing")
        if job.slim is not None:
            wanted["slim"] = _Variant(2, "existing")
        if job.skipping:
            wanted["calib"] = _Variant(last, none)
        if (job.eval_before_after and after) or job.skipping:
            wanted["final"] = _Variant(last, result)
        if quant is not None and job.eval_before_after and after:
            wanted["quant"] = _Variant(3, result)
        self.variant_of = wanted
        self.streams = {v: TensorList(spill) for v in dict.fromkeys(wanted.values())}
        self.results: list[LayerPruneResult] = []
        self.slimmed: list[LayerSlimResult] = []
        self.keep: dict[int, int] = {}  # experts each layer keeps, where not job.experts.keep (global scope)
        self.betas: dict[int, float] = {}
        self.skipped: dict[int, int] = {}

    def stream(self, name: str) -> TensorList:
        return self.streams[self.variant_of[name]]

    def embed(self) -> None:
        """Every stream starts at the input embeddings."""
        for h in _embedded(self.plan, self.batches):
            for s in self.streams.values():
                s.append(h)

    def _inputs(self, name: str, i: int, view: MoeLayerView) -> TensorList:
        """The block inputs of layer ``i`` along stream ``name`` (the block itself is not run)."""
        xs = TensorList(self.spill)
        for b, h in zip(self.batches, self.stream(name)):
            xs.append(block_inputs(self.plan.runner, i, view.module, h, b["attention_mask"]))
        return xs

    def _run(
        self,
        i: int,
        variant: _Variant,
        view: MoeLayerView | None,
        new: float | None,
        xs: TensorList | None = None,
        zs: TensorList | None = None,
    ) -> None:
        """Advance ``variant``'s stream through layer ``i``, recording the block's X/Z when asked."""
        _set_betas(view, variant.betas, self.existing.get(i), new)
        stream, out = self.streams[variant], TensorList(self.spill)
        current: dict[str, Tensor] = {}
        count_skips = self.job.skipping and variant == self.variant_of.get("final") and i in self.betas
        for b, h in zip(self.batches, stream):
            current["mask"] = b["attention_mask"].reshape(-1).bool()  # (B*S,)
            if xs is not None and view is not None:
                with record_block_io(view.module, lambda: current["mask"], xs, zs):
                    out.append(self.plan.runner.layer(i, h, b["attention_mask"]))
            else:
                out.append(self.plan.runner.layer(i, h, b["attention_mask"]))
            if count_skips and view is not None:
                idx = view.module.last_routing.indices.cpu()  # (B*S, k)
                self.skipped[i] = self.skipped.get(i, 0) + int((idx[current["mask"]][:, 1] < 0).sum())
        stream.release()
        self.streams[variant] = out

    def layer(self, i: int, writer: ShardWriter) -> None:
        """Read layer ``i``, advance the streams through it, prune it, write it, send it back to ``meta``."""
        plan, job = self.plan, self.job
        layer = _materialise_layer(plan, i)
        view = view_of(layer.mlp) if i in plan.moe else None
        pruning = view is not None and job.experts is not None
        # inputs along the other streams first: they are the states *before* layer i
        prog = self._inputs("prog", i, view) if pruning and job.experts.progressive and self.results else None
        slimming = view is not None and job.slim is not None
        slim = self._inputs("slim", i, view) if slimming else None
        calib = (
            self._inputs("calib", i, view) if view is not None and job.skipping and view.top_k >= 2 else None
        )
        orig, quant = self.variant_of["orig"], self.variant_of.get("quant")  # quant: after the write
        xs, zs = (TensorList(self.spill), TensorList(self.spill)) if pruning else (None, None)
        self._run(i, orig, view, None, xs, zs)
        if pruning:
            self.results.append(
                prune_layer(
                    i, view, xs if prog is None else prog, zs, self.keep.get(i, job.experts.keep), job.experts
                )
            )
            for t in (xs, zs, prog):
                if t is not None:
                    t.release()
        if slim is not None:
            for variant in list(self.streams):  # the pruned-only streams go through before slimming
                if variant.stage == 1:
                    self._run(i, variant, view, None)
            x = torch.cat(list(slim)) if len(slim) else torch.empty(0)  # (T, d)
            self.slimmed.append(slim_layer(view, x, job.slim, i))
            logger.info(
                "slim: layer %d %s -> expert sparsity %.3f", i, job.slim.method, self.slimmed[-1].sparsity
            )
            del x
            slim.release()
        new = None
        if calib is not None and view.top_k >= 2:
            new = self.betas[i] = float(weight_ratios(view, calib).median())
            calib.release()
        for variant in list(self.streams):
            if variant not in (orig, quant) and not (slim is not None and variant.stage == 1):
                self._run(i, variant, view, new)
        _set_betas(view, "new" if job.skipping else "existing", self.existing.get(i), new)
        if view is not None and hasattr(view.module, "last_routing"):
            view.module.last_routing = None
        floats = {}
        if self.quant is not None:  # last: a storage format, as in memory
            floats = quantize_linears(
                layer, self.quant.in_layer(f"{plan.runner.path}.{i}."), self.quant.config
            )
        state = unique_state_dict(layer)
        # quantised tensors are copied: the quant forward below runs these modules before the writer
        # flushes, and nothing bitsandbytes keeps on them may reach the output
        quantised = tuple(f"{n}." for n in floats)
        state = {k: t.clone() if k.startswith(quantised) else t for k, t in state.items()}
        writer.reserve(sum(t.numel() * t.element_size() for t in state.values()))
        for name, t in _disk_tensors((plan.out_layouts or plan.layouts)[i], state):
            writer.add(name, t)
        del state
        if quant is not None:
            self._run(i, quant, view, new)
        restore_linears(layer, floats)
        layer.to("meta")
        _trim_heap()

    def loss(self, name: str) -> float:
        """:func:`~moe_app.core.pruning.calibration.eval_loss` of the model stream ``name`` runs through."""
        return _stream_loss(self.plan, self.batches, self.stream(name))

    def release(self) -> None:
        for s in self.streams.values():
            s.release()


def _embedded(plan: _Plan, batches: list[dict[str, Tensor]]) -> Iterator[Tensor]:
    """The input embeddings ``(B, S, d)`` of each batch (the embedding matrix is read for them and
    sent back to ``meta`` after the last one)."""
    embeddings = plan.model.get_input_embeddings()
    _materialise(plan, _name_of(plan.model, embeddings))
    try:
        for b in batches:
            yield plan.runner.embed(b["input_ids"])  # (B, S, d)
    finally:
        embeddings.to("meta")


def _stream_loss(plan: _Plan, batches: list[dict[str, Tensor]], stream: TensorList) -> float:
    """:func:`~moe_app.core.pruning.calibration.eval_loss` from the final hidden states ``stream``
    (the final norm and LM head must be materialised)."""
    total, count = 0.0, 0
    for b, h in zip(batches, stream):
        t, c = plan.runner.loss_terms(h, b["input_ids"], b["attention_mask"])
        total, count = total + t, count + c
    return total / max(count, 1)


def _head_modules(plan: _Plan) -> list[str]:
    """The final norm and the LM head: what the loss needs after the last layer."""
    return [
        _name_of(plan.model, plan.runner.base.norm),
        _name_of(plan.model, plan.model.get_output_embeddings()),
    ]


def _score_pass(
    plan: _Plan,
    batches: list[dict[str, Tensor]],
    spill: Path | None,
    hooks: Callable[[int, nn.Module, dict[str, Any]], list[Any]],
    want_loss: bool,
    desc: str,
    after: Callable[[int, nn.Module, dict[str, Any]], None] | None = None,
) -> tuple[dict[int, float], float | None]:
    """Run every layer of the model as it stands, once, in order, on the carried hidden states, with
    ``hooks(i, layer, current)`` on layer ``i`` accumulating ``{key: (sum cos, count)}`` in
    ``current["acc"]`` over the tokens of ``current["mask"]`` (the contract of the in-memory scores,
    :mod:`moe_app.core.pruning.drop`), and ``after(i, layer, current)`` called once the layer has
    run on every batch, its weights still in memory. Returns the mean scores and, if ``want_loss``,
    the model's calibration loss."""
    spec = spec_of(plan.model)
    existing = {int(k): float(v) for k, v in ((spec.skipping or {}) if spec else {}).items()}
    current: dict[str, Any] = {"acc": {}}
    stream = TensorList(spill)
    for h in _embedded(plan, batches):
        stream.append(h)
    try:
        for i in progress(range(plan.runner.num_layers), desc=desc, unit="layer"):
            layer = _materialise_layer(plan, i)
            view = view_of(layer.mlp) if i in plan.moe else None
            _set_betas(view, "existing", existing.get(i), None)
            handles = hooks(i, layer, current)
            out = TensorList(spill)
            try:
                for b, h in zip(batches, stream):
                    current["mask"] = b["attention_mask"].reshape(-1).bool()  # (B*S,)
                    out.append(plan.runner.layer(i, h, b["attention_mask"]))
            finally:
                for handle in handles:
                    handle.remove()
            if after is not None:
                after(i, layer, current)
            stream.release()
            stream = out
            if view is not None and hasattr(view.module, "last_routing"):
                view.module.last_routing = None
            layer.to("meta")
            _trim_heap()
        loss = None
        if want_loss:
            heads = [_materialise(plan, name) for name in _head_modules(plan)]
            loss = _stream_loss(plan, batches, stream)
            for module in heads:
                module.to("meta")
    finally:
        stream.release()
    return mean_scores(current["acc"]), loss


def _global_keep_counts(
    plan: _Plan, batches: list[dict[str, Tensor]], spill: Path | None, keep: int
) -> dict[int, int]:
    """Global expert drop (He et al. 2024): every MoE layer's ``expert_drop`` scores on its original
    block inputs, in a pass of their own, then each layer's count from the ranking over all layers
    (:func:`~moe_app.core.pruning.saliency.global_keep_counts`, as in memory)."""
    scores: dict[int, Tensor] = {}

    def hooks(i: int, layer: nn.Module, current: dict[str, Any]) -> list[Any]:
        if i not in plan.moe:
            return []
        current[i] = []
        return [block_io_hook(view_of(layer.mlp).module, lambda: current["mask"], current[i])]

    def after(i: int, layer: nn.Module, current: dict[str, Any]) -> None:
        if i in plan.moe:
            scores[i] = saliency_scores(view_of(layer.mlp), current.pop(i), "expert_drop")

    _score_pass(plan, batches, spill, hooks, False, "score experts", after)
    return global_keep_counts(scores, keep, {lay: view.top_k for lay, view in plan.moe.items()})


def _activation_bytes(plan: _Plan, batches: list[dict[str, Tensor]], streams: int) -> int:
    """Carried states (one ``(B, S, d)`` per stream and batch) plus one layer's X and Z."""
    d = int(plan.model.config.hidden_size)
    elem = torch.finfo(plan.dtype).bits // 8
    padded = sum(b["input_ids"].numel() for b in batches)
    return (streams * padded + 2 * num_tokens(batches)) * d * elem


class _Scratch:
    """Temporary directories next to ``--out`` (same filesystem), made when first needed, all removed
    at the end: the spilled hidden states, the expert-pruned checkpoint the drops then read."""

    def __init__(self, out: Path, act_budget: int) -> None:
        self.out, self.act_budget = out, act_budget
        self.dirs: list[Path] = []

    def _make(self, what: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.{what}-", dir=self.out.parent))
        self.dirs.append(path)
        return path

    def spill(self, plan: _Plan, batches: list[dict[str, Tensor]], streams: int) -> Path | None:
        """Where ``streams`` carried hidden states go: ``None`` (memory) within the activation budget."""
        if _activation_bytes(plan, batches, streams) <= self.act_budget:
            return None
        path = self._make("hidden")
        logger.info("hidden states on disk in %s", path)
        return path

    def checkpoint(self) -> Path:
        return self._make("experts") / "checkpoint"

    def cleanup(self) -> None:
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)


def prune_checkpoint_streaming(
    ckpt: str | Path,
    out: str | Path,
    job: PruneJob,
    overwrite: bool = False,
    *,
    memory_budget: int | str | None = None,
    activation_budget: int | str | None = None,
    max_shard_size: int | str | None = None,
) -> dict[str, Any]:
    """``moe-app prune --streaming on``: :func:`~moe_app.checkpoint.pruning.prune_checkpoint`'s job
    and report, one decoder layer in memory at a time (see the module docstring).

    ``memory_budget`` (default: half the available memory) sizes the output shards (an eighth of it,
    at most 5 GB); ``activation_budget`` (default: a quarter of it) is what the carried hidden states
    may take in memory before they go to a temporary directory next to ``out``.
    """
    src, out = checked_paths(ckpt, out, overwrite)
    problems = streaming_problems(job)
    if problems:
        raise ConfigError(
            "the layer-streamed pruning cannot run this job: " + "; ".join(problems),
            where="--streaming",
            fix="drop those options, or use --streaming off (prunes in memory)",
        )
    budget = resolve_budget(memory_budget)
    act_budget = budget // 4 if activation_budget is None else parse_size(activation_budget)
    shard = max_shard_size or min(DEFAULT_MAX_SHARD_SIZE, max(budget // 8, 2**26))
    tokenizer = load_tokenizer(src, required=True)
    plan = _plan(src)
    kind = validate_job(plan.model, job, str(src))
    if job.skipping and not any(v.top_k >= 2 for v in plan.moe.values()):
        raise UnsupportedModelError(
            "no MoE layer with top_k >= 2: there is no second expert to skip",
            fix="dynamic skipping applies to top-2 (or larger) routing",
        )
    if job.experts is not None and job.experts.scope == "global":
        check_global_scope(list(plan.moe.items()))
    if job.layer_drop and not plan.moe:
        raise UnsupportedModelError(
            "the model has no MoE layers to drop", fix="layer drop applies to MoE models"
        )
    batches = normalize_batches(calibration_batches(tokenizer, job.calibration))
    report: dict[str, Any] = {"calibration": dataclasses.asdict(job.calibration)}
    out.parent.mkdir(parents=True, exist_ok=True)
    logger.info(
        "layer-streamed pruning of %s (%.2f GB, %d layers)",
        src, checkpoint_nbytes(src) / 1e9, plan.runner.num_layers,
    )  # fmt: skip
    scratch = _Scratch(out, act_budget)
    stage = _Stage(src, job, kind, batches, shard, scratch)
    try:
        if not (job.block_drop or job.layer_drop):
            stage.prune_pass(plan, job, out, report)
        else:
            if job.experts is not None:  # the experts first, as in memory: the drops score the pruned model
                experts = dataclasses.replace(
                    job, block_drop=0, layer_drop=0, slim=None, skipping=False, quantize=None
                )
                mid = scratch.checkpoint()
                stage.prune_pass(plan, experts, mid, report, intermediate=True, after=False)
                plan = _plan(mid)
            stage.drops(plan, out, report)
    finally:
        scratch.cleanup()
    report["out"] = str(out)
    report["kind"] = kind
    report["mode"] = "streaming"
    return report


@dataclass
class _Stage:
    """What every pass of one ``prune_checkpoint_streaming`` call shares."""

    src: Path
    job: PruneJob
    kind: str
    batches: list[dict[str, Tensor]]
    shard: int | str
    scratch: _Scratch

    def prune_pass(
        self,
        plan: _Plan,
        job: PruneJob,
        out: Path,
        report: dict[str, Any],
        *,
        before: float | None = None,
        intermediate: bool = False,
        after: bool = True,
    ) -> None:
        """Read, prune (``job``'s experts), calibrate skipping and write every layer of ``plan`` to
        ``out``; the report of :func:`~moe_app.checkpoint.pruning.run_job` is completed in ``report``.
        ``before``: the loss before, when an earlier pass measured it on the unmodified model;
        ``after``: whether to measure the loss after (not for a checkpoint a later pass changes)."""
        batches = self.batches
        quant = _Quant.of(plan.model, job.quantize, plan.dtype) if job.quantize else None
        run = _Pass(plan, job, batches, None, after, quant)
        spill = self.scratch.spill(plan, batches, len(run.streams))
        if spill is not None:
            run = _Pass(plan, job, batches, spill, after, quant)
        if job.experts is not None and job.experts.scope == "global":
            run.keep = _global_keep_counts(plan, batches, spill, job.experts.keep)

        def fill(writer: ShardWriter) -> None:
            for key in plan.outside:  # embeddings, final norm, LM head: copied in the model dtype
                t = _read(plan, key)
                writer.reserve(t.numel() * t.element_size())
                writer.add(key, t.to(plan.dtype) if t.is_floating_point() else t)
                del t
            run.embed()
            for i in progress(range(plan.runner.num_layers), desc="prune layers", unit="layer"):
                run.layer(i, writer)
            if plan.moe:
                sync_expert_count(plan.model)
            losses = {}
            if job.eval_before_after:  # the final norm and LM head, only now and only for the report
                for name in _head_modules(plan):
                    _materialise(plan, name)
                losses = {"eval_loss_before": run.loss("orig") if before is None else before}
                if after:
                    losses["eval_loss_after"] = run.loss("final")
                if "quant" in run.variant_of:
                    losses["eval_loss_quantized"] = run.loss("quant")
            _finish_report(plan, job, batches, run, report, losses)

        try:
            _write(plan, out, fill, report, self.job, self.src, self.kind, self.shard, intermediate, quant)
        finally:
            run.release()

    def drops(self, plan: _Plan, out: Path, report: dict[str, Any]) -> None:
        """Block drop, then layer drop, each scored in a pass over the model as it stands, then the
        last pass (skipping, loss after, the output) over what is left."""
        job, batches = self.job, self.batches
        spill = self.scratch.spill(plan, batches, 1)

        def score(hooks, desc: str) -> dict[int, float]:
            """One scoring pass; the first pass over the unmodified model also gives the loss before."""
            want = job.eval_before_after and "eval_loss_before" not in report
            scores, loss = _score_pass(plan, batches, spill, hooks, want, desc)
            if want:
                report["eval_loss_before"] = loss
            return scores

        if job.block_drop:
            scores = score(lambda i, layer, cur: [block_drop_hook(layer, i, cur)], "score blocks")
            drop = most_similar(scores, job.block_drop)
            _delete_blocks(plan, drop)
            report["block_drop"] = drop_entry("block drop: removed decoder blocks", scores, drop)
        if job.layer_drop:

            def hooks(i: int, layer: nn.Module, cur: dict[str, Any]) -> list[Any]:
                return layer_drop_hooks(layer, i, f"{plan.runner.path}.{i}", cur) if i in plan.moe else []

            scores = score(hooks, "score MoE sublayers")
            drop = most_similar(scores, job.layer_drop)
            how = layer_drop_how(plan.model)
            _drop_mlps(plan, drop)
            report["layer_drop"] = drop_entry(f"layer drop: {how} MoE sublayers", scores, drop)
        rest = dataclasses.replace(job, experts=None)
        self.prune_pass(plan, rest, out, report, before=report.get("eval_loss_before"))


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _finish_report(
    plan: _Plan,
    job: PruneJob,
    batches: list[dict[str, Tensor]],
    run: _Pass,
    report: dict[str, Any],
    losses: dict[str, float],
) -> None:
    """The report of :func:`~moe_app.checkpoint.pruning.run_job` (same keys, same order), and the
    spec's ``pruning`` / ``skipping`` slots."""
    if "eval_loss_before" in losses:
        report["eval_loss_before"] = losses["eval_loss_before"]
    if job.experts is not None:
        cfg = job.experts
        pr = PruneReport(cfg.method, cfg.keep, cfg.progressive, cfg.scope, num_tokens(batches), run.results)
        record_pruning(plan.model, pr, cfg)
        report["experts"] = pr.to_dict()
    if job.slim is not None:
        slim = SlimReport(job.slim.method, job.slim.target_sparsity, num_tokens(batches), run.slimmed)
        report["slim"] = slim.to_dict()
    if job.skipping:
        total = num_tokens(batches)
        layers = sorted(run.betas)
        rates = {f"L{lay}": run.skipped.get(lay, 0) / max(total, 1) for lay in layers}
        rates["all"] = sum(run.skipped.get(lay, 0) for lay in layers) / max(total * len(layers), 1)
        report["skipping"] = {"betas": {str(k): run.betas[k] for k in layers}, "skip_rate": rates}
        logger.info(
            "skipping: betas %s, skip rate %.3f", {k: round(v, 4) for k, v in run.betas.items()}, rates["all"]
        )
        spec = spec_of(plan.model)
        if spec is not None:
            spec.skipping = {lay: float(b) for lay, b in run.betas.items()}
            spec.pruning = {**(spec.pruning or {}), "skipping_calibration": report["skipping"]}
    for key in ("eval_loss_after", "eval_loss_quantized"):
        if key in losses:
            report[key] = losses[key]


def _write(
    plan: _Plan,
    out: Path,
    fill,
    report: dict[str, Any],
    job: PruneJob,
    src: Path,
    kind: str,
    shard,
    intermediate: bool = False,
    quant: _Quant | None = None,
) -> None:
    """The output directory, atomically: config, shards filled layer by layer, tokenizer, lineage/spec.

    ``intermediate``: a checkpoint a later pass reads (no ``prune`` stage in its lineage: the last
    pass records the whole job once); ``quant``: the layers were written quantised, and the config
    says how (transformers' ``quantization_config``)."""
    from transformers import GenerationConfig

    model = plan.model

    def describe(staging: Path) -> None:
        config = {
            "source": str(src),
            "experts": dataclasses.asdict(job.experts) if job.experts is not None else None,
            "block_drop": job.block_drop,
            "layer_drop": job.layer_drop,
            "skipping": job.skipping,
            "slim": dataclasses.asdict(job.slim) if job.slim is not None else None,
            "quantize": job.quantize,
            "calibration": dataclasses.asdict(job.calibration),
            "eval_loss_before": report.get("eval_loss_before"),
            "eval_loss_after": report.get("eval_loss_after"),
            "streaming": True,
        }
        if kind == "moe-app":
            spec = current_spec(model)
            if not intermediate:
                spec.add_stage("prune", config)
            write_spec(staging, spec)
        else:
            (staging / "config.json").unlink()
            model.config.architectures = [type(model).__name__]
            if quant is not None:
                model.config.quantization_config = quant.config
            model.config.save_pretrained(staging)  # the expert counts sync_expert_count wrote
            if not intermediate:
                entry = {"stage": "prune", "time": utc_now(), "config": config}
                write_lineage_file(staging, [*read_lineage(src), entry])

    generation = model.generation_config if kind == "moe-app" else None
    if kind == "hf" and (src / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(str(src))
    write_model_dir(
        out,
        model.config,
        fill,
        generation_config=generation,
        tokenizer_dir=src,
        max_shard_size=shard,
        extra=describe,
    )


__all__ = [
    "STREAMING_MODES",
    "TensorList",
    "checkpoint_nbytes",
    "default_memory_budget",
    "prune_checkpoint_streaming",
    "streaming_problems",
    "use_streaming",
]
