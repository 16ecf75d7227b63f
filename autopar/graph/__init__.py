"""model -> OpGraph: tracing (trace.py), the graph types (opgraph.py), layer grouping (layers.py)."""

from autopar.graph.layers import Layer, distinct_layers, group_layers, layer_graph
from autopar.graph.opgraph import OpGraph, OpNode, TensorArg, TensorMeta
from autopar.graph.trace import trace

__all__ = [
    "trace", "OpGraph", "OpNode", "TensorMeta", "TensorArg", "Layer", "group_layers",
    "distinct_layers", "layer_graph",
]  # fmt: skip
