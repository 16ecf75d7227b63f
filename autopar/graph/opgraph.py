"""OpGraph: the traced operator graph every later stage prices and searches.

A thin typed layer over ``networkx.DiGraph``: one node per graph input, parameter, buffer and
aten operator, edges carrying the tensor that flows. Nothing here knows about devices or costs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx

__all__ = ["TensorMeta", "TensorArg", "OpNode", "OpGraph", "NodeKind", "DTYPE_ITEMSIZE"]

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
    """Unique node name (the fx node name)."""
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
