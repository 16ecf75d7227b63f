"""MoE: expert parallelism emerges from the dispatch/combine rules (all-to-all)."""

from __future__ import annotations

import torch

from autopar.graph.layers import group_layers, layer_graph
from autopar.graph.trace import trace
from autopar.models import build
from autopar.sharding.layer_plan import solve_layer
from autopar.topology.load import load_cluster
from autopar.topology.mesh import LogicalMesh


def test_moe_block_splits_experts_and_dispatches_by_all_to_all() -> None:
    model = build("moe-1.3b-8e", layers=2, dtype=torch.bfloat16)
    graph = trace(model).with_batch(8)
    sparse = [
        layer_graph(graph, layer)
        for layer in group_layers(graph)
        if any("index_put" in n.op for n in layer_graph(graph, layer))
    ]
    assert sparse, "the zoo's MoE model has a sparse block"
    res = solve_layer(
        sparse[0], mesh=LogicalMesh((8,), ("dp",)), cluster=load_cluster("dgx-a100"), dtype="bf16"
    )
    assert res.unsupported_ops == ()
    experts = {k: v for k, v in res.placements.items() if ".experts." in k}
    assert experts and all(v == ("S(0)",) for v in experts.values())  # one expert per device
    a2a = [c for c in res.collectives if c.kind == "all_to_all"]
    assert {c.phase for c in a2a} == {"fwd", "bwd"}
    # expert weights are not replicated over the axis, so they need no gradient all-reduce
    assert not any(c.op.startswith(tuple(experts)) for c in res.collectives)
