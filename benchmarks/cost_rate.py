"""Call rate of the cost functions (issue #4: >= 1 M collective prices per second).

A search prices the same few device groups millions of times with different byte counts, so
``collective_time_s`` caches each group's (alpha, beta) lines on the Cluster and a price is one
dict lookup and two multiply-adds. This script measures it on a 64-host DGX A100 cluster with
the groups of a (pp=4, dp=16, tp=8) mesh, cold (first call per group) and warm.

Run: ``python benchmarks/cost_rate.py [--calls N]``
"""

from __future__ import annotations

import argparse
import time

from autopar.cost.collectives import collective_time_s, mesh_collective_time_s
from autopar.cost.compute import compute_time_s
from autopar.topology.load import load_cluster
from autopar.topology.mesh import LogicalMesh

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--nodes", type=int, default=64)
    args = ap.parse_args(argv)

    cluster = load_cluster("dgx-a100", nodes=args.nodes)
    mesh = LogicalMesh((4, args.nodes * 8 // 32, 8), ("pp", "dp", "tp"))  # nodes: multiple of 4
    groups = [g for ax in ("dp", "tp", "pp") for g in mesh.groups(ax)]
    work = [(KINDS[i % len(KINDS)], groups[i % len(groups)]) for i in range(4096)]
    sizes = [float(2 ** (10 + i % 20)) for i in range(4096)]

    t0 = time.perf_counter()
    for kind, g in work:
        collective_time_s(kind, 1.0, g, cluster)
    cold_s = time.perf_counter() - t0
    distinct = len(set(work))

    n = args.calls
    t0 = time.perf_counter()
    i = 0
    while i < n:
        for j in range(4096):
            kind, g = work[j]
            collective_time_s(kind, sizes[j], g, cluster)
        i += 4096
    warm_rate = i / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    m = 0
    while m < n // 4:
        for ax in ("dp", "tp", "pp"):
            mesh_collective_time_s("all_reduce", 1e8, mesh, ax, cluster)
        m += 3
    mesh_rate = m / (time.perf_counter() - t0)

    dev = cluster.device
    t0 = time.perf_counter()
    for _k in range(n // 4):
        compute_time_s(
            flops=2e12, bytes_moved=1e9, device=dev, dtype="bf16", matmul_dims=(8192, 8192, 8192)
        )
    compute_rate = (n // 4) / (time.perf_counter() - t0)

    print(
        f"cluster {cluster.name} x{cluster.num_hosts} hosts, {distinct} distinct (kind, group) pairs"
    )
    print(f"  cold (first price per group): {cold_s / distinct * 1e6:8.1f} us per group")
    print(f"  collective_time_s (warm):      {warm_rate / 1e6:8.2f} M prices/s")
    print(f"  mesh_collective_time_s (warm): {mesh_rate / 1e6:8.2f} M prices/s")
    print(f"  compute_time_s (matmul):       {compute_rate / 1e6:8.2f} M calls/s")
    return {"collective_per_s": warm_rate, "mesh_per_s": mesh_rate, "compute_per_s": compute_rate}


if __name__ == "__main__":
    main()
