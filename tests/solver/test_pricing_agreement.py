"""The two layer pricers agree on the same split: the analytic Megatron split (``_costing``) and
the intra-op ILP (``sharding.layer_plan``) price a GPT-3-shaped block alike, so the search picks
between plans, not between pricing conventions."""

from __future__ import annotations

import pytest

from autopar.cost.collectives import collective_time_s, mesh_collective_time_s
from autopar.cost.compute import compute_time_s
from autopar.cost.memory import graph_saved_activation_bytes, saved_tensors
from autopar.graph.layers import group_layers, layer_graph
from autopar.graph.trace import trace
from autopar.models import gpt
from autopar.sharding.layer_plan import solve_layer
from autopar.solver._costing import analytic_layer_cost, in_training_dtype
from autopar.topology.load import load_cluster
from autopar.topology.mesh import LogicalMesh

HIDDEN, HEADS, SEQ = 4096, 32, 2048


@pytest.fixture(scope="module")
def block_fp32():
    """One GPT-3-style block (hidden 4096, 32 heads, seq 2048) at micro-batch 1, traced in fp32."""
    model = gpt(layers=2, hidden=HIDDEN, heads=HEADS, vocab=512, seq_len=SEQ)
    graph = trace(model)
    layer = next(x for x in group_layers(graph) if x.name == "layers.0")
    return layer_graph(graph, layer)


@pytest.fixture(scope="module")
def cluster():
    return load_cluster("dgx-a100")


def _analytic(block, cluster, *, tp: int, sequence_parallel: bool):
    out_bytes = sum(sum(m.nbytes for m in n.input_metas) for n in block if n.kind == "output")
    in_bytes = sum(n.output.nbytes for n in block if n.kind == "input")
    return analytic_layer_cost(
        name="layers.0", graph=block, ops=tuple(block.ops()), params=block.params(),
        input_bytes=float(in_bytes), output_bytes=float(out_bytes), dp=1, tp=tp,
        full_mesh=LogicalMesh((1, 1, tp), ("pp", "dp", "tp")), cluster=cluster, dtype="bf16",
        grad_bytes_per_param=2, sequence_parallel=sequence_parallel,
        compute_time_s=compute_time_s, mesh_collective_time_s=mesh_collective_time_s,
        saved_tensors=saved_tensors, collective_time_s=collective_time_s,
    )  # fmt: skip


def test_ilp_prices_the_megatron_split_like_the_analytic_model(block_fp32, cluster) -> None:
    block = in_training_dtype(block_fp32, "bf16")
    ilp = solve_layer(block, mesh=LogicalMesh((1, 8), ("dp", "tp")), cluster=cluster, dtype="bf16")
    p = ilp.placements
    # the Megatron split: heads and MLP columns over tp
    assert p["layers.0.attn.q.weight"] == ("R", "S(0)")
    assert p["layers.0.attn.o.weight"] == ("R", "S(1)")
    assert p["layers.0.mlp.up.weight"] == ("R", "S(0)")
    assert p["layers.0.mlp.down.weight"] == ("R", "S(1)")
    # on NVLink the ILP takes its sequence-parallel form (norms and residuals split over the
    # sequence): priced like the analytic split with sequence parallelism, term by term
    sp = _analytic(block, cluster, tp=8, sequence_parallel=True)
    assert ilp.fwd_compute_s + ilp.bwd_compute_s == pytest.approx(sp.fwd_s + sp.bwd_s, rel=0.02)
    assert ilp.fwd_compute_s == pytest.approx(sp.fwd_s, rel=0.02)
    assert ilp.tp_comm_s == pytest.approx(sp.tp_fwd_s + sp.tp_bwd_s, rel=0.02)
    assert ilp.activation_bytes == pytest.approx(sp.act_bytes, rel=0.02)
    # and it is at least as good as the split without sequence parallelism
    plain = _analytic(block, cluster, tp=8, sequence_parallel=False)
    assert ilp.fwd_compute_s + ilp.bwd_compute_s + ilp.tp_comm_s <= (
        plain.fwd_s + plain.bwd_s + plain.tp_fwd_s + plain.tp_bwd_s
    )
    # attention runs on tensor cores in both: at the vector rate it alone would take ~0.4 ms
    attn = [c for c in ilp.collectives if "scaled_dot_product" in c.op]
    assert not attn
    assert ilp.fwd_compute_s < 0.7e-3


def test_activations_count_each_stored_tensor_once(block_fp32, cluster) -> None:
    block = in_training_dtype(block_fp32, "bf16")
    expected = graph_saved_activation_bytes(block)
    # q, k and v keep one normalised input between them: 34·s·b·h bytes, not the 38·s·b·h of
    # counting it three times
    assert expected == pytest.approx(34 * SEQ * HIDDEN, rel=0.01)
    ilp = solve_layer(block, mesh=LogicalMesh((1,), ("tp",)), cluster=cluster, dtype="bf16")
    assert ilp.activation_bytes == pytest.approx(expected, rel=1e-6)
    one = _analytic(block, cluster, tp=1, sequence_parallel=False)
    assert one.act_bytes == pytest.approx(expected, rel=1e-6)
    # without sequence parallelism tensor parallelism leaves the norms' and the column-parallel
    # inputs whole (Korthikanti: 10 + 24/t); with it everything is split (34/t)
    plain = _analytic(block, cluster, tp=8, sequence_parallel=False)
    sp = _analytic(block, cluster, tp=8, sequence_parallel=True)
    assert sp.act_bytes == pytest.approx(expected / 8, rel=1e-6)
    assert expected / 8 < plain.act_bytes < expected


def test_fp32_traces_are_priced_in_the_training_dtype(block_fp32, cluster) -> None:
    mesh = LogicalMesh((1, 8), ("dp", "tp"))
    from_fp32 = solve_layer(block_fp32, mesh=mesh, cluster=cluster, dtype="bf16")
    from_bf16 = solve_layer(
        in_training_dtype(block_fp32, "bf16"), mesh=mesh, cluster=cluster, dtype="bf16"
    )
    assert from_fp32.objective_s == pytest.approx(from_bf16.objective_s)
    assert from_fp32.activation_bytes == pytest.approx(from_bf16.activation_bytes)
    as_fp32 = solve_layer(block_fp32, mesh=mesh, cluster=cluster, dtype="fp32")
    assert as_fp32.activation_bytes == pytest.approx(2 * from_bf16.activation_bytes, rel=0.01)


def test_views_and_elementwise_ops_are_priced_by_the_bytes_they_move(block_fp32, cluster):
    from autopar.sharding.layer_plan import _make_pricing
    from autopar.sharding.problem import build_problem
    from autopar.solver._costing import _op_bytes

    block = in_training_dtype(block_fp32, "bf16")
    pricing = _make_pricing(
        mesh=LogicalMesh((1,), ("tp",)), cluster=cluster, dtype="bf16", grad_sync_weight=1.0,
        topology_aware=True, memory_budget_bytes=None, param_memory_multiplier=1.0,
    )  # fmt: skip
    bp = build_problem(block, pricing)
    metadata = ("aten.view.", "aten.permute.", "aten.t.", "aten.transpose.", "aten.expand.")
    seen = {"view": 0, "elementwise": 0}
    for i, node in enumerate(bp.nodes):
        if node.kind != "op":
            continue
        if node.op.startswith(metadata):
            seen["view"] += 1
            assert bp.fwd_compute_s[i].max() == 0.0 and bp.bwd_compute_s[i].max() == 0.0
            assert _op_bytes(node) == 0.0
        elif node.fwd_flops == 0:  # add, gelu, layer norm, clone: no FLOPs from the tracer
            seen["elementwise"] += 1
            nbytes = sum(m.nbytes for m in (*node.input_metas, *node.outputs))
            floor = nbytes / cluster.device.memory_bandwidth_bytes_per_s
            assert bp.fwd_compute_s[i].min() >= floor, node.op
            assert _op_bytes(node) > 0.0
    assert seen["view"] >= 10 and seen["elementwise"] >= 4
    # and both pricers add them up the same way
    ilp = solve_layer(block, mesh=LogicalMesh((1,), ("tp",)), cluster=cluster, dtype="bf16")
    one = _analytic(block, cluster, tp=1, sequence_parallel=False)
    assert ilp.fwd_compute_s == pytest.approx(one.fwd_s, rel=1e-6)
    assert ilp.bwd_compute_s == pytest.approx(one.bwd_s, rel=1e-6)
