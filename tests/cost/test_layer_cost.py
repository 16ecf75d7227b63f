"""ZeRO-3's collectives over a data-parallel group that spans hosts (``cost.layer``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from autopar.cost.collectives import collective_time_s
from autopar.cost.layer import layer_cost
from autopar.topology.load import load_cluster
from autopar.topology.mesh import LogicalMesh


def _price(numel: float) -> SimpleNamespace:
    zero = dict.fromkeys(
        ("fwd_s", "bwd_s", "comm_fwd_s", "comm_bwd_s", "grad_sync_s", "activation_bytes",
         "input_bytes", "output_bytes", "core_fwd_s", "core_activation_bytes", "fwd_flops",
         "bwd_flops"), 0.0,
    )  # fmt: skip
    return SimpleNamespace(param_numel=numel, **zero)


def _zero3(numel: float, cluster, dp: int):
    mesh = LogicalMesh((1, dp, 1), ("pp", "dp", "tp"))
    return layer_cost(_price(numel), name="l", kind="block", dp=dp, full_mesh=mesh,
                      cluster=cluster, dtype_bytes=2, grad_bytes=2)  # fmt: skip


def test_zero3_gather_has_the_rail_bandwidth_and_the_flat_ring_latency():
    """Across hosts a ZeRO-3 all-gather moves the full buffer through one NIC per device (the
    rail's bandwidth) but runs a flat ring over all n ranks: n - 1 steps at the inter-host step
    latency, not the rail's one step per host."""
    c = load_cluster("dgx-a100", nodes=8)
    group, rail = tuple(range(64)), tuple(range(0, 64, 8))
    step = c.analyze(group).inter_latency_s
    tiny = _zero3(1.0, c, 64)
    assert tiny.zero3_gather_s == pytest.approx(63 * step, rel=0.01)
    assert tiny.zero3_reduce_s == pytest.approx(63 * step, rel=0.01)
    # the rail alone would have had 7 steps: the flat ring's 56 more are what is added
    big = _zero3(1e9, c, 64)
    rail_s = collective_time_s("all_gather", 2e9, rail, c)
    assert big.zero3_gather_s == pytest.approx(rail_s + 56 * step, rel=1e-6)
    assert big.zero3_gather_s > collective_time_s("all_gather", 2e9, group, c)
