"""Compute time of one op: a roofline over FLOPs and bytes with an achievable-efficiency curve.

``time = kernel_overhead + max(flops / achieved_flop_rate, bytes / achieved_memory_bandwidth)``

* Matrix products (``matmul_dims`` given) run on tensor cores at
  ``peak(dtype) · matmul_efficiency · g / (g + matmul_half_size)`` with ``g = (b·m·n·k)^(1/3)``:
  large GEMMs approach the profile's achieved fraction (e.g. ~75% of 312 TFLOP/s on A100), small
  ones cannot fill the SMs (tile and wave quantisation, NVIDIA "Matrix Multiplication Background"
  guide) and fall off smoothly; a half-size of 128 gives 50% of the achievable rate at g = 128.
* Everything else (elementwise, reductions, norms) runs on CUDA cores (``vector_flop_per_s``) and
  is almost always bound by memory bandwidth.

All constants come from the device profile (cost_models/*.yaml), never from this file.
"""

from __future__ import annotations

from collections.abc import Sequence

from autopar.cost.profiles import DTYPE_ALIASES, DeviceProfile
from autopar.errors import ConfigError

__all__ = ["compute_time_s", "matmul_efficiency"]


def matmul_efficiency(device: DeviceProfile, matmul_dims: Sequence[int]) -> float:
    """Achieved fraction of tensor-core peak for a GEMM of dims (m, n, k) or (batch, m, n, k)."""
    if len(matmul_dims) not in (3, 4):
        raise ConfigError(
            f"matmul_dims must be (m, n, k) or (batch, m, n, k), got {tuple(matmul_dims)}",
            field="matmul_dims",
        )
    work = 1.0
    for d in matmul_dims:
        if d < 0:
            raise ConfigError(
                f"matmul dims must be >= 0, got {tuple(matmul_dims)}", field="matmul_dims"
            )
        work *= d
    g = work ** (1.0 / 3.0)
    if g == 0.0:
        return device.matmul_efficiency
    return device.matmul_efficiency * g / (g + device.matmul_half_size)


def compute_time_s(
    *,
    flops: float,
    bytes_moved: float,
    device: DeviceProfile,
    dtype: str,
    matmul_dims: Sequence[int] | None = None,
) -> float:
    """Seconds one op takes on one device.

    ``flops`` counts 2 per multiply-add; ``bytes_moved`` is what the kernel reads and writes in
    device memory; ``dtype`` is "bf16"/"fp16"/"fp32" (torch names like "bfloat16" are accepted).
    An op that does no work and moves nothing (a view) takes no time.
    """
    if flops < 0 or bytes_moved < 0:
        raise ConfigError(
            f"flops and bytes_moved must be >= 0, got {flops!r} / {bytes_moved!r}", field="flops"
        )
    if dtype not in DTYPE_ALIASES:
        raise ConfigError(f"unknown dtype {dtype!r}", field="dtype", allowed=tuple(DTYPE_ALIASES))
    if flops == 0 and bytes_moved == 0:
        return 0.0
    if matmul_dims is not None:
        rate = device.peak_flop_per_s(dtype) * matmul_efficiency(device, matmul_dims)
    else:
        rate = device.vector_flop_per_s
    t_flop = flops / rate if flops else 0.0
    t_mem = bytes_moved / (device.memory_bandwidth_bytes_per_s * device.memory_efficiency)
    return device.kernel_overhead_s + (t_flop if t_flop > t_mem else t_mem)
