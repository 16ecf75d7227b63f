"""Regions of a layer graph found by their ops: the attention core that selective recompute
re-runs (Korthikanti et al. 2022, arXiv 2205.05198).

The core is found from the graph, never from a module name:

* a fused attention node (``scaled_dot_product_attention`` and its kernels) is the core;
* unfused attention is a softmax whose input comes, through pointwise ops and views (scale,
  mask, cast), from a matmul (the scores ``QK^T``) and whose output goes, through pointwise ops
  and views (dropout, cast), into a matmul (``PV``): the core is both matmuls and everything
  between them. A softmax elsewhere (a router, the loss) is not attention.
"""

from __future__ import annotations

from autopar.graph.opgraph import OpGraph, OpNode
from autopar.graph.ops import family

__all__ = ["attention_core"]

_PASS = ("elementwise", "view")


def _biggest_input(graph: OpGraph, node: OpNode) -> OpNode | None:
    best: OpNode | None = None
    size = -1
    for name, meta in zip(node.inputs, node.input_metas):
        if name in graph and meta.numel > size:
            best, size = graph.node(name), meta.numel
    return best


def attention_core(graph: OpGraph) -> frozenset[str]:
    """Names of the ops selective recompute re-runs (see the module docstring)."""
    core: set[str] = set()
    for node in graph:
        if node.kind != "op":
            continue
        fam = family(node.op)
        if fam == "attention":
            core.add(node.name)
        elif fam == "softmax":
            back: list[str] = []
            cur = _biggest_input(graph, node)
            while cur is not None and cur.kind == "op" and family(cur.op) in _PASS:
                back.append(cur.name)
                cur = _biggest_input(graph, cur)
            if cur is None or cur.kind != "op" or family(cur.op) != "matmul":
                continue
            scores = cur.name
            forward: list[str] = []
            nxt = node
            found = None
            for _ in range(32):
                users = [c for c in graph.consumers(nxt.name) if c.kind == "op"]
                if len(users) != 1:
                    break
                (user,) = users
                if family(user.op) == "matmul":
                    found = user.name
                    break
                if family(user.op) not in _PASS:
                    break
                forward.append(user.name)
                nxt = user
            if found is None:
                continue
            core.update((scores, *back, node.name, *forward, found))
    return frozenset(core)
