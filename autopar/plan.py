"""Plan: the answer autopar gives, as plain data that round-trips through JSON.

The plan imports nothing from the solver: the search fills it in, the CLI renders it, the
emitter applies it. Mesh convention (the same as torchtitan's): ``mesh.dim_names`` is a subset of
``("pp", "dp", "tp")`` in that order, ranks laid out row-major, so ``tp`` is the innermost axis and
neighbouring ranks share a host. ``stages[i].devices`` are the global ranks of pipeline stage i;
an interleaved plan lists one stage per model chunk (``pp * virtual_stages``), chunk c on pipeline
rank ``c % pp``.
Placement strings follow DTensor's short form: ``"R"`` replicate, ``"S(d)"`` shard tensor dim d,
``"P"`` partial sum; a parameter has one per non-``pp`` mesh axis, in ``dim_names`` order.
On ``tp`` a placement says how the parameter is split for compute (Megatron column = ``S(0)``,
row = ``S(1)`` for a Linear weight). On ``dp`` it says how the parameter is *stored* across
data-parallel ranks: ``"R"`` unless ``zero_stage == 3``, where ``"S(d)"`` names the FSDP shard dim
(ZeRO-1/2 shard optimizer state and gradients, not the stored parameter).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from autopar.errors import ConfigError

__all__ = [
    "PLAN_VERSION",
    "Parallel",
    "Mesh",
    "Stage",
    "TimeBreakdown",
    "MemoryBreakdown",
    "Prediction",
    "Alternative",
    "Plan",
    "Schedule",
    "Recompute",
    "parse_placement",
]

PLAN_VERSION = 1
Schedule = Literal["gpipe", "1f1b", "interleaved_1f1b"]
Recompute = Literal["none", "selective", "full"]
MESH_AXES = ("pp", "dp", "tp")
_PLACEMENT = re.compile(r"^(R|P|S\((\d+)\))$")


def parse_placement(text: str) -> tuple[str, int | None]:
    """``"S(1)"`` -> ``("S", 1)``; ``"R"`` -> ``("R", None)``; ``"P"`` -> ``("P", None)``."""
    m = _PLACEMENT.match(text)
    if not m:
        raise ConfigError(f"bad placement {text!r}", field="placements", allowed=("R", "P", "S(d)"))
    return (m.group(1)[0], int(m.group(2)) if m.group(2) is not None else None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Parallel:
    """Degrees of data, tensor and pipeline parallelism; their product is the world size."""

    dp: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp


@dataclass(frozen=True, slots=True, kw_only=True)
class Mesh:
    """Logical device mesh: shape and one name per axis (a subset of pp, dp, tp in that order)."""

    shape: tuple[int, ...]
    dim_names: tuple[str, ...]
    host_mapping: str = ""
    """Human-readable note of which axis lies inside a host and which crosses hosts."""

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.dim_names):
            raise ConfigError("mesh shape and dim_names differ in length", field="mesh")
        order = [MESH_AXES.index(d) for d in self.dim_names if d in MESH_AXES]
        if len(order) != len(self.dim_names) or order != sorted(order):
            raise ConfigError(
                f"dim_names {self.dim_names} must be a subset of {MESH_AXES} in that order",
                field="mesh.dim_names",
                allowed=MESH_AXES,
            )

    def degree(self, axis: str) -> int:
        return self.shape[self.dim_names.index(axis)] if axis in self.dim_names else 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Stage:
    """One pipeline stage: the model layers it holds and the global ranks that run it."""

    layers: tuple[str, ...]
    """Layer names in model order (module paths such as ``"layers.0"``, plus ``"embed"``/``"head"`` parts)."""
    devices: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeBreakdown:
    """Where a step's time goes, in seconds; ``exposed`` parts are on the critical path."""

    compute: float = 0.0
    tp_comm: float = 0.0
    dp_comm: float = 0.0
    pp_bubble: float = 0.0
    pp_comm: float = 0.0
    recompute: float = 0.0
    """Extra forward time spent recomputing activations (part of ``compute``'s neighbour, not inside it)."""
    overlapped_comm: float = 0.0
    """Communication hidden behind compute (not in the step time, shown for the explanation)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryBreakdown:
    """Peak bytes per device on the most loaded stage."""

    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    other: float = 0.0
    capacity: float = 0.0
    """Usable device memory (after headroom)."""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.other


@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    step_time_s: float
    tokens_per_s: float
    tflops_per_device: float
    mfu: float
    memory_gib_per_device: float
    breakdown: TimeBreakdown = field(default_factory=TimeBreakdown)
    memory: MemoryBreakdown = field(default_factory=MemoryBreakdown)


@dataclass(frozen=True, slots=True, kw_only=True)
class Alternative:
    """A runner-up configuration and why it lost to the chosen plan."""

    parallel: Parallel
    microbatches: int
    micro_batch_size: int
    schedule: str
    zero_stage: int
    recompute: str
    step_time_s: float
    memory_gib_per_device: float
    why: str = ""


@dataclass(kw_only=True, slots=True)
class Plan:
    """A complete parallel training plan, JSON-serialisable and self-explaining."""

    model: str
    cluster: str
    num_devices: int
    global_batch: int
    seq_len: int
    dtype: str
    parallel: Parallel
    mesh: Mesh
    stages: tuple[Stage, ...]
    microbatches: int
    micro_batch_size: int
    schedule: str = "1f1b"
    virtual_stages: int = 1
    """Model chunks per device for the interleaved schedule (1 otherwise)."""
    zero_stage: int = 0
    recompute: str = "none"
    sequence_parallel: bool = False
    placements: dict[str, tuple[str, ...]] = field(default_factory=dict)
    predicted: Prediction | None = None
    alternatives: tuple[Alternative, ...] = ()
    landscape: tuple[Alternative, ...] = ()
    """Best plan of each (dp, tp, pp) shape, so a user sees how the choice was made."""
    solver: dict[str, Any] = field(default_factory=dict)
    """Search statistics: time, candidates priced, ILP status and gap."""
    version: int = PLAN_VERSION

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["placements"] = {k: list(v) for k, v in self.placements.items()}
        return d

    def to_json(self, path: str | Path | None = None, *, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<plan>") -> Plan:
        version = d.get("version")
        if version != PLAN_VERSION:
            raise ConfigError(
                f"unsupported plan version {version!r}",
                file=source,
                field="version",
                allowed=(PLAN_VERSION,),
            )
        try:
            pred = d.get("predicted")
            prediction = None
            if pred is not None:
                prediction = Prediction(
                    **{k: v for k, v in pred.items() if k not in ("breakdown", "memory")},
                    breakdown=TimeBreakdown(**pred.get("breakdown", {})),
                    memory=MemoryBreakdown(**pred.get("memory", {})),
                )
            return cls(
                **{f.name: d[f.name] for f in fields(cls) if f.name in d and f.name in _SCALARS},
                parallel=Parallel(**d["parallel"]),
                mesh=Mesh(
                    shape=tuple(d["mesh"]["shape"]),
                    dim_names=tuple(d["mesh"]["dim_names"]),
                    host_mapping=d["mesh"].get("host_mapping", ""),
                ),
                stages=tuple(
                    Stage(layers=tuple(s["layers"]), devices=tuple(s["devices"]))
                    for s in d["stages"]
                ),
                placements={k: tuple(v) for k, v in d.get("placements", {}).items()},
                predicted=prediction,
                alternatives=tuple(_alternative(a) for a in d.get("alternatives", ())),
                landscape=tuple(_alternative(a) for a in d.get("landscape", ())),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"malformed plan ({e})", file=source) from e

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Plan:
        """Parse a plan from a JSON string or a file path."""
        source = "<plan>"
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
            source = str(text_or_path)
            try:
                text = Path(text_or_path).read_text()
            except OSError as e:
                raise ConfigError(f"cannot read plan file ({e.strerror})", file=source) from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"not valid JSON ({e})", file=source) from e
        return cls.from_dict(data, source=source)

    # -- views --------------------------------------------------------------------------------
    @property
    def stage_dim_names(self) -> tuple[str, ...]:
        """Mesh axes inside one pipeline stage (the axes placements refer to)."""
        return tuple(n for n in self.mesh.dim_names if n != "pp")

    def sharding_specs(self) -> dict[str, Any]:
        """Per-parameter ``torch.distributed.tensor`` placements on the stage mesh.

        Returns ``{"mesh_shape": ..., "dim_names": ..., "placements": {fqn: (Placement, ...)}}``
        where the placements refer to the stage mesh (``stage_dim_names``).
        """
        from torch.distributed.tensor import Partial, Replicate, Shard

        def convert(text: str):
            kind, dim = parse_placement(text)
            return Shard(dim) if kind == "S" else Partial() if kind == "P" else Replicate()

        names = self.stage_dim_names
        return {
            "mesh_shape": tuple(self.mesh.degree(n) for n in names),
            "dim_names": names,
            "placements": {k: tuple(convert(p) for p in v) for k, v in self.placements.items()},
        }


_SCALARS = {
    "model", "cluster", "num_devices", "global_batch", "seq_len", "dtype", "microbatches",
    "micro_batch_size", "schedule", "virtual_stages", "zero_stage", "recompute",
    "sequence_parallel", "solver", "version",
}  # fmt: skip


def _alternative(a: dict[str, Any]) -> Alternative:
    return Alternative(**{**a, "parallel": Parallel(**a["parallel"])})
