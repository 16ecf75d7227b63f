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

import dataclasses
import functools
import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from autopar.config import RECOMPUTE_KINDS, Optimizer
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
    loss: bool = False
    """Part of the training loss priced after the model (the emitter runs the loss itself)."""


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
    grad_dtype: str | None = None
    """Dtype gradients were priced in (accumulated and reduced); None: the plan's dtype."""
    pipeline_scatter_gather: bool = False
    """Pipeline sends replicated over tp priced as 1/tp per rank plus an all-gather over tp."""


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
    offload: float = 0.0
    """Exposed host<->device copies, NVMe traffic and the CPU's optimizer step (offload)."""


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
    host: float = 0.0
    """Host memory this device uses (offloaded model state and activations)."""
    host_capacity: float = 0.0
    """Host memory one device may use (its share of the host, after headroom)."""

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
    offload: str = "none"
    """Model-state offload (``none``, ``optimizer``, ``full``)."""
    recompute_blocks: int = 0
    """Blocks fully recomputed on top of ``recompute`` (per-stage relief)."""
    offload_blocks: int = 0
    """Blocks whose saved activations go to host memory."""


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
    recompute_layers: tuple[str, ...] = ()
    """Blocks fully recomputed on top of ``recompute``, by layer name: the search relieves only
    the pipeline ranks over capacity, and only by as many blocks as each needs."""
    offload: str = "none"
    """Model state off the device: ``none``, ``optimizer`` (ZeRO-Offload) or ``full`` (FSDP2
    CPU offload of weights, gradients and optimizer state)."""
    offload_device: str = "cpu"
    """Where offloaded optimizer state lives: ``cpu`` or ``nvme``."""
    activation_offload_layers: tuple[str, ...] = ()
    """Blocks whose saved activations are kept in host memory during the step, by layer name."""
    sequence_parallel: bool = False
    placements: dict[str, tuple[str, ...]] = field(default_factory=dict)
    layouts: dict[str, tuple[OpPlacement, ...]] = field(default_factory=dict)
    """Per layer signature: its ops' tp layouts in graph order (empty when tp == 1)."""
    unknown_ops: dict[str, int] = field(default_factory=dict)
    """Ops no sharding rule knows (aten name -> count in the model): run replicated."""
    indivisible_params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Weight matrices replicated over tp with a dimension tp does not divide (name -> shape):
    e.g. a 50257-row vocabulary at tp 4 cannot be split by rows (the sharding rules split
    evenly). Padding that dimension would offer the split."""
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
        """A plan from its JSON form, type-checked field by field and validated
        (``Plan.validate``); any mismatch is a ``ConfigError`` naming the file and field."""
        if not isinstance(d, dict):
            raise ConfigError(
                f"a plan is a JSON object, got {type(d).__name__}", file=source, field="<root>"
            )
        _check_version(d.get("version"), file=source)
        try:
            plan = _decode_dataclass(Plan, d, "")
            _check_consistency(plan)
        except ConfigError as e:
            if e.file is not None:
                raise
            raise ConfigError(e.message, file=source, field=e.field, allowed=e.allowed) from None
        return plan

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first field that is wrong: its type or range, or an
        inconsistency between fields (the rules are listed in ``_check_consistency``).

        Pure: reads only the plan. ``from_dict`` / ``from_json`` run it, so a plan read from a
        file is valid; the CLI runs it before rendering, exporting or launching a plan.
        """
        _check_version(self.version, file=None)
        _decode_dataclass(Plan, self.to_dict(), "")  # types of every field, as in JSON
        _check_consistency(self)

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
    def grad_dtype(self) -> str:
        """Dtype gradients were priced in: the stack's, else the training dtype."""
        return self.stack.grad_dtype or self.dtype

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


# ---------------------------------------------------------------------------------------------
# JSON decoding (types) and validation (ranges and consistency)
# ---------------------------------------------------------------------------------------------
DTYPES = ("bf16", "fp16", "fp32")
OPTIMIZERS = typing.get_args(Optimizer)
OFFLOAD_MODES = ("none", "optimizer", "full")
OFFLOAD_DEVICES = ("cpu", "nvme")
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
RECOMPUTE_MODES = RECOMPUTE_KINDS
ZERO_STAGES = (0, 1, 2, 3)
LAYER_KINDS = ("embed", "block", "head")
ATTENTION_KERNELS = ("flash", "unfused")
SEQUENCE_PARALLEL_MODES = ("auto", "on", "off")


def _check_version(version: object, *, file: str | None) -> None:
    if version != PLAN_VERSION or isinstance(version, bool):
        hint = (
            "; it was written by an older autopar without per-op layouts: re-run "
            "`autopar plan ... --json` to get a plan this version can apply"
            if version == 1
            else ""
        )
        raise ConfigError(
            f"unsupported plan version {version!r}{hint}",
            file=file,
            field="version",
            allowed=(PLAN_VERSION,),
        )


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


_KIND_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _type_error(hint: Any, value: Any, path: str) -> ConfigError:
    if hint in _KIND_WORDS:
        want = _KIND_WORDS[hint]
    elif typing.get_origin(hint) is tuple:
        want = "a list"
    elif typing.get_origin(hint) is dict or dataclasses.is_dataclass(hint):
        want = "an object"
    else:
        want = str(hint)
    return ConfigError(f"expected {want}, got {value!r}", field=path or "<root>")


def _decode(hint: Any, value: Any, path: str) -> Any:
    """``value`` (JSON data) as type ``hint``: checked, lists made tuples, objects dataclasses."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(args[0], value, path)
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value, path)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _type_error(hint, value, path)
        item = typing.get_args(hint)[0]
        return tuple(_decode(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(hint, value, path)
        item = typing.get_args(hint)[1]
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"keys must be strings, got {k!r}", field=path)
            out[k] = _decode(item, v, f"{path}[{k}]")
        return out
    if dataclasses.is_dataclass(hint):
        return _decode_dataclass(hint, value, path)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif hint is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a field type this decoder does not know
        raise TypeError(f"cannot decode {hint!r}")
    if not ok:
        raise _type_error(hint, value, path)
    return value


def _decode_dataclass(cls: type, value: Any, path: str) -> Any:
    """Keys this version does not know are ignored (optional fields added later); a missing
    required field or a wrong type is a ConfigError naming the field."""
    if not isinstance(value, dict):
        raise _type_error(cls, value, path)
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        where = _join(path, f.name)
        if f.name in value:
            kwargs[f.name] = _decode(hints[f.name], value[f.name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError("missing", field=where)
    return cls(**kwargs)


def _at_least(value: int, minimum: int, field: str) -> None:
    if value < minimum:
        raise ConfigError(f"must be >= {minimum}, got {value}", field=field)


def _one_of(value: object, allowed: tuple, field: str) -> None:
    if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
        raise ConfigError(f"unknown value {value!r}", field=field, allowed=allowed)


ROUNDING = 1e-9
"""Negative numbers down to this fraction of the largest number beside them are rounding (a
bubble priced as the difference of two nearly equal times), not errors."""


def _finite(obj: Any, path: str) -> None:
    """Every number in a prediction or alternative is finite and not negative (beyond rounding)."""
    numbers: list[tuple[str, float]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        where = _join(path, f.name)
        if dataclasses.is_dataclass(value):
            _finite(value, where)
        elif isinstance(value, tuple):
            for i, v in enumerate(value):
                if dataclasses.is_dataclass(v):
                    _finite(v, f"{where}[{i}]")
                elif isinstance(v, int | float) and not isinstance(v, bool):
                    numbers.append((f"{where}[{i}]", v))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            numbers.append((where, value))
    for where, v in numbers:
        if not math.isfinite(v):
            raise ConfigError(f"must be a finite number, got {v}", field=where)
    scale = max((abs(v) for _, v in numbers), default=0.0)
    for where, v in numbers:
        if v < -ROUNDING * scale:
            raise ConfigError(f"must be >= 0, got {v}", field=where)


def _check_alternative(a: Alternative, path: str) -> None:
    for axis in MESH_AXES:
        _at_least(getattr(a.parallel, axis), 1, f"{path}.parallel.{axis}")
    _at_least(a.microbatches, 1, f"{path}.microbatches")
    _at_least(a.micro_batch_size, 1, f"{path}.micro_batch_size")
    _at_least(a.virtual_stages, 1, f"{path}.virtual_stages")
    _one_of(a.schedule, SCHEDULES, f"{path}.schedule")
    _one_of(a.zero_stage, ZERO_STAGES, f"{path}.zero_stage")
    _one_of(a.recompute, RECOMPUTE_MODES, f"{path}.recompute")
    _finite(a, path)


def _check_consistency(plan: Plan) -> None:
    """Ranges and the rules that tie fields together, each error naming one field:

    * counts >= 1; dtype, optimizer, schedule, recompute, ZeRO stage and stack choices known;
    * the mesh has each axis once, its degrees are ``parallel``'s, and dp x tp x pp (and the
      mesh) equal ``num_devices``, which is the cluster's hosts x devices per host;
    * ``global_batch = dp x microbatches x micro_batch_size``; a pipeline has at least ``pp``
      microbatches; the interleaved schedule needs pp >= 2 and microbatches divisible by pp
      (Megatron's schedule, what the search prices), ``virtual_stages > 1`` needs it;
    * ``pp x virtual_stages`` stages, stage ``i`` on the ranks of pipeline rank ``i % pp`` in the
      row-major (pp, dp, tp) layout, and the stages list ``layers`` once each, in model order;
    * sequence parallelism splits a token sequence evenly over tp;
    * placements parse, one per non-pp mesh axis, never a partial sum on a parameter; op layouts
      parse; predicted and runner-up numbers are finite and not negative.
    """
    p = plan.parallel
    _at_least(plan.num_devices, 1, "num_devices")
    _at_least(plan.global_batch, 1, "global_batch")
    if plan.seq_len is not None:
        _at_least(plan.seq_len, 1, "seq_len")
    _one_of(plan.dtype, DTYPES, "dtype")
    _one_of(plan.optimizer, OPTIMIZERS, "optimizer")
    for axis in MESH_AXES:
        _at_least(getattr(p, axis), 1, f"parallel.{axis}")
    for i, n in enumerate(plan.mesh.shape):
        _at_least(n, 1, f"mesh.shape[{i}]")
    if len(set(plan.mesh.dim_names)) != len(plan.mesh.dim_names):
        raise ConfigError(
            f"dim_names {plan.mesh.dim_names} repeat an axis",
            field="mesh.dim_names",
            allowed=MESH_AXES,
        )
    _at_least(plan.microbatches, 1, "microbatches")
    _at_least(plan.micro_batch_size, 1, "micro_batch_size")
    _at_least(plan.virtual_stages, 1, "virtual_stages")
    _one_of(plan.schedule, SCHEDULES, "schedule")
    _one_of(plan.zero_stage, ZERO_STAGES, "zero_stage")
    _one_of(plan.recompute, RECOMPUTE_MODES, "recompute")
    _one_of(plan.offload, OFFLOAD_MODES, "offload")
    _one_of(plan.offload_device, OFFLOAD_DEVICES, "offload_device")
    blocks = {layer.name for layer in plan.layers if layer.kind == "block"}
    for name in ("recompute_layers", "activation_offload_layers"):
        for layer in getattr(plan, name):
            if plan.layers and layer not in blocks:
                raise ConfigError(
                    f"{name} lists {layer!r}, which is not a block layer of the plan",
                    field=name,
                )
    _one_of(plan.stack.attention, ATTENTION_KERNELS, "stack.attention")
    _one_of(plan.stack.sequence_parallel, SEQUENCE_PARALLEL_MODES, "stack.sequence_parallel")
    if plan.stack.grad_dtype is not None:
        _one_of(plan.stack.grad_dtype, DTYPES, "stack.grad_dtype")

    # the mesh, the degrees and the device count
    for axis in MESH_AXES:
        have = plan.mesh.degree(axis)
        if getattr(p, axis) != have:
            raise ConfigError(
                f"parallel.{axis}={getattr(p, axis)} but the mesh {tuple(plan.mesh.shape)} over "
                f"{tuple(plan.mesh.dim_names)} gives axis '{axis}' degree {have}",
                field=f"parallel.{axis}",
            )
    if p.world_size != plan.num_devices:
        raise ConfigError(
            f"plan is for {plan.num_devices} devices but dp x tp x pp = {p.dp} x {p.tp} x "
            f"{p.pp} = {p.world_size}",
            field="num_devices",
        )
    mesh_size = math.prod(plan.mesh.shape)
    if mesh_size != plan.num_devices:
        raise ConfigError(
            f"mesh {tuple(plan.mesh.shape)} has {mesh_size} ranks, the plan {plan.num_devices} "
            "devices (an axis of degree 1 may be left out, no other)",
            field="mesh.shape",
        )
    info = plan.cluster_info
    if info is not None:
        _at_least(info.nodes, 1, "cluster_info.nodes")
        _at_least(info.devices_per_host, 1, "cluster_info.devices_per_host")
        if info.nodes * info.devices_per_host != plan.num_devices:
            raise ConfigError(
                f"the cluster has {info.nodes} hosts x {info.devices_per_host} devices = "
                f"{info.nodes * info.devices_per_host} devices but the plan is for "
                f"{plan.num_devices}",
                field="cluster_info.nodes",
            )

    _check_stages(plan)
    _check_placements(plan)

    # batch, microbatches and the schedule
    per_step = p.dp * plan.microbatches * plan.micro_batch_size
    if per_step != plan.global_batch:
        raise ConfigError(
            f"global_batch={plan.global_batch} but dp x microbatches x micro_batch_size = "
            f"{p.dp} x {plan.microbatches} x {plan.micro_batch_size} = {per_step}",
            field="global_batch",
        )
    if p.pp > 1 and plan.microbatches < p.pp:
        raise ConfigError(
            f"microbatches={plan.microbatches} < pp={p.pp}: a pipeline needs at least one "
            "microbatch per stage",
            field="microbatches",
        )
    if plan.virtual_stages > 1 and plan.schedule != "interleaved_1f1b":
        raise ConfigError(
            f"virtual_stages={plan.virtual_stages} needs the interleaved schedule",
            field="schedule",
            allowed=("interleaved_1f1b",),
        )
    if plan.schedule == "interleaved_1f1b":
        if p.pp < 2:
            raise ConfigError(
                "interleaved_1f1b needs a pipeline (pp >= 2)", field="schedule", allowed=SCHEDULES
            )
        if plan.microbatches % p.pp:
            raise ConfigError(
                f"interleaved_1f1b needs microbatches divisible by pp: {plan.microbatches} "
                f"microbatches, pp={p.pp}",
                field="microbatches",
            )
    tp = p.tp
    if plan.sequence_parallel and tp > 1 and plan.seq_len is not None and plan.seq_len % tp:
        raise ConfigError(
            f"sequence parallelism splits seq_len={plan.seq_len} over tp={tp} unevenly",
            field="sequence_parallel",
        )

    if plan.predicted is not None:
        _finite(plan.predicted, "predicted")
        if plan.predicted.step_time_s <= 0:
            raise ConfigError(
                f"must be > 0, got {plan.predicted.step_time_s}", field="predicted.step_time_s"
            )
    for name in ("alternatives", "landscape"):
        for i, a in enumerate(getattr(plan, name)):
            _check_alternative(a, f"{name}[{i}]")


def _check_stages(plan: Plan) -> None:
    p = plan.parallel
    want = p.pp * plan.virtual_stages
    if len(plan.stages) != want:
        raise ConfigError(
            f"{len(plan.stages)} stages listed but pp={p.pp} x virtual_stages="
            f"{plan.virtual_stages} needs {want}",
            field="stages",
        )
    per_stage = p.dp * p.tp
    for i, stage in enumerate(plan.stages):
        coord = i % p.pp
        expected = tuple(range(coord * per_stage, (coord + 1) * per_stage))
        if tuple(sorted(stage.devices)) != expected:
            raise ConfigError(
                f"stage {i} runs on ranks {tuple(stage.devices)} but with the row-major "
                f"(pp, dp, tp) mesh of {plan.num_devices} ranks it must run on pipeline rank "
                f"{coord}: ranks {expected}",
                field=f"stages[{i}].devices",
            )
        if not stage.layers:
            raise ConfigError(f"stage {i} holds no layers", field=f"stages[{i}].layers")
    names = [layer.name for layer in plan.layers]
    for i, layer in enumerate(plan.layers):
        _one_of(layer.kind, LAYER_KINDS, f"layers[{i}].kind")
        if names.index(layer.name) != i:
            raise ConfigError(f"layer {layer.name!r} is listed twice", field=f"layers[{i}].name")
    check_stage_layers(plan, names or None)


def check_stage_layers(plan: Plan, order: list[str] | None) -> None:
    """Every stage layer is in ``order`` (when given), once, in model order, and (when given)
    every layer of ``order`` is in a stage."""
    position = {name: k for k, name in enumerate(order)} if order is not None else None
    seen: dict[str, int] = {}
    last = -1
    for i, stage in enumerate(plan.stages):
        for name in stage.layers:
            if position is not None and name not in position:
                raise ConfigError(
                    f"stage {i} names layer {name!r} which the model does not have",
                    field=f"stages[{i}].layers",
                    allowed=order,
                )
            if name in seen:
                raise ConfigError(
                    f"layer {name!r} is in stage {seen[name]} and stage {i}",
                    field=f"stages[{i}].layers",
                )
            if position is not None:
                if position[name] < last:
                    raise ConfigError(
                        f"stage {i} lists {name!r} out of model order",
                        field=f"stages[{i}].layers",
                        allowed=order,
                    )
                last = position[name]
            seen[name] = i
    if order is not None:
        missing = [n for n in order if n not in seen]
        if missing:
            raise ConfigError(
                f"layers {missing} are in no stage (every layer must be placed exactly once)",
                field="stages",
            )


def _check_placements(plan: Plan) -> None:
    axes = plan.stage_dim_names
    for name, spec in plan.placements.items():
        where = f"placements[{name}]"
        if len(spec) != len(axes):
            raise ConfigError(
                f"{name}: {len(spec)} placement(s) {tuple(spec)} for the {len(axes)} stage mesh "
                f"axes {axes}",
                field=where,
            )
        for axis, text in zip(axes, spec):
            kind, _ = _parse_at(text, where)
            if kind == "P":
                raise ConfigError(
                    f"{name}: a parameter cannot be a partial sum ('P') on axis '{axis}'",
                    field=where,
                    allowed=("R", "S(d)"),
                )
    for sig, ops in plan.layouts.items():
        for i, op in enumerate(ops):
            where = f"layouts[{sig}][{i}]"
            for j, text in enumerate(op.inputs):
                _parse_at(text, f"{where}.inputs[{j}]")
            _parse_at(op.output, f"{where}.output")


def _parse_at(text: str, field: str) -> tuple[str, int | None]:
    try:
        return parse_placement(text)
    except ConfigError as e:
        raise ConfigError(e.message, field=field, allowed=e.allowed) from None
