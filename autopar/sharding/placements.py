"""Placements: how one tensor is laid out over one mesh axis, in DTensor's vocabulary.

A *spec* is a tuple with one placement per mesh axis (``("S(0)", "R")`` on a (dp, tp) mesh means
"split dim 0 over dp, replicated over tp"). Keeping the same three kinds as
``torch.distributed.tensor`` (Shard(dim) / Replicate / Partial) means a solved plan turns into
``distribute_tensor`` calls with no translation table; the string form is the one ``Plan`` stores.
This module never imports torch at import time: only ``to_torch`` does, on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autopar.errors import ConfigError

__all__ = [
    "Shard",
    "Replicate",
    "Partial",
    "Placement",
    "Spec",
    "REPLICATE",
    "PARTIAL",
    "parse",
    "spec_from_strings",
    "spec_strings",
    "replicated",
    "shard_factor",
    "local_numel_fraction",
    "to_torch",
    "spec_to_torch",
]


@dataclass(frozen=True, slots=True)
class Shard:
    """Tensor dim ``dim`` is split evenly over the axis's devices."""

    dim: int

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True, slots=True)
class Replicate:
    """Every device of the axis holds the whole tensor."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True, slots=True)
class Partial:
    """Every device holds a same-shaped partial sum; the true value is their sum."""

    def __str__(self) -> str:
        return "P"


Placement = Shard | Replicate | Partial
Spec = tuple[Placement, ...]
REPLICATE = Replicate()
PARTIAL = Partial()


def parse(text: str) -> Placement:
    """``"S(1)"`` -> ``Shard(1)``, ``"R"`` -> ``Replicate()``, ``"P"`` -> ``Partial()``."""
    t = text.strip()
    if t == "R":
        return REPLICATE
    if t == "P":
        return PARTIAL
    if t.startswith("S(") and t.endswith(")") and t[2:-1].isdigit():
        return Shard(int(t[2:-1]))
    raise ConfigError(f"bad placement {text!r}", field="placements", allowed=("R", "P", "S(d)"))


def spec_from_strings(texts: tuple[str, ...] | list[str]) -> Spec:
    return tuple(parse(t) for t in texts)


def spec_strings(spec: Spec) -> tuple[str, ...]:
    """The string form stored in ``Plan.placements``."""
    return tuple(str(p) for p in spec)


def replicated(ndim_mesh: int) -> Spec:
    return (REPLICATE,) * ndim_mesh


def shard_factor(spec: Spec, mesh_shape: tuple[int, ...], dim: int) -> int:
    """How many pieces tensor dim ``dim`` is cut into by ``spec`` (product over the axes)."""
    f = 1
    for p, n in zip(spec, mesh_shape):
        if isinstance(p, Shard) and p.dim == dim:
            f *= n
    return f


def local_numel_fraction(spec: Spec, mesh_shape: tuple[int, ...], *, skip_axis: int = -1) -> float:
    """Fraction of the tensor one device holds (Partial and Replicate keep the whole shape).

    ``skip_axis`` ignores one axis: the per-device buffer a collective on that axis moves.
    """
    f = 1.0
    for a, (p, n) in enumerate(zip(spec, mesh_shape)):
        if a != skip_axis and isinstance(p, Shard):
            f /= n
    return f


def to_torch(placement: Placement | str) -> Any:
    """The matching ``torch.distributed.tensor`` placement object."""
    from torch.distributed.tensor import Partial as TPartial
    from torch.distributed.tensor import Replicate as TReplicate
    from torch.distributed.tensor import Shard as TShard

    p = parse(placement) if isinstance(placement, str) else placement
    if isinstance(p, Shard):
        return TShard(p.dim)
    if isinstance(p, Partial):
        return TPartial()
    return TReplicate()


def spec_to_torch(spec: Spec | tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(to_torch(p) for p in spec)
