"""Typed errors: every failure a user can cause says what was wrong and how to fix it.

The search counts ``InfeasibleError`` per candidate instead of pricing infeasible choices with a
sentinel number; the CLI maps ``ConfigError`` to exit code 2 and ``InfeasibleError`` to 3.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import traceback
from collections.abc import Iterable, Sequence

__all__ = [
    "AutoparError",
    "ConfigError",
    "InfeasibleError",
    "TraceError",
    "UserCodeError",
    "user_code_location",
]

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
        self.message = message
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
        memory: str = "device",
    ) -> None:
        self.message = message
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        self.suggestions = tuple(suggestions)
        self.memory = memory
        """Which memory is short: ``device``, or ``host`` (every layout that fits the devices
        offloads more than the host holds)."""
        if memory == "host":
            text = (
                f"{message}: the layouts that fit the devices need at least "
                f"{needed_bytes / GiB:.1f} GiB of host memory per device, each device's share of "
                f"its host is {available_bytes / GiB:.1f} GiB"
            )
        else:
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


class UserCodeError(ConfigError):
    """The user's own code (a model factory, its import or its forward) raised: exit 2 with the
    model spec and the user's exception line, not a traceback through autopar."""

    def __init__(
        self,
        message: str,
        *,
        spec: str | None = None,
        location: str | None = None,
        field: str | None = "model",
        what: str = "model",
    ) -> None:
        self.spec = spec
        self.location = location
        text = f"{what} {spec!r}: {message}" if spec else message
        if location:
            text += f"\n  raised at {location}"
        super().__init__(text, field=field)


def _library_dirs() -> tuple[str, ...]:
    dirs = [os.path.dirname(os.path.abspath(__file__))]  # autopar itself
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "__file__", None):
        dirs.append(os.path.dirname(os.path.abspath(torch.__file__)))
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.append(os.path.abspath(path))
    return tuple(d.rstrip(os.sep) + os.sep for d in dirs)


def user_code_location(exc: BaseException, *, files: Iterable[str] | None = None) -> str | None:
    """``file:line in function: source`` of the innermost frame of ``exc`` (or of the exception
    it was raised from) that is the user's code: with ``files``, a frame in one of them;
    otherwise neither autopar, torch nor the standard library, installed packages only when no
    other frame is left. None when there is no such frame."""
    if isinstance(exc, SyntaxError) and exc.filename:
        text = (exc.text or "").strip()
        return f"{exc.filename}:{exc.lineno}: {text}" if text else f"{exc.filename}:{exc.lineno}"
    wanted = {os.path.abspath(f) for f in files} if files is not None else None
    skip = _library_dirs()
    frames: list[traceback.FrameSummary] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames += reversed(traceback.extract_tb(current.__traceback__))
        current = current.__cause__ or current.__context__

    def ok(frame: traceback.FrameSummary, packages: bool) -> bool:
        name = frame.filename
        if name.startswith("<"):
            return False
        path = os.path.abspath(name)
        if wanted is not None:
            return path in wanted
        if path.startswith(skip):
            return False
        return packages or not any(p in path.split(os.sep) for p in _PACKAGE_DIRS)

    for packages in (False, True):
        for frame in frames:
            if ok(frame, packages):
                where = f"{frame.filename}:{frame.lineno} in {frame.name}"
                return f"{where}: {frame.line.strip()}" if frame.line else where
    return None


_PACKAGE_DIRS = ("site-packages", "dist-packages")
