"""Cluster.graph: devices, switches, NICs and links with SI attributes; group bottlenecks."""

from __future__ import annotations

import math

import pytest

from autopar.errors import ConfigError
from autopar.topology.load import load_cluster
from autopar.topology.mesh import LogicalMesh


def _kinds(g):
    out: dict[str, int] = {}
    for _, d in g.nodes(data=True):
        out[d["kind"]] = out.get(d["kind"], 0) + 1
    return out


def test_dgx_graph_has_nvswitch_and_rails():
    c = load_cluster("dgx-a100", nodes=2)
    g = c.graph
    assert _kinds(g)["device"] == 16 and _kinds(g)["nic"] == 16
    e = g.edges["h0/gpu3", "h0/nvswitch"]
    assert e["bandwidth_bytes_per_s"] == 300e9 and e["latency_s"] > 0
    assert g.edges["h1/nic5", "dgx/leaf0"]["bandwidth_bytes_per_s"] == 25e9
    # every device reaches every other device
    assert all(math.isfinite(len(p)) for p in [g.nodes])
    import networkx as nx

    assert nx.is_connected(g)


def test_pcie_graph_has_switches_and_uplinks():
    g = load_cluster("pcie-4090").graph
    assert g.has_edge("h0/gpu0", "h0/pcie0") and g.has_edge("h0/gpu7", "h0/pcie1")
    assert g.has_edge("h0/pcie0", "h0/root") and not g.has_edge("h0/gpu0", "h0/gpu1")


def test_hetero_graph_links_the_two_groups():
    g = load_cluster("hetero-nic", nodes=4).graph
    (edge,) = [(a, b) for a, b, d in g.edges(data=True) if d["kind"] == "between_groups"]
    assert g.edges[edge]["count"] == 4
    assert g.edges[edge]["bandwidth_bytes_per_s"] == 4 * 12.5e9


def test_spine_appears_with_more_than_one_leaf():
    g = load_cluster("dgx-a100", nodes=40).graph
    assert "dgx/spine" in g and g.has_edge("dgx/leaf1", "dgx/spine")


def test_bottleneck_and_mesh_groups():
    c = load_cluster("hetero-nic", nodes=4)
    assert "nvlink" in c.bottleneck((0, 1, 2, 3))
    assert "eth-100g" in c.bottleneck((0, 16))
    mesh = LogicalMesh((4, 8), ("dp", "tp"))
    assert c.mesh_groups(mesh, "dp")[0] == (0, 8, 16, 24)
    with pytest.raises(ConfigError):
        c.mesh_groups(LogicalMesh((8, 8), ("dp", "tp")), "dp")


def test_rank_checks():
    c = load_cluster("dgx-a100", nodes=2)
    assert c.host_of(15) == 1 and c.local_rank(15) == 7
    with pytest.raises(ConfigError):
        c.host_of(16)
