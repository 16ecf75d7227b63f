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
from autopar.plan import (
    RECOMPUTE_MODES,
    SCHEDULES,
    Plan,
    check_stage_layers,
    parse_placement,
)

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
    every rank before ``init_device_mesh``. First ``plan.validate()`` (the plan on its own:
    types, ranges, degrees, mesh, stages, microbatches, placements), then the world size, then
    the stages against ``model_layer_names`` (the names stage layers may use, when given; the
    emitter checks the plan's own ``layers`` against the model's trace) and the placements
    against the model's parameters.
    """
    if not isinstance(plan, Plan):
        raise ConfigError(
            f"plan must be an autopar.Plan (Plan.from_json(path)), got {type(plan).__name__}",
            field="plan",
        )
    plan.validate()
    _check_world(plan, world_size=world_size)
    if model_layer_names is not None:
        check_stage_layers(plan, list(model_layer_names))
    if model is not None:
        params = dict(model.named_parameters(remove_duplicate=False))
        _check_dtypes(plan, params)
        _check_placements(plan, params)


def _check_dtypes(plan: Plan, params: Mapping[str, torch.Tensor]) -> None:
    """The model trains in the dtype the plan was priced for, and keeps gradients in it.

    The emitter does not cast: weights, activations and gradients are in the parameters' own
    dtype (fp32 master copies come from ``ParallelModel.make_optimizer``). A float32 model
    under a bf16 plan would run, and need twice the memory the plan priced; a plan priced with
    fp32 gradients for a bf16 model (``--stack megatron-core``) would keep them in bf16.
    """
    from autopar.models.zoo import DTYPES

    want = DTYPES[plan.dtype]
    other = sorted(
        {(n, str(p.dtype).removeprefix("torch.")) for n, p in params.items()
         if p.is_floating_point() and p.dtype != want}
    )  # fmt: skip
    if other:
        name, dtype = other[0]
        more = f" (and {len(other) - 1} more)" if len(other) > 1 else ""
        raise ConfigError(
            f"the plan was priced for {plan.dtype} training but parameter {name!r}{more} is "
            f"{dtype}: cast the model first (model.to({want})) or re-plan with --dtype matching "
            "the model",
            field="dtype",
            allowed=(plan.dtype,),
        )
    if plan.grad_dtype != plan.dtype:
        raise ConfigError(
            f"the plan prices gradients in {plan.grad_dtype} ({plan.stack.name or 'stack'}: "
            f"accumulated and reduced in {plan.grad_dtype}) but the emitter keeps them in the "
            f"parameters' dtype ({plan.dtype}); re-plan with --grad-dtype {plan.dtype} to apply "
            "it with autopar, or run the layout with the stack it was priced for "
            "(`autopar explain plan.json --emit megatron|torchtitan`)",
            field="stack.grad_dtype",
            allowed=(plan.dtype,),
        )


def _check_world(plan: Plan, *, world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(
            f"world_size must be a positive integer, got {world_size!r}", field="world_size"
        )
    if plan.num_devices != world_size:
        size = plan.num_devices
        raise ConfigError(
            f"plan mesh {tuple(plan.mesh.shape)} over {tuple(plan.mesh.dim_names)} needs "
            f"{size} ranks but the process group has world size {world_size}; launch with "
            f"`autopar launch plan.json -- script.py` or torchrun --nproc-per-node={size}",
            field="mesh.shape",
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
