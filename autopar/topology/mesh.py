"""Logical device meshes: one vocabulary of axis names and the rank groups of each axis.

Convention (the same as ``autopar.plan.Mesh`` and torchtitan's ``ParallelDims``): ranks are laid
out row-major over ``shape`` starting at ``first_rank``, the last axis innermost. With
``dim_names=("pp", "dp", "tp")`` neighbouring ranks differ in ``tp`` first, so on hosts of 8
devices a tp degree up to 8 stays inside a host and ``dp`` / ``pp`` cross hosts.

``first_rank`` lets a pipeline stage own a sub-mesh: stage i of a (pp, dp, tp) layout is the
(dp, tp) mesh whose first rank is ``i * dp * tp``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from autopar.errors import ConfigError

__all__ = ["MeshAxis", "LogicalMesh"]


class MeshAxis(str, enum.Enum):
    """The mesh axis names autopar knows, validated here and nowhere else."""

    PP = "pp"
    DP = "dp"
    TP = "tp"

    def __str__(self) -> str:
        return self.value


_AXIS_NAMES = tuple(a.value for a in MeshAxis)
_HASH_KEY = ("__hash__",)  # cache slot for the hash; no axis name is a tuple


@dataclass(frozen=True, slots=True)
class LogicalMesh:
    """A row-major grid of global ranks with one named axis per dimension."""

    shape: tuple[int, ...]
    """Degree of each axis."""
    dim_names: tuple[str, ...]
    """One distinct name per axis, from :class:`MeshAxis` (plain strings or enum members)."""
    first_rank: int = 0
    """Global rank of the mesh's element (0, 0, ...)."""
    _groups: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        names = tuple(
            str(MeshAxis(n).value) if isinstance(n, MeshAxis) else n for n in self.dim_names
        )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dim_names", names)
        if len(shape) != len(names):
            raise ConfigError(
                f"shape {shape} and dim_names {names} differ in length", field="mesh.dim_names"
            )
        for n in names:
            if n not in _AXIS_NAMES:
                raise ConfigError(
                    f"unknown mesh axis {n!r}", field="mesh.dim_names", allowed=_AXIS_NAMES
                )
        if len(set(names)) != len(names):
            raise ConfigError(f"repeated mesh axis in {names}", field="mesh.dim_names")
        for d in shape:
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ConfigError(
                    f"mesh degrees must be positive integers, got {shape}", field="mesh.shape"
                )
        if (
            isinstance(self.first_rank, bool)
            or not isinstance(self.first_rank, int)
            or self.first_rank < 0
        ):
            raise ConfigError(
                f"first_rank must be >= 0, got {self.first_rank!r}", field="mesh.first_rank"
            )

    def __hash__(self) -> int:
        # frozen: hash once (meshes key the collective-price caches, called millions of times)
        h = self._groups.get(_HASH_KEY)
        if h is None:
            h = self._groups[_HASH_KEY] = hash((self.shape, self.dim_names, self.first_rank))
        return h

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.size)

    def axis_index(self, axis_name: str | MeshAxis) -> int:
        name = axis_name.value if isinstance(axis_name, MeshAxis) else axis_name
        try:
            return self.dim_names.index(name)
        except ValueError:
            raise ConfigError(
                f"mesh {self.dim_names} has no axis {name!r}", field="axis", allowed=self.dim_names
            ) from None

    def axis_size(self, axis_name: str | MeshAxis) -> int:
        return self.shape[self.axis_index(axis_name)]

    def groups(self, axis_name: str | MeshAxis) -> tuple[tuple[int, ...], ...]:
        """Rank groups that communicate along ``axis_name``: one tuple per setting of the other
        axes, ranks in axis order. Cached on the (frozen) mesh."""
        hit = self._groups.get(axis_name)
        if hit is not None:
            return hit
        ax = self.axis_index(axis_name)
        strides = [math.prod(self.shape[i + 1 :]) for i in range(self.ndim)]
        others = [i for i in range(self.ndim) if i != ax]
        out = []
        for idx in _product([self.shape[i] for i in others]):
            base = self.first_rank + sum(strides[i] * j for i, j in zip(others, idx))
            out.append(tuple(base + strides[ax] * t for t in range(self.shape[ax])))
        result = tuple(out)
        self._groups[axis_name] = result
        return result

    def coordinates(self, rank: int) -> dict[str, int]:
        """Axis name -> index of global ``rank`` in this mesh."""
        off = rank - self.first_rank
        if not 0 <= off < self.size:
            raise ConfigError(f"rank {rank} not in mesh ranks {self.ranks}", field="rank")
        out = {}
        for name, d in zip(reversed(self.dim_names), reversed(self.shape)):
            out[name] = off % d
            off //= d
        return {n: out[n] for n in self.dim_names}


def _product(dims: list[int]) -> list[tuple[int, ...]]:
    result: list[tuple[int, ...]] = [()]
    for d in dims:
        result = [r + (i,) for r in result for i in range(d)]
    return result
