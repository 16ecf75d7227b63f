"""Typed errors: every failure a user can cause says what was wrong and how to fix it.

The search counts ``InfeasibleError`` per candidate instead of pricing infeasible choices with a
sentinel number; the CLI maps ``ConfigError`` to exit code 2 and ``InfeasibleError`` to 3.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["AutoparError", "ConfigError", "InfeasibleError", "TraceError"]

GiB = 1024**3


class AutoparError(Exception):
    """Base class of every error autopar raises on purpose."""


class ConfigError(AutoparError, ValueError):
    """Bad user input: names the file (if any), the field and the allowed values."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        field: str | None = None,
        allowed: Iterable[object] | None = None,
    ) -> None:
        self.file = file
        self.field = field
        self.allowed = tuple(allowed) if allowed is not None else None
        parts = []
        if file:
            parts.append(str(file))
        if field:
            parts.append(f"field '{field}'")
        prefix = ": ".join(parts)
        text = f"{prefix}: {message}" if prefix else message
        if self.allowed:
            text += f" (allowed: {', '.join(str(a) for a in self.allowed)})"
        super().__init__(text)


class InfeasibleError(AutoparError):
    """No plan fits in memory: states the need, the capacity and what would make it fit."""

    def __init__(
        self,
        message: str,
        *,
        needed_bytes: float,
        available_bytes: float,
        suggestions: Sequence[str] = (),
    ) -> None:
        self.message = message
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        self.suggestions = tuple(suggestions)
        text = (
            f"{message}: needs at least {needed_bytes / GiB:.1f} GiB per device, "
            f"devices have {available_bytes / GiB:.1f} GiB"
        )
        if self.suggestions:
            text += ". To make it fit: " + "; ".join(self.suggestions)
        super().__init__(text)


class TraceError(AutoparError):
    """A model could not be traced: names the op or module and what to do about it."""

    def __init__(self, message: str, *, op: str | None = None, module: str | None = None) -> None:
        self.op = op
        self.module = module
        where = ", ".join(
            x for x in (f"op {op}" if op else "", f"module '{module}'" if module else "") if x
        )
        super().__init__(f"{message} ({where})" if where else message)
