"""solve_layer: the intra-op plan of one layer on a (dp, tp)-style mesh, priced and explained.

This is the entry the outer search calls once per distinct layer and mesh shape. It builds the
``IntraOpProblem`` (``problem.py``), solves it (``solver/intra_op.py``) and reads the chosen
strategies back into a ``LayerSharding``: parameter placements in ``Plan`` string form and the
time and memory breakdown the search adds up.

Two pricings of communication:

* topology-aware (default): ``cost.collectives.mesh_collective_time_s`` on the mesh axis's real
  device groups, so a group that spans hosts pays NIC and network prices;
* volume-only (``topology_aware=False``): ``volume_collective_time_s`` on bytes and group size
  only, the baseline most auto-parallel systems use. The plan it picks is re-priced with the
  topology-aware model, so the breakdown fields always say what the plan really costs and
  ``model_objective_s`` says what the choosing model believed.

Repeated layers are solved once: results are cached on the layer's structure (ops, shapes,
arguments, not its names) + mesh + cluster + dtype + the remaining knobs, and re-keyed to the
caller's parameter names.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from autopar.cost.profiles import DTYPE_ALIASES
from autopar.graph.opgraph import OpGraph, OpNode
from autopar.sharding.placements import spec_strings
from autopar.sharding.problem import (
    BuiltProblem,
    Pricing,
    _partial_grad_axes,
    build_problem,
    edge_collectives,
)
from autopar.sharding.rules import op_dims

__all__ = ["LayerSharding", "CollectiveUse", "solve_layer", "graph_signature"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectiveUse:
    """One collective of the chosen plan, for explanations (priced topology-aware)."""

    op: str
    """Graph node that implies it (a consumer, for resharding)."""
    kind: str
    axis: str
    phase: Literal["fwd", "bwd", "grad_sync"]
    nbytes: float
    time_s: float
    """Seconds; a backward ``reduce_scatter`` that replaces a partial-gradient all-reduce
    (sequence parallelism, ``problem.edge_collectives``) carries the (negative) difference."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerSharding:
    """The chosen intra-op plan of one layer and what it costs on one device."""

    placements: dict[str, tuple[str, ...]]
    """Parameter FQN -> placement string per mesh axis (``"R"``, ``"S(d)"``, ``"P"``)."""
    fwd_compute_s: float
    """Forward compute of the local shards, per microbatch."""
    bwd_compute_s: float
    """Backward compute, per microbatch."""
    tp_comm_s: float
    """All per-microbatch communication, forward + backward (tensor-parallel collectives and
    resharding on any axis); equals ``comm_fwd_s + comm_bwd_s``."""
    comm_fwd_s: float
    comm_bwd_s: float
    grad_sync_s: float
    """Weight-gradient synchronisation, once per step (not weighted)."""
    param_bytes_per_device: float
    """Weight bytes held per device (no grads or optimizer state)."""
    activation_bytes: float
    """Bytes saved for backward per microbatch per device."""
    status: Literal["optimal", "feasible"]
    gap: float
    """CP-SAT's relative gap (0 when optimal)."""
    objective_s: float
    """Topology-aware objective of the chosen plan: compute + comm + grad_sync x weight."""
    model_objective_s: float
    """The objective as priced by the model that chose the plan (volume-only or topology-aware)."""
    topology_aware: bool
    unsupported_ops: tuple[str, ...] = ()
    """Ops no rule knew (replicated, priced at full size), by aten name."""
    op_strategies: dict[str, str] = field(default_factory=dict)
    """Decision op -> chosen strategy name (e.g. ``"n@tp"``: output columns split over tp)."""
    collectives: tuple[CollectiveUse, ...] = ()
    solve_time_s: float = 0.0
    num_decisions: int = 0
    cached: bool = False

    @property
    def comm_s(self) -> float:
        """Per-microbatch plus per-step communication (unweighted)."""
        return self.tp_comm_s + self.grad_sync_s


# -- pricing ------------------------------------------------------------------------------------
def _make_pricing(
    *,
    mesh: Any,
    cluster: Any,
    dtype: str,
    grad_sync_weight: float,
    topology_aware: bool,
    memory_budget_bytes: float | None,
    param_memory_multiplier: float,
    replicated_param_axes: tuple[str, ...] = (),
    collective_mesh: Any = None,
    attention: str = "flash",
) -> Pricing:
    """Prices on ``mesh``'s axes; collectives along an axis are priced on ``collective_mesh``
    (default ``mesh``): a one-axis tp problem is priced with every tp group of the whole cluster
    communicating at once, as in the step it stands for."""
    from autopar.cost.collectives import mesh_collective_time_s, volume_collective_time_s
    from autopar.cost.memory import saved_activation_bytes, saved_tensors
    from autopar.cost.ops import op_time_s
    from autopar.graph.ops import family

    names = tuple(str(n) for n in mesh.dim_names)
    shape = tuple(int(s) for s in mesh.shape)
    device = cluster.device
    dt = DTYPE_ALIASES.get(dtype, dtype)

    if topology_aware:
        on = mesh if collective_mesh is None else collective_mesh

        def coll(kind: str, nbytes: float, axis: int) -> float:
            if shape[axis] == 1 or nbytes <= 0:
                return 0.0
            return mesh_collective_time_s(kind, nbytes, on, names[axis], cluster)
    else:

        def coll(kind: str, nbytes: float, axis: int) -> float:
            if shape[axis] == 1 or nbytes <= 0:
                return 0.0
            return volume_collective_time_s(kind, nbytes, shape[axis], cluster)

    def compute(node: OpNode, st: Any, phase: str) -> float:
        return op_time_s(
            node,
            input_shapes=[
                _local(m.shape, sp, shape) for m, sp in zip(node.input_metas, st.input_specs)
            ],
            output_shapes=[
                _local(m.shape, sp, shape) for m, sp in zip(node.outputs, st.output_specs)
            ],
            divisor=st.compute_divisor,
            phase=phase,
            device=device,
            dtype=dt,
            attention=attention,
        )

    def saved(node: OpNode) -> tuple[tuple[str, float], ...]:
        base = tuple((t.key, t.nbytes) for t in saved_tensors(node))
        if attention == "unfused" and family(node.op) == "attention":
            return base + _unfused_scores(node)
        return base

    return Pricing(
        mesh_shape=shape,
        axis_names=names,
        collective_s=coll,
        compute_s=compute,
        saved_bytes=saved_activation_bytes,
        saved_tensors=saved,
        grad_sync_weight=grad_sync_weight,
        param_memory_multiplier=param_memory_multiplier,
        memory_budget_bytes=memory_budget_bytes,
        replicated_param_axes=tuple(i for i, n in enumerate(names) if n in replicated_param_axes),
    )


def _local(shape: tuple[int, ...], spec: Any, mesh_shape: tuple[int, ...]) -> tuple[int, ...]:
    """A tensor's shape as one device holds it under ``spec``."""
    from autopar.sharding.placements import Shard

    out = list(shape)
    for p, n in zip(spec, mesh_shape):
        if isinstance(p, Shard) and p.dim < len(out):
            out[p.dim] = max(1, out[p.dim] // n)
    return tuple(out)


def _unfused_scores(node: OpNode) -> tuple[tuple[str, float], ...]:
    """What unfused attention keeps for backward besides q, k, v: the softmax output, and with
    dropout its 1-byte mask and its output (Korthikanti et al.: 5 bytes per score in 16 bit)."""
    q, k = node.input_metas[0], node.input_metas[1]
    scores = 1
    for d in q.shape[:-1]:
        scores *= d
    scores *= k.shape[-2]
    item = q.itemsize
    dropout = float(node.args[4]) if len(node.args) > 4 and node.args[4] else 0.0
    total = item * scores + ((1 + item) * scores if dropout > 0 else 0)
    return ((f"{node.name}:scores", float(total)),)


# -- reading a solution back ----------------------------------------------------------------------
def _breakdown(bp: BuiltProblem, choice: tuple[int, ...], pricing: Pricing) -> dict[str, Any]:
    fwd = bwd = cfwd = cbwd = gs = pbytes = abytes = 0.0
    uses: list[CollectiveUse] = []
    names = pricing.axis_names
    known = {n.name for n in bp.nodes}
    for i, node in enumerate(bp.nodes):
        s = choice[i]
        st = bp.strategies[i][s]
        fwd += float(bp.fwd_compute_s[i][s])
        bwd += float(bp.bwd_compute_s[i][s])
        pbytes += float(bp.param_bytes[i][s])
        abytes += float(bp.activation_bytes[i][s])
        for c in st.collectives:
            if 0 <= c.operand < len(node.inputs) and node.inputs[c.operand] in known:
                continue  # partial-gradient all-reduces are counted once below (shared)
            t = pricing.collective_s(c.kind, c.nbytes, c.axis)
            uses.append(CollectiveUse(op=node.name, kind=c.kind, axis=names[c.axis],
                                      phase=c.phase, nbytes=c.nbytes, time_s=t))  # fmt: skip
    prob = bp.problem
    for (producer, c), members in zip(bp.shared, prob.shared_members):
        if any(choice[i] in ss for i, ss in members):
            t = pricing.collective_s(c.kind, c.nbytes, c.axis)
            uses.append(CollectiveUse(op=producer, kind=c.kind, axis=names[c.axis],
                                      phase=c.phase, nbytes=c.nbytes, time_s=t))  # fmt: skip
    for e, (u, v) in enumerate(prob.edges):
        in_j, out_k, wrap = bp.edge_inputs[e]
        su, sv = bp.strategies[u][choice[u]], bp.strategies[v][choice[v]]
        src = su.output_specs[min(out_k, len(su.output_specs) - 1)]
        dst = sv.output_specs[0] if wrap > 0 else sv.input_specs[in_j]
        node_v = bp.nodes[v]
        meta = bp.nodes[v].output if wrap > 0 else node_v.input_metas[in_j]
        grad = _needs_grad(bp, u) and _needs_grad(bp, v)
        if wrap > 0:
            partial: frozenset[int] = frozenset()
        elif bp.problem.follows[v] >= 0 and _is_view(bp, v):
            partial = frozenset(range(len(pricing.mesh_shape)))
        else:
            partial = _partial_grad_axes(sv, in_j)
        w = bp.edge_weights[e] if e < len(bp.edge_weights) else 1.0
        for c, t in edge_collectives(
            src, dst, meta, pricing.mesh_shape, grad=grad, partial_grad_axes=partial,
            pricing=pricing,
        ):  # fmt: skip
            uses.append(CollectiveUse(op=node_v.name, kind=c.kind, axis=names[c.axis],
                                      phase=c.phase, nbytes=c.nbytes * w, time_s=t * w))  # fmt: skip
    for u in uses:
        if u.phase == "fwd":
            cfwd += u.time_s
        elif u.phase == "bwd":
            cbwd += u.time_s
        else:
            gs += u.time_s
    objective = fwd + bwd + cfwd + cbwd + pricing.grad_sync_weight * gs
    return dict(
        fwd_compute_s=fwd,
        bwd_compute_s=bwd,
        comm_fwd_s=cfwd,
        comm_bwd_s=cbwd,
        tp_comm_s=cfwd + cbwd,
        grad_sync_s=gs,
        param_bytes_per_device=pbytes,
        activation_bytes=abytes,
        objective_s=objective,
        collectives=tuple(uses),
    )


def _is_view(bp: BuiltProblem, i: int) -> bool:
    """Is node i a single-input pure view (the edge pricing assumes its consumer's gradient)?"""
    node = bp.nodes[i]
    if node.kind != "op" or len(node.inputs) != 1 or len(node.outputs) != 1:
        return False
    dims = op_dims(node)
    return dims is not None and not dims.moves_bytes


def _needs_grad(bp: BuiltProblem, i: int) -> bool:
    node = bp.nodes[i]
    if node.kind == "param":
        return True
    out = node.output
    return out is not None and out.dtype.startswith(("float", "bfloat", "complex"))


# -- caching on structure -------------------------------------------------------------------------
def graph_signature(graph: OpGraph) -> tuple:
    """Structure of a layer graph without its names: equal for identical repeated blocks."""
    index: dict[str, int] = {}
    rows = []
    for i, n in enumerate(graph):
        index[n.name] = i
        rows.append(
            (
                n.kind,
                n.op,
                tuple(index.get(p, -1) for p in n.inputs),
                tuple((m.shape, m.dtype, m.batch_dim) for m in n.input_metas),
                tuple((m.shape, m.dtype, m.batch_dim) for m in n.outputs),
                repr(n.args),
                repr(n.kwargs),
                round(n.fwd_flops),
                round(n.bwd_flops),
            )
        )
    return tuple(rows)


class _ByKey:
    """Carries an unhashable object through lru_cache, compared by a key (or identity)."""

    __slots__ = ("key", "obj")

    def __init__(self, key: object, obj: object) -> None:
        self.key = key
        self.obj = obj

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByKey) and self.key == other.key


def _cluster_key(cluster: Any) -> object:
    try:
        hash(cluster)
        return cluster
    except TypeError:
        return ("id", id(cluster))


def solve_layer(
    graph: OpGraph,
    *,
    mesh: Any,
    cluster: Any,
    dtype: str,
    grad_sync_weight: float = 1.0,
    topology_aware: bool = True,
    time_limit_s: float = 10.0,
    memory_budget_bytes: float | None = None,
    param_memory_multiplier: float = 1.0,
    replicated_param_axes: tuple[str, ...] = (),
) -> LayerSharding:
    """Choose every op's sharding of ``graph`` on ``mesh`` and price the result.

    ``graph`` is one layer at the batch the mesh processes (the search passes
    ``graph.with_batch(micro_batch_size * dp)``); float32 tensors in it are priced in ``dtype``
    (zoo models trace in fp32, training runs in bf16: ``graph.prepare.in_training_dtype``); ``mesh`` a LogicalMesh of one or two axes whose
    ranks lie on ``cluster``. ``grad_sync_weight`` (1/microbatches) weighs the once-per-step
    gradient all-reduce against per-microbatch time. ``memory_budget_bytes`` bounds
    ``param_bytes x param_memory_multiplier + activation_bytes`` per device; when no layout fits
    an InfeasibleError says by how much. ``replicated_param_axes`` names mesh axes on which
    parameters must be stored whole: the search passes ``("dp",)`` and applies ZeRO itself.
    """
    from autopar.graph.prepare import in_training_dtype

    graph = in_training_dtype(graph, dtype)  # fp32-traced bytes priced at the training dtype
    sig = graph_signature(graph)
    mesh_key = (
        tuple(mesh.shape),
        tuple(str(n) for n in mesh.dim_names),
        getattr(mesh, "first_rank", 0),
    )
    hits = _solve_cached.cache_info().hits
    result, order = _solve_cached(
        _ByKey(sig, graph),
        _ByKey(mesh_key, mesh),
        _ByKey(_cluster_key(cluster), cluster),
        str(dtype),
        float(grad_sync_weight),
        bool(topology_aware),
        float(time_limit_s),
        memory_budget_bytes,
        float(param_memory_multiplier),
        tuple(replicated_param_axes),
    )
    was_cached = _solve_cached.cache_info().hits > hits
    names = _name_order(graph)
    if order == names:
        return replace(result, cached=True) if was_cached else result
    # same structure, other names (another copy of a repeated block): re-key by position
    params = dict(zip(order[0], names[0]))
    nodes = dict(zip(order[1], names[1]))
    return replace(
        result,
        placements={params.get(k, k): v for k, v in result.placements.items()},
        op_strategies={nodes.get(k, k): v for k, v in result.op_strategies.items()},
        collectives=tuple(replace(c, op=nodes.get(c.op, c.op)) for c in result.collectives),
        cached=True,
    )


def _name_order(graph: OpGraph) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(parameter FQNs, node names) in graph order: how two identical blocks line up."""
    params = tuple(n.params[0] if n.params else n.name for n in graph if n.kind == "param")
    return params, tuple(n.name for n in graph)


@functools.lru_cache(maxsize=512)
def _solve_cached(
    graph_k: _ByKey,
    mesh_k: _ByKey,
    cluster_k: _ByKey,
    dtype: str,
    grad_sync_weight: float,
    topology_aware: bool,
    time_limit_s: float,
    memory_budget_bytes: float | None,
    param_memory_multiplier: float,
    replicated_param_axes: tuple[str, ...],
) -> tuple[LayerSharding, tuple[tuple[str, ...], tuple[str, ...]]]:
    from autopar.solver.intra_op import solve_intra_op

    graph: OpGraph = graph_k.obj  # type: ignore[assignment]
    mesh, cluster = mesh_k.obj, cluster_k.obj
    t0 = time.perf_counter()
    kw = dict(
        mesh=mesh,
        cluster=cluster,
        dtype=dtype,
        grad_sync_weight=grad_sync_weight,
        memory_budget_bytes=memory_budget_bytes,
        param_memory_multiplier=param_memory_multiplier,
        replicated_param_axes=replicated_param_axes,
    )
    truth = _make_pricing(topology_aware=True, **kw)
    bp_truth = build_problem(graph, truth)
    if topology_aware:
        bp_model, model_pricing = bp_truth, truth
    else:
        model_pricing = _make_pricing(topology_aware=False, **kw)
        bp_model = build_problem(graph, model_pricing)
    sol = solve_intra_op(bp_model.problem, time_limit_s=time_limit_s)
    parts = _breakdown(bp_truth, sol.choice, truth)
    placements = {
        fqn: spec_strings(bp_truth.strategies[i][sol.choice[i]].output_specs[0])
        for fqn, i in bp_truth.params.items()
    }
    op_strats = {
        n.name: bp_truth.strategies[i][sol.choice[i]].name
        for i, n in enumerate(bp_truth.nodes)
        if n.kind == "op" and bp_truth.problem.follows[i] < 0
    }
    result = LayerSharding(
        placements=placements,
        status=sol.status,
        gap=sol.gap,
        model_objective_s=sol.objective_s,
        topology_aware=topology_aware,
        unsupported_ops=tuple(sorted(set(bp_truth.problem.unsupported_ops))),
        op_strategies=op_strats,
        solve_time_s=time.perf_counter() - t0,
        num_decisions=sol.num_groups,
        **parts,
    )
    return result, _name_order(graph)


# -- the search's entry: choose once per (structure, tp, boundary), price per micro-batch --------
@dataclass(frozen=True, slots=True, kw_only=True)
class LayerChoice:
    """The ILP's choice for one layer structure on a tp axis: a strategy name per decision."""

    select: dict[str, str]
    """Node name -> chosen strategy name, for every decision op, parameter and input (the
    followers follow). ``build_problem(select=...)`` re-prices it at any batch."""
    sequence_parallel: bool
    """Whether the layer's boundary activations are token-split over tp."""
    status: str
    gap: float
    objective_s: float
    solve_time_s: float
    num_decisions: int
    unsupported_ops: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class OpLayout:
    """Where one op runs on the tp axis, in DTensor short form (what the emitter applies)."""

    node: str
    op: str
    inputs: tuple[str, ...]
    """Placement of each tensor input (``OpNode.inputs`` order) as the op consumes it."""
    output: str
    """Placement of the op's first output as produced."""
    core: bool = False
    """Part of the attention core (re-run by selective recompute)."""
    loss: bool = False
    """Part of the training loss the search adds after the model (``trace(with_loss=True)``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerPrice:
    """What one layer costs on one device of a tp group, per microbatch, for one choice."""

    fwd_s: float
    bwd_s: float
    comm_fwd_s: float
    """Tensor-parallel collectives and resharding on the forward critical path."""
    comm_bwd_s: float
    grad_sync_s: float
    """Gradient all-reduces over tp of parameters left partial there, once per step."""
    param_numel: float
    """Parameters one device holds after the tp split (owned ones only: a tied weight counts
    once, with the layer that owns it)."""
    activation_bytes: float
    """Bytes saved for backward per microbatch per device."""
    input_bytes: float
    """The layer's batched inputs at the boundary layout (what full recompute keeps)."""
    output_bytes: float
    """The batched activation leaving the layer at the boundary layout (a pipeline send)."""
    core_fwd_s: float
    """Forward time of the attention core (what selective recompute re-runs)."""
    core_activation_bytes: float
    """Saved bytes the attention core makes (what selective recompute drops)."""
    fwd_flops: float
    bwd_flops: float
    placements: dict[str, str]
    """Parameter FQN (as named in the layer graph) -> tp placement string."""
    layouts: tuple[OpLayout, ...]
    unsupported_ops: tuple[str, ...] = ()
    splits: bool = False
    """Does tp split any op's work (a compute divisor above 1)?"""


def _tp_pricing(*, tp: int, world: int, cluster: Any, dtype: str, grad_sync_weight: float,
                memory_budget_bytes: float | None = None, param_memory_multiplier: float = 1.0,
                attention: str = "flash") -> Pricing:  # fmt: skip
    """Pricing on a one-axis tp mesh whose groups are laid out as the innermost axis of
    ``world`` devices (every tp group of the cluster communicating at once)."""
    from autopar.topology.mesh import LogicalMesh

    return _make_pricing(
        mesh=LogicalMesh((tp,), ("tp",)),
        collective_mesh=LogicalMesh((max(1, world // tp), tp), ("dp", "tp")),
        cluster=cluster,
        dtype=dtype,
        grad_sync_weight=grad_sync_weight,
        topology_aware=True,
        memory_budget_bytes=memory_budget_bytes,
        param_memory_multiplier=param_memory_multiplier,
        attention=attention,
    )


def choose_layer(
    graph: OpGraph,
    *,
    tp: int,
    world: int,
    cluster: Any,
    dtype: str,
    sequence_parallel: bool,
    grad_sync_weight: float = 1.0,
    time_limit_s: float = 10.0,
    pinned: tuple[tuple[str, str], ...] = (),
    lean: bool = False,
    param_memory_multiplier: float = 1.0,
    attention: str = "flash",
) -> LayerChoice:
    """Solve the intra-op ILP of one layer on a ``tp`` axis (its groups laid out as the
    innermost axis of ``world`` devices), boundaries whole or token-split over tp.

    ``pinned`` fixes some nodes' strategies (a tied weight keeps the layout its owner layer
    gave it). ``lean`` asks for the fastest plan among those using the least memory
    (weights x ``param_memory_multiplier`` + saved activations): the least memory is found
    first, then CP-SAT solves the problem with that memory row as its budget. The search uses
    it when the time-optimal choice does not fit. Cached on the layer's structure and the
    arguments.
    """
    # cached on structure: identical layers of another model (other names) share the answer,
    # so strategies are keyed by node position in the cache and named per caller here
    order = [n.name for n in graph if n.kind != "output"]
    position = {name: i for i, name in enumerate(order)}
    result = _choose_cached(
        _ByKey(graph_signature(graph), graph),
        int(tp),
        int(world),
        _ByKey(_cluster_key(cluster), cluster),
        str(dtype),
        bool(sequence_parallel),
        float(grad_sync_weight),
        float(time_limit_s),
        tuple(sorted((position[n], st) for n, st in pinned)),
        bool(lean),
        float(param_memory_multiplier),
        str(attention),
    )
    return replace(result, select={order[int(i)]: st for i, st in result.select.items()})


LEAN_SLACK = 0.02
"""Memory slack over the least memory within which the lean choice minimises time: enough
that a few-kilobyte norm or bias is not sharded (and gathered every use) to save 0.1 %."""


@functools.lru_cache(maxsize=2048)
def _choose_cached(
    graph_k: _ByKey,
    tp: int,
    world: int,
    cluster_k: _ByKey,
    dtype: str,
    sequence_parallel: bool,
    grad_sync_weight: float,
    time_limit_s: float,
    pinned: tuple[tuple[int, str], ...],
    lean: bool,
    param_memory_multiplier: float,
    attention: str,
) -> LayerChoice:
    """``choose_layer`` on the first graph of its structure; ``select`` keyed by position."""
    from dataclasses import replace as dc_replace

    from autopar.solver.intra_op import solve_intra_op

    graph: OpGraph = graph_k.obj  # type: ignore[assignment]
    t0 = time.perf_counter()
    pricing = _tp_pricing(
        tp=tp, world=world, cluster=cluster_k.obj, dtype=dtype,
        grad_sync_weight=grad_sync_weight, param_memory_multiplier=param_memory_multiplier,
        attention=attention,
    )  # fmt: skip
    order = [n.name for n in graph if n.kind != "output"]
    bp = build_problem(
        graph,
        pricing,
        select={order[i]: st for i, st in pinned} or None,
        sequence_parallel=sequence_parallel,
    )
    problem = bp.problem
    if lean:
        # least memory first (memory as the only cost: exact by elimination), then the fastest
        # plan within it (CP-SAT with the memory row)
        least = dc_replace(
            problem,
            node_costs=problem.memory_bytes,
            edges=(),
            edge_costs=(),
            shared_costs=(),
            shared_members=(),
        )
        floor = solve_intra_op(least, time_limit_s=time_limit_s).objective_s
        problem = dc_replace(problem, memory_budget_bytes=floor * (1.0 + LEAN_SLACK) + 1.0)
    sol = solve_intra_op(problem, time_limit_s=time_limit_s)
    position = {name: i for i, name in enumerate(order)}
    select = {
        position[n.name]: bp.strategies[i][sol.choice[i]].name
        for i, n in enumerate(bp.nodes)
        if bp.problem.follows[i] < 0
    }
    return LayerChoice(
        select=select,  # type: ignore[arg-type]  # positions here, names once returned
        sequence_parallel=sequence_parallel,
        status=sol.status,
        gap=float(sol.gap or 0.0),
        objective_s=float(sol.objective_s),
        solve_time_s=time.perf_counter() - t0,
        num_decisions=sol.num_groups,
        unsupported_ops=tuple(bp.problem.unsupported_ops),
    )


def price_layer(
    graph: OpGraph,
    choice: LayerChoice,
    *,
    tp: int,
    world: int,
    cluster: Any,
    dtype: str,
    owned_params: frozenset[str] | None = None,
    attention: str = "flash",
) -> LayerPrice:
    """Price ``choice`` on ``graph`` (the layer at the micro-batch being priced).

    Builds the problem with one strategy per node (``build_problem(select=...)``) and reads
    its costs: compute per op at its local shard, collectives and resharding per phase, saved
    activations at their layouts, the attention core's share (``graph.regions``), the
    per-op layouts the emitter applies. Raises ``KeyError`` when the choice cannot be formed at
    this graph's shapes (a split that no longer divides).
    """
    from autopar.graph.regions import attention_core
    from autopar.graph.trace import LOSS_PATH
    from autopar.sharding.placements import local_numel_fraction
    from autopar.sharding.problem import boundary_spec

    pricing = _tp_pricing(
        tp=tp, world=world, cluster=cluster, dtype=dtype, grad_sync_weight=1.0, attention=attention
    )
    bp = build_problem(
        graph, pricing, select=choice.select, sequence_parallel=choice.sequence_parallel
    )
    zeros = tuple(0 for _ in bp.nodes)
    parts = _breakdown(bp, zeros, pricing)
    core = attention_core(graph)
    shape = pricing.mesh_shape
    core_fwd = core_act = 0.0
    numel = fwd_flops = bwd_flops = 0.0
    placements: dict[str, str] = {}
    layouts: list[OpLayout] = []
    splits = False
    for i, node in enumerate(bp.nodes):
        st = bp.strategies[i][0]
        if node.kind == "param":
            fqn = node.params[0] if node.params else node.name
            placements[fqn] = spec_strings(st.output_specs[0])[0]
            if (owned_params is None or fqn in owned_params) and node.output is not None:
                numel += node.output.numel * local_numel_fraction(st.output_specs[0], shape)
            continue
        if node.kind != "op":
            continue
        if st.compute_divisor > 1 and (node.fwd_flops > 0 or node.outputs):
            splits = True
        fwd_flops += node.fwd_flops / st.compute_divisor
        bwd_flops += node.bwd_flops / st.compute_divisor
        is_core = node.name in core
        if is_core:
            core_fwd += float(bp.fwd_compute_s[i][0])
            core_act += float(bp.activation_bytes[i][0])
        layouts.append(
            OpLayout(
                node=node.name,
                op=node.op,
                inputs=tuple(spec_strings(sp)[0] for sp in st.input_specs),
                output=spec_strings(st.output_specs[0])[0] if st.output_specs else "R",
                core=is_core,
                loss=node.module_path == LOSS_PATH,
            )
        )

    def boundary_bytes(metas: list[Any]) -> float:
        total = 0.0
        for m in metas:
            if m is None or m.batch_dim is None or not m.dtype.startswith(("float", "bfloat")):
                continue
            spec = boundary_spec(m, pricing, sequence_parallel=choice.sequence_parallel)
            total += m.nbytes * local_numel_fraction(spec, shape)
        return total

    inputs = [n.output for n in graph if n.kind == "input"]
    outputs: list[Any] = []
    for n in graph:
        if n.kind == "output":
            outputs += [
                m
                for src, m in zip(n.inputs, n.input_metas)
                if src not in graph or graph.node(src).kind not in ("param", "buffer")
            ]
    # what crosses a stage boundary: the last batched activation (the hidden state), not every
    # tensor the layer hands on
    batched = [m for m in outputs if m is not None and m.batch_dim is not None]
    return LayerPrice(
        fwd_s=float(parts["fwd_compute_s"]),
        bwd_s=float(parts["bwd_compute_s"]),
        comm_fwd_s=float(parts["comm_fwd_s"]),
        comm_bwd_s=float(parts["comm_bwd_s"]),
        grad_sync_s=float(parts["grad_sync_s"]),
        param_numel=numel,
        activation_bytes=float(parts["activation_bytes"]),
        input_bytes=boundary_bytes(inputs),
        output_bytes=boundary_bytes(batched[-1:]),
        core_fwd_s=core_fwd,
        core_activation_bytes=core_act,
        fwd_flops=fwd_flops,
        bwd_flops=bwd_flops,
        placements=placements,
        layouts=tuple(layouts),
        unsupported_ops=tuple(bp.problem.unsupported_ops),
        splits=splits,
    )
