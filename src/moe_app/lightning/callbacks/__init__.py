"""Lightning callbacks: thin schedulers over the core (``moe_app.core.pruning``, router statistics, ...).

Referenced from YAML by class path, e.g. ``moe_app.lightning.callbacks.pruning.ExpertPruning``; the names are
also importable from here (lazily, so importing the package costs nothing).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ExpertPruning": "moe_app.lightning.callbacks.pruning",
    "ExpertSkipping": "moe_app.lightning.callbacks.pruning",
    "LayerDrop": "moe_app.lightning.callbacks.pruning",
    "BlockDrop": "moe_app.lightning.callbacks.pruning",
    "MixtureWeightsCallback": "moe_app.lightning.callbacks.mixture",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moe_app.lightning.callbacks' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
