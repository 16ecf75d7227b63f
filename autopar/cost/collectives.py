"""Collective communication time on a group of devices, priced on the links the group crosses.

First principles (alpha-beta, Thakur et al. 2005; NCCL's ring and hierarchical algorithms), with
``B`` the buffer per device, ``n`` group size, ``m`` hosts touched, ``k`` devices per host,
``bw_i``/``a_i`` the intra-host ring bandwidth/latency and ``bw_e``/``a_e`` the inter-host
bandwidth per device/latency from :meth:`Cluster.analyze` (which already folds in NIC sharing,
oversubscription and the link between host groups):

================  ==========================================  =====================================
kind              one host (ring)                             across hosts (hierarchical)
================  ==========================================  =====================================
all_reduce        2(n-1)/n·B/bw_i + 2(n-1)·a_i                2(k-1)/k·B/bw_i + 2(m-1)/m·B/(k·bw_e)
                                                              + 2(k-1)·a_i + 2(m-1)·a_e
all_gather,       (n-1)/n·B/bw_i + (n-1)·a_i                  half of all_reduce
reduce_scatter
broadcast         B/bw_i + (n-1)·a_i  (pipelined chain)       2(k-1)/k·B/bw_i + B/(k·bw_e) + ...
all_to_all        (n-1)/n·B/bw_i + (n-1)·a_i                  max((k-1)/n·B/bw_i, inter part) + ...
p2p (n = 2)       B/bw_i + a_i                                B/bw_e + a_e
================  ==========================================  =====================================

Across hosts the flat ring (``2(n-1)/n·B/min(bw_i, k·bw_e)``, latency ``2(n-1)·a_e``) is priced
too and the cheaper of the two is taken, as NCCL's tuner picks between algorithms. ``B`` is the
full buffer per device: the gathered output of an all_gather, the unreduced input of a
reduce_scatter, the send buffer of an all_to_all. Every price is ``alpha + beta·B`` per algorithm,
so the (alpha, beta) pairs are cached per (kind, group) on the Cluster and a price costs one dict
lookup (benchmarks/cost_rate.py: > 1 M prices/s).

The achieved-bandwidth corrections live in the link profiles (``achieved:``) or in a calibration
profile, never here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from autopar.errors import ConfigError

if TYPE_CHECKING:
    from autopar.topology.cluster import Cluster, GroupPath
    from autopar.topology.mesh import LogicalMesh

__all__ = [
    "COLLECTIVES",
    "Collective",
    "collective_time_s",
    "mesh_collective_time_s",
    "volume_collective_time_s",
    "collective_coefficients",
]

Collective = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "p2p"]
COLLECTIVES: tuple[str, ...] = (
    "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "p2p",
)  # fmt: skip
_FREE = (0.0, 0.0, 0.0, 0.0)


def collective_time_s(kind: str, nbytes: float, group: Sequence[int], cluster: Cluster) -> float:
    """Seconds for ``kind`` over ``group`` (global ranks) moving ``nbytes`` per device.

    Assumes all groups of the same mesh axis run at once (each device gets its share of the
    host's NICs). A group of one device costs nothing.
    """
    if nbytes < 0:
        raise ConfigError(f"nbytes must be >= 0, got {nbytes!r}", field="nbytes")
    cache = cluster._cache["coef"]
    try:
        a1, b1, a2, b2 = cache[(kind, group)]
    except KeyError:
        a1, b1, a2, b2 = collective_coefficients(kind, group, cluster)
    except TypeError:  # unhashable group (a list): normalise once
        return collective_time_s(kind, nbytes, tuple(group), cluster)
    t1 = a1 + b1 * nbytes
    t2 = a2 + b2 * nbytes
    return t1 if t1 < t2 else t2


def collective_coefficients(
    kind: str, group: Sequence[int], cluster: Cluster
) -> tuple[float, float, float, float]:
    """(alpha1, beta1, alpha2, beta2): the two algorithms' lines; the price is the lower one."""
    group = tuple(group)
    key = (kind, group)
    hit = cluster._cache["coef"].get(key)
    if hit is not None:
        return hit
    if kind not in COLLECTIVES:
        raise ConfigError(f"unknown collective {kind!r}", field="kind", allowed=COLLECTIVES)
    if not group:
        raise ConfigError("empty device group", field="group")
    if kind == "p2p" and len(group) > 2:
        raise ConfigError(
            f"p2p needs a group of 2 ranks (sender, receiver), got {group}",
            field="group",
        )
    coef = _FREE if len(group) == 1 else _lines(kind, cluster.analyze(group))
    cluster._cache["coef"][key] = coef
    return coef


def _lines(kind: str, p: GroupPath) -> tuple[float, float, float, float]:
    n, m, k = p.size, p.hosts, p.per_host
    bi, ai = p.intra_bandwidth_bytes_per_s, p.intra_latency_s
    be, ae = p.inter_bandwidth_bytes_per_s, p.inter_latency_s
    if m == 1:
        if kind == "all_reduce":
            line = (2 * (n - 1) * ai, 2 * (n - 1) / n / bi)
        elif kind in ("all_gather", "reduce_scatter", "all_to_all"):
            line = ((n - 1) * ai, (n - 1) / n / bi)
        elif kind == "broadcast":
            line = ((n - 1) * ai, 1.0 / bi)
        else:  # p2p
            line = (ai, 1.0 / bi)
        return (*line, *line)
    intra = 0.0 if k == 1 else 1.0 / bi  # k == 1: no intra-host phase
    flat_bw = min(bi, k * be)
    flat_lat = max(ai, ae)
    if kind == "all_reduce":
        hier = (
            2 * (k - 1) * ai + 2 * (m - 1) * ae,
            2 * (k - 1) / k * intra + 2 * (m - 1) / m / (k * be),
        )
        flat = (2 * (n - 1) * flat_lat, 2 * (n - 1) / n / flat_bw)
    elif kind in ("all_gather", "reduce_scatter"):
        hier = ((k - 1) * ai + (m - 1) * ae, (k - 1) / k * intra + (m - 1) / m / (k * be))
        flat = ((n - 1) * flat_lat, (n - 1) / n / flat_bw)
    elif kind == "broadcast":
        hier = (2 * (k - 1) * ai + (m - 1) * ae, 2 * (k - 1) / k * intra + 1.0 / (k * be))
        flat = ((n - 1) * flat_lat, 1.0 / flat_bw)
    elif kind == "all_to_all":
        hier = (
            (k - 1) * ai + (m - 1) * ae,
            max((k - 1) / n * intra, p.all_to_all_inter_s_per_byte),
        )
        flat = hier
    else:  # p2p between two hosts
        hier = flat = (ae, 1.0 / be)
    return (*hier, *flat)


def mesh_collective_time_s(
    kind: str, nbytes: float, mesh: LogicalMesh, axis_name: str, cluster: Cluster
) -> float:
    """Seconds for ``kind`` along ``axis_name`` of ``mesh``: all its groups at once, the slowest
    one sets the time. Distinct price lines are cached per (kind, mesh, axis)."""
    key = (kind, mesh, axis_name)
    mcache = cluster._cache["mesh"]
    lines = mcache.get(key)
    if lines is None:
        groups = cluster.mesh_groups(mesh, axis_name)
        lines = tuple({collective_coefficients(kind, g, cluster) for g in groups})
        mcache[key] = lines
    if nbytes < 0:
        raise ConfigError(f"nbytes must be >= 0, got {nbytes!r}", field="nbytes")
    worst = 0.0
    for a1, b1, a2, b2 in lines:
        t = min(a1 + b1 * nbytes, a2 + b2 * nbytes)
        if t > worst:
            worst = t
    return worst


def volume_collective_time_s(kind: str, nbytes: float, group_size: int, cluster: Cluster) -> float:
    """Bytes-only baseline: the ring formula at one uniform bandwidth and latency (those of a
    ring over one full host), whatever links the group really crosses.

    This is the "communication volume" price TAPS (and many planners) use; it is kept only to
    show what topology-aware pricing changes (benchmarks, ``autopar topology show``).
    """
    if kind not in COLLECTIVES:
        raise ConfigError(f"unknown collective {kind!r}", field="kind", allowed=COLLECTIVES)
    if nbytes < 0:
        raise ConfigError(f"nbytes must be >= 0, got {nbytes!r}", field="nbytes")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(
            f"group_size must be a positive integer, got {group_size!r}", field="group_size"
        )
    if group_size == 1:
        return 0.0
    dph = cluster.devices_per_host
    if dph > 1:
        ref = cluster.analyze(tuple(range(dph)))
        bw, lat = ref.intra_bandwidth_bytes_per_s, ref.intra_latency_s
    else:
        ref = cluster.analyze(tuple(range(min(2, cluster.num_devices))))
        bw, lat = ref.inter_bandwidth_bytes_per_s, ref.inter_latency_s
    if not math.isfinite(bw):
        raise ConfigError("cluster has a single device; no bandwidth to price", field="group_size")
    n = group_size
    a, b = _lines(kind, _uniform(n, bw, lat))[:2]
    return a + b * nbytes


def _uniform(n: int, bw: float, lat: float) -> GroupPath:
    from autopar.topology.cluster import GroupPath

    return GroupPath(
        size=n,
        hosts=1,
        per_host=n,
        intra_bandwidth_bytes_per_s=bw,
        intra_latency_s=lat,
        inter_bandwidth_bytes_per_s=math.inf,
        inter_latency_s=0.0,
        all_to_all_inter_s_per_byte=0.0,
        bottleneck="uniform",
    )
