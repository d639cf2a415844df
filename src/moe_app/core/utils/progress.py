"""Progress bars for long offline work (upcycle, export, prune), shown the way transformers shows them.

A bar is drawn only when stderr is a terminal, so logs, CI and pipes stay quiet; ``MOE_APP_PROGRESS=0``
turns bars off on a terminal and ``MOE_APP_PROGRESS=1`` forces them on (e.g. under ``script``).
Without a bar the iterable is returned unchanged: no wrapper, no cost.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

ENV = "MOE_APP_PROGRESS"


def progress_enabled() -> bool:
    """Whether bars are drawn: ``$MOE_APP_PROGRESS`` if set, else whether stderr is a terminal."""
    flag = os.environ.get(ENV, "").strip().lower()
    if flag in {"0", "false", "no", "off"}:
        return False
    if flag in {"1", "true", "yes", "on"}:
        return True
    return sys.stderr.isatty()


def progress(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "it"
) -> Iterator[T] | Iterable[T]:
    """``items`` with a tqdm bar (``desc``, ``unit``) on a terminal; ``items`` itself otherwise."""
    if not progress_enabled():
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
