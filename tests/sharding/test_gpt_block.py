"""A traced GPT block (helper A's zoo) rediscovers Megatron's split on a tensor-parallel mesh."""

from __future__ import annotations

import pytest
import torch

from autopar.graph.layers import group_layers, layer_graph
from autopar.graph.trace import trace
from autopar.models import gpt
from autopar.sharding.layer_plan import solve_layer
from autopar.topology.load import load_cluster
from autopar.topology.mesh import LogicalMesh


@pytest.fixture(scope="module")
def blocks():
    model = gpt(layers=2, hidden=2048, heads=16, vocab=512, seq_len=1024, dtype=torch.bfloat16)
    graph = trace(model).with_batch(2)
    layers = {layer.name: layer for layer in group_layers(graph)}
    return layer_graph(graph, layers["layers.0"]), layer_graph(graph, layers["layers.1"])


def test_gpt_block_is_megatron_split(blocks) -> None:
    block, _ = blocks
    res = solve_layer(
        block, mesh=LogicalMesh((8,), ("tp",)), cluster=load_cluster("dgx-a100"), dtype="bf16"
    )
    p = res.placements
    for name in ("q", "k", "v"):
        assert p[f"layers.0.attn.{name}.weight"] == ("S(0)",), name
    assert p["layers.0.mlp.up.weight"] == ("S(0)",)
    assert p["layers.0.attn.o.weight"] == ("S(1)",)
    assert p["layers.0.mlp.down.weight"] == ("S(1)",)
    assert p["layers.0.attn_norm.weight"] == ("R",)
    fwd = [c for c in res.collectives if c.phase == "fwd"]
    bwd = [c for c in res.collectives if c.phase == "bwd"]
    # one all-reduce after attention and one after the MLP, and their mirrors in backward
    assert [c.kind for c in fwd] == ["all_reduce", "all_reduce"]
    assert [c.kind for c in bwd] == ["all_reduce", "all_reduce"]
    assert res.unsupported_ops == ()
    assert res.status == "optimal"
    assert res.tp_comm_s == pytest.approx(res.comm_fwd_s + res.comm_bwd_s)


def test_repeated_block_is_solved_once(blocks) -> None:
    first, second = blocks
    kw = dict(mesh=LogicalMesh((4,), ("tp",)), cluster=load_cluster("dgx-a100"), dtype="bf16")
    a = solve_layer(first, **kw)
    b = solve_layer(second, **kw)
    assert b.cached
    assert set(b.placements) == {k.replace("layers.0.", "layers.1.") for k in a.placements}
    assert b.placements["layers.1.mlp.up.weight"] == a.placements["layers.0.mlp.up.weight"]
    assert b.objective_s == a.objective_s
    assert set(b.op_strategies) <= {n.name for n in second}  # node names re-keyed too
    assert {c.op for c in b.collectives} <= {n.name for n in second}


def test_2d_mesh_keeps_tensor_parallel_inside_hosts(blocks) -> None:
    block, _ = blocks
    res = solve_layer(
        block,
        mesh=LogicalMesh((2, 8), ("dp", "tp")),
        cluster=load_cluster("dgx-a100", nodes=2),
        dtype="bf16",
        grad_sync_weight=1 / 16,
    )
    p = res.placements
    assert p["layers.0.attn.q.weight"] == ("R", "S(0)")
    assert p["layers.0.mlp.down.weight"] == ("R", "S(1)")
    per_microbatch = {c.axis for c in res.collectives if c.phase != "grad_sync"}
    assert per_microbatch == {"tp"}  # the host-crossing dp axis only carries gradient sync
    assert {c.axis for c in res.collectives if c.phase == "grad_sync"} == {"dp"}
