"""The file names of every on-disk format moe-app reads or writes, in one place.

Where the lineage (the stages that produced a model) is stored — exactly one place per directory:

* a **moe-app checkpoint dir** (``config.json`` + :data:`SPEC_FILE` + safetensors): the ``lineage``
  field of :data:`SPEC_FILE` (``moe_app.json``), the single source of truth;
* a **PESC adapter-only dir** (:data:`PESC_META` + :data:`PESC_ADAPTER_FILE`): the ``lineage``
  field of its manifest :data:`PESC_META`, the only metadata file such a dir has;
* a **plain Hugging Face dir** written by moe-app (a dense model, or a pruned stock HF MoE):
  :data:`LINEAGE_FILE` (``{"lineage": [...]}``). It is *not* a ``moe_app.json``, because that
  file's presence is what marks a moe-app checkpoint (``load_model``, ``check_init_from`` and
  ``moe-app export`` key on it); stock ``transformers`` ignores the extra file, so the dir still
  loads with ``from_pretrained``.

:func:`moe_app.checkpoint.pretrained.read_lineage` reads all three; nothing else reads lineage.
"""

from __future__ import annotations

from moe_app.core.spec import SPEC_FILE

CONFIG_FILE = "config.json"
"""The (base) model's Hugging Face config."""
GENERATION_CONFIG_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
"""The safetensors shard index (``{"metadata": {...}, "weight_map": {key: file}}``)."""
SINGLE_FILE = "model.safetensors"
"""The weights of an unsharded checkpoint."""
LINEAGE_FILE = "moe_app_lineage.json"
"""Lineage of a plain HF model dir written by moe-app (see the module docstring)."""
PESC_ADAPTER_FILE = "pesc_adapters.safetensors"
"""The trainable PESC tensors of an adapter-only dir."""
PESC_META = "pesc.json"
"""The manifest of a PESC adapter-only dir: PESC config, base model path, lineage."""

__all__ = [
    "CONFIG_FILE",
    "GENERATION_CONFIG_FILE",
    "INDEX_FILE",
    "LINEAGE_FILE",
    "PESC_ADAPTER_FILE",
    "PESC_META",
    "SINGLE_FILE",
    "SPEC_FILE",
]
