"""Group an OpGraph into layers and find the repeated ones.

A layer is everything issued under one entry of the model's block container (``layers.7``,
``model.layers.7``, ``encoder.layer.7``): the container is the ``<path>.<int>`` prefix that
owns the most operator nodes, whatever it is called. A block layer is named by its real module
path (the FQN a user sees in ``named_modules()``); ops before the first block form ``embed``,
ops after the last form ``head``; root-level ops between two blocks go with the block before
them. Names only label output: ``Layer.kind`` says what a layer is.

Two layers are the same when their ops, shapes, dtypes and non-tensor arguments agree in order
and their inputs are wired the same way; parameter names and module paths are compared relative
to the layer, so ``layers.3`` and ``layers.4`` of GPT-3 match and the search solves one of
them. A first or last block that differs (a dense block before MoE blocks, an extra norm) just
gets its own signature.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Literal

import networkx as nx

from autopar.graph.opgraph import OpGraph, OpNode, TensorArg

__all__ = ["Layer", "group_layers", "distinct_layers", "layer_graph", "block_container"]

_BLOCK = re.compile(r"^(.*?)(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Layer:
    """A contiguous slice of the model: the embedding, one block, or the head."""

    name: str
    """``"embed"``, the block's module path (``"layers.3"``, ``"model.layers.3"``) or ``"head"``."""
    kind: Literal["embed", "block", "head"]
    """What the layer is: the search and the emitter read this, never the name."""
    index: int
    """Position in model order: embed is 0, block i is i + 1, head is last."""
    nodes: tuple[str, ...]
    """Graph node names (ops, and the parameters/inputs they own) in topological order."""
    params: tuple[str, ...]
    """FQNs of the parameters that live in this layer (tied ones go to their first user)."""
    inputs: tuple[str, ...]
    """Producers outside the layer whose tensors the layer reads (activations, shared params)."""
    output: str | None
    """The last node whose tensor leaves the layer (what the next stage receives)."""
    fwd_flops: float
    bwd_flops: float
    param_count: int
    signature: str
    """Hash of ops, shapes, arguments and relative wiring: equal signature = identical layer."""
    module_path: str = ""
    """Module prefix of the block (``layers.3``); empty for embed/head."""


def block_container(graph: OpGraph) -> str | None:
    """The module path of the repeated-block container (``layers``), or None if there is none."""
    counts: Counter[str] = Counter()
    for node in graph:
        if node.kind != "op":
            continue
        m = _BLOCK.match(node.module_path)
        if m:
            counts[m.group(1)] += 1
    if not counts:
        return None
    return counts.most_common(1)[0][0]


def _block_of(path: str, container: str) -> int | None:
    prefix = f"{container}." if container else ""
    if not path.startswith(prefix):
        return None
    head = path[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def group_layers(graph: OpGraph) -> list[Layer]:
    """Layers in model order: ``embed``, one per block (named by its module path), ``head``.

    ``embed``/``head`` are omitted when empty (e.g. a pipeline stage without them). A model
    without a block container is one ``embed`` layer holding everything.
    """
    container = block_container(graph)
    order = list(graph)
    rank = {n.name: i for i, n in enumerate(order)}
    assign: dict[str, str] = {}

    # 1. ops: by module path, then root-level ops by position between blocks
    last_block: int | None = None
    seen_blocks: list[int] = []
    for node in order:
        if node.kind != "op":
            continue
        b = _block_of(node.module_path, container) if container is not None else None
        if b is not None:
            if b not in seen_blocks:
                seen_blocks.append(b)
            last_block = b
            assign[node.name] = f"block:{b}"
        else:
            assign[node.name] = "pre" if last_block is None else f"after:{last_block}"
    block_keys = seen_blocks
    final_block = block_keys[-1] if block_keys else None
    for name, key in list(assign.items()):
        if key.startswith("after:"):
            b = int(key.split(":")[1])
            assign[name] = "head" if b == final_block else f"block:{b}"
        elif key == "pre":
            assign[name] = "embed"

    # 2. params/buffers: by FQN when under a block, else with their first consumer
    for node in order:
        if node.kind in ("param", "buffer"):
            b = _block_of(node.params[0], container) if container is not None else None
            if b is not None and b in block_keys:
                assign[node.name] = f"block:{b}"
                continue
            users = sorted(
                (rank[c.name] for c in graph.consumers(node.name) if c.name in assign),
            )
            assign[node.name] = assign[order[users[0]].name] if users else "embed"
        elif node.kind == "input":
            assign[node.name] = "embed"
        elif node.kind == "output":
            assign[node.name] = "head"

    keys = ["embed", *(f"block:{b}" for b in block_keys), "head"]
    members: dict[str, list[str]] = defaultdict(list)
    for node in order:
        members[assign[node.name]].append(node.name)

    # embed/head without ops (a pipeline stage): their inputs/output markers join the neighbour
    planned: list[tuple[str, list[str], str]] = []
    carry: list[str] = []
    for key in keys:
        names = members.get(key, [])
        if key in ("embed", "head") and not any(graph.node(n).kind == "op" for n in names):
            if key == "head" and planned:
                name, prev, path = planned[-1]
                planned[-1] = (name, prev + names, path)
            else:
                carry += names
            continue
        if key.startswith("block:"):
            b = int(key.split(":")[1])
            path = f"{container}.{b}" if container else str(b)
            name = path
        else:
            name, path = key, ""
        planned.append((name, carry + names, path))
        carry = []
    if carry:
        planned.append(("embed", carry, ""))
    return [
        _make_layer(graph, name, i, names, path, rank)
        for i, (name, names, path) in enumerate(planned)
    ]


def _kind(name: str, path: str) -> Literal["embed", "block", "head"]:
    if path:
        return "block"
    return "head" if name == "head" else "embed"


def _make_layer(
    graph: OpGraph, name: str, index: int, names: list[str], path: str, rank: dict[str, int]
) -> Layer:
    names = sorted(names, key=rank.__getitem__)
    inside = set(names)
    ext_inputs: list[str] = []
    live_out: list[OpNode] = []
    marker_input: str | None = None
    params: list[str] = []
    param_count = 0
    fwd = bwd = 0.0
    for n in names:
        node = graph.node(n)
        fwd += node.fwd_flops
        bwd += node.bwd_flops
        if node.kind == "param":
            params.append(node.params[0])
            param_count += node.outputs[0].numel if node.outputs else 0
        for p in node.inputs:
            if p not in inside and p not in ext_inputs:
                ext_inputs.append(p)
        if node.kind == "op" and any(c not in inside for c in graph.nx_graph.successors(n)):
            live_out.append(node)
        if node.kind == "output" and node.inputs:
            marker_input = node.inputs[0]
    # what the next layer receives: the last batched tensor leaving the layer (not, e.g., the
    # rotary tables an embedding layer also hands on), or what the model returns
    batched = [n for n in live_out if n.outputs and n.outputs[0].batch_dim is not None]
    output = (batched or live_out)[-1].name if live_out else marker_input
    return Layer(
        name=name,
        kind=_kind(name, path),
        index=index,
        nodes=tuple(names),
        params=tuple(params),
        inputs=tuple(ext_inputs),
        output=output,
        fwd_flops=fwd,
        bwd_flops=bwd,
        param_count=param_count,
        signature=_signature(graph, names, path),
        module_path=path,
    )


def _relative(text: str, prefix: str) -> str:
    if prefix and (text == prefix or text.startswith(prefix + ".")):
        return "~" + text[len(prefix) :]
    return text


def _signature(graph: OpGraph, names: list[str], prefix: str) -> str:
    """Hash of the layer's structure with names made relative (position in layer / external).

    Graph inputs and the output marker are boundaries, not structure: a first block that also
    holds the token placeholder still matches the blocks after it.
    """
    body = [n for n in names if graph.node(n).kind not in ("input", "output")]
    local = {n: i for i, n in enumerate(body)}
    ext: dict[str, int] = {}
    h = hashlib.sha1()
    for n in body:
        node: OpNode = graph.node(n)
        wiring = []
        for p in node.inputs:
            if p in local:
                wiring.append(("l", local[p]))
            else:
                wiring.append(("x", ext.setdefault(p, len(ext)), _meta_key(graph.node(p))))
        args = tuple(_arg_key(a) for a in node.args)
        item = (
            node.kind,
            node.op,
            tuple((t.shape, t.dtype, t.batch_dim) for t in node.outputs),
            tuple(wiring),
            args,
            node.kwargs,
            _relative(node.module_path, prefix),
            tuple(_relative(p, prefix) for p in node.params) if node.kind == "param" else (),
        )
        h.update(repr(item).encode())
    return h.hexdigest()[:16]


def _meta_key(node: OpNode) -> tuple:
    return tuple((t.shape, t.dtype) for t in node.outputs[:1])


def _arg_key(a: object) -> object:
    if isinstance(a, TensorArg):
        return ("T", a.index)
    if isinstance(a, list | tuple):
        return tuple(_arg_key(x) for x in a)
    return a


def distinct_layers(layers: list[Layer]) -> dict[str, list[Layer]]:
    """Signature -> the layers sharing it, in model order (first occurrence first)."""
    out: dict[str, list[Layer]] = {}
    for layer in layers:
        out.setdefault(layer.signature, []).append(layer)
    return out


def layer_graph(graph: OpGraph, layer: Layer) -> OpGraph:
    """The layer as its own OpGraph: its nodes, its external inputs as ``input`` nodes (params
    shared with another layer stay ``param``) and an ``output`` node for what leaves it."""
    g = nx.DiGraph()
    rank = 0
    inside = set(layer.nodes)
    for p in layer.inputs:
        src = graph.node(p)
        kind = src.kind if src.kind in ("param", "buffer") else "input"
        outputs = src.outputs
        if kind == "input" and len(outputs) > 1:
            # only what the layer reads (a dropout's mask is read by its backward, elsewhere):
            # two identical blocks then see identical inputs
            read = {graph.nx_graph.edges[p, c]["tensor"] for c in graph.nx_graph.successors(p)
                    if c in inside}  # fmt: skip
            outputs = tuple(m for m in outputs if m in read) or outputs
        g.add_node(p, op=OpNode(name=p, kind=kind, op="placeholder", outputs=outputs,
                                params=src.params if kind != "input" else (),
                                module_path=src.module_path), rank=rank)  # fmt: skip
        rank += 1
    live_out: list[str] = []
    for n in layer.nodes:
        data = graph.nx_graph.nodes[n]
        g.add_node(n, **{**data, "rank": rank})
        rank += 1
        if any(c not in inside for c in graph.nx_graph.successors(n)):
            live_out.append(n)
    for n in layer.nodes:
        for p in graph.nx_graph.predecessors(n):
            if p in g:
                g.add_edge(p, n, **graph.nx_graph.edges[p, n])
    has_output = any(graph.node(n).kind == "output" for n in layer.nodes)
    if not has_output and live_out:
        out_name = f"{layer.name}.output"
        metas = tuple(graph.node(n).outputs[0] for n in live_out if graph.node(n).outputs)
        g.add_node(out_name, op=OpNode(name=out_name, kind="output", op="output",
                                       inputs=tuple(live_out), input_metas=metas), rank=rank)  # fmt: skip
        for i, n in enumerate(live_out):
            if graph.node(n).outputs:
                g.add_edge(n, out_name, tensor=graph.node(n).outputs[0], index=i)
    metadata = {**graph.metadata, "layer": layer.name, "signature": layer.signature}
    return OpGraph(g, name=f"{graph.name}:{layer.name}", batch_size=graph.batch_size,
                   metadata=metadata)  # fmt: skip
