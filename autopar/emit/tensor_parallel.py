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

Sequence parallelism (``plan.sequence_parallel``) additionally keeps the activations between
tensor-parallel regions sharded on the sequence dim: norms run on sequence shards
(``SequenceParallel``), regions all-gather on entry and their row-parallel Linear
reduce-scatters on exit; ``sequence_parallel_roles`` decides where from the block structure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn
from torch.distributed.tensor import Shard

from autopar.errors import ConfigError
from autopar.plan import parse_placement

__all__ = ["TPAssignment", "tp_styles", "sequence_parallel_roles", "apply_tensor_parallel"]

SEQ_DIM = 1
"""Sequence dim of activations ``[batch, seq, hidden]`` (sequence parallelism shards it)."""
SEQ_SHARD = Shard(SEQ_DIM)
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


def _distribute_style(
    target: nn.Module, placements: Mapping[str, str], *, seq_in: bool, seq_out: bool
):
    """Partition/input/output functions for ``distribute_module`` with planned placements.

    Inputs arrive as local tensors, sequence-sharded when ``seq_in`` (sequence parallelism),
    else replicated; outputs leave as local tensors, sequence-sharded when ``seq_out``.
    """
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
        def enter(x):
            if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
                return x
            if seq_in:
                return DTensor.from_local(x, mesh, [SEQ_SHARD], run_check=False).redistribute(
                    mesh, [Replicate()]
                )
            return DTensor.from_local(x, mesh, [Replicate()], run_check=False)

        return tuple(enter(x) for x in inputs)

    def output_fn(module, outputs, mesh):
        def leave(x):
            if isinstance(x, DTensor):
                return x.redistribute(mesh, [SEQ_SHARD if seq_out else Replicate()]).to_local()
            return x

        if isinstance(outputs, tuple):
            return tuple(leave(x) for x in outputs)
        return leave(outputs)

    return partition_fn, input_fn, output_fn


def _is_norm(module: nn.Module) -> bool:
    """Token-wise normalisation layers (the ones ``SequenceParallel`` supports)."""
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or type(module).__name__.endswith("Norm")


def sequence_parallel_roles(model: nn.Module, *, assignments: list[TPAssignment]) -> dict[str, str]:
    """Where activations change layout under sequence parallelism (Korthikanti et al. 2022).

    Between tensor-parallel regions activations are sharded on the sequence dim (dim 1) over
    tp. Roles, by module name:

    * ``enter``: first block of a stage that also holds the embedding: replicated -> sharded.
    * ``norm``: a normalisation layer with replicated parameters inside a block or the head:
      runs on its sequence shard (``SequenceParallel``; its weight gradients are all-reduced).
    * ``gather``: a block child holding a column->row Linear pair: all-gather the sequence on
      entry; its row-parallel Linear reduce-scatters back to sequence shards.
    * ``gather_scatter``: any other block child (it may mix tokens, e.g. attention with
      replicated weights): all-gather on entry, keep this rank's sequence shard on exit.
    * ``exit``: the first head module after the norms: all-gather the sequence.

    Pure, so it is unit-tested without processes. Assumes the model's own ``forward`` does
    nothing token-mixing between blocks (true of the zoo; rotary tables are built per block).
    """
    from autopar.emit.pipeline import layer_map

    lmap = layer_map(model)
    if lmap.container is None:
        return {}
    paired_parents = {
        a.module.rpartition(".")[0] for a in assignments if a.sharded_io and a.style == ROWWISE
    }
    roles: dict[str, str] = {}
    blocks = list(getattr(model, lmap.container).named_children())
    has_embed = any(getattr(model, n) is not None for n in lmap.embed)
    if has_embed and not blocks:
        raise ConfigError(
            "sequence parallelism needs a block in the stage that holds the embedding",
            field="sequence_parallel",
        )
    for i, (key, block) in enumerate(blocks):
        bname = f"{lmap.container}.{key}"
        if i == 0 and has_embed:
            roles[bname] = "enter"
        for cname, child in block.named_children():
            name = f"{bname}.{cname}"
            if isinstance(child, nn.Dropout):
                continue
            if _is_norm(child) and not _tp_sharded(name, assignments):
                roles[name] = "norm"
            elif name in paired_parents:
                roles[name] = "gather"
            else:
                roles[name] = "gather_scatter"
    if blocks or not has_embed:
        for hname in lmap.head:
            child = getattr(model, hname)
            if child is None:
                continue
            if _is_norm(child) and not _tp_sharded(hname, assignments):
                roles[hname] = "norm"
                continue
            roles[hname] = "exit"
            break
    return roles


def _tp_sharded(name: str, assignments: list[TPAssignment]) -> bool:
    return any(a.module == name for a in assignments)


def apply_tensor_parallel(
    model: nn.Module,
    *,
    tp_mesh,
    tp_of: Mapping[str, str],
    sequence_parallel: bool = False,
) -> list[TPAssignment]:
    """Turn the planned tp placements into DTensor parameters on ``tp_mesh``, in place.

    With ``sequence_parallel`` the activations between tensor-parallel regions are also
    sharded over tp on the sequence dim (see ``sequence_parallel_roles``). Returns the
    assignments applied (the caller can log them or assert on them).
    """
    from torch.distributed.tensor import Replicate, distribute_module
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleInputOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    plan = tp_styles(model, tp_of=tp_of)
    roles = sequence_parallel_roles(model, assignments=plan) if sequence_parallel else {}
    styles = {}
    for a in plan:
        mod = model.get_submodule(a.module)
        role = roles.get(a.module)
        if role in ("gather_scatter", "exit"):
            del roles[a.module]  # folded into the module's own TP style below
        seq_in = role in ("gather_scatter", "exit")
        seq_out = role == "gather_scatter"
        parent_role = roles.get(a.module.rpartition(".")[0])
        in_layout = SEQ_SHARD if seq_in else Replicate()
        if a.style == DISTRIBUTE:
            part, inp, outp = _distribute_style(
                mod, dict(a.placements), seq_in=seq_in, seq_out=seq_out
            )
            distribute_module(mod, tp_mesh, part, input_fn=inp, output_fn=outp)
            continue
        if isinstance(mod, nn.Embedding):
            out = SEQ_SHARD if seq_out else Replicate()
            styles[a.module] = (
                RowwiseParallel(input_layouts=Replicate(), output_layouts=out)
                if a.style == ROWWISE
                else ColwiseParallel(input_layouts=Replicate(), output_layouts=out)
            )
        elif a.style == COLWISE:
            out = Shard(-1) if a.sharded_io else SEQ_SHARD if seq_out else Replicate()
            styles[a.module] = ColwiseParallel(input_layouts=in_layout, output_layouts=out)
        else:
            scatter = seq_out or (a.sharded_io and parent_role == "gather")
            styles[a.module] = RowwiseParallel(
                input_layouts=Shard(-1) if a.sharded_io else in_layout,
                output_layouts=SEQ_SHARD if scatter else Replicate(),
            )
    for name, role in roles.items():
        if role == "enter":
            styles[name] = PrepareModuleInput(
                input_layouts=(Replicate(),),
                desired_input_layouts=(SEQ_SHARD,),
                use_local_output=True,
            )
        elif role == "norm":
            styles[name] = SequenceParallel(sequence_dim=1, use_local_output=True)
        elif role in ("gather", "exit"):
            styles[name] = PrepareModuleInput(
                input_layouts=(SEQ_SHARD,),
                desired_input_layouts=(Replicate(),),
                use_local_output=True,
            )
        else:
            styles[name] = PrepareModuleInputOutput(
                input_layouts=(SEQ_SHARD,),
                desired_input_layouts=(Replicate(),),
                use_local_input=True,
                output_layouts=(Replicate(),),
                desired_output_layouts=(SEQ_SHARD,),
                use_local_output=True,
            )
    if styles:
        parallelize_module(model, tp_mesh, styles)
    return plan
