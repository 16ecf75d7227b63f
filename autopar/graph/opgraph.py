"""OpGraph: the traced operator graph every later stage prices and searches.

A thin typed layer over ``networkx.DiGraph``: one node per graph input, parameter, buffer and
aten operator, edges carrying the tensor that flows. Nothing here knows about devices or costs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import networkx as nx

__all__ = [
    "TensorMeta",
    "TensorArg",
    "OpNode",
    "OpGraph",
    "NodeKind",
    "DTYPE_ITEMSIZE",
    "arg_leaves",
    "map_arg_leaves",
]

NodeKind = Literal["input", "param", "buffer", "op", "output"]

DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Shape and dtype of one tensor; ``batch_dim`` is the dim that grows with the batch (or None)."""

    shape: tuple[int, ...]
    dtype: str
    """torch dtype name without the ``torch.`` prefix, e.g. ``"bfloat16"``."""
    batch_dim: int | None = None
    """Which dim scales linearly with the global batch size, so a graph traced once can be re-sized."""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE.get(self.dtype, 4)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True, slots=True)
class TensorArg:
    """Marks where the i-th tensor input sits among an op's positional/keyword arguments."""

    index: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OpNode:
    """One node of the graph: an aten op, or a graph input / parameter / buffer / output."""

    name: str
    """Unique node name. For ``op`` nodes (and ``output``) the name of the fx node that produced
    it in ``trace_program``'s graph module, so the two can be matched by name (the fx nodes
    without an OpGraph node are listed in ``autopar/graph/trace.py``); ``param`` / ``buffer``
    nodes are named by FQN and ``input`` nodes by forward argument, suffixed ``_1``... if that
    name is taken."""
    kind: NodeKind
    op: str
    """Qualified aten overload, e.g. ``"aten.mm.default"``; ``"placeholder"`` / ``"output"`` otherwise."""
    inputs: tuple[str, ...] = ()
    """Producer node names, one per tensor argument, in argument order (matches ``input_metas``)."""
    input_metas: tuple[TensorMeta, ...] = ()
    outputs: tuple[TensorMeta, ...] = ()
    args: tuple[Any, ...] = ()
    """Positional arguments with tensors replaced by ``TensorArg`` (dims of a view, a transpose...)."""
    kwargs: tuple[tuple[str, Any], ...] = ()
    fwd_flops: float = 0.0
    """Forward FLOPs (torch.utils.flop_counter formulas; 2 per multiply-add)."""
    bwd_flops: float = 0.0
    """Estimated backward FLOPs (input and weight gradients)."""
    params: tuple[str, ...] = ()
    """Fully qualified names of parameters this node reads directly (or is, for kind ``param``)."""
    module_path: str = ""
    """Dotted path of the innermost nn.Module that issued the op, ``""`` for the root."""

    @property
    def output(self) -> TensorMeta | None:
        return self.outputs[0] if self.outputs else None


def arg_leaves(args: Any) -> list[Any]:
    """Leaves of nested list/tuple arguments, depth first (the indexing ``batch_args`` uses)."""
    out: list[Any] = []

    def walk(a: Any) -> None:
        if isinstance(a, list | tuple):
            for x in a:
                walk(x)
        else:
            out.append(a)

    walk(args)
    return out


def map_arg_leaves(args: Any, fn: Any) -> Any:
    """``args`` with leaf ``i`` (in ``arg_leaves`` order) replaced by ``fn(i, leaf)``."""
    counter = [0]

    def walk(a: Any) -> Any:
        if isinstance(a, list | tuple):
            return type(a)(walk(x) for x in a) if type(a) in (list, tuple) else [walk(x) for x in a]
        i = counter[0]
        counter[0] += 1
        return fn(i, a)

    return walk(args)


@dataclass(eq=False)
class OpGraph:
    """Typed view over a ``networkx.DiGraph`` whose nodes hold ``OpNode`` under key ``"op"``.

    Edges ``(producer, consumer)`` carry ``tensor`` (TensorMeta) and ``index`` (input position).
    ``len(graph)`` counts operator nodes only.
    """

    nx_graph: nx.DiGraph
    name: str = "model"
    batch_size: int = 1
    """Batch size the shapes, bytes and FLOPs are stated for."""
    metadata: dict[str, Any] = field(default_factory=dict)
    _order: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._order = tuple(nx.lexicographical_topological_sort(self.nx_graph, key=self._rank))

    def _rank(self, name: str) -> int:
        return self.nx_graph.nodes[name].get("rank", 0)

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(1 for n in self._order if self.node(n).kind == "op")

    def __iter__(self) -> Iterator[OpNode]:
        return (self.node(n) for n in self._order)

    def __contains__(self, name: object) -> bool:
        return name in self.nx_graph

    def node(self, name: str) -> OpNode:
        return self.nx_graph.nodes[name]["op"]

    def ops(self) -> list[OpNode]:
        """Operator nodes in topological order."""
        return [n for n in self if n.kind == "op"]

    def producers(self, name: str) -> list[OpNode]:
        return [self.node(p) for p in self.nx_graph.predecessors(name)]

    def consumers(self, name: str) -> list[OpNode]:
        return [self.node(c) for c in self.nx_graph.successors(name)]

    def params(self) -> dict[str, TensorMeta]:
        """Parameter FQN -> its TensorMeta."""
        return {n.params[0]: n.outputs[0] for n in self if n.kind == "param"}

    @property
    def fwd_flops(self) -> float:
        return sum(n.fwd_flops for n in self)

    @property
    def bwd_flops(self) -> float:
        return sum(n.bwd_flops for n in self)

    @property
    def param_count(self) -> int:
        return sum(t.numel for t in self.params().values())

    def subgraph(self, names: Iterable[str], *, name: str | None = None) -> OpGraph:
        """The induced sub-graph on ``names`` (edges from outside nodes are dropped)."""
        sub = self.nx_graph.subgraph(list(names)).copy()
        return OpGraph(sub, name=name or self.name, batch_size=self.batch_size)

    # -- re-sizing ----------------------------------------------------------------------------
    def with_batch(self, n: int) -> OpGraph:
        """The same graph re-stated for batch ``n``: shapes, bytes and FLOPs, without re-tracing.

        Every tensor's ``batch_dim`` is scaled by ``n / batch_size`` (rounded up, for sizes such
        as an MoE expert capacity that are not exactly proportional), FLOPs of ops touching a
        batched tensor scale linearly, and the integer arguments the tracer saw change with the
        batch (view/expand sizes, an MoE capacity) are scaled the same way.
        Needs batch dims from the tracer (``trace(..., detect_batch=True)``, the default).
        """
        from autopar.errors import ConfigError, TraceError

        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"batch size must be a positive integer, got {n!r}", field="batch")
        if n == self.batch_size:
            return self
        if not self.metadata.get("batch_dims_known", False):
            raise TraceError(
                f"graph '{self.name}' has no batch dims; trace it with detect_batch=True "
                "(the default) or trace again at the batch size you need"
            )
        old = self.batch_size
        cache: dict[int, TensorMeta] = {}

        def scale(meta: TensorMeta) -> TensorMeta:
            hit = cache.get(id(meta))
            if hit is not None:
                return hit
            if meta.batch_dim is None:
                new = meta
            else:
                d = meta.batch_dim
                shape = list(meta.shape)
                shape[d] = -(-shape[d] * n // old)
                new = replace(meta, shape=tuple(shape))
            cache[id(meta)] = new
            return new

        ratio = n / old
        batch_args: dict[str, tuple[int, ...]] = self.metadata.get("batch_args", {})

        def scale_args(name: str, args: tuple) -> tuple:
            """Scalar arguments the tracer saw change with the batch (e.g. an MoE capacity)."""
            idx = batch_args.get(name)
            if not idx:
                return args
            wanted = set(idx)
            return map_arg_leaves(
                args, lambda i, x: -(-x * n // old) if i in wanted and isinstance(x, int) else x
            )

        g = nx.DiGraph()
        for name, data in self.nx_graph.nodes(data=True):
            op: OpNode = data["op"]
            outputs = tuple(scale(t) for t in op.outputs)
            input_metas = tuple(scale(t) for t in op.input_metas)
            batched = any(t.batch_dim is not None for t in (*op.outputs, *op.input_metas))
            new_op = replace(
                op,
                outputs=outputs,
                input_metas=input_metas,
                args=scale_args(name, op.args),
                fwd_flops=op.fwd_flops * ratio if batched else op.fwd_flops,
                bwd_flops=op.bwd_flops * ratio if batched else op.bwd_flops,
            )
            g.add_node(name, **{**data, "op": new_op})
        for u, v, data in self.nx_graph.edges(data=True):
            attrs = dict(data)
            if isinstance(attrs.get("tensor"), TensorMeta):
                attrs["tensor"] = scale(attrs["tensor"])
            g.add_edge(u, v, **attrs)
        metadata = {
            **self.metadata,
            "traced_batch_size": self.metadata.get("traced_batch_size", old),
        }
        return OpGraph(g, name=self.name, batch_size=n, metadata=metadata)
