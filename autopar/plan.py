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

Version 2 (this one) adds what makes a plan applicable to the model the user brings, exactly as
priced: ``layers`` (every layer with its kind, real module path and structural signature; stages
list these names), ``layouts`` (per distinct layer signature, every op's tp placement of its inputs
and output, in graph order: what the emitter applies op by op), the stated software ``stack``,
the ``model_spec`` to rebuild the model, the ``cluster_info`` to launch it, and ``unknown_ops``.
Version-1 files are refused with a message saying to re-run the search.
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
    "StageCost",
    "LayerSpec",
    "OpPlacement",
    "ClusterInfo",
    "Stack",
    "Plan",
    "Schedule",
    "Recompute",
    "parse_placement",
]

PLAN_VERSION = 2
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
class LayerSpec:
    """One layer of the model as the plan sees it (``Plan.layers``, model order)."""

    name: str
    """``"embed"``, the block's real module path (``"layers.3"``, ``"model.layers.3"``) or
    ``"head"``: labels, never decisions."""
    kind: str
    """``"embed"``, ``"block"`` or ``"head"``."""
    signature: str = ""
    """Structural signature: layers sharing it share ``Plan.layouts[signature]``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OpPlacement:
    """One op of a layer on the tp axis, as the ILP placed it (DTensor short form)."""

    op: str
    """The aten overload (``"aten.mm.default"``): checked against the model's trace."""
    inputs: tuple[str, ...]
    """Placement of each tensor input as the op consumes it."""
    output: str
    """Placement of the op's first output as produced."""
    core: bool = False
    """Part of the attention core, re-run under selective recompute."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterInfo:
    """The cluster as it was loaded, so ``launch`` lays ranks out the same way."""

    name: str
    path: str | None = None
    """The topology file when it was not a shipped one."""
    nodes: int = 1
    devices_per_host: int = 1
    device: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Stack:
    """The software stack the plan was priced for (``--stack`` and its flags)."""

    name: str | None = None
    attention: str = "flash"
    """``"flash"`` (fused attention kernel) or ``"unfused"`` (scores materialised)."""
    sequence_parallel: str = "auto"
    """``"auto"`` (searched), ``"on"`` or ``"off"``: what the search was allowed."""
    overlap_grad_reduce: bool = True
    """Data-parallel gradient reduction overlapped with backward (DDP buckets / FSDP)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Stage:
    """One pipeline stage: the model layers it holds and the global ranks that run it."""

    layers: tuple[str, ...]
    """Names from ``Plan.layers`` in model order."""
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
class StageCost:
    """One plan stage (an interleaved chunk) per microbatch, as the pipeline model prices it."""

    fwd_s: float
    """Forward of the stage's layers: compute, exposed tensor-parallel comm, ZeRO-3 gathers."""
    bwd_s: float
    """Backward: recompute, gradients, exposed tensor-parallel comm, ZeRO-3 traffic."""
    send_s: float
    """Sending its output to the next stage (the gradient coming back costs the same)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    step_time_s: float
    tokens_per_s: float
    """Tokens (token models) or samples per second."""
    tflops_per_device: float
    mfu: float
    memory_gib_per_device: float
    breakdown: TimeBreakdown = field(default_factory=TimeBreakdown)
    memory: MemoryBreakdown = field(default_factory=MemoryBreakdown)
    stages: tuple[StageCost, ...] = ()
    """Per plan stage, what one microbatch costs (the schedule model's inputs)."""
    rank_memory: tuple[MemoryBreakdown, ...] = ()
    """Peak memory per pipeline rank."""
    rank_tail_s: tuple[float, ...] = ()
    """Per pipeline rank, after its last backward: exposed gradient sync and optimizer step."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Alternative:
    """A runner-up configuration; ``explain`` says why it lost from its breakdown."""

    parallel: Parallel
    microbatches: int
    micro_batch_size: int
    schedule: str
    zero_stage: int
    recompute: str
    step_time_s: float
    memory_gib_per_device: float
    sequence_parallel: bool = False
    virtual_stages: int = 1
    breakdown: TimeBreakdown = field(default_factory=TimeBreakdown)


@dataclass(kw_only=True, slots=True)
class Plan:
    """A complete parallel training plan, JSON-serialisable and self-explaining."""

    model: str
    cluster: str
    num_devices: int
    global_batch: int
    seq_len: int | None
    """Tokens per sample for token models; None for others (images, features)."""
    dtype: str
    parallel: Parallel
    mesh: Mesh
    stages: tuple[Stage, ...]
    microbatches: int
    micro_batch_size: int
    layers: tuple[LayerSpec, ...] = ()
    """Every layer in model order; stages list their names."""
    model_spec: str | None = None
    """What rebuilds the model: a zoo spec, ``pkg.mod:factory``, ``hf:Config:...`` (None for a
    model object passed to the API)."""
    model_facts: dict[str, Any] = field(default_factory=dict)
    """Architecture facts from the model's config (labels for exports)."""
    cluster_info: ClusterInfo | None = None
    optimizer: str = "adam"
    stack: Stack = field(default_factory=Stack)
    schedule: str = "1f1b"
    virtual_stages: int = 1
    """Model chunks per device for the interleaved schedule (1 otherwise)."""
    zero_stage: int = 0
    recompute: str = "none"
    sequence_parallel: bool = False
    placements: dict[str, tuple[str, ...]] = field(default_factory=dict)
    layouts: dict[str, tuple[OpPlacement, ...]] = field(default_factory=dict)
    """Per layer signature: its ops' tp layouts in graph order (empty when tp == 1)."""
    unknown_ops: dict[str, int] = field(default_factory=dict)
    """Ops no sharding rule knows (aten name -> count in the model): run replicated."""
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

    @property
    def layer_kinds(self) -> dict[str, str]:
        """Layer name -> kind (``embed`` / ``block`` / ``head``)."""
        return {layer.name: layer.kind for layer in self.layers}

    def to_json(self, path: str | Path | None = None, *, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<plan>") -> Plan:
        if not isinstance(d, dict):
            raise ConfigError(
                f"a plan is a JSON object, got {type(d).__name__}", file=source, field="<root>"
            )
        version = d.get("version")
        if version != PLAN_VERSION:
            hint = (
                "; it was written by an older autopar without per-op layouts: re-run "
                "`autopar plan ... --json` to get a plan this version can apply"
                if version == 1
                else ""
            )
            raise ConfigError(
                f"unsupported plan version {version!r}{hint}",
                file=source,
                field="version",
                allowed=(PLAN_VERSION,),
            )
        try:
            pred = d.get("predicted")
            prediction = None
            if pred is not None:
                nested = ("breakdown", "memory", "stages", "rank_memory", "rank_tail_s")
                prediction = Prediction(
                    **{k: v for k, v in pred.items() if k not in nested},
                    breakdown=TimeBreakdown(**pred.get("breakdown", {})),
                    memory=MemoryBreakdown(**pred.get("memory", {})),
                    stages=tuple(StageCost(**x) for x in pred.get("stages", ())),
                    rank_memory=tuple(MemoryBreakdown(**x) for x in pred.get("rank_memory", ())),
                    rank_tail_s=tuple(pred.get("rank_tail_s", ())),
                )
            info = d.get("cluster_info")
            return cls(
                **{f.name: d[f.name] for f in fields(cls) if f.name in d and f.name in _SCALARS},
                parallel=Parallel(**d["parallel"]),
                mesh=Mesh(shape=tuple(d["mesh"]["shape"]), dim_names=tuple(d["mesh"]["dim_names"])),
                stages=tuple(
                    Stage(layers=tuple(s["layers"]), devices=tuple(s["devices"]))
                    for s in d["stages"]
                ),
                layers=tuple(LayerSpec(**x) for x in d.get("layers", ())),
                cluster_info=ClusterInfo(**info) if info is not None else None,
                stack=Stack(**d.get("stack", {})),
                placements={k: tuple(v) for k, v in d.get("placements", {}).items()},
                layouts={
                    sig: tuple(
                        OpPlacement(
                            op=o["op"],
                            inputs=tuple(o["inputs"]),
                            output=o["output"],
                            core=bool(o.get("core", False)),
                        )  # fmt: skip
                        for o in ops
                    )
                    for sig, ops in d.get("layouts", {}).items()
                },
                predicted=prediction,
                alternatives=tuple(_alternative(a) for a in d.get("alternatives", ())),
                landscape=tuple(_alternative(a) for a in d.get("landscape", ())),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"malformed plan ({type(e).__name__}: {e})", file=source) from e

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Plan:
        """Parse a plan from a JSON string or a file path."""
        source = "<plan>"
        text = str(text_or_path)
        if not isinstance(text_or_path, str | Path):
            raise ConfigError(
                f"expected a JSON string or a file path, got {type(text_or_path).__name__}",
                field="plan",
            )
        if isinstance(text_or_path, Path) or not text.lstrip().startswith(("{", "[")):
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
    "sequence_parallel", "solver", "version", "model_spec", "model_facts", "optimizer",
    "unknown_ops",
}  # fmt: skip


def _alternative(a: dict[str, Any]) -> Alternative:
    return Alternative(
        **{
            **a,
            "parallel": Parallel(**a["parallel"]),
            "breakdown": TimeBreakdown(**a.get("breakdown", {})),
        }
    )
