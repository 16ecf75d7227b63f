"""Integration: the per-op saving rules on a GPT layer traced by autopar.graph.trace.

Traced without dropout and with fused scaled-dot-product attention, Korthikanti's
34·s·b·h + 5·a·s²·b changes in known ways: the two dropout masks (2·s·b·h) are gone, the
5·a·s²·b score/softmax/dropout matrices are gone, and the attention output is kept by the fused
kernel as well as (after a contiguous copy) by the output projection (+2·s·b·h). What remains is
34·s·b·h 16-bit-equivalents, scaled by the traced dtype, plus the norms' fp32 statistics.
"""

from __future__ import annotations

import pytest

from autopar.cost.memory import graph_saved_activation_bytes, saved_activation_bytes


def test_traced_gpt_layer_matches_the_adjusted_formula():
    from autopar.graph.layers import group_layers, layer_graph
    from autopar.graph.trace import trace
    from autopar.models.gpt import gpt

    s, h, a = 128, 256, 4
    graph = trace(gpt(layers=2, hidden=h, heads=a, vocab=512, seq_len=s, dropout=0.0))
    b = graph.batch_size
    block = next(layer for layer in group_layers(graph) if layer.name == "layers.1")
    lg = layer_graph(graph, block)
    itemsize = next(m.itemsize for n in lg if n.kind == "op" for m in n.outputs)
    want = 34 * s * b * h * itemsize / 2
    got = graph_saved_activation_bytes(lg)
    assert got == pytest.approx(want, rel=0.01)
    # summing ops one by one counts the shared q/k/v input three times
    assert sum(saved_activation_bytes(n) for n in lg) > got
