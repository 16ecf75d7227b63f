"""Cost model: pure functions from (work, devices) to seconds or bytes.

Submodules: profiles (hardware data from cost_models/), compute (roofline op time),
collectives (topology-aware collective time), memory (model state, activations, pipelines),
calibrate (measure and fit alpha/beta with torch.distributed). Imported lazily so that
``autopar.topology`` and ``autopar.cost`` can import each other's leaf modules without cycles.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DeviceProfile": "autopar.cost.profiles",
    "LinkProfile": "autopar.cost.profiles",
    "load_device_profile": "autopar.cost.profiles",
    "compute_time_s": "autopar.cost.compute",
    "collective_time_s": "autopar.cost.collectives",
    "mesh_collective_time_s": "autopar.cost.collectives",
    "volume_collective_time_s": "autopar.cost.collectives",
    "model_state_bytes": "autopar.cost.memory",
    "model_state_breakdown": "autopar.cost.memory",
    "saved_activation_bytes": "autopar.cost.memory",
    "graph_saved_activation_bytes": "autopar.cost.memory",
    "transformer_layer_activation_bytes": "autopar.cost.memory",
    "in_flight_microbatches": "autopar.cost.memory",
    "run_calibration": "autopar.cost.calibrate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'autopar.cost' has no attribute {name!r}")
