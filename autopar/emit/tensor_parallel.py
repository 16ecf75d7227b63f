"""Tensor parallelism with DTensor, op by op, exactly as the plan placed it.

Parameters become ``DTensor``s on the tp mesh with the plan's placement (``distribute_tensor``;
replicated ones too, so every op sees DTensors). Each traced op then runs with its inputs
redistributed to the plan's input placements and its output checked against (and, if DTensor
chose otherwise, redistributed to) the plan's output placement; ``OpStats`` counts those
corrections, so a run that deviates from what was priced is visible (tests assert zero).

DTensor's sharding propagation computes every op correctly for whatever placements its inputs
have: a layout the plan chose can cost more than priced if it were wrong, never produce a wrong
value. Two kinds of op run on their local shards instead, because DTensor has no strategy for
them on every device: fused attention split over batch or heads (each device attends its own
heads: no communication, the plan's layout is exact), and ops the plan keeps replicated.

Gradients of a parameter replicated on tp but computed from split activations are partial sums
over tp; ``reduce_partial_grads`` all-reduces them once per step, as the plan priced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from autopar.errors import ConfigError
from autopar.plan import OpPlacement, parse_placement

__all__ = [
    "OpStats",
    "to_placement",
    "distribute_parameter",
    "run_op",
    "boundary_placement",
    "reduce_partial_grads",
    "check_ops_supported",
]

aten = torch.ops.aten
_LOCAL_ATTENTION = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
}


@dataclass(slots=True)
class OpStats:
    """What the executor did beyond the plan (all zero when a run is exactly as priced)."""

    ops: int = 0
    output_corrections: int = 0
    """Ops whose output DTensor placed differently from the plan (then redistributed)."""
    local_ops: int = 0
    """Ops run on local shards (fused attention, replicated ops DTensor lacks)."""
    corrected: list[str] = field(default_factory=list)


def to_placement(text: str):
    """``"S(1)"`` -> ``Shard(1)``, ``"R"`` -> ``Replicate()``, ``"P"`` -> ``Partial()``."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    kind, dim = parse_placement(text)
    return Shard(dim) if kind == "S" else Partial() if kind == "P" else Replicate()


def _same(have: Any, want: Any) -> bool:
    from torch.distributed.tensor import Partial

    if isinstance(want, Partial):
        return isinstance(have, Partial)
    return have == want


def distribute_parameter(param: torch.Tensor, mesh: Any, text: str) -> torch.nn.Parameter:
    """A parameter as a DTensor on the tp mesh with the planned placement."""
    from torch.distributed.tensor import distribute_tensor

    placement = to_placement(text)
    if parse_placement(text)[0] == "P":
        raise ConfigError("a parameter cannot be a partial sum", field="placements")
    dt = distribute_tensor(param.detach(), mesh, [placement])
    return torch.nn.Parameter(dt, requires_grad=param.requires_grad)


def _as_dtensor(x: Any, mesh: Any) -> Any:
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
        return DTensor.from_local(x, mesh, [Replicate()], run_check=False)
    return x


def _to(x: Any, mesh: Any, text: str) -> Any:
    from torch.distributed.tensor import DTensor

    if not isinstance(x, torch.Tensor):
        return x
    x = _as_dtensor(x, mesh)
    want = to_placement(text)
    if _same(x.placements[0], want):
        return x
    if parse_placement(text)[0] == "P":
        # a whole value is a valid partial sum (the op adds it once: DTensor's own strategies
        # do that conversion; users may not redistribute to Partial); a shard is gathered
        # first, as the pricing's resharding rule does
        from torch.distributed.tensor import Replicate

        if not isinstance(x.placements[0], Replicate):
            x = x.redistribute(mesh, [Replicate()])
        return x
    assert isinstance(x, DTensor)
    return x.redistribute(mesh, [want])


def run_op(
    node: Any,
    args: tuple,
    kwargs: dict,
    layout: OpPlacement | None,
    mesh: Any,
    stats: OpStats,
    target: Any = None,
) -> Any:
    """Run one traced op on DTensors as ``layout`` says (see the module docstring);
    ``target`` replaces the node's op (same values, e.g. ``reshape`` for ``view``)."""
    from torch.distributed.tensor import DTensor

    stats.ops += 1
    target = node.target if target is None else target
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensor_pos = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    if layout is not None and len(layout.inputs) == len(tensor_pos):
        for j, i in enumerate(tensor_pos):
            leaves[i] = _to(leaves[i], mesh, layout.inputs[j])
    else:
        for i in tensor_pos:
            leaves[i] = _as_dtensor(leaves[i], mesh)
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    if target in _LOCAL_ATTENTION:
        out = _local_attention(target, args, kwargs, layout, mesh)
        stats.local_ops += 1
    else:
        out = target(*args, **kwargs)
    if layout is None:
        return out
    first = out[0] if isinstance(out, tuple | list) else out
    if isinstance(first, DTensor):
        want = to_placement(layout.output)
        if not _same(first.placements[0], want):
            stats.output_corrections += 1
            stats.corrected.append(f"{node.name}: {first.placements[0]} -> {layout.output}")
            first = first.redistribute(mesh, [want])
            if isinstance(out, tuple | list):
                out = type(out)([first, *out[1:]])
            else:
                out = first
    return out


def _local_attention(target: Any, args: tuple, kwargs: dict, layout: Any, mesh: Any) -> Any:
    """Attention split over batch or heads: each device attends its own shard."""
    from torch.distributed.tensor import DTensor, Replicate

    q, k, v = args[:3]
    placements = q.placements if isinstance(q, DTensor) else (Replicate(),)
    for t in (k, v):
        if isinstance(t, DTensor) and t.placements != placements:
            raise ConfigError(
                f"attention inputs are placed {placements} / {t.placements}: the plan must give "
                "q, k and v the same split",
                field="layouts",
            )
    rest = tuple(a.to_local() if isinstance(a, DTensor) else a for a in args[3:])
    local = target(*(t.to_local() for t in (q, k, v)), *rest, **kwargs)
    if isinstance(local, tuple):
        return tuple(DTensor.from_local(t, mesh, placements, run_check=False) for t in local)
    return DTensor.from_local(local, mesh, placements, run_check=False)


def boundary_placement(shape: tuple[int, ...], *, sequence_parallel: bool, tp: int) -> str:
    """How an activation crosses a pipeline stage boundary: whole, or split along its token
    dim (dim 1 of a ``[batch, tokens, features]`` tensor) under sequence parallelism."""
    if sequence_parallel and len(shape) >= 3 and shape[1] % tp == 0:
        return "S(1)"
    return "R"


def reduce_partial_grads(params: Mapping[str, torch.nn.Parameter]) -> int:
    """All-reduce gradients left partial over tp to their parameter's placement; returns how
    many (once per step, before the optimizer)."""
    from torch.distributed.tensor import DTensor, Partial

    n = 0
    for p in params.values():
        g = p.grad
        if isinstance(g, DTensor) and any(isinstance(x, Partial) for x in g.placements):
            assert isinstance(p, DTensor)
            p.grad = g.redistribute(g.device_mesh, list(p.placements))
            n += 1
    return n


def check_ops_supported(targets: list[Any], layouts: list[OpPlacement | None]) -> None:
    """Refuse, before any collective, a plan that splits an op DTensor cannot run split."""
    from torch.distributed.tensor import DTensor

    prop = DTensor._op_dispatcher.sharding_propagator
    known = (
        set(prop.op_strategy_funcs)
        | set(getattr(prop, "op_to_rules", {}))
        | set(getattr(prop, "op_single_dim_strategy_funcs", {}))
    )
    for target, layout in zip(targets, layouts):
        if layout is None or target in _LOCAL_ATTENTION or target in known:
            continue
        if not isinstance(target, torch._ops.OpOverload):
            continue
        if target.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd):
            continue  # decomposes into ops DTensor knows
        if all(p == "R" for p in (*layout.inputs, layout.output)):
            continue
        raise ConfigError(
            f"the plan splits {target} over tp ({layout.inputs} -> {layout.output}) but "
            "DTensor has no sharding strategy for it; re-run `autopar plan` with --tp 1, or "
            "register one with torch.distributed.tensor's op strategy API",
            field="layouts",
        )
