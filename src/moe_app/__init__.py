"""moe-app: turn dense decoder LMs into Mixture-of-Experts models, train, prune and export them.

``import moe_app`` is light (the CLI imports it); heavy modules load on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_model(path: Any, dtype: Any = None, device: Any = None, trust_remote_code: bool = False) -> Any:
    """A ready ``PreTrainedModel`` for a moe-app checkpoint dir (or a plain HF model dir / hub id).

    See :func:`moe_app.checkpoint.model_dir.load_model`.
    """
    from moe_app.checkpoint.model_dir import load_model as _load

    return _load(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


__all__ = ["__version__", "load_model"]
