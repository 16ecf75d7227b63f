"""What the cost model assumes about a cluster, and what it charges: ``autopar topology show``.

:meth:`Cluster.describe` lists what was loaded (hosts, devices, links) and prices nothing;
:func:`describe_cluster` adds the device's compute figures (large-GEMM rate, attention and
bandwidth fractions, per-kernel overheads, the sources they come from) and the price of a 1 GiB
all-reduce over representative groups, topology-aware against the bytes-only baseline. Living
in ``cost/`` keeps the dependency one way: cost knows the Cluster, the Cluster knows no price.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autopar.cost.collectives import collective_time_s, volume_collective_time_s
from autopar.cost.compute import attention_time_s, gemm_time_s, kernel_overhead_s
from autopar.cost.profiles import DeviceProfile

if TYPE_CHECKING:
    from autopar.topology.cluster import Cluster

__all__ = ["describe_cluster", "describe_device"]

GiB = 1024**3


def describe_device(device: DeviceProfile) -> list[str]:
    """Lines with the compute figures the model assumes for ``device``."""
    src = device.source + (f" + {device.compute_calibration}" if device.compute_calibration else "")
    lines = [f"  compute model ({src}):"]
    parts = []
    for dt, frac in device.gemm_fractions:
        peak = device.peak_flop_per_s(dt)
        parts.append(f"{dt} {peak * frac / 1e12:.4g} TFLOP/s ({frac:.0%} of {peak / 1e12:g})")
    tm, tn = device.gemm_tile
    lines.append(
        f"    large GEMMs: {', '.join(parts)}; {tm}x{tn} tiles over {device.sm_count} SMs, "
        f"k_half {device.gemm_k_half:g}"
    )
    dt = "bf16" if any(k == "bf16" for k, _ in device.peak_flops) else device.peak_flops[0][0]
    shapes = ((8192, 8192, 8192), (2048, 12288, 12288), (2048, 1536, 12288), (2048, 2048, 128))
    rates = []
    for m, n, k in shapes:
        t = gemm_time_s(m=m, n=n, k=k, device=device, dtype=dt)
        rates.append(f"{m}x{n}x{k} {2.0 * m * n * k / t / 1e12:.4g}")
    lines.append(f"    {dt} GEMM TFLOP/s by shape (m x n x k): {', '.join(rates)}")
    peak = device.peak_flop_per_s(dt)
    bh, s, d = 16, 4096, 128
    flops = 4.0 * bh * s * s * d
    fwd = attention_time_s(batch_heads=bh, q_len=s, kv_len=s, head_dim=d, causal=False,
                           device=device, dtype=dt, phase="fwd")  # fmt: skip
    bwd = attention_time_s(batch_heads=bh, q_len=s, kv_len=s, head_dim=d, causal=False,
                           device=device, dtype=dt, phase="bwd")  # fmt: skip
    lines.append(
        f"    flash attention: forward {device.flash_fwd_fraction:.0%}, backward "
        f"{device.flash_bwd_fraction:.0%} of {dt} peak for long sequences (kv_half "
        f"{device.flash_kv_half:g}); {bh} heads x {s} tokens, head dim {d}: "
        f"{flops / fwd / 1e12:.4g} / {2.5 * flops / bwd / 1e12:.4g} TFLOP/s"
    )
    kinds = "".join(f", {k} {f:.0%}" for k, f in device.memory_kind_fractions)
    lines.append(
        f"    memory: {device.achieved_memory_bandwidth_bytes_per_s / 1e9:.4g} GB/s achieved "
        f"({device.memory_efficiency:.0%} of {device.memory_bandwidth_bytes_per_s / 1e9:g}){kinds}"
    )
    mode = "overlapped with the device" if device.host_overlap else "added to the kernel"
    lines.append(
        f"    per kernel: launch {device.launch_overhead_s * 1e6:.3g} us, host "
        f"{device.host_overhead_s * 1e6:.3g} us ({mode}); an empty kernel costs "
        f"{kernel_overhead_s(device) * 1e6:.3g} us"
    )
    return lines


def describe_cluster(cluster: Cluster) -> str:
    """``cluster.describe()`` plus the compute figures the cost model assumes for its device and
    the price of a 1 GiB all-reduce over representative groups (topology-aware | volume-only)."""
    lines = [cluster.describe(), *describe_device(cluster.device)]
    lines.append("  1 GiB all-reduce (topology-aware | volume-only baseline):")
    for label, grp in cluster.representative_groups():
        t = collective_time_s("all_reduce", GiB, grp, cluster)
        v = volume_collective_time_s("all_reduce", GiB, len(grp), cluster)
        path = cluster.analyze(grp)
        lines.append(
            f"    {label:<40} n={len(grp):<5} {t * 1e3:9.2f} ms | {v * 1e3:8.2f} ms"
            f"   bottleneck: {path.bottleneck}"
        )
    return "\n".join(lines)
