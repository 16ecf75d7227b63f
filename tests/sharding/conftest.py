"""Hand-built OpGraphs and a simple analytic pricing, so sharding tests need no tracer or cluster."""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import pytest

from autopar.graph.opgraph import OpGraph, OpNode, TensorArg, TensorMeta
from autopar.sharding.problem import Pricing


class GraphBuilder:
    """Adds nodes in order; ``op`` wires edges from the named producers."""

    def __init__(self, dtype: str = "bfloat16") -> None:
        self.g = nx.DiGraph()
        self.dtype = dtype
        self.rank = 0

    def _meta(self, name: str) -> TensorMeta:
        return self.g.nodes[name]["op"].outputs[0]

    def _add(self, node: OpNode) -> str:
        self.g.add_node(node.name, op=node, rank=self.rank)
        self.rank += 1
        for j, p in enumerate(node.inputs):
            self.g.add_edge(p, node.name, tensor=node.input_metas[j], index=j)
        return node.name

    def input(self, name: str, shape: tuple[int, ...], *, dtype: str | None = None) -> str:
        meta = TensorMeta(shape, dtype or self.dtype, 0)
        return self._add(OpNode(name=name, kind="input", op="placeholder", outputs=(meta,)))

    def param(self, fqn: str, shape: tuple[int, ...]) -> str:
        meta = TensorMeta(shape, self.dtype, None)
        name = fqn.replace(".", "_")
        return self._add(
            OpNode(name=name, kind="param", op="placeholder", outputs=(meta,), params=(fqn,))
        )

    def op(
        self,
        name: str,
        op: str,
        inputs: tuple[str, ...],
        out_shape: tuple[int, ...] | tuple[tuple[int, ...], ...],
        *,
        args: tuple = (),
        flops: float = 0.0,
        dtype: str | None = None,
    ) -> str:
        metas = tuple(self._meta(p) for p in inputs)
        shapes = out_shape if out_shape and isinstance(out_shape[0], tuple) else (out_shape,)
        outs = tuple(TensorMeta(tuple(s), dtype or self.dtype, 0) for s in shapes)
        if not args:
            args = tuple(TensorArg(i) for i in range(len(inputs)))
        return self._add(
            OpNode(
                name=name,
                kind="op",
                op=op,
                inputs=inputs,
                input_metas=metas,
                outputs=outs,
                args=args,
                fwd_flops=flops,
                bwd_flops=2 * flops,
            )
        )

    def output(self, src: str) -> OpGraph:
        meta = self._meta(src)
        self._add(
            OpNode(name="output", kind="output", op="output", inputs=(src,), input_metas=(meta,))
        )
        return OpGraph(self.g, name="test")

    def linear(self, prefix: str, x: str, in_f: int, out_f: int, rows: int) -> str:
        """The aten pattern of nn.Linear without bias on a 2-D input: t(w) then mm."""
        w = self.param(f"{prefix}.weight", (out_f, in_f))
        wt = self.op(f"{prefix}_t", "aten.t.default", (w,), (in_f, out_f))
        return self.op(
            f"{prefix}_mm",
            "aten.mm.default",
            (x, wt),
            (rows, out_f),
            flops=2.0 * rows * in_f * out_f,
        )


def simple_pricing(
    mesh_shape: tuple[int, ...],
    *,
    axis_names: tuple[str, ...] | None = None,
    bw_bytes_per_s: tuple[float, ...] | None = None,
    peak_flop_per_s: float = 100e12,
    mem_bw_bytes_per_s: float = 1.5e12,
    grad_sync_weight: float = 1.0,
    memory_budget_bytes: float | None = None,
) -> Pricing:
    """Ring collectives over one bandwidth per axis, roofline compute."""
    bws = bw_bytes_per_s or (100e9,) * len(mesh_shape)

    def coll(kind: str, nbytes: float, axis: int) -> float:
        n = mesh_shape[axis]
        if n == 1:
            return 0.0
        factor = {"all_reduce": 2 * (n - 1) / n, "all_to_all": (n - 1) / n}.get(kind, (n - 1) / n)
        return 5e-6 + factor * nbytes / bws[axis]

    def compute(node: OpNode, st, phase: str) -> float:
        div = st.compute_divisor
        flops = node.fwd_flops if phase == "fwd" else node.bwd_flops
        nbytes = sum(m.nbytes for m in node.input_metas) + sum(m.nbytes for m in node.outputs)
        if phase == "bwd":
            nbytes *= 2
        return max(flops / div / peak_flop_per_s, nbytes / div / mem_bw_bytes_per_s)

    def saved(node: OpNode) -> float:
        return float(sum(m.nbytes for m in node.input_metas))

    return Pricing(
        mesh_shape=mesh_shape,
        axis_names=axis_names or tuple(f"a{i}" for i in range(len(mesh_shape))),
        collective_s=coll,
        compute_s=compute,
        saved_bytes=saved,
        grad_sync_weight=grad_sync_weight,
        memory_budget_bytes=memory_budget_bytes,
    )


@pytest.fixture
def builder() -> Callable[..., GraphBuilder]:
    return GraphBuilder
