"""User-facing errors.

Every error a user can cause (bad config, bad record, missing file, unsupported model) is raised as
a :class:`MoeAppError`: the message says *what* is wrong, *where* (file, line, key) and *how to fix
it*. The CLI turns these into one readable line and exit code 2, with no traceback unless
``--debug`` or ``MOE_APP_DEBUG=1`` asks for it. They subclass ``ValueError`` so that dataclass
``__post_init__`` validation and library code that expects ``ValueError`` keep working.
"""

from __future__ import annotations


class MoeAppError(ValueError):
    """An error caused by the user's input, with a location and a fix."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(f"Fix: {self.fix}")
        return " ".join(parts)


class ConfigError(MoeAppError):
    """A config value is invalid (raised before any heavy work)."""


class DataError(MoeAppError):
    """A data file or record is malformed."""


class CheckpointError(MoeAppError):
    """A checkpoint directory is missing files or is not of the expected kind."""


class UnsupportedModelError(MoeAppError):
    """The model's architecture cannot be handled by the requested operation."""
