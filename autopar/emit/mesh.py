"""Device mesh from ``plan.mesh`` and the rank -> pipeline-stage map from ``plan.stages``.

Everything a plan can get wrong is checked here *before* the first collective: a wrong world
size or a misspelt parameter name discovered inside ``init_device_mesh`` or a pipeline send
would hang all ranks or fail with an opaque gloo/NCCL error on one of them. Validation only
reads the plan, the model and the world size, so every rank raises the same ``ConfigError``.

Mesh convention (``autopar.plan``): ``dim_names`` is a subset of ``("pp", "dp", "tp")`` in that
order, ranks are laid out row-major, so ``tp`` is innermost and rank ``r`` has pipeline
coordinate ``r // (dp * tp)``. Pipeline stage ``i`` runs on the ranks whose pipeline coordinate
is ``i % pp`` (the looped placement ``torch.distributed.pipelining`` assumes for interleaved
schedules).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from autopar.errors import ConfigError
from autopar.plan import MESH_AXES, Plan, parse_placement

__all__ = [
    "SCHEDULES",
    "RECOMPUTE_MODES",
    "RankLayout",
    "rank_layout",
    "stages_of_rank",
    "validate_plan",
    "build_device_mesh",
    "default_device_type",
]

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
RECOMPUTE_MODES = ("none", "selective", "full")
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True, slots=True, kw_only=True)
class RankLayout:
    """Where one rank sits in the plan's mesh."""

    rank: int
    coords: tuple[tuple[str, int], ...]
    """``(axis, index)`` for every mesh axis in ``plan.mesh.dim_names`` order."""
    stage_indices: tuple[int, ...]
    """Global pipeline-stage indices this rank runs (more than one only for interleaved 1F1B)."""

    def coord(self, axis: str) -> int:
        """Index along ``axis`` (0 for an axis the mesh does not have, i.e. degree 1)."""
        return dict(self.coords).get(axis, 0)


def _coords(
    rank: int, shape: tuple[int, ...], names: tuple[str, ...]
) -> tuple[tuple[str, int], ...]:
    out = []
    for size, name in zip(reversed(shape), reversed(names)):
        out.append((name, rank % size))
        rank //= size
    return tuple(reversed(out))


def stages_of_rank(plan: Plan, rank: int) -> tuple[int, ...]:
    """Global stage indices whose ``devices`` include ``rank``, in stage order."""
    return tuple(i for i, s in enumerate(plan.stages) if rank in s.devices)


def rank_layout(plan: Plan, rank: int) -> RankLayout:
    """The mesh coordinates and pipeline stages of ``rank`` (assumes a validated plan)."""
    return RankLayout(
        rank=rank,
        coords=_coords(rank, tuple(plan.mesh.shape), tuple(plan.mesh.dim_names)),
        stage_indices=stages_of_rank(plan, rank),
    )


def validate_plan(
    plan: Plan,
    *,
    world_size: int,
    model: nn.Module | None = None,
    model_layer_names: Iterable[str] | None = None,
) -> None:
    """Raise ``ConfigError`` naming the first mismatch between the plan, the world and the model.

    Pure: no collectives, no device work, so it runs identically (and fails identically) on
    every rank before ``init_device_mesh``. ``model_layer_names`` are the names stage layers may
    use (default: the plan's own ``layers``); the emitter then checks them against the model's
    trace.
    """
    _check_mesh(plan, world_size=world_size)
    _check_knobs(plan)
    if model_layer_names is None and plan.layers:
        model_layer_names = [layer.name for layer in plan.layers]
    _check_stages(plan, model_layer_names=model_layer_names)
    if model is not None:
        _check_placements(plan, dict(model.named_parameters(remove_duplicate=False)))


def _check_mesh(plan: Plan, *, world_size: int) -> None:
    mesh_size = 1
    for n in plan.mesh.shape:
        mesh_size *= int(n)
    if mesh_size != world_size:
        raise ConfigError(
            f"plan mesh {tuple(plan.mesh.shape)} over {tuple(plan.mesh.dim_names)} needs "
            f"{mesh_size} ranks but the process group has world size {world_size}; launch with "
            f"`autopar launch plan.json -- script.py` or torchrun --nproc-per-node={mesh_size}",
            field="mesh.shape",
        )
    if plan.num_devices != world_size:
        raise ConfigError(
            f"plan is for {plan.num_devices} devices but the process group has world size "
            f"{world_size}",
            field="num_devices",
        )
    for axis in MESH_AXES:
        want = getattr(plan.parallel, axis)
        have = plan.mesh.degree(axis)
        if want != have:
            raise ConfigError(
                f"parallel.{axis}={want} but the mesh gives axis '{axis}' degree {have}",
                field=f"parallel.{axis}",
            )
    if any(int(n) < 1 for n in plan.mesh.shape):
        raise ConfigError(f"mesh degrees must be >= 1, got {plan.mesh.shape}", field="mesh.shape")


def _check_knobs(plan: Plan) -> None:
    if plan.schedule not in SCHEDULES:
        raise ConfigError(
            f"unknown schedule {plan.schedule!r}", field="schedule", allowed=SCHEDULES
        )
    if plan.recompute not in RECOMPUTE_MODES:
        raise ConfigError(
            f"unknown recompute mode {plan.recompute!r}", field="recompute", allowed=RECOMPUTE_MODES
        )
    if plan.zero_stage not in ZERO_STAGES:
        raise ConfigError(
            f"unknown ZeRO stage {plan.zero_stage!r}", field="zero_stage", allowed=ZERO_STAGES
        )
    if plan.microbatches < 1 or plan.micro_batch_size < 1:
        raise ConfigError(
            f"microbatches={plan.microbatches} and micro_batch_size={plan.micro_batch_size} "
            "must both be >= 1",
            field="microbatches",
        )
    tp = plan.mesh.degree("tp")
    if plan.sequence_parallel and tp > 1 and plan.seq_len % tp:
        raise ConfigError(
            f"sequence parallelism splits seq_len={plan.seq_len} over tp={tp} unevenly",
            field="sequence_parallel",
        )
    if plan.virtual_stages < 1:
        raise ConfigError(
            f"virtual_stages={plan.virtual_stages} must be >= 1", field="virtual_stages"
        )
    if plan.virtual_stages > 1 and plan.schedule != "interleaved_1f1b":
        raise ConfigError(
            f"virtual_stages={plan.virtual_stages} needs the interleaved schedule",
            field="schedule",
            allowed=("interleaved_1f1b",),
        )


def _check_stages(plan: Plan, *, model_layer_names: Iterable[str] | None) -> None:
    pp = plan.parallel.pp
    per_stage = plan.parallel.dp * plan.parallel.tp
    want_stages = pp * plan.virtual_stages
    if len(plan.stages) != want_stages:
        raise ConfigError(
            f"{len(plan.stages)} stages listed but pp={pp} x virtual_stages="
            f"{plan.virtual_stages} needs {want_stages}",
            field="stages",
        )
    world = plan.num_devices
    for i, stage in enumerate(plan.stages):
        coord = i % pp
        expected = tuple(range(coord * per_stage, (coord + 1) * per_stage))
        if tuple(sorted(stage.devices)) != expected:
            raise ConfigError(
                f"stage {i} runs on ranks {tuple(stage.devices)} but with the row-major "
                f"(pp, dp, tp) mesh of {world} ranks it must run on pipeline rank {coord}: "
                f"ranks {expected}",
                field=f"stages[{i}].devices",
            )
    if model_layer_names is None:
        return
    order = list(model_layer_names)
    position = {name: k for k, name in enumerate(order)}
    seen: dict[str, int] = {}
    last = -1
    for i, stage in enumerate(plan.stages):
        for name in stage.layers:
            if name not in position:
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
            if position[name] < last:
                raise ConfigError(
                    f"stage {i} lists {name!r} out of model order",
                    field=f"stages[{i}].layers",
                    allowed=order,
                )
            last = position[name]
            seen[name] = i
    missing = [n for n in order if n not in seen]
    if missing:
        raise ConfigError(
            f"layers {missing} are in no stage (every layer must be placed exactly once)",
            field="stages",
        )


def _check_placements(plan: Plan, params: Mapping[str, torch.Tensor]) -> None:
    axes = plan.stage_dim_names
    unknown = sorted(n for n in plan.placements if n not in params)
    if unknown:
        shown = ", ".join(unknown[:5]) + (
            f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        )
        raise ConfigError(
            f"plan places {len(unknown)} parameter(s) the model does not have: {shown}; "
            f"the model's parameters start with {sorted(params)[:3]}",
            field="placements",
        )
    for name, spec in plan.placements.items():
        if len(spec) != len(axes):
            raise ConfigError(
                f"{name}: {len(spec)} placement(s) {tuple(spec)} for the {len(axes)} stage mesh "
                f"axes {axes}",
                field=f"placements[{name}]",
            )
        shape = tuple(params[name].shape)
        for axis, text in zip(axes, spec):
            kind, dim = parse_placement(text)
            if kind == "P":
                raise ConfigError(
                    f"{name}: a parameter cannot be a partial sum ('P') on axis '{axis}'",
                    field=f"placements[{name}]",
                    allowed=("R", "S(d)"),
                )
            if kind == "S":
                assert dim is not None
                if dim >= len(shape):
                    raise ConfigError(
                        f"{name}: S({dim}) on axis '{axis}' but the parameter has shape {shape}",
                        field=f"placements[{name}]",
                    )
                degree = plan.mesh.degree(axis)
                if axis == "tp" and shape[dim] % degree:
                    raise ConfigError(
                        f"{name}: dim {dim} of shape {shape} does not split evenly over "
                        f"tp={degree}",
                        field=f"placements[{name}]",
                    )


def default_device_type() -> str:
    """``"cuda"`` when the default process group runs NCCL on GPUs, else ``"cpu"`` (gloo)."""
    import torch.distributed as dist

    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return "cuda"
    return "cpu"


def build_device_mesh(plan: Plan, *, device_type: str | None = None):
    """``init_device_mesh`` over the plan's axes; call only after ``validate_plan``.

    Collective (creates one process group per mesh axis slice), so every rank must call it.
    Returns None for a single-device plan, which needs no mesh.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if plan.num_devices == 1:
        return None
    return init_device_mesh(
        device_type or default_device_type(),
        tuple(int(n) for n in plan.mesh.shape),
        mesh_dim_names=tuple(plan.mesh.dim_names),
    )
