"""Safe resolution of output paths taken from configs: they stay inside their run directory.

A config value such as ``save_dir: model`` or ``report: ../../etc/x`` is resolved against the run
directory (``trainer.default_root_dir``). Relative paths that climb out of it with ``..``, or
through a symlink that points elsewhere, are refused, and so are absolute paths outside it unless
the caller explicitly allows them (an absolute path a user typed is a deliberate choice; a
relative path that escapes is almost always a mistake or a hostile config). Nothing here touches
the file system except to resolve existing symlinks.
"""

from __future__ import annotations

import os
from pathlib import Path

from moe_app.errors import ConfigError


def resolve_output_path(
    value: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    key: str = "output path",
    allow_absolute: bool = False,
) -> Path:
    """``value`` resolved against ``run_dir``; a :class:`ConfigError` if it would write outside it.

    Args:
        value: the configured path (relative to ``run_dir``, or absolute).
        run_dir: the run directory every relative output lives under.
        key: the config key, for the error message.
        allow_absolute: accept an absolute ``value`` outside ``run_dir`` (the user named it).

    Returns:
        The absolute, normalised path (symlinks of existing parents resolved).
    """
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("the path is empty.", where=key, fix="give a file or directory name, e.g. 'model'")
    if "\x00" in text:
        raise ConfigError("the path contains a NUL character.", where=key, fix="remove it")
    root = Path(run_dir).expanduser().resolve()
    raw = Path(text).expanduser()
    target = (raw if raw.is_absolute() else root / raw).resolve()
    if target == root or root in target.parents:
        return target
    if raw.is_absolute() and allow_absolute:
        return target
    if raw.is_absolute():
        raise ConfigError(
            f"{text!r} is outside the run directory {str(root)!r}.",
            where=key,
            fix="use a path relative to the run directory (trainer.default_root_dir), or move the run "
            "directory; absolute output paths elsewhere are not allowed for this key",
        )
    raise ConfigError(
        f"{text!r} escapes the run directory {str(root)!r} (through '..' or a symlink).",
        where=key,
        fix="use a path inside the run directory, e.g. 'model' or 'exports/mixtral'",
    )


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` (resolved) is ``root`` or below it."""
    p, r = Path(path).expanduser().resolve(), Path(root).expanduser().resolve()
    return p == r or r in p.parents


__all__ = ["is_inside", "resolve_output_path"]
