"""Reading and writing ``moe_app.json``, the surgery description of a moe-app checkpoint dir.

The schema (:class:`~moe_app.core.spec.MoeSpec` and its JSON form) is core: surgery builds it in
memory. This module is the only code that puts it on disk or reads it back, so a missing or
malformed file is one clear :class:`~moe_app.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_app.core.spec import SPEC_FILE, MoeSpec
from moe_app.core.utils.atomic import atomic_write_text
from moe_app.errors import CheckpointError


def write_spec(directory: str | Path, spec: MoeSpec) -> Path:
    """Write ``spec`` as ``directory/moe_app.json`` (atomically: a reader never sees half a file)."""
    return atomic_write_text(Path(directory) / SPEC_FILE, spec.to_json())


def read_spec(directory: str | Path) -> MoeSpec:
    """The :class:`MoeSpec` of the moe-app checkpoint in ``directory``; a clear error when there is none."""
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise CheckpointError(
            f"missing {SPEC_FILE}",
            where=str(directory),
            fix="this is not a moe-app checkpoint; create one with `moe-app upcycle`",
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"invalid JSON ({e})", where=str(path), fix="repair or regenerate the file"
        ) from e
    return MoeSpec.from_dict(data, where=str(path))


__all__ = ["read_spec", "write_spec"]
