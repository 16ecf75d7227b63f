"""Build the intra-op ILP's data (``IntraOpProblem``) from an OpGraph, the rules and the prices.

Who gets a decision:

* every parameter and graph input: its storage layout (Replicate / Shard(d) per mesh axis), so a
  sharded weight (Megatron column split, or a ZeRO-3-like layout under memory pressure) is a
  choice with its memory and its gather cost, not an assumption;
* every non-trivial op (matmuls, attention, embedding, convolution, ops no rule knows);
* trivial ops (elementwise, views, norms, softmax, reductions) get none: they *follow* their
  primary operand (``IntraOpProblem.follows``), their strategy ``s`` being "whatever the
  operand's strategy ``s`` produces, replicated on axes where that cannot be kept".

Costs, all in seconds per microbatch except gradient sync:

* node: forward + backward compute on the local shard, plus the strategy's own collectives
  (backward partial-gradient all-reduces; weight-gradient all-reduces x ``grad_sync_weight``,
  which is 1/microbatches because they run once per step);
* edge: the resharding between the producer's output spec and the consumer's input spec,
  forward collectives and their backward duals (``rules.reshard``);
* a wrap-around edge from the block's output to its input when they have the same shape: the
  next identical layer consumes this one's output, so a layout mismatch there is paid too.

Nothing here imports torch or the cost model: ``Pricing`` carries the functions that put
numbers on work, so a volume-only pricing and a topology-aware one build identical strategy
lists (the indices of one solution can be re-priced with the other).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from autopar.graph.opgraph import OpGraph, OpNode, TensorMeta
from autopar.sharding.placements import (
    REPLICATE,
    Partial,
    Shard,
    Spec,
    local_numel_fraction,
    replicated,
)
from autopar.sharding.rules import (
    Collective,
    OpDims,
    Strategy,
    base_name,
    enumerate_strategies,
    follow_strategy,
    op_dims,
    replicate_strategy,
    reshard,
    tensor_strategies,
)
from autopar.solver.intra_op import IntraOpProblem

__all__ = ["Pricing", "BuiltProblem", "build_problem", "IntraOpProblem"]

_FLOAT = ("float", "bfloat", "complex")


@dataclass(frozen=True, slots=True, kw_only=True)
class Pricing:
    """The functions that turn described work into seconds and bytes (the link to ``cost/``)."""

    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    collective_s: Callable[[str, float, int], float]
    """(kind, nbytes per device, mesh axis index) -> seconds, all groups of the axis at once."""
    compute_s: Callable[[OpNode, Strategy, Literal["fwd", "bwd"]], float]
    """(node, strategy, phase) -> seconds for the local shard of the op (the strategy's input
    and output specs say which dims are split, so local GEMM shapes are exact)."""
    saved_bytes: Callable[[OpNode], float]
    """Bytes the op keeps for backward when unsharded (used when ``saved_tensors`` is None)."""
    saved_tensors: Callable[[OpNode], Sequence[tuple[str, float]]] | None = None
    """Per op, the tensors it keeps for backward as ``(storage key, bytes)`` (the shape of
    ``cost.memory.saved_tensors``). When given, each storage is charged once (views resolved),
    to the first op that saves it, at that op's layout of it: q, k and v all keep the same
    normalised input, which is one tensor in memory, not three."""
    grad_sync_weight: float = 1.0
    """Weight of once-per-step gradient synchronisation (1 / microbatches)."""
    param_memory_multiplier: float = 1.0
    """Bytes held per parameter byte (1: weights only; more with grads and optimizer state)."""
    memory_budget_bytes: float | None = None
    replicated_param_axes: tuple[int, ...] = ()
    """Mesh axes on which parameters must be stored whole (the search keeps ZeRO-3, i.e. a dp
    split of the stored weights, to itself)."""


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class BuiltProblem:
    """The ILP data plus what is needed to read a solution back (per node, per strategy)."""

    problem: IntraOpProblem
    nodes: tuple[OpNode, ...]
    strategies: tuple[tuple[Strategy, ...], ...]
    params: dict[str, int]
    """Parameter FQN -> node index (its strategy is the stored layout)."""
    fwd_compute_s: tuple[np.ndarray, ...]
    bwd_compute_s: tuple[np.ndarray, ...]
    comm_s: tuple[np.ndarray, ...]
    """Per-microbatch collectives of the strategy itself (fwd + bwd)."""
    grad_sync_s: tuple[np.ndarray, ...]
    """Once-per-step collectives, unweighted."""
    param_bytes: tuple[np.ndarray, ...]
    """Weight bytes per device (without the memory multiplier)."""
    activation_bytes: tuple[np.ndarray, ...]
    edge_inputs: tuple[tuple[int, int, int], ...]
    """Per edge: (consumer input index, producer output index, -1 or 1 for a wrap-around)."""
    edge_weights: tuple[float, ...] = ()
    """Per edge: the share of its resharding it pays (1/n for n identical views of one tensor,
    see ``_edge_weight``)."""
    shared: tuple[tuple[str, Collective], ...] = ()
    """Per shared cost of the problem: (producer node name, the one all-reduce it stands for)."""


def _is_float(meta: TensorMeta | None) -> bool:
    return meta is not None and meta.dtype.startswith(_FLOAT)


def _output_index(producer: OpNode, consumer: OpNode, j: int) -> int:
    if len(producer.outputs) <= 1:
        return 0
    if base_name(consumer.op) == "getitem" and len(consumer.args) > 1:
        return int(consumer.args[1])
    meta = consumer.input_metas[j] if j < len(consumer.input_metas) else None
    for k, t in enumerate(producer.outputs):
        if t == meta:
            return k
    return 0


def _price(colls: tuple[Collective, ...], pricing: Pricing) -> tuple[float, float]:
    """(per-microbatch seconds, once-per-step seconds) of a list of collectives."""
    mb = step = 0.0
    for c in colls:
        t = pricing.collective_s(c.kind, c.nbytes, c.axis)
        if c.phase == "grad_sync":
            step += t
        else:
            mb += t
    return mb, step


def build_problem(
    graph: OpGraph,
    pricing: Pricing,
    *,
    select: Mapping[str, str] | None = None,
    sequence_parallel: bool | None = None,
) -> BuiltProblem:
    """OpGraph x rules x pricing -> the frozen ILP data (see the module docstring).

    ``select`` keeps only the named strategy of the listed nodes (decision ops, parameters,
    inputs; followers follow): the problem then prices one assignment, which is how a solved
    layer is re-priced at another micro-batch size. A listed strategy that does not exist at
    this graph's shapes raises ``KeyError`` (the choice cannot be applied here).

    ``sequence_parallel`` fixes the layout of the layer's activations at its boundaries on a
    ``tp`` axis: False keeps them whole (replicated), True splits them along the token dim
    (Megatron's sequence parallelism, ``boundary_spec``); the block's own input is pinned to
    it, the wrap-around edge prices its output's way back. None leaves a repeated block's input
    free (the ILP chooses) and pins other layers to ``canonical_spec``.
    """
    mesh_shape = pricing.mesh_shape
    nd = len(mesh_shape)
    nodes = [n for n in graph if n.kind != "output"]
    index = {n.name: i for i, n in enumerate(nodes)}
    if select is not None:
        unknown = [n for n in select if n not in index]
        if unknown:
            raise KeyError(f"select names nodes this graph does not have: {unknown[:3]}")
    requires_grad: list[bool] = []
    param_derived: list[bool] = []
    strategies: list[tuple[Strategy, ...]] = []
    follows: list[int] = []
    unsupported: list[str] = []
    dims_of: list[OpDims | None] = []
    params: dict[str, int] = {}

    # a repeated block's input arrives in the boundary layout when sequence_parallel is set
    pinned_inputs: dict[int, Spec] = {}
    acts0 = [i for i, n in enumerate(nodes) if n.kind == "input" and _is_float(n.output)]
    outs0 = [n for n in graph if n.kind == "output"]
    if sequence_parallel is not None and _wraps(nodes, index, acts0, outs0):
        a = acts0[0]
        pinned_inputs[a] = boundary_spec(
            nodes[a].output, pricing, sequence_parallel=sequence_parallel
        )

    for i, node in enumerate(nodes):
        ins = [index.get(p, -1) for p in node.inputs]
        if node.kind == "param":
            requires_grad.append(True)
            param_derived.append(True)
        elif node.kind in ("input", "buffer"):
            requires_grad.append(node.kind == "input" and _is_float(node.output))
            param_derived.append(False)
        else:
            requires_grad.append(
                _is_float(node.output) and any(requires_grad[j] for j in ins if j >= 0)
            )
            param_derived.append(bool(ins) and all(j >= 0 and param_derived[j] for j in ins))
        grad_in = tuple(j >= 0 and requires_grad[j] for j in ins)
        param_in = tuple(j >= 0 and param_derived[j] for j in ins)

        dims = op_dims(node) if node.kind == "op" else None
        dims_of.append(dims)
        follow = -1
        if node.kind in ("param", "input", "buffer"):
            meta = node.output
            specs = tensor_strategies(meta, mesh_shape) if meta is not None else [replicated(nd)]
            if i in pinned_inputs:
                specs = [sp for sp in specs if sp == pinned_inputs[i]] or specs
            if node.kind == "param" and pricing.replicated_param_axes:
                specs = [
                    sp
                    for sp in specs
                    if all(not isinstance(sp[a], Shard) for a in pricing.replicated_param_axes)
                ]
            strats = tuple(Strategy(",".join(str(p) for p in s), (), (s,), 1, ()) for s in specs)
            if node.kind == "param":
                params[node.params[0] if node.params else node.name] = i
        elif dims is None:
            unsupported.append(node.op)
            strats = (replicate_strategy(len(node.inputs), len(node.outputs), nd),)
        elif dims.follow and node.inputs and ins[dims.primary] >= 0:
            follow = ins[dims.primary]
            producer = nodes[follow]
            k = _output_index(producer, node, dims.primary)
            memo: dict[Spec, Strategy] = {}
            out: list[Strategy] = []
            for ps in strategies[follow]:
                spec = ps.output_specs[k] if k < len(ps.output_specs) else ps.output_specs[0]
                if spec not in memo:
                    memo[spec] = follow_strategy(
                        dims,
                        spec,
                        input_metas=node.input_metas,
                        output_metas=node.outputs,
                        mesh_shape=mesh_shape,
                        grad_inputs=grad_in,
                        param_inputs=param_in,
                        axis_names=pricing.axis_names,
                    )
                out.append(memo[spec])
            strats = tuple(out)
        else:
            strats = tuple(
                enumerate_strategies(
                    dims,
                    input_metas=node.input_metas,
                    output_metas=node.outputs,
                    mesh_shape=mesh_shape,
                    grad_inputs=grad_in,
                    param_inputs=param_in,
                    axis_names=pricing.axis_names,
                )
            )
        if select is not None and follow < 0 and node.name in select:
            want = select[node.name]
            strats = tuple(st for st in strats if st.name == want)[:1]
            if not strats:
                raise KeyError(f"{node.name}: strategy {want!r} does not exist at these shapes")
        strategies.append(strats)
        follows.append(follow)

    _pin_boundaries(
        graph, nodes, index, strategies, requires_grad, pricing, sequence_parallel=sequence_parallel
    )

    # -- node costs ----------------------------------------------------------------------------
    fwd_c, bwd_c, comm, gsync, pbytes, abytes, costs, mems = [], [], [], [], [], [], [], []
    view_src = [
        index.get(n.inputs[0], -1)
        if d is not None and not d.moves_bytes and len(n.inputs) == 1 and len(n.outputs) == 1
        else -1
        for n, d in zip(nodes, dims_of)
    ]
    owned = _owned_saved_tensors(nodes, index, view_src, pricing)
    shared: dict[tuple, list[tuple[int, int]]] = {}
    shared_coll: dict[tuple, Collective] = {}
    for i, node in enumerate(nodes):
        ins = _ins_of(node, index)
        k = len(strategies[i])
        f, b, c, g, pb, ab = (np.zeros(k) for _ in range(6))
        dims = dims_of[i]
        moves = node.kind == "op" and (dims is None or dims.moves_bytes or node.fwd_flops > 0)
        saved = owned[i]
        memo_s: dict[Strategy, tuple[float, ...]] = {}
        for s, st in enumerate(strategies[i]):
            if st not in memo_s:
                fs = pricing.compute_s(node, st, "fwd") if moves else 0.0
                bs = pricing.compute_s(node, st, "bwd") if moves and requires_grad[i] else 0.0
                own = tuple(
                    c for c in st.collectives if _shared_key(c, ins, nodes, node, view_src) is None
                )
                cm, gs = _price(own, pricing)
                p_b = a_b = 0.0
                if node.kind == "param" and node.output is not None:
                    p_b = node.output.nbytes * local_numel_fraction(st.output_specs[0], mesh_shape)
                elif saved:
                    a_b = sum(
                        nbytes * _saved_fraction(node, st, which, param_derived, ins, mesh_shape)
                        for which, nbytes in saved
                    )
                memo_s[st] = (fs, bs, cm, gs, p_b, a_b)
            f[s], b[s], c[s], g[s], pb[s], ab[s] = memo_s[st]
            for coll in st.collectives:
                key = _shared_key(coll, ins, nodes, node, view_src)
                if key is not None:
                    shared.setdefault(key, []).append((i, s))
                    shared_coll[key] = coll
        fwd_c.append(f)
        bwd_c.append(b)
        comm.append(c)
        gsync.append(g)
        pbytes.append(pb)
        abytes.append(ab)
        costs.append(f + b + c + pricing.grad_sync_weight * g)
        mems.append(pb * pricing.param_memory_multiplier + ab)

    # -- edges: resharding between producer output and consumer input -------------------------
    edges: list[tuple[int, int]] = []
    mats: list[np.ndarray] = []
    edge_inputs: list[tuple[int, int, int]] = []
    cache: dict[tuple, float] = {}
    siblings = _view_siblings(nodes, view_src)
    n_consumers = [0] * len(nodes)
    for node in nodes:
        for p in node.inputs:
            if p in index:
                n_consumers[index[p]] += 1
    weights: list[float] = []

    moving: set[tuple] = set()  # resharding that moves data even when its net price is 0

    def reshard_s(src: Spec, dst: Spec, meta: TensorMeta, grad: bool, partial: frozenset) -> float:
        key = (src, dst, meta.shape, meta.dtype, grad, partial)
        if key not in cache:
            terms = edge_collectives(
                src, dst, meta, mesh_shape, grad=grad, partial_grad_axes=partial, pricing=pricing
            )
            cache[key] = sum(t for _, t in terms)
            if terms:
                moving.add(key)
        return cache[key]

    def add_edge(u: int, v: int, out_k: int, in_j: int, meta: TensorMeta, wrap: bool) -> None:
        src_specs = [
            st.output_specs[out_k] if out_k < len(st.output_specs) else st.output_specs[0]
            for st in strategies[u]
        ]
        everything = frozenset(range(nd))
        dst_specs = (
            [(st.output_specs[0], frozenset()) for st in strategies[v]]
            if wrap
            else [
                (st.input_specs[in_j], everything if view_src[v] >= 0 else _partial_grad_axes(st, in_j))
                for st in strategies[v]
            ]
        )  # fmt: skip
        grad = requires_grad[u] and requires_grad[v]
        us = {s: n for n, s in enumerate(dict.fromkeys(src_specs))}
        vs = {s: n for n, s in enumerate(dict.fromkeys(dst_specs))}
        small = np.array([[reshard_s(a, b, meta, grad, pa) for b, pa in vs] for a in us])
        if not small.any() and not any(
            (a, b, meta.shape, meta.dtype, grad, pa) in moving for a in us for b, pa in vs
        ):
            return  # no layout pair moves anything: nothing to decide or to report
        w = _edge_weight(u, v, siblings, n_consumers)
        mat = w * small[np.ix_([us[s] for s in src_specs], [vs[s] for s in dst_specs])]
        edges.append((u, v))
        mats.append(mat)
        edge_inputs.append((in_j, out_k, 1 if wrap else -1))
        weights.append(w)

    for v, node in enumerate(nodes):
        if node.kind != "op":
            continue
        for j, p in enumerate(node.inputs):
            u = index.get(p, -1)
            if u < 0:
                continue  # produced outside this graph: arrives as the op wants it
            meta = node.input_metas[j] if j < len(node.input_metas) else nodes[u].output
            if meta is None:
                continue
            add_edge(u, v, _output_index(nodes[u], node, j), j, meta, False)

    # wrap-around: block output feeds the next identical block's input
    acts = [i for i, n in enumerate(nodes) if n.kind == "input" and _is_float(n.output)]
    outs = [n for n in graph if n.kind == "output"]
    if len(acts) == 1 and outs:
        a = acts[0]
        for p in outs[0].inputs:
            u = index.get(p, -1)
            if (
                u >= 0
                and nodes[u].output is not None
                and nodes[u].output.shape == nodes[a].output.shape
            ):
                add_edge(u, a, 0, 0, nodes[a].output, True)
                break

    shared_keys = list(shared)
    shared_costs = []
    for key in shared_keys:
        coll = shared_coll[key]
        t = pricing.collective_s(coll.kind, coll.nbytes, coll.axis)
        shared_costs.append(t * (pricing.grad_sync_weight if coll.phase == "grad_sync" else 1.0))
    shared_members = []
    for key in shared_keys:
        by_node: dict[int, list[int]] = {}
        for i, s_ in shared[key]:
            by_node.setdefault(i, []).append(s_)
        shared_members.append(tuple((i, tuple(ss)) for i, ss in by_node.items()))

    problem = IntraOpProblem(
        names=tuple(n.name for n in nodes),
        node_costs=tuple(costs),
        memory_bytes=tuple(mems),
        follows=tuple(follows),
        edges=tuple(edges),
        edge_costs=tuple(mats),
        shared_costs=tuple(shared_costs),
        shared_members=tuple(shared_members),
        memory_budget_bytes=pricing.memory_budget_bytes,
        strategy_names=tuple(tuple(s.name for s in st) for st in strategies),
        unsupported_ops=tuple(unsupported),
    )
    return BuiltProblem(
        problem=problem,
        nodes=tuple(nodes),
        strategies=tuple(strategies),
        params=params,
        fwd_compute_s=tuple(fwd_c),
        bwd_compute_s=tuple(bwd_c),
        comm_s=tuple(comm),
        grad_sync_s=tuple(gsync),
        param_bytes=tuple(pbytes),
        activation_bytes=tuple(abytes),
        edge_inputs=tuple(edge_inputs),
        edge_weights=tuple(weights),
        shared=tuple((nodes[key[0]].name, shared_coll[key]) for key in shared_keys),
    )


def _shared_key(
    coll: Collective, ins: list[int], nodes: list[OpNode], node: OpNode, view_src: list[int]
) -> tuple | None:
    """Partial-gradient all-reduces of one tensor are shared by all its consumers.

    Views are seen through (q, k and v each read their own view of the norm's output, yet the
    backward sums their partial gradients into one tensor before a single all-reduce).
    """
    if coll.operand < 0 or coll.operand >= len(ins) or ins[coll.operand] < 0:
        return None
    u = ins[coll.operand]
    k = _output_index(nodes[u], node, coll.operand)
    while view_src[u] >= 0:
        u, k = view_src[u], 0
    return (u, k, coll.kind, coll.axis, coll.phase, round(coll.nbytes))


def _ins_of(node: OpNode, index: dict[str, int]) -> list[int]:
    return [index.get(p, -1) for p in node.inputs]


def _local_fraction(
    node: OpNode,
    st: Strategy,
    param_derived: list[bool],
    ins: list[int],
    mesh_shape: tuple[int, ...],
) -> float:
    """Share of the op's saved activations one device keeps: by its activation inputs' layout."""
    full = local = 0.0
    for j, (meta, spec) in enumerate(zip(node.input_metas, st.input_specs)):
        if j < len(ins) and ins[j] >= 0 and param_derived[ins[j]]:
            continue
        full += meta.nbytes
        local += meta.nbytes * local_numel_fraction(spec, mesh_shape)
    if full > 0:
        return local / full
    if st.output_specs and not any(isinstance(p, Partial) for p in st.output_specs[0]):
        return local_numel_fraction(st.output_specs[0], mesh_shape)
    return 1.0


_WHOLE = -1
"""``_owned_saved_tensors`` marker: the op's whole per-op saved bytes (no per-tensor split)."""


def _owned_saved_tensors(
    nodes: list[OpNode], index: dict[str, int], view_src: list[int], pricing: Pricing
) -> list[list[tuple[int | tuple[str, int], float]]]:
    """Per node, the saved tensors it is charged for: ``(which, bytes)``.

    ``which`` is ``("in", j)`` for its input j, ``("out", k)`` for its output k (a mask sized
    like output 0 counts as output 0), or ``_WHOLE`` for the per-op fallback. A storage saved by
    several ops (or by ops reading different views of it) is charged once, to the node that
    produces it (views resolved), at that node's output layout: a tensor gathered for its
    consumer is kept in the layout it was made in and gathered again for backward, as
    Megatron-LM's sequence parallelism does (Korthikanti et al.: 34/t·sbh per layer).
    """
    out: list[list[tuple[int | tuple[str, int], float]]] = [[] for _ in nodes]
    if pricing.saved_tensors is None:
        for i, node in enumerate(nodes):
            if node.kind == "op":
                b = float(pricing.saved_bytes(node))
                if b > 0:
                    out[i].append((_WHOLE, b))
        return out

    def root(name: str) -> int:
        i = index.get(name, -1)
        while i >= 0 and view_src[i] >= 0:
            i = view_src[i]
        return i

    seen: set[str] = set()
    for i, node in enumerate(nodes):
        if node.kind != "op":
            continue
        for key, nbytes in pricing.saved_tensors(node):
            if nbytes <= 0:
                continue
            owner = i
            if key in node.inputs:
                r = root(key)
                if r >= 0:  # charged where the tensor is made, in the layout it is made in
                    owner, storage, which = r, nodes[r].name, ("out", 0)
                else:
                    storage, which = key, ("in", node.inputs.index(key))
            elif key.startswith(node.name + ":") and key[len(node.name) + 1 :].isdigit():
                storage, which = key, ("out", int(key[len(node.name) + 1 :]))
            else:
                storage, which = key, ("out", 0)  # own output, or a mask shaped like it
            if storage in seen:
                continue
            seen.add(storage)
            out[owner].append((which, float(nbytes)))
    return out


def _saved_fraction(
    node: OpNode,
    st: Strategy,
    which: int | tuple[str, int],
    param_derived: list[bool],
    ins: list[int],
    mesh_shape: tuple[int, ...],
) -> float:
    """Share of one saved tensor a device keeps under strategy ``st`` (Partial keeps it whole)."""
    if which == _WHOLE:
        return _local_fraction(node, st, param_derived, ins, mesh_shape)
    kind, k = which  # type: ignore[misc]
    specs = st.input_specs if kind == "in" else st.output_specs
    if not specs:
        return 1.0
    return local_numel_fraction(specs[min(k, len(specs) - 1)], mesh_shape)


def canonical_spec(meta: TensorMeta, pricing: Pricing) -> Spec:
    """The layout activations have between layers: batch split over ``dp``, whole elsewhere."""
    return boundary_spec(meta, pricing, sequence_parallel=False)


def token_dim(meta: TensorMeta) -> int | None:
    """The dim of an activation that runs over tokens: the one after the batch dim, for
    ``[batch, tokens, features...]`` tensors (at least three dims); None otherwise."""
    b = meta.batch_dim if meta.batch_dim is not None else 0
    d = b + 1
    return d if len(meta.shape) >= 3 and d < len(meta.shape) - 1 else None


def boundary_spec(meta: TensorMeta, pricing: Pricing, *, sequence_parallel: bool) -> Spec:
    """Layout of an activation between layers: batch split over ``dp``; over ``tp`` whole, or
    split along its token dim under sequence parallelism (when it divides evenly)."""
    out = []
    for name, size in zip(pricing.axis_names, pricing.mesh_shape):
        b = meta.batch_dim
        t = token_dim(meta)
        if name == "dp" and size > 1 and b is not None and b < len(meta.shape):
            out.append(Shard(b) if meta.shape[b] % size == 0 else REPLICATE)
        elif name == "tp" and sequence_parallel and size > 1 and t is not None:
            out.append(Shard(t) if meta.shape[t] % size == 0 else REPLICATE)
        else:
            out.append(REPLICATE)
    return tuple(out)


def _pin_boundaries(
    graph: OpGraph,
    nodes: list[OpNode],
    index: dict[str, int],
    strategies: list[tuple[Strategy, ...]],
    requires_grad: list[bool],
    pricing: Pricing,
    *,
    sequence_parallel: bool | None = None,
) -> None:
    """Layers that are not a repeated block meet their neighbours in the canonical layout.

    A block's output feeds the next identical block (the wrap-around edge prices a mismatch).
    Other layers (embedding, head) would otherwise pick an output layout the next layer never
    sees as free: the hidden state leaves the embedding split over its hidden dim, say. So when
    there is no wrap-around, a float graph input arrives in ``canonical_spec`` (the move to the
    chosen layout is the input's own collectives) and an output that feeds a next layer (same
    shape as a float input, or no float input at all: the embedding) leaves in it. The model's
    final output (logits) is left free: the loss reads it where it is (vocabulary-parallel).
    """
    acts = [i for i, n in enumerate(nodes) if n.kind == "input" and _is_float(n.output)]
    outs = [n for n in graph if n.kind == "output"]
    sp = bool(sequence_parallel)
    if _wraps(nodes, index, acts, outs):
        return  # the block's input was pinned when its strategies were made (build_problem)
    shapes = {nodes[i].output.shape for i in acts}
    for i in acts:
        meta = nodes[i].output
        canon = boundary_spec(meta, pricing, sequence_parallel=sp)
        strategies[i] = tuple(
            replace(
                st,
                collectives=st.collectives
                + reshard(
                    canon,
                    st.output_specs[0],
                    meta,
                    pricing.mesh_shape,
                    requires_grad=requires_grad[i],
                ),
            )  # fmt: skip
            for st in strategies[i]
        )
    for out in outs:
        for j, p in enumerate(out.inputs):
            u = index.get(p, -1)
            meta = out.input_metas[j] if j < len(out.input_metas) else None
            if u < 0 or not _is_float(meta) or (acts and meta.shape not in shapes):
                continue
            canon = boundary_spec(meta, pricing, sequence_parallel=sp)
            k = _output_index(nodes[u], out, j)
            strategies[u] = tuple(
                replace(
                    st,
                    collectives=st.collectives
                    + reshard(
                        st.output_specs[min(k, len(st.output_specs) - 1)],
                        canon,
                        meta,
                        pricing.mesh_shape,
                        requires_grad=requires_grad[u],
                    ),
                )  # fmt: skip
                for st in strategies[u]
            )


def _wraps(nodes: list[OpNode], index: dict[str, int], acts: list[int], outs: list[OpNode]) -> bool:
    """Does the layer have the wrap-around edge (one float input, an output of its shape)?"""
    if len(acts) != 1 or not outs:
        return False
    shape = nodes[acts[0]].output.shape
    for p in outs[0].inputs:
        u = index.get(p, -1)
        if u >= 0 and nodes[u].output is not None and nodes[u].output.shape == shape:
            return True
    return False


def _view_siblings(nodes: list[OpNode], view_src: list[int]) -> list[int]:
    """Per node: how many identical views of the same tensor exist (1 for non-views).

    Tracing gives q, k and v each their own ``view`` of the normalised input. The views follow
    that tensor, so they always carry the same layout: a gather needed by one is needed by all,
    and it is one gather of one tensor, not three.
    """
    key_of: list[tuple | None] = []
    counts: dict[tuple, int] = {}
    for i, n in enumerate(nodes):
        if view_src[i] < 0 or not n.outputs:
            key_of.append(None)
            continue
        key = (view_src[i], n.op, repr(n.args), n.outputs[0].shape)
        key_of.append(key)
        counts[key] = counts.get(key, 0) + 1
    return [counts[k] if k is not None else 1 for k in key_of]


def _edge_weight(u: int, v: int, siblings: list[int], n_consumers: list[int]) -> float:
    """Share of an edge's resharding it pays: 1/n into (or out of, when the view has a single
    consumer) one of n identical views of a tensor; 1 otherwise.

    Exact on the edges into the views (they share the producer's layout); out of them it
    assumes the n consumers want the same layout (q, k and v do), the one approximation here.
    """
    if siblings[v] > 1:
        return 1.0 / siblings[v]
    if siblings[u] > 1 and n_consumers[u] == 1:
        return 1.0 / siblings[u]
    return 1.0


def _partial_grad_axes(st: Strategy, operand: int) -> frozenset[int]:
    """Mesh axes on which strategy ``st`` leaves input ``operand`` a partial gradient."""
    return frozenset(
        c.axis
        for c in st.collectives
        if c.kind == "all_reduce" and c.phase == "bwd" and c.operand == operand
    )


def edge_collectives(
    src: Spec,
    dst: Spec,
    meta: TensorMeta,
    mesh_shape: tuple[int, ...],
    *,
    grad: bool,
    partial_grad_axes: frozenset[int],
    pricing: Pricing,
) -> list[tuple[Collective, float]]:
    """The resharding ``src -> dst`` as priced collectives (``rules.reshard``), one adjustment:

    a gather ``Shard -> Replicate`` on an axis where the consumer leaves the tensor a partial
    gradient (it splits another label there: Megatron's column-parallel input) has, as its
    backward dual, a reduce-scatter of that gradient, which *replaces* the all-reduce the
    consumer already pays for it (a shared cost). That is sequence parallelism: all-gather
    forward, reduce-scatter backward, the same traffic as the all-reduce it stands in for. The
    replacement is priced as ``reduce_scatter - all_reduce`` (a "bwd" term, never making the
    edge cost negative). A consumer reached through a view is assumed to leave a partial
    gradient (views hide their consumer's strategy from the edge).
    """
    out: list[tuple[Collective, float]] = []
    for c in reshard(src, dst, meta, mesh_shape, requires_grad=grad):
        t = pricing.collective_s(c.kind, c.nbytes, c.axis)
        out.append((c, t))
        if (
            grad
            and c.kind == "all_gather"
            and c.phase == "fwd"
            and c.axis in partial_grad_axes
            and isinstance(src[c.axis], Shard)
            and not isinstance(dst[c.axis], Shard)
        ):
            rs = pricing.collective_s("reduce_scatter", c.nbytes, c.axis)
            ar = pricing.collective_s("all_reduce", c.nbytes, c.axis)
            delta = max(rs - ar, -t)
            out.append((Collective("reduce_scatter", c.nbytes, c.axis, "bwd"), delta))
    return out
