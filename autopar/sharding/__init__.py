"""Intra-operator sharding: placements, per-op strategy rules, the ILP's data, solve_layer.

    from autopar.sharding import solve_layer
    res = solve_layer(layer_graph, mesh=LogicalMesh((8, 8), ("dp", "tp")), cluster=cluster,
                      dtype="bf16", grad_sync_weight=1 / microbatches)
    res.placements["layers.0.attn.q.weight"]   # ("R", "S(0)"): column split over tp

Names are imported lazily so ``import autopar.sharding.placements`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "solve_layer": "autopar.sharding.layer_plan",
    "LayerSharding": "autopar.sharding.layer_plan",
    "CollectiveUse": "autopar.sharding.layer_plan",
    "build_problem": "autopar.sharding.problem",
    "Pricing": "autopar.sharding.problem",
    "Shard": "autopar.sharding.placements",
    "Replicate": "autopar.sharding.placements",
    "Partial": "autopar.sharding.placements",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'autopar.sharding' has no attribute {name!r}")
