"""Tensor parallelism from per-parameter placements on the ``tp`` mesh axis.

No layer names are hard-coded: the style of each module is read off the plan's placement of
its own parameters.

* ``nn.Linear`` whose weight is ``S(0)`` on tp (output features split) -> ``ColwiseParallel``;
  ``S(1)`` (input features split) -> ``RowwiseParallel``. This is Megatron's split.
* ``nn.Embedding`` with ``S(0)`` (vocabulary split) -> ``RowwiseParallel`` (masked lookup plus
  all-reduce); ``S(1)`` (hidden split) -> ``ColwiseParallel`` gathering its output.
* Any other module with a sharded parameter -> ``distribute_module`` with exactly the planned
  placements; its inputs enter as replicated DTensors and its outputs leave replicated, so
  DTensor's sharding propagation computes the right thing for whatever the module does.
* Parameters replicated on tp stay plain tensors: every tp rank holds and updates the same copy
  (their gradients agree because the colwise layer after them all-reduces its input gradient).

Pairing: a colwise Linear keeps its output sharded (local tensors, heads split) when a sibling
in the same parent module is rowwise, the parent's forward being ``rowwise(f(colwise(x)))``
(attention ``q,k,v -> o``, MLP ``up -> down``); otherwise its output is gathered. Likewise a
rowwise Linear expects a sharded input only when it has a colwise sibling. Model code must be
TP-agnostic in the local view (attention reshapes with ``-1`` heads, as the zoo does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from autopar.errors import ConfigError
from autopar.plan import parse_placement

__all__ = ["TPAssignment", "tp_styles", "apply_tensor_parallel"]

COLWISE = "colwise"
ROWWISE = "rowwise"
DISTRIBUTE = "distribute"


@dataclass(frozen=True, slots=True, kw_only=True)
class TPAssignment:
    """What tensor parallelism does to one module."""

    module: str
    style: str
    """``colwise``, ``rowwise`` or ``distribute``."""
    placements: tuple[tuple[str, str], ...]
    """``(local parameter name, placement string on tp)``."""
    sharded_io: bool = False
    """Colwise: output stays sharded; rowwise: input arrives sharded (paired with a sibling)."""


def _tp_placements(module_name: str, module: nn.Module, tp_of: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for pname, _ in module.named_parameters(recurse=False):
        fqn = f"{module_name}.{pname}" if module_name else pname
        out[pname] = tp_of.get(fqn, "R")
    return out


def tp_styles(model: nn.Module, *, tp_of: Mapping[str, str]) -> list[TPAssignment]:
    """Decide the style of every module with a parameter sharded on tp.

    ``tp_of`` maps parameter FQNs (as in ``model.named_parameters()``) to their tp placement
    string; unnamed parameters are replicated. Pure: no communication, so it can be tested and
    it fails (``ConfigError``) on every rank alike before any DTensor is made.
    """
    kinds: dict[str, tuple[str, dict[str, str]]] = {}
    for name, mod in model.named_modules():
        places = _tp_placements(name, mod, tp_of)
        if all(p == "R" for p in places.values()):
            continue
        weight = places.get("weight", "R")
        style = DISTRIBUTE
        if isinstance(mod, nn.Linear):
            style = {"S(0)": COLWISE, "S(1)": ROWWISE}.get(weight, DISTRIBUTE)
            expected_bias = {COLWISE: "S(0)", ROWWISE: "R"}.get(style)
            if expected_bias is not None and "bias" in places and places["bias"] != expected_bias:
                raise ConfigError(
                    f"{name}: weight {weight} on tp makes it {style} parallel, whose bias must "
                    f"be {expected_bias}, but the plan says {places['bias']}",
                    field=f"placements[{name}.bias]",
                    allowed=(expected_bias,),
                )
        elif isinstance(mod, nn.Embedding):
            style = {"S(0)": ROWWISE, "S(1)": COLWISE}.get(weight, DISTRIBUTE)
        kinds[name] = (style, places)

    def parent(n: str) -> str:
        return n.rpartition(".")[0]

    def linear_siblings(n: str, style: str) -> bool:
        return any(
            parent(m) == parent(n)
            and m != n
            and s == style
            and isinstance(model.get_submodule(m), nn.Linear)
            for m, (s, _) in kinds.items()
        )

    out = []
    for name, (style, places) in kinds.items():
        mod = model.get_submodule(name)
        paired = False
        if isinstance(mod, nn.Linear) and style == COLWISE:
            paired = linear_siblings(name, ROWWISE)
        elif isinstance(mod, nn.Linear) and style == ROWWISE:
            paired = linear_siblings(name, COLWISE)
        out.append(
            TPAssignment(
                module=name,
                style=style,
                placements=tuple(sorted(places.items())),
                sharded_io=paired,
            )
        )
    return out


def _distribute_style(target: nn.Module, placements: Mapping[str, str]):
    """Partition/input/output functions for ``distribute_module`` with planned placements."""
    import torch
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    def to_placement(text: str):
        kind, dim = parse_placement(text)
        return Shard(dim) if kind == "S" else Replicate()

    def partition_fn(_name, module, mesh):
        if module is not target:  # distribute_module visits submodules too; they are not ours
            return
        for pname, param in list(module.named_parameters(recurse=False)):
            dt = distribute_tensor(param.data, mesh, [to_placement(placements[pname])])
            module.register_parameter(pname, nn.Parameter(dt, requires_grad=param.requires_grad))

    def input_fn(module, inputs, mesh):
        return tuple(
            DTensor.from_local(x, mesh, [Replicate()], run_check=False)
            if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
            else x
            for x in inputs
        )

    def output_fn(module, outputs, mesh):
        def local(x):
            if isinstance(x, DTensor):
                return x.redistribute(mesh, [Replicate()]).to_local()
            return x

        if isinstance(outputs, tuple):
            return tuple(local(x) for x in outputs)
        return local(outputs)

    return partition_fn, input_fn, output_fn


def apply_tensor_parallel(
    model: nn.Module, *, tp_mesh, tp_of: Mapping[str, str]
) -> list[TPAssignment]:
    """Turn the planned tp placements into DTensor parameters on ``tp_mesh``, in place.

    Returns the assignments applied (the caller can log them or assert on them).
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_module
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = tp_styles(model, tp_of=tp_of)
    styles = {}
    for a in plan:
        mod = model.get_submodule(a.module)
        if a.style == DISTRIBUTE:
            part, inp, outp = _distribute_style(mod, dict(a.placements))
            distribute_module(mod, tp_mesh, part, input_fn=inp, output_fn=outp)
            continue
        if isinstance(mod, nn.Embedding):
            styles[a.module] = (
                RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
                if a.style == ROWWISE
                else ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
            )
        elif a.style == COLWISE:
            styles[a.module] = ColwiseParallel(
                output_layouts=Shard(-1) if a.sharded_io else Replicate()
            )
        else:
            styles[a.module] = RowwiseParallel(
                input_layouts=Shard(-1) if a.sharded_io else Replicate()
            )
    if styles:
        parallelize_module(model, tp_mesh, styles)
    return plan
