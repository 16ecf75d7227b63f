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
from autopar.sharding.rules import base_name, op_dims

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
) -> Pricing:
    from autopar.cost.collectives import mesh_collective_time_s, volume_collective_time_s
    from autopar.cost.compute import compute_time_s
    from autopar.cost.memory import saved_activation_bytes, saved_tensors

    names = tuple(str(n) for n in mesh.dim_names)
    shape = tuple(int(s) for s in mesh.shape)
    device = cluster.device
    dt = DTYPE_ALIASES.get(dtype, dtype)

    if topology_aware:

        def coll(kind: str, nbytes: float, axis: int) -> float:
            if shape[axis] == 1 or nbytes <= 0:
                return 0.0
            return mesh_collective_time_s(kind, nbytes, mesh, names[axis], cluster)
    else:

        def coll(kind: str, nbytes: float, axis: int) -> float:
            if shape[axis] == 1 or nbytes <= 0:
                return 0.0
            return volume_collective_time_s(kind, nbytes, shape[axis], cluster)

    def compute(node: OpNode, div: int, phase: str) -> float:
        flops = node.fwd_flops if phase == "fwd" else node.bwd_flops
        nbytes = sum(m.nbytes for m in node.input_metas) + sum(m.nbytes for m in node.outputs)
        if phase == "bwd":
            nbytes *= 2  # read the saved inputs and the output gradient, write input gradients
        return compute_time_s(
            flops=flops / div,
            bytes_moved=nbytes / div,
            device=device,
            dtype=dt,
            matmul_dims=_matmul_dims(node, div),
        )

    return Pricing(
        mesh_shape=shape,
        axis_names=names,
        collective_s=coll,
        compute_s=compute,
        saved_bytes=saved_activation_bytes,
        saved_tensors=lambda node: tuple((t.key, t.nbytes) for t in saved_tensors(node)),
        grad_sync_weight=grad_sync_weight,
        param_memory_multiplier=param_memory_multiplier,
        memory_budget_bytes=memory_budget_bytes,
        replicated_param_axes=tuple(i for i, n in enumerate(names) if n in replicated_param_axes),
    )


def _matmul_dims(node: OpNode, div: int) -> tuple[int, ...] | None:
    """(m, n, k) of a matmul's local shard, so small local matmuls get their lower efficiency.

    Fused attention is two batched GEMMs on tensor cores, (batch·heads, s_q, s_k, head dim);
    the divisor splits its batch·heads (the strategies split batch, heads or queries, which
    all shrink the GEMM batch the same way for the efficiency curve).
    """
    name = base_name(node.op)
    if name in _ATTENTION_OPS:
        if len(node.input_metas) < 2 or len(node.input_metas[0].shape) < 3:
            return None
        q, k = node.input_metas[0].shape, node.input_metas[1].shape
        batch = 1
        for d in q[:-2]:
            batch *= d
        return (max(1, batch // div), max(1, q[-2]), max(1, k[-2]), max(1, q[-1]))
    if name not in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear") or not node.outputs:
        return None
    metas = node.input_metas[1:] if name in ("addmm", "baddbmm") else node.input_metas
    if len(metas) < 2 or len(metas[0].shape) < 1 or not node.outputs[0].shape:
        return None
    k = metas[0].shape[-1]
    out = node.outputs[0].shape
    m = 1
    for d in out[:-1]:
        m *= d
    n = out[-1]
    # the divisor splits one of the three; attribute it to the largest for a fair efficiency
    dims = [m, n, k]
    big = max(range(3), key=lambda i: dims[i])
    dims[big] = max(1, dims[big] // div)
    return (dims[0], dims[1], dims[2])


_ATTENTION_OPS = frozenset(
    {
        "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
        "_flash_attention_forward", "_efficient_attention_forward",
    }
)  # fmt: skip


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
    (zoo models trace in fp32, training runs in bf16: ``_costing.in_training_dtype``); ``mesh`` a LogicalMesh of one or two axes whose
    ranks lie on ``cluster``. ``grad_sync_weight`` (1/microbatches) weighs the once-per-step
    gradient all-reduce against per-microbatch time. ``memory_budget_bytes`` bounds
    ``param_bytes x param_memory_multiplier + activation_bytes`` per device; when no layout fits
    an InfeasibleError says by how much. ``replicated_param_axes`` names mesh axes on which
    parameters must be stored whole: the search passes ``("dp",)`` and applies ZeRO itself.
    """
    from autopar.solver._costing import in_training_dtype

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
