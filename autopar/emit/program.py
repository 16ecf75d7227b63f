"""The model's traced program cut into the plan's layers, each op with its planned tp layout.

The emitter runs the same aten program the search priced (``graph.trace.trace_program``), not
the model's Python ``forward``: what is split, what each op's inputs and outputs look like on
the tensor-parallel axis, and where pipeline stages are cut come from the plan and the traced
graph, whatever the modules are called or however they are nested (``ModuleList``,
``ModuleDict``, ``Sequential``, HF ``model.layers``), whatever extra inputs blocks take (rotary
tables, masks), and with tied parameters kept tied (one traced placeholder).

Matching the plan to the trace: layers are grouped exactly as the search grouped them
(``graph.layers.group_layers`` on this trace) and must carry the plan's names and kinds; each
layer's ops are aligned with the plan's ``layouts`` for its signature by aten op name (a trace at
another batch size may elide a no-op view, expand or copy). An op the plan does not list that
is not a view or a copy, or a planned op this trace lacks, is a mismatch: the plan is refused
before any collective.
"""

from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from autopar.errors import ConfigError
from autopar.plan import OpPlacement, Plan

__all__ = ["LayerPart", "Program", "build_program", "example_inputs_for"]

_PASS_THROUGH = {operator.getitem}


@dataclass(slots=True, kw_only=True)
class LayerPart:
    """One plan layer: its fx nodes in program order and their planned layouts."""

    name: str
    kind: str
    nodes: list[fx.Node]
    """The layer's nodes (no placeholders, no output), in program order."""
    layouts: dict[fx.Node, OpPlacement] = field(default_factory=dict)
    core: set[fx.Node] = field(default_factory=set)
    """Attention-core nodes (re-run under selective recompute)."""
    params: list[str] = field(default_factory=list)
    """FQNs (first alias) of the parameter placeholders the layer reads."""


@dataclass(slots=True, kw_only=True)
class Program:
    """A traced program split into layers, ready to be cut into stages and run."""

    traced: Any
    """The ``graph.trace.TracedProgram``."""
    parts: list[LayerPart]
    params: dict[fx.Node, tuple[str, ...]]
    """Parameter placeholder -> all its FQNs (tied parameters have several)."""
    buffers: dict[fx.Node, str]
    inputs: list[fx.Node]
    """Placeholders of the flattened model inputs, in order."""
    output: fx.Node
    constant: set[fx.Node]
    """Nodes that depend on no input and no parameter (positions, rotary tables, masks built
    from shapes): recomputed on every stage that needs them instead of being sent."""
    batch_size: int

    @property
    def graph(self) -> fx.Graph:
        return self.traced.graph_module.graph

    def layer_of(self) -> dict[fx.Node, int]:
        return {n: i for i, part in enumerate(self.parts) for n in part.nodes}


def example_inputs_for(model: nn.Module, plan: Plan, batch: int, given: Any = None) -> Any:
    """Inputs of one microbatch (``batch`` samples) to trace the program with.

    ``given`` (the user's own example, any batch) is resized along dim 0; otherwise the model's
    ``example_inputs(batch_size=...)``, token inputs stretched to the plan's sequence length.
    """
    from torch.utils import _pytree as pytree

    from autopar.graph.prepare import _vocab_of

    if given is None:
        factory = getattr(model, "example_inputs", None)
        if not callable(factory):
            raise ConfigError(
                f"{type(model).__name__} has no example_inputs(); pass example_inputs= to "
                "apply_plan (one batch of the inputs the model's forward takes)",
                field="example_inputs",
            )
        try:
            given = factory(batch_size=batch)
        except TypeError:
            given = factory()
    seq = plan.seq_len
    vocab = _vocab_of(model) or 2

    def fit(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return x
        if x.shape[0] != batch:
            reps = -(-batch // x.shape[0])
            x = torch.cat([x] * reps, dim=0)[:batch]
        if seq and x.dim() == 2 and not x.is_floating_point() and x.shape[1] != seq:
            x = torch.randint(0, vocab, (batch, seq), device=x.device)
        return x

    return pytree.tree_map(fit, given)


def _align(plan_ops: list[OpPlacement], nodes: list[fx.Node], layer: str) -> dict[fx.Node, Any]:
    """Match the plan's ops of a layer to the trace's, by aten op name, in order."""
    from autopar.graph.ops import is_copy_or_view

    want = [o.op for o in plan_ops]
    have = [str(n.target) for n in nodes]
    matcher = difflib.SequenceMatcher(a=want, b=have, autojunk=False)
    out: dict[fx.Node, Any] = {}
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for k in range(i2 - i1):
                out[nodes[j1 + k]] = plan_ops[i1 + k]
            continue
        extra = [have[j] for j in range(j1, j2) if not is_copy_or_view(have[j])]
        missing = [want[i] for i in range(i1, i2) if not is_copy_or_view(want[i])]
        if extra or missing:
            raise ConfigError(
                f"layer {layer!r} traces differently from when the plan was made "
                f"(plan has {missing or 'no'} op(s) where the model has {extra or 'none'}); "
                "re-run `autopar plan` for this model",
                field=f"layouts[{layer}]",
            )
    return out


def _constant_nodes(graph: fx.Graph, params: set[fx.Node], inputs: set[fx.Node]) -> set[fx.Node]:
    from autopar.graph.trace import DEVICE_NODE

    const: set[fx.Node] = set()
    for node in graph.nodes:
        if node.name == DEVICE_NODE:
            const.add(node)  # the device the program runs on: each stage knows its own
            continue
        if node.op == "placeholder":
            if node not in params and node not in inputs:
                const.add(node)  # buffers
            continue
        if node.op == "get_attr":
            const.add(node)
            continue
        if node.op != "call_function":
            continue
        if all(a in const for a in node.all_input_nodes):
            const.add(node)
    return const


def build_program(model: nn.Module, plan: Plan, inputs: Any) -> Program:
    """Trace ``model`` at ``inputs`` (one microbatch) and cut the program into the plan's layers.

    Raises ConfigError when the model's layers or ops differ from the plan's (before any
    collective), naming the layer and what differs.
    """
    from autopar.graph.layers import group_layers
    from autopar.graph.regions import attention_core
    from autopar.graph.trace import trace, trace_program

    traced = trace_program(model, inputs)
    opgraph = trace(model, inputs, detect_batch=False)
    gm = traced.graph_module
    by_name = {n.name: n for n in gm.graph.nodes}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    n_params, n_buffers = len(traced.param_names), len(traced.buffer_names)
    params = {placeholders[i]: tuple(traced.param_names[i]) for i in range(n_params)}
    buffers = {placeholders[n_params + i]: traced.buffer_names[i] for i in range(n_buffers)}
    flat_inputs = placeholders[n_params + n_buffers :]
    output = next(n for n in gm.graph.nodes if n.op == "output")

    layers = group_layers(opgraph)
    plan_layers = [(x.name, x.kind) for x in plan.layers]
    model_layers = [(x.name, x.kind) for x in layers]
    if plan_layers != model_layers:
        diff = [a for a, b in zip(plan_layers, model_layers) if a != b][:3]
        raise ConfigError(
            f"the model's layers ({len(model_layers)}: {model_layers[:2]}...) are not the plan's "
            f"({len(plan_layers)}: {plan_layers[:2]}...)"
            + (f"; first differences: {diff}" if diff else "")
            + "; was the plan made for this model?",
            field="layers",
        )
    sig_of = {x.name: x.signature for x in plan.layers}
    owner: dict[fx.Node, int] = {}
    for i, layer in enumerate(layers):
        for name in layer.nodes:
            node = by_name.get(name)
            if node is not None and node.op == "call_function":
                owner[node] = i
    # fx nodes without an OpGraph node (getitem, alias, detach, get_attr) go with their input's
    # layer; constants with their first consumer's
    for node in gm.graph.nodes:
        if node.op == "call_function" and node not in owner:
            srcs = [a for a in node.all_input_nodes if a in owner]
            if srcs:
                owner[node] = owner[srcs[0]]
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("call_function", "get_attr") and node not in owner:
            users = [u for u in node.users if u in owner]
            if users:
                owner[node] = min(owner[u] for u in users)
            elif node.op == "call_function" and not node.users:
                continue  # an assertion: nothing reads it
            else:
                owner[node] = 0
    core_names = attention_core(opgraph)
    parts = []
    for i, layer in enumerate(layers):
        nodes = [n for n in gm.graph.nodes if owner.get(n) == i]
        part = LayerPart(name=layer.name, kind=layer.kind, nodes=nodes)
        part.core = {n for n in nodes if n.name in core_names}
        ops = [n for n in nodes if n.op == "call_function" and n.name in opgraph]
        planned = plan.layouts.get(sig_of.get(layer.name, ""), ())
        if plan.parallel.tp > 1:
            if not planned:
                raise ConfigError(
                    f"the plan has tp={plan.parallel.tp} but no op layouts for layer "
                    f"{layer.name!r}; re-run `autopar plan`",
                    field="layouts",
                )
            # the training loss the search priced runs in the loss function, not the program
            part.layouts = _align([o for o in planned if not o.loss], ops, layer.name)
        seen: list[str] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a in params and params[a][0] not in seen:
                    seen.append(params[a][0])
        part.params = seen
        parts.append(part)
    batch = 1
    for leaf in (
        inputs.values()
        if isinstance(inputs, dict)
        else (inputs if isinstance(inputs, tuple | list) else (inputs,))
    ):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            batch = int(leaf.shape[0])
            break
    return Program(
        traced=traced,
        parts=parts,
        params=params,
        buffers=buffers,
        inputs=list(flat_inputs),
        output=output,
        constant=_constant_nodes(gm.graph, set(params), set(flat_inputs)),
        batch_size=batch,
    )
