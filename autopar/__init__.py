"""autopar: auto-parallelism strategy search for PyTorch training.

Public API (imported lazily so ``autopar --help`` stays fast)::

    graph = autopar.trace(model)                       # OpGraph of aten ops under fake tensors
    cluster = autopar.load_cluster("dgx-a100", nodes=16)
    plan = autopar.search(graph_or_model, cluster, autopar.TrainingConfig(global_batch=1536))
    print(plan.to_json()); specs = plan.sharding_specs()
    parallel_model = autopar.apply_plan(model, plan)    # inside an initialised process group
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "trace": "autopar.graph.trace",
    "OpGraph": "autopar.graph.opgraph",
    "Cluster": "autopar.topology.cluster",
    "TrainingConfig": "autopar.config",
    "search": "autopar.solver.search",
    "Plan": "autopar.plan",
    "apply_plan": "autopar.emit.apply",
    "AutoparError": "autopar.errors",
    "ConfigError": "autopar.errors",
    "InfeasibleError": "autopar.errors",
}

__all__ = [
    "AutoparError",
    "Cluster",
    "ConfigError",
    "InfeasibleError",
    "OpGraph",
    "Plan",
    "TrainingConfig",
    "apply_plan",
    "load_cluster",
    "search",
    "trace",
]

if TYPE_CHECKING:  # pragma: no cover
    from autopar.config import TrainingConfig
    from autopar.emit.apply import apply_plan
    from autopar.errors import AutoparError, ConfigError, InfeasibleError
    from autopar.graph.opgraph import OpGraph
    from autopar.graph.trace import trace
    from autopar.plan import Plan
    from autopar.solver.search import search
    from autopar.topology.cluster import Cluster


def load_cluster(
    name_or_path: Any,
    *,
    nodes: int | None = None,
    calibration: Any = None,
    compute_calibration: Any = None,
) -> Cluster:
    """``autopar.topology.load.load_cluster`` with its arguments' types checked: a shipped
    topology name (``"dgx-a100"``) or a topology file path, ``nodes`` hosts (default: the
    file's). Raises ``ConfigError`` naming the argument for anything else."""
    import os

    from autopar.errors import ConfigError
    from autopar.topology.load import load_cluster as _load

    if not isinstance(name_or_path, str | os.PathLike):
        raise ConfigError(
            f"a topology name or file path, got {type(name_or_path).__name__}",
            field="name_or_path",
        )
    for arg, value in (("calibration", calibration), ("compute_calibration", compute_calibration)):
        if value is not None and not isinstance(value, str | os.PathLike):
            raise ConfigError(f"a profile name or file path, got {type(value).__name__}", field=arg)
    return _load(
        name_or_path, nodes=nodes, calibration=calibration, compute_calibration=compute_calibration
    )


_SUBMODULES = ("models", "explain", "graph", "topology", "cost", "sharding", "solver", "emit")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"autopar.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'autopar' has no attribute {name!r}")
