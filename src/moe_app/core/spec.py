"""The ``moe_app.json`` surgery description stored in every moe-app checkpoint directory.

A moe-app checkpoint is the base model's ``config.json`` (unchanged, so the base class can be rebuilt
from it) plus this file, which says how the base was turned into a Mixture-of-Experts: per decoder
layer, whether its MLP and/or attention is an MoE and with which shape (experts, top-k, routing
rule, scale, expert size, shared expert), or whether its MLP was removed by layer drop. It is per layer so that later stages can make layers
differ (expert pruning keeps a different number of experts per layer, Lu et al. 2024). Slots for
later stages: ``adapters`` (PESC, Wu et al. 2024), ``pruning``, ``skipping`` (``{layer: beta}``)
and ``lineage`` (every stage that produced the checkpoint, with its config and data).

``load_model`` rebuilds the module structure from this file alone (no weight init), then loads the
safetensors strictly; so the file records *structure*, and provenance (method, split) only as
information.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from moe_app.core.moe.router import routing_problem
from moe_app.errors import CheckpointError

SPEC_FILE = "moe_app.json"
FORMAT = "moe-app"
FORMAT_VERSION = 2
"""The newest schema this moe-app reads. Files are written as version 1 unless they need version 2
(a layer whose MLP was removed by layer drop), so older moe-app versions keep reading the rest and
refuse the files they would misread with "newer than this moe-app understands"."""


def utc_now() -> str:
    """The current time for a lineage entry: ISO 8601, UTC, with its zone (``...+00:00``).

    Milliseconds, so that stages run back to back (tests, tiny pipelines) still order by time.
    """
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def lineage_time(entry: dict[str, Any]) -> datetime | None:
    """An entry's ``time`` as an aware UTC datetime; a zone-less time (written by old moe-app
    versions with the local clock) is read as local time; ``None`` if absent or unparseable."""
    raw = entry.get("time") if isinstance(entry, dict) else None
    if not isinstance(raw, str):
        return None
    try:
        t = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return (t.astimezone() if t.tzinfo is None else t).astimezone(timezone.utc)


def merge_lineage(*lists: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """One lineage from several partial ones, in the order the stages happened.

    Entries are de-duplicated (by their JSON form, so an entry read back from disk equals the one
    held in memory), every time is normalised to UTC with its zone, and the result is sorted by
    time; the sort is stable, so entries with equal or missing times keep the order given (pass
    the inherited lists first). This is what puts a base model's stages before the upcycling
    surgery that a later stage recorded while loading it.
    """
    seen: set[str] = set()
    merged: list[dict[str, Any]] = []
    for entries in lists:
        for entry in entries or []:
            entry = dict(entry)
            t = lineage_time(entry)
            if t is not None:
                entry["time"] = t.isoformat(timespec="milliseconds")
            key = json.dumps(entry, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                merged.append(entry)
    keys: list[datetime] = []
    last = datetime.min.replace(tzinfo=timezone.utc)
    for entry in merged:  # an entry without a time sorts with the one before it
        last = lineage_time(entry) or last
        keys.append(last)
    order = sorted(range(len(merged)), key=lambda i: keys[i])
    return [merged[i] for i in order]


@dataclass
class MlpMoeSpec:
    """Shape of one MLP Mixture-of-Experts block (a ``SparseMoeBlock``)."""

    num_experts: int
    """Routed experts ``E`` in this layer."""
    top_k: int
    """Experts per token ``k``."""
    rule: str
    """Routing rule, one of ``moe_app.core.moe.router.ROUTING_RULES``."""
    scale: float
    """Multiplier ``s`` on the combined routed output."""
    expert_intermediate_size: int
    """Intermediate size ``F`` of every routed expert."""
    shared_intermediate_size: int = 0
    """Intermediate size of the always-on shared expert; 0 = none."""
    shared_gate: bool = False
    """Whether the shared expert has a sigmoid gate (Qwen2-MoE style)."""
    noisy_gating: bool = False
    """Router has a ``noise_weight`` (LLaMA-MoE v1 noisy gating, training only)."""
    jitter: float = 0.0
    """Router input jitter (training only)."""
    method: str | None = None
    """Provenance: the upcycling method that built the experts (information only)."""
    split: str | None = None
    """Provenance: the neuron split for ``partition`` (information only)."""

    def __post_init__(self) -> None:
        problem = routing_problem(self.num_experts, self.top_k, self.rule)
        if problem:
            raise CheckpointError(problem, where=SPEC_FILE, fix="repair the layer spec")
        if self.expert_intermediate_size < 1 or self.shared_intermediate_size < 0:
            raise CheckpointError(
                "expert sizes must be positive", where=SPEC_FILE, fix="repair the layer spec"
            )


@dataclass
class AttentionMoeSpec:
    """Shape of one attention MoE (LLaMA-MoE v2): experts are the GQA key/value groups."""

    num_experts: int
    """Attention experts = number of key/value head groups."""
    top_k: int
    """Groups per token."""
    rule: str
    """Routing rule."""
    scale: float
    """Multiplier on the combined attention output."""

    def __post_init__(self) -> None:
        problem = routing_problem(self.num_experts, self.top_k, self.rule)
        if problem:
            raise CheckpointError(
                f"invalid attention MoE spec: {problem}", where=SPEC_FILE, fix="repair the layer spec"
            )


@dataclass
class LayerSpec:
    """One decoder layer: ``mlp``/``attention`` are ``None`` where the layer stays dense."""

    index: int
    mlp: MlpMoeSpec | None = None
    attention: AttentionMoeSpec | None = None
    mlp_dropped: bool = False
    """The MLP sublayer was removed (layer drop): a parameter-free ``DroppedMlp`` adding zero,
    no tensors in the checkpoint (``moe_app.core.models.dropped``). ``mlp`` is then ``None``."""
    mlp_norm_dropped: bool = False
    """With ``mlp_dropped``: the norm in front of the MLP was removed too (it fed only the MLP)."""

    def __post_init__(self) -> None:
        if self.mlp_dropped and self.mlp is not None:
            raise CheckpointError(
                f"layer {self.index} has both an MLP MoE and mlp_dropped",
                where=SPEC_FILE,
                fix="repair the layer spec",
            )
        if self.mlp_norm_dropped and not self.mlp_dropped:
            raise CheckpointError(
                f"layer {self.index} has mlp_norm_dropped without mlp_dropped",
                where=SPEC_FILE,
                fix="repair the layer spec",
            )

    @property
    def is_moe(self) -> bool:
        return self.mlp is not None or self.attention is not None


@dataclass
class MoeSpec:
    """Everything ``moe_app.json`` holds."""

    base_architecture: str
    """The base model's class name, e.g. ``LlamaForCausalLM``."""
    base_model_type: str
    """The base config's ``model_type``, e.g. ``llama``."""
    layers: list[LayerSpec]
    """One entry per decoder layer, in order."""
    source: str | None = None
    """Where the dense base came from (path or hub id)."""
    adapters: dict[str, Any] | None = None
    """Free slot for adapter stages (PESC)."""
    pruning: dict[str, Any] | None = None
    """Free slot for expert pruning state (kept experts per layer, method)."""
    skipping: dict[int, float] = field(default_factory=dict)
    """Dynamic skipping thresholds ``{layer: beta}`` applied to the layer's MLP router on load."""
    lineage: list[dict[str, Any]] = field(default_factory=list)
    """Stages that produced this checkpoint: ``{stage, time, config, data}``."""
    format_version: int = FORMAT_VERSION
    """Version of this schema."""

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)

    def moe_layers(self) -> list[int]:
        return [lay.index for lay in self.layers if lay.mlp is not None]

    def dropped_mlp_layers(self) -> list[int]:
        """Layers whose MLP sublayer was removed by layer drop."""
        return [lay.index for lay in self.layers if lay.mlp_dropped]

    def written_version(self) -> int:
        """The schema version the file needs: 2 with a removed MLP, else 1."""
        return 2 if any(lay.mlp_dropped for lay in self.layers) else 1

    def add_stage(self, stage: str, config: dict[str, Any] | None = None, data: Any = None) -> None:
        """Append a lineage entry stamped with the current UTC time."""
        self.lineage.append({"stage": stage, "time": utc_now(), "config": config or {}, "data": data})

    def merge_lineage(self, *others: list[dict[str, Any]] | None) -> None:
        """Merge ``others`` into ``lineage`` (see :func:`merge_lineage`)."""
        self.lineage = merge_lineage(self.lineage, *others)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.written_version(),
            "base": {
                "architecture": self.base_architecture,
                "model_type": self.base_model_type,
                "num_hidden_layers": self.num_hidden_layers,
                "source": self.source,
            },
            "layers": [
                {
                    "index": lay.index,
                    "mlp": asdict(lay.mlp) if lay.mlp is not None else None,
                    "attention": asdict(lay.attention) if lay.attention is not None else None,
                    **(
                        {"mlp_dropped": True, "mlp_norm_dropped": bool(lay.mlp_norm_dropped)}
                        if lay.mlp_dropped
                        else {}
                    ),
                }
                for lay in self.layers
            ],
            "adapters": self.adapters,
            "pruning": self.pruning,
            "skipping": {str(k): float(v) for k, v in sorted(self.skipping.items())},
            "lineage": self.lineage,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = SPEC_FILE) -> MoeSpec:
        if d.get("format") != FORMAT:
            raise CheckpointError(
                f"not a moe-app surgery file (format={d.get('format')!r})",
                where=where,
                fix="point at a directory written by `moe-app upcycle` or `save_moe_checkpoint`",
            )
        version = int(d.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"format_version {version} is newer than this moe-app understands ({FORMAT_VERSION})",
                where=where,
                fix="upgrade moe-app",
            )
        try:
            base = d["base"]
            layers = []
            for i, lay in enumerate(d["layers"]):
                if int(lay["index"]) != i:
                    raise CheckpointError(f"layers[{i}] has index {lay['index']}", where=where)
                layers.append(
                    LayerSpec(
                        index=i,
                        mlp=MlpMoeSpec(**lay["mlp"]) if lay.get("mlp") else None,
                        attention=AttentionMoeSpec(**lay["attention"]) if lay.get("attention") else None,
                        mlp_dropped=_flag(lay, "mlp_dropped", where),
                        mlp_norm_dropped=_flag(lay, "mlp_norm_dropped", where),
                    )
                )
            return cls(
                base_architecture=base["architecture"],
                base_model_type=base["model_type"],
                layers=layers,
                source=base.get("source"),
                adapters=d.get("adapters"),
                pruning=d.get("pruning"),
                skipping={int(k): float(v) for k, v in (d.get("skipping") or {}).items()},
                lineage=list(d.get("lineage") or []),
                format_version=version,
            )
        except (KeyError, TypeError) as e:
            raise CheckpointError(
                f"malformed surgery file ({type(e).__name__}: {e})",
                where=where,
                fix="regenerate the checkpoint or repair the JSON against the documented schema",
            ) from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"


def _flag(lay: dict[str, Any], key: str, where: str) -> bool:
    value = lay.get(key, False)
    if not isinstance(value, bool):
        raise CheckpointError(
            f"layers[{lay.get('index')}].{key} must be true or false, not {value!r}", where=where
        )
    return value


# ---------------------------------------------------------------------- the spec on a live model
_SPEC_ATTR = "moe_app_spec"


def attach_spec(model: Any, spec: MoeSpec) -> None:
    """Record ``spec`` as the surgery description of ``model`` (what ``save_moe_checkpoint`` writes)."""
    if not isinstance(spec, MoeSpec):
        raise TypeError(f"attach_spec needs a MoeSpec, got {type(spec).__name__}")
    object.__setattr__(model, _SPEC_ATTR, spec)  # a plain attribute, never a submodule or parameter


def spec_of(model: Any) -> MoeSpec | None:
    """The surgery description attached to ``model`` by moe-app's surgery or loader, if any."""
    spec = model.__dict__.get(_SPEC_ATTR)
    return spec if isinstance(spec, MoeSpec) else None
