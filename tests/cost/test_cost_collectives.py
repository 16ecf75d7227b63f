"""Collective prices pin the physics: ring formulas, NIC bounds, hierarchy, heterogeneity."""

from __future__ import annotations

import math

import pytest

from autopar.cost.collectives import (
    COLLECTIVES,
    collective_time_s,
    mesh_collective_time_s,
    volume_collective_time_s,
)
from autopar.cost.profiles import load_link_profile
from autopar.errors import ConfigError
from autopar.topology.load import load_cluster
from autopar.topology.mesh import LogicalMesh

GiB = 1024**3


@pytest.fixture(scope="module")
def a100x8():
    return load_cluster("dgx-a100", nodes=8)


def test_ring_all_reduce_in_one_host_matches_the_formula(a100x8):
    nv = load_link_profile("nvlink3-nvswitch")
    bw = nv.bandwidth_bytes_per_s * nv.bandwidth_fraction  # datasheet x achieved fraction
    alpha = nv.latency_s + nv.step_overhead_s
    for n in (2, 4, 8):
        for b in (1e3, 1e6, float(GiB)):
            want = 2 * (n - 1) / n * b / bw + 2 * (n - 1) * alpha
            assert collective_time_s("all_reduce", b, tuple(range(n)), a100x8) == pytest.approx(
                want, rel=1e-12
            )
            half = (n - 1) / n * b / bw + (n - 1) * alpha
            assert collective_time_s("all_gather", b, tuple(range(n)), a100x8) == pytest.approx(
                half, rel=1e-12
            )
            assert collective_time_s("reduce_scatter", b, tuple(range(n)), a100x8) == pytest.approx(
                half, rel=1e-12
            )
    # ~230 GB/s achieved bus bandwidth (shared/benchmarks/README.md)
    t = collective_time_s("all_reduce", GiB, tuple(range(8)), a100x8)
    busbw = 2 * 7 / 8 * GiB / t
    assert 200e9 < busbw < 240e9


def test_all_reduce_across_hosts_is_bounded_by_nic_bandwidth(a100x8):
    nic = load_link_profile("ib-hdr-200")
    per_device_datasheet = 8 * nic.bandwidth_bytes_per_s / 8  # 8 NICs shared by 8 devices
    for m in (2, 4, 8):
        group = tuple(h * 8 for h in range(m))  # one device per host
        t = collective_time_s("all_reduce", GiB, group, a100x8)
        lower = 2 * (m - 1) / m * GiB / per_device_datasheet
        assert t > lower  # can never beat the NIC datasheet
        assert t < 1.3 * lower / nic.bandwidth_fraction  # and it is the NIC that limits it
    # full hosts: 8 devices per host share 8 NICs; bus bandwidth bounded by 8 x 25 GB/s
    t = collective_time_s("all_reduce", GiB, tuple(range(32)), a100x8)
    assert 2 * 31 / 32 * GiB / t < 8 * nic.bandwidth_bytes_per_s


def test_dgx_a100_same_bytes_across_hosts_cost_several_times_more(a100x8):
    in_host = collective_time_s("all_reduce", GiB, tuple(range(8)), a100x8)
    spread = collective_time_s("all_reduce", GiB, tuple(range(0, 64, 8)), a100x8)
    assert spread > 5 * in_host
    # the bytes-only baseline cannot see the difference
    assert volume_collective_time_s("all_reduce", GiB, 8, a100x8) == pytest.approx(in_host)


def test_hetero_nic_group_touching_ethernet_hosts_runs_at_ethernet_speed():
    c = load_cluster("hetero-nic", nodes=4)  # hosts 0,1: InfiniBand; hosts 2,3: Ethernet
    ib_ib = collective_time_s("all_reduce", GiB, (0, 8), c)
    eth_eth = collective_time_s("all_reduce", GiB, (16, 24), c)
    ib_eth = collective_time_s("all_reduce", GiB, (0, 16), c)
    ib, eth = c.host_groups
    ratio = ib.nic_bandwidth_per_device_bytes_per_s / eth.nic_bandwidth_per_device_bytes_per_s
    assert eth_eth / ib_ib == pytest.approx(ratio, rel=0.05)
    assert ib_eth >= eth_eth  # a mixed group pays Ethernet speed (and the link between groups)
    assert ib_eth / ib_ib > 5


def test_link_between_groups_limits_when_nics_do_not(make_topology, tmp_path):
    import yaml

    base = load_cluster("hetero-nic", nodes=2)
    # make both groups InfiniBand: now only the 4x100 GbE link between them is slow
    path = tmp_path / "topologies" / "two-ib.yaml"
    path.parent.mkdir(exist_ok=True)
    doc = yaml.safe_load(open(base.file))
    doc["host_groups"][1]["nics"] = {"count": 8, "link": "ib-hdr-200"}
    path.write_text(yaml.safe_dump(doc))
    c = load_cluster(path, nodes=2)
    path_info = c.analyze((0, 8))
    link = c.between_groups
    assert path_info.inter_bandwidth_bytes_per_s == pytest.approx(link.bandwidth_bytes_per_s / 8)
    assert "between host groups" in path_info.bottleneck


def test_hierarchical_group_spanning_hosts(a100x8):
    # 16 devices = 2 full hosts: intra reduce-scatter + inter all-reduce + intra all-gather,
    # or a flat ring: the cheaper of the two, both bounded below by the pure intra ring
    t16 = collective_time_s("all_reduce", GiB, tuple(range(16)), a100x8)
    t8 = collective_time_s("all_reduce", GiB, tuple(range(8)), a100x8)
    assert t8 < t16 < 3 * t8
    # partial hosts: 2 devices on each of 4 hosts get only 2/8 of each host's NICs
    grp = tuple(h * 8 + j for h in range(4) for j in range(2))
    assert collective_time_s("all_reduce", GiB, grp, a100x8) > t16


def test_pcie_box_is_limited_by_the_pcie_tree(make_topology):
    no_p2p = load_cluster("pcie-4090")
    pcie = load_link_profile("pcie4-x16")
    eff = pcie.bandwidth_bytes_per_s * pcie.bandwidth_fraction
    path = no_p2p.analyze(tuple(range(8)))
    # without P2P every hop goes through host memory: 4 devices share a switch uplink
    assert path.intra_bandwidth_bytes_per_s == pytest.approx(eff / 4)
    assert "uplink" in path.bottleneck
    # with P2P inside one switch the device link is the limit
    p2p = load_cluster(
        make_topology(
            "p2p",
            fabric={"kind": "pcie_tree", "link": "pcie4-x16", "devices_per_switch": 4,
                    "uplink": "pcie4-x16", "p2p": True, "root_bandwidth_GBps": 63},
            nics={"count": 1, "link": "eth-100g"},
        ),
        nodes=1,
    )  # fmt: skip
    assert p2p.analyze((0, 1, 2, 3)).intra_bandwidth_bytes_per_s == pytest.approx(eff)
    assert collective_time_s("all_reduce", GiB, (0, 1, 2, 3), p2p) < collective_time_s(
        "all_reduce", GiB, (0, 1, 2, 3), no_p2p
    )
    # a PCIe box is far slower than NVSwitch for the same group
    a100 = load_cluster("dgx-a100")
    assert collective_time_s("all_reduce", GiB, tuple(range(8)), no_p2p) > 10 * collective_time_s(
        "all_reduce", GiB, tuple(range(8)), a100
    )


def test_nvlink_pairs(make_topology):
    c = load_cluster(
        make_topology(
            "pairs",
            fabric={"kind": "nvlink_pairs", "link": "nvlink3-nvswitch",
                    "pcie": {"kind": "pcie_tree", "link": "pcie4-x16", "p2p": True}},
        ),
        nodes=1,
    )  # fmt: skip
    assert collective_time_s("all_reduce", GiB, (0, 1), c) * 5 < collective_time_s(
        "all_reduce", GiB, (1, 2), c
    )


def test_oversubscription_slows_groups_that_leave_a_leaf(make_topology):
    c = load_cluster(
        make_topology(
            "over",
            network={"kind": "fat_tree", "hosts_per_leaf": 2, "oversubscription": 4.0,
                     "switch_latency_us": 0.5},
        ),
        nodes=4,
    )  # fmt: skip
    same_leaf = c.analyze((0, 8))
    cross_leaf = c.analyze((0, 16))
    assert cross_leaf.inter_bandwidth_bytes_per_s == pytest.approx(
        same_leaf.inter_bandwidth_bytes_per_s / 4
    )
    assert cross_leaf.inter_latency_s > same_leaf.inter_latency_s


def test_every_kind_is_priced_and_grows_with_bytes(a100x8):
    for kind in COLLECTIVES:
        for group in (
            [(0, 1), (0, 8)]
            if kind == "p2p"
            else [tuple(range(8)), tuple(range(0, 64, 8)), tuple(range(64))]
        ):
            small = collective_time_s(kind, 1e3, group, a100x8)
            big = collective_time_s(kind, 1e9, group, a100x8)
            assert 0 < small < big and math.isfinite(big), (kind, group)
        assert collective_time_s(kind, 1e9, (5,), a100x8) == 0.0  # nobody to talk to


def test_all_to_all_across_hosts_pays_the_network(a100x8):
    in_host = collective_time_s("all_to_all", GiB, tuple(range(8)), a100x8)
    across = collective_time_s("all_to_all", GiB, tuple(range(0, 64, 8)), a100x8)
    assert across > 5 * in_host


def test_list_groups_are_accepted(a100x8):
    assert collective_time_s("all_reduce", 1e6, [0, 1, 2, 3], a100x8) == collective_time_s(
        "all_reduce", 1e6, (0, 1, 2, 3), a100x8
    )


def test_mesh_axis_price_is_its_slowest_group(a100x8):
    mesh = LogicalMesh((8, 8), ("dp", "tp"))
    assert mesh_collective_time_s("all_reduce", GiB, mesh, "tp", a100x8) == pytest.approx(
        collective_time_s("all_reduce", GiB, tuple(range(8)), a100x8)
    )
    dp = mesh_collective_time_s("all_reduce", GiB, mesh, "dp", a100x8)
    assert dp == pytest.approx(
        max(collective_time_s("all_reduce", GiB, g, a100x8) for g in mesh.groups("dp"))
    )
    # tensor parallelism belongs inside a host: the transposed layout is much worse
    bad = LogicalMesh((8, 8), ("tp", "dp"))
    assert mesh_collective_time_s(
        "all_reduce", GiB, bad, "tp", a100x8
    ) > 5 * mesh_collective_time_s("all_reduce", GiB, mesh, "tp", a100x8)


def test_mesh_larger_than_cluster_is_rejected(a100x8):
    with pytest.raises(ConfigError):
        mesh_collective_time_s("all_reduce", 1.0, LogicalMesh((16, 8), ("dp", "tp")), "dp", a100x8)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: collective_time_s("allreduce", 1.0, (0, 1), c),
        lambda c: collective_time_s("all_reduce", -1.0, (0, 1), c),
        lambda c: collective_time_s("p2p", 1.0, (0, 1, 2), c),
        lambda c: collective_time_s("all_reduce", 1.0, (0, 64), c),
        lambda c: collective_time_s("all_reduce", 1.0, (0, 0), c),
        lambda c: collective_time_s("all_reduce", 1.0, (), c),
        lambda c: volume_collective_time_s("all_reduce", 1.0, 0, c),
    ],
)
def test_bad_calls_raise_config_errors(a100x8, call):
    with pytest.raises(ConfigError):
        call(a100x8)


def test_unknown_kind_lists_allowed(a100x8):
    with pytest.raises(ConfigError) as exc:
        collective_time_s("allreduce", 1.0, (0, 1), a100x8)
    assert "all_reduce" in exc.value.allowed


def test_prices_are_cached_per_group(a100x8):
    c = load_cluster("dgx-a100", nodes=2)
    collective_time_s("all_reduce", 1.0, (0, 8), c)
    collective_time_s("all_reduce", 1.0, (1, 9), c)  # same signature: analysis reused
    assert len(c._cache["sig"]) == 1 and len(c._cache["coef"]) == 2
