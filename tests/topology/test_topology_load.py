"""Topology files: the shipped ones load and scale; bad files fail naming file, field, allowed."""

from __future__ import annotations

import pytest

from autopar.errors import ConfigError
from autopar.topology.load import list_topologies, load_cluster

GiB = 1024**3


def test_shipped_topologies_are_listed():
    assert {"dgx-a100", "dgx-h100", "pcie-4090", "hetero-nic"} <= set(list_topologies())


@pytest.mark.parametrize(
    "name,nodes,devices,memory_gib",
    [
        ("dgx-a100", 16, 128, 80),
        ("dgx-h100", 2, 16, 80),
        ("pcie-4090", 1, 8, 24),
        ("hetero-nic", 6, 48, 80),
    ],
)
def test_shipped_topologies_scale_with_nodes(name, nodes, devices, memory_gib):
    c = load_cluster(name, nodes=nodes)
    assert c.num_hosts == nodes
    assert c.num_devices == devices == nodes * c.devices_per_host
    assert c.memory_bytes == memory_gib * GiB
    assert c.host_of(devices - 1) == nodes - 1
    assert sum(1 for _, d in c.graph.nodes(data=True) if d["kind"] == "device") == devices


def test_dgx_a100_is_megatron_selene():
    c = load_cluster("dgx-a100", nodes=2)
    assert c.device.peak_flop_per_s("bf16") == 312e12
    assert c.device.peak_flop_per_s("bfloat16") == 312e12
    (group,) = c.host_groups
    assert group.nic_count == 8 and group.nic.bandwidth_bytes_per_s == 25e9  # 200 Gb/s HDR
    assert group.fabric.kind == "nvswitch"
    assert group.fabric.link.bandwidth_bytes_per_s == 300e9  # 600 GB/s bidirectional


def test_hetero_nic_splits_hosts_between_groups():
    c = load_cluster("hetero-nic", nodes=6)
    names = [h.group.name for h in c.hosts]
    assert names == ["ib"] * 3 + ["eth"] * 3
    assert c.between_groups is not None and c.between_groups.count == 4


def test_default_node_count_comes_from_the_file():
    assert load_cluster("hetero-nic").num_hosts == 4
    assert load_cluster("dgx-a100").num_hosts == 1


def test_load_by_path(scratch):
    c = load_cluster(scratch / "topologies" / "dgx-h100.yaml", nodes=3)
    assert c.num_devices == 24


def test_describe_lists_what_was_loaded_and_prices_nothing():
    c = load_cluster("hetero-nic", nodes=4)
    text = c.describe()
    for needle in ("4 hosts", "ib-hdr-200", "eth-100g", "a100-sxm4-80gb", "108 SMs"):
        assert needle in text
    assert "all-reduce" not in text and " ms" not in text
    labels = [label for label, _ in c.representative_groups()]
    assert labels[0] == "one host" and "full cluster" in labels and len(labels) == 4


def test_topology_modules_do_not_import_the_pricing():
    # the Cluster is data: loading topologies must not pull in cost.collectives / cost.compute
    import subprocess
    import sys

    code = (
        "import sys, autopar.topology.load as L; L.load_cluster('dgx-a100').describe(); "
        "print(sorted(m for m in sys.modules if m.startswith('autopar.cost')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['autopar.cost', 'autopar.cost.profiles']"


def test_host_groups_must_price_their_devices_alike(scratch, edit_yaml):
    (scratch / "cost_models" / "slow.yaml").write_text(
        "kind: compute_calibration\ndevice: a100-sxm4-80gb\nfitted:\n  host_overhead_us: 50\n"
    )
    path = edit_yaml(
        scratch / "topologies" / "hetero-nic.yaml",
        lambda d: d["host_groups"][1].update(compute_calibration="slow"),
    )
    with pytest.raises(ConfigError) as exc:
        load_cluster(path, nodes=4)
    _expect(exc, file="hetero-nic.yaml", field="host_groups")
    # one calibration for every group is fine
    c = load_cluster(path, nodes=4, compute_calibration="slow")
    assert c.device.host_overhead_s == pytest.approx(50e-6)


# -- bad input ---------------------------------------------------------------------------------
def _expect(exc: pytest.ExceptionInfo, *, file: str | None, field: str, allowed: str | None = None):
    err = exc.value
    assert isinstance(err, ConfigError)
    if file is not None:
        assert err.file is not None and err.file.endswith(file), err.file
        assert file in str(err)
    assert err.field == field and field in str(err)
    if allowed is not None:
        assert err.allowed and any(allowed in str(a) for a in err.allowed), err.allowed


def test_unknown_topology_lists_shipped_ones():
    with pytest.raises(ConfigError) as exc:
        load_cluster("dgx-a1000")
    _expect(exc, file=None, field="topology", allowed="dgx-a100")


def test_missing_field(scratch, edit_yaml):
    path = edit_yaml(
        scratch / "topologies" / "dgx-a100.yaml",
        lambda d: d["host_groups"][0].pop("devices_per_host"),
    )
    with pytest.raises(ConfigError) as exc:
        load_cluster(path)
    _expect(exc, file="dgx-a100.yaml", field="host_groups[0].devices_per_host")
    assert "missing" in str(exc.value)


def test_unknown_device_kind(scratch, edit_yaml):
    path = edit_yaml(
        scratch / "topologies" / "dgx-a100.yaml",
        lambda d: d["host_groups"][0].update(device="a200"),
    )
    with pytest.raises(ConfigError) as exc:
        load_cluster(path)
    _expect(exc, file="dgx-a100.yaml", field="host_groups[0].device", allowed="a100-sxm4-80gb")


def test_unknown_fabric_kind(scratch, edit_yaml):
    path = edit_yaml(
        scratch / "topologies" / "dgx-h100.yaml",
        lambda d: d["host_groups"][0]["fabric"].update(kind="torus"),
    )
    with pytest.raises(ConfigError) as exc:
        load_cluster(path)
    _expect(exc, file="dgx-h100.yaml", field="host_groups[0].fabric.kind", allowed="nvswitch")


def test_negative_bandwidth_in_a_link_profile(scratch, edit_yaml):
    edit_yaml(scratch / "cost_models" / "ib-hdr-200.yaml", lambda d: d.update(bandwidth_GBps=-25))
    with pytest.raises(ConfigError) as exc:
        load_cluster(scratch / "topologies" / "dgx-a100.yaml")
    _expect(exc, file="ib-hdr-200.yaml", field="bandwidth_GBps")
    assert "-25" in str(exc.value)


def test_negative_root_bandwidth_in_a_topology(scratch, edit_yaml):
    path = edit_yaml(
        scratch / "topologies" / "pcie-4090.yaml",
        lambda d: d["host_groups"][0]["fabric"].update(root_bandwidth_GBps=-1),
    )
    with pytest.raises(ConfigError) as exc:
        load_cluster(path)
    _expect(exc, file="pcie-4090.yaml", field="host_groups[0].fabric.root_bandwidth_GBps")


def test_misspelt_field_is_rejected_not_defaulted(scratch, edit_yaml):
    path = edit_yaml(
        scratch / "topologies" / "dgx-a100.yaml",
        lambda d: d["network"].update(oversubscribtion=d["network"].pop("oversubscription")),
    )
    with pytest.raises(ConfigError) as exc:
        load_cluster(path)
    _expect(exc, file="dgx-a100.yaml", field="network.oversubscribtion", allowed="oversubscription")


def test_oversubscription_below_one(scratch, edit_yaml):
    path = edit_yaml(
        scratch / "topologies" / "dgx-a100.yaml",
        lambda d: d["network"].update(oversubscription=0.5),
    )
    with pytest.raises(ConfigError) as exc:
        load_cluster(path)
    _expect(exc, file="dgx-a100.yaml", field="network.oversubscription")


@pytest.mark.parametrize("nodes", [1, 3, 5])
def test_node_count_the_hetero_file_cannot_form(nodes):
    with pytest.raises(ConfigError) as exc:
        load_cluster("hetero-nic", nodes=nodes)
    _expect(exc, file="hetero-nic.yaml", field="nodes", allowed="2")
    assert "4" in [str(a) for a in exc.value.allowed]


@pytest.mark.parametrize("nodes", [0, -2, 2.5, 561])
def test_bad_node_counts(nodes):
    with pytest.raises(ConfigError) as exc:
        load_cluster("dgx-a100", nodes=nodes)
    _expect(exc, file="dgx-a100.yaml", field="nodes")


def test_two_groups_need_a_link_between_them(scratch, edit_yaml):
    path = edit_yaml(scratch / "topologies" / "hetero-nic.yaml", lambda d: d.pop("between_groups"))
    with pytest.raises(ConfigError) as exc:
        load_cluster(path)
    _expect(exc, file="hetero-nic.yaml", field="between_groups")


def test_group_fractions_must_sum_to_one(scratch, edit_yaml):
    path = edit_yaml(
        scratch / "topologies" / "hetero-nic.yaml",
        lambda d: d["host_groups"][0].update(fraction=0.7),
    )
    with pytest.raises(ConfigError) as exc:
        load_cluster(path)
    _expect(exc, file="hetero-nic.yaml", field="host_groups")


def test_not_a_mapping(scratch):
    path = scratch / "topologies" / "broken.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError) as exc:
        load_cluster(path)
    assert "broken.yaml" in str(exc.value)
