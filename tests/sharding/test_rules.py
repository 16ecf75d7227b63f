"""Strategy rules, resharding and placements on small hand-made ops."""

from __future__ import annotations

import pytest

from autopar.errors import ConfigError
from autopar.graph.opgraph import OpNode, TensorMeta
from autopar.sharding.placements import (
    PARTIAL,
    REPLICATE,
    Shard,
    parse,
    spec_strings,
    spec_to_torch,
)
from autopar.sharding.problem import build_problem
from autopar.sharding.rules import (
    _view_groups,
    enumerate_strategies,
    follow_strategy,
    op_dims,
    reshard,
)
from autopar.solver.intra_op import solve_intra_op

from .conftest import GraphBuilder, simple_pricing

BF16 = "bfloat16"


def _node(op: str, ins: list[tuple[int, ...]], outs: list[tuple[int, ...]], args=()) -> OpNode:
    return OpNode(
        name="n",
        kind="op",
        op=op,
        inputs=tuple(f"i{k}" for k in range(len(ins))),
        input_metas=tuple(TensorMeta(s, BF16, 0) for s in ins),
        outputs=tuple(TensorMeta(s, BF16, 0) for s in outs),
        args=args,
    )


def _strats(node: OpNode, mesh=(4,), grads=None, params=None):
    dims = op_dims(node)
    n = len(node.inputs)
    return enumerate_strategies(
        dims,
        input_metas=node.input_metas,
        output_metas=node.outputs,
        mesh_shape=mesh,
        grad_inputs=grads or (True,) * n,
        param_inputs=params or (False,) * n,
        axis_names=("tp",),
    )


def test_mm_strategies_and_their_collectives() -> None:
    node = _node("aten.mm.default", [(64, 32), (32, 16)], [(64, 16)])
    by_name = {s.name: s for s in _strats(node, params=(False, True))}
    assert set(by_name) == {"R", "m@tp", "n@tp", "k@tp"}
    k = by_name["k@tp"]
    assert k.input_specs == ((Shard(1),), (Shard(0),)) and k.output_specs == ((PARTIAL,),)
    assert k.collectives == ()  # the Partial is resolved by whoever consumes it
    m = by_name["m@tp"]
    assert m.compute_divisor == 4
    # batch split with a replicated weight: its gradient is all-reduced once per step
    (c,) = m.collectives
    assert (c.kind, c.phase, c.nbytes, c.operand) == ("all_reduce", "grad_sync", 32 * 16 * 2, 1)
    n = by_name["n@tp"]
    (c,) = n.collectives  # column split: the input's gradient is partial (Megatron's f)
    assert (c.kind, c.phase, c.nbytes) == ("all_reduce", "bwd", 64 * 32 * 2)


def test_2d_mesh_enumerates_label_pairs_and_checks_divisibility() -> None:
    node = _node("aten.mm.default", [(8, 6), (6, 4)], [(8, 4)])
    strats = enumerate_strategies(
        op_dims(node),
        input_metas=node.input_metas,
        output_metas=node.outputs,
        mesh_shape=(2, 4),
        grad_inputs=(True, True),
        param_inputs=(False, True),
        axis_names=("dp", "tp"),
    )
    names = {s.name for s in strats}
    # k=6 splits over dp (2) but not over tp (4); m=8 splits over both axes at once (8 | 8)
    assert {"m@dp,n@tp", "m@dp,m@tp", "k@dp", "n@tp"} <= names
    assert "k@tp" not in names and "k@dp,k@tp" not in names
    assert all(s.compute_divisor in (1, 2, 4, 8) for s in strats)


def test_addmm_k_split_adds_bias_once() -> None:
    node = _node("aten.addmm.default", [(16,), (8, 32), (32, 16)], [(8, 16)])
    k = next(s for s in _strats(node) if s.name == "k@tp")
    assert k.input_specs[0] == (PARTIAL,) and k.output_specs == ((PARTIAL,),)


def test_view_groups_and_batch_merge() -> None:
    assert _view_groups((2, 3, 4), (6, 4)) == [([0, 1], [0]), ([2], [1])]
    assert _view_groups((6, 4), (2, 3, 2, 2)) == [([0], [0, 1]), ([1], [2, 3])]
    node = _node("aten.view.default", [(4, 128, 64)], [(512, 64)])
    dims = op_dims(node)
    st = follow_strategy(
        dims,
        (Shard(0),),
        input_metas=node.input_metas,
        output_metas=node.outputs,
        mesh_shape=(4,),
        grad_inputs=(True,),
        param_inputs=(False,),
    )
    assert st.output_specs == ((Shard(0),),)  # the batch leads the merged dim
    st = follow_strategy(
        dims,
        (Shard(1),),
        input_metas=node.input_metas,
        output_metas=node.outputs,
        mesh_shape=(4,),
        grad_inputs=(True,),
        param_inputs=(False,),
    )
    assert st.input_specs == ((REPLICATE,),)  # a sequence split cannot survive the merge


def test_softmax_never_splits_its_dim() -> None:
    node = _node("aten._softmax.default", [(4, 8, 16)], [(4, 8, 16)], args=(None, -1, False))
    dims = op_dims(node)
    assert "d2" not in dims.splittable and {"d0", "d1"} <= dims.splittable


def test_reshard_collectives() -> None:
    meta = TensorMeta((8, 16), BF16, 0)
    nbytes = meta.nbytes
    kinds = lambda src, dst: [  # noqa: E731
        (c.kind, c.phase) for c in reshard(src, dst, meta, (4,), requires_grad=True)
    ]
    assert kinds((PARTIAL,), (REPLICATE,)) == [("all_reduce", "fwd")]
    assert kinds((PARTIAL,), (Shard(0),)) == [("reduce_scatter", "fwd"), ("all_gather", "bwd")]
    assert kinds((Shard(0),), (REPLICATE,)) == [("all_gather", "fwd")]
    assert kinds((Shard(0),), (Shard(1),)) == [("all_to_all", "fwd"), ("all_to_all", "bwd")]
    assert kinds((REPLICATE,), (Shard(1),)) == [("all_gather", "bwd")]
    assert kinds((REPLICATE,), (REPLICATE,)) == []
    (ag,) = reshard((Shard(0),), (REPLICATE,), meta, (4,), requires_grad=False)
    assert ag.nbytes == nbytes  # gathered size
    (a2a, _) = reshard((Shard(0),), (Shard(1),), meta, (4,), requires_grad=True)
    assert a2a.nbytes == nbytes / 4  # the local buffer
    # on a 2-D mesh a collective on one axis moves the shard of the other axis
    (ar,) = reshard((Shard(0), PARTIAL), (Shard(0), REPLICATE), meta, (2, 4), requires_grad=True)
    assert ar.axis == 1 and ar.nbytes == nbytes / 2


def test_unknown_op_is_replicated_reported_and_priced() -> None:
    gb = GraphBuilder()
    x = gb.input("x", (1024, 256))
    y = gb.op("mystery", "aten.some_new_op.default", (x,), (1024, 256), flops=1e6)
    graph = gb.output(y)
    bp = build_problem(graph, simple_pricing((4,)))
    assert bp.problem.unsupported_ops == ("aten.some_new_op.default",)
    i = bp.problem.names.index("mystery")
    assert [s.name for s in bp.strategies[i]] == ["R"]
    assert bp.fwd_compute_s[i][0] > 0.0 and bp.bwd_compute_s[i][0] > 0.0
    sol = solve_intra_op(bp.problem)
    assert sol.objective_s > 0.0


def test_placements_round_trip_and_torch() -> None:
    for text in ("R", "P", "S(0)", "S(3)"):
        assert str(parse(text)) == text
    assert spec_strings((Shard(1), REPLICATE)) == ("S(1)", "R")
    with pytest.raises(ConfigError):
        parse("S(x)")
    from torch.distributed.tensor import Partial, Replicate
    from torch.distributed.tensor import Shard as TShard

    assert spec_to_torch(("S(1)", "R", "P")) == (TShard(1), Replicate(), Partial())
