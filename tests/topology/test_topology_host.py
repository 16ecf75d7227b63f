"""Host profiles: CPU memory, host<->device copies, CPU Adam and NVMe of each host group.

The expected figures are derived by hand from the profile files (datasheet x achieved fraction,
shared links divided among the devices that copy at once), so a change to the loader's model or
to a file's numbers shows up here.
"""

from __future__ import annotations

import math

import pytest

from autopar.cost.profiles import PROFILE_DIR, load_link_profile
from autopar.errors import ConfigError
from autopar.topology.cluster import HostProfile
from autopar.topology.load import (
    ADAM_BYTES_PER_PARAM,
    list_topologies,
    load_cluster,
    load_host_profile,
)

GiB = 1024**3


def _pcie4_effective() -> float:
    link = load_link_profile("pcie4-x16")
    return link.bandwidth_bytes_per_s * link.bandwidth_fraction


# -- the shipped files ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_topologies())
def test_every_shipped_topology_has_a_host_profile(name):
    c = load_cluster(name)
    assert c.has_host_profile and all(g.host is not None for g in c.host_groups)
    h = c.host_profile
    assert h.name.startswith("host-") and h.source.endswith(f"{h.name}.yaml")
    for value in (h.memory_bytes, h.h2d_bytes_per_s, h.d2h_bytes_per_s, h.cpu_adam_params_per_s,
                  h.nvme_read_bytes_per_s, h.nvme_write_bytes_per_s, h.nvme_bytes):  # fmt: skip
        assert math.isfinite(value) and value > 0
    assert h.torch_adam_params_per_s is not None
    assert h.torch_adam_params_per_s < h.cpu_adam_params_per_s  # fused beats PyTorch's passes
    # a host copies no faster than one device slot
    assert h.h2d_bytes_per_s <= load_cluster(name).host_groups[0].fabric.link.bandwidth_bytes_per_s


def test_dgx_a100_host_figures():
    h = load_cluster("dgx-a100").host_profile
    assert h.memory_bytes == 2048 * GiB  # DGX A100 640 GB system: 2 TB
    # two GPUs under each PCIe Gen4 switch, one x16 uplink: all 8 copying get half a slot each
    assert h.h2d_bytes_per_s == pytest.approx(_pcie4_effective() / 2)
    assert h.d2h_bytes_per_s == h.h2d_bytes_per_s
    # 2 x 8 channels DDR4-3200 = 409.6 GB/s, fused Adam at 16.6% of bandwidth / 30 B per param
    assert ADAM_BYTES_PER_PARAM == 30
    assert h.cpu_adam_params_per_s == pytest.approx(409.6e9 * 0.166 / 30)
    assert h.torch_adam_params_per_s == pytest.approx(409.6e9 * 0.0243 / 30)
    # 8x 3.84 TB U.2 NVMe, 6.4 / 3.8 GB/s per drive at 77% achieved
    assert h.nvme_bytes == pytest.approx(8 * 3.84e12)
    assert h.nvme_read_bytes_per_s == pytest.approx(8 * 6.4e9 * 0.77)
    assert h.nvme_write_bytes_per_s == pytest.approx(8 * 3.8e9 * 0.77)


def test_pcie_4090_devices_share_the_switch_uplink():
    # 8 GPUs, 4 per PCIe 4.0 switch, each switch on ONE x16 Gen4 uplink: when all copy at once,
    # each gets a quarter of the uplink, not its own x16 slot
    box = load_cluster("pcie-4090").host_profile
    assert box.h2d_bytes_per_s == pytest.approx(_pcie4_effective() / 4)
    assert "shared by 4 devices" in box.copy_path
    # the same card alone on CPU lanes (the workstation) gets its whole slot
    ws = load_cluster("workstation-4090").host_profile
    assert ws.h2d_bytes_per_s == pytest.approx(_pcie4_effective())
    assert ws.h2d_bytes_per_s == pytest.approx(4 * box.h2d_bytes_per_s)
    # fewer devices in use than slots: one device under a switch has the uplink to itself
    one = load_host_profile("host-4090-server", devices_in_use=1)
    assert one.h2d_bytes_per_s == pytest.approx(_pcie4_effective())
    two = load_host_profile("host-4090-server", devices_in_use=2)
    assert two.h2d_bytes_per_s == pytest.approx(_pcie4_effective() / 2)


def test_root_complex_limits_when_it_is_the_narrowest(scratch, edit_yaml):
    # a 20 GB/s host bridge shared by 8 devices: 20 x 0.8 / 8 = 2 GB/s each, below the uplinks
    edit_yaml(
        scratch / "cost_models" / "host-4090-server.yaml",
        lambda d: d["pcie"].update(root_bandwidth_GBps=20),
    )
    edit_yaml(
        scratch / "topologies" / "pcie-4090.yaml",
        lambda d: d["host_groups"][0]["fabric"].update(root_bandwidth_GBps=20),
    )
    h = load_cluster(scratch / "topologies" / "pcie-4090.yaml").host_profile
    assert h.h2d_bytes_per_s == pytest.approx(20e9 * 0.8 / 8)
    assert "root complex shared by 8 devices" in h.copy_path


def test_workstation_is_the_issue_one_gpu_case():
    c = load_cluster("workstation-4090")
    assert c.num_devices == 1 and c.memory_bytes == 24 * GiB
    h = c.host_profile
    assert h.memory_bytes == 128 * GiB
    assert h.nvme_bytes == pytest.approx(2e12)
    # a 13B model's fp32 master weights + Adam moments (12 B/param) do not fit in 128 GB of RAM:
    # the figures must let the search see that NVMe is needed
    assert 12 * 13e9 > h.memory_bytes and 12 * 13e9 < h.memory_bytes + h.nvme_bytes


def test_topology_show_prints_the_host_figures():
    from autopar.cost.describe import describe_cluster

    text = describe_cluster(load_cluster("pcie-4090"))
    for needle in ("host host-4090-server", "512 GiB CPU memory", "h2d 6.3 GB/s",
                   "CPU Adam per host: fused 2.27 G params/s", "NVMe: 7.68 TB"):  # fmt: skip
        assert needle in text, needle


# -- more than one host group --------------------------------------------------------------------
def test_host_groups_with_different_hosts_take_the_slowest(scratch, edit_yaml):
    path = edit_yaml(
        scratch / "topologies" / "hetero-nic.yaml",
        lambda d: d["host_groups"][1].update(host="host-dgx-h100"),
    )
    c = load_cluster(path, nodes=4)
    a100 = load_host_profile("host-dgx-a100")
    h100 = load_host_profile("host-dgx-h100")
    h = c.host_profile
    assert h.name == "slowest of host-dgx-a100, host-dgx-h100"
    assert h.h2d_bytes_per_s == a100.h2d_bytes_per_s < h100.h2d_bytes_per_s
    assert h.cpu_adam_params_per_s == a100.cpu_adam_params_per_s < h100.cpu_adam_params_per_s
    assert h.memory_bytes == min(a100.memory_bytes, h100.memory_bytes)
    # the host is part of the cluster's identity
    assert c != load_cluster("hetero-nic", nodes=4)
    # one profile for every group is returned unchanged
    assert load_cluster("hetero-nic", nodes=4).host_profile == a100


def test_slowest_of_one_is_itself():
    a100 = load_host_profile("host-dgx-a100")
    assert HostProfile.slowest((a100,)) is a100


# -- bad input -----------------------------------------------------------------------------------
def _expect(exc, *, file: str | None, field: str, allowed: str | None = None):
    err = exc.value
    assert isinstance(err, ConfigError)
    if file is not None:
        assert err.file is not None and err.file.endswith(file), err.file
    assert err.field == field and field in str(err), (err.field, str(err))
    if allowed is not None:
        assert err.allowed and any(allowed in str(a) for a in err.allowed), err.allowed


def test_a_cluster_without_host_profile_refuses_to_invent_one(scratch, edit_yaml):
    path = edit_yaml(
        scratch / "topologies" / "dgx-a100.yaml", lambda d: d["host_groups"][0].pop("host")
    )
    c = load_cluster(path)  # still a valid topology: the host is optional
    assert not c.has_host_profile
    with pytest.raises(ConfigError) as exc:
        _ = c.host_profile
    _expect(exc, file="dgx-a100.yaml", field="host_groups[0].host", allowed="host-dgx-a100")
    assert "host: not stated" in c.describe()


def test_every_group_names_a_host_or_none_does(scratch, edit_yaml):
    path = edit_yaml(
        scratch / "topologies" / "hetero-nic.yaml", lambda d: d["host_groups"][1].pop("host")
    )
    with pytest.raises(ConfigError) as exc:
        load_cluster(path, nodes=4)
    _expect(exc, file="hetero-nic.yaml", field="host_groups")
    assert "eth" in str(exc.value)


def test_unknown_host_profile_lists_the_known_ones(scratch, edit_yaml):
    path = edit_yaml(
        scratch / "topologies" / "dgx-h100.yaml",
        lambda d: d["host_groups"][0].update(host="host-dgx-h200"),
    )
    with pytest.raises(ConfigError) as exc:
        load_cluster(path)
    _expect(exc, file="dgx-h100.yaml", field="host_groups[0].host", allowed="host-dgx-h100")
    assert "host-workstation-4090" in exc.value.allowed
    assert "a100-sxm4-80gb" not in exc.value.allowed  # only kind: host profiles


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda d: d["pcie"].update(devices_per_swich=2), "pcie.devices_per_swich"),
        (lambda d: d.update(memory_GiB=-1), "memory_GiB"),
        (lambda d: d.pop("memory_GiB"), "memory_GiB"),
        (lambda d: d["achieved"].update(nvme_read_fraction=1.2), "achieved.nvme_read_fraction"),
        (lambda d: d["achieved"].pop("fused_adam_memory_fraction"),
         "achieved.fused_adam_memory_fraction"),
        (lambda d: d["cpu"].update(memory_bandwidth_GBps="fast"), "cpu.memory_bandwidth_GBps"),
        (lambda d: d["nvme"].update(drives=-1), "nvme.drives"),
        (lambda d: d["pcie"].pop("uplink"), "pcie.devices_per_switch"),
        (lambda d: d["pcie"].update(devices_per_switch=9), "pcie.devices_per_switch"),
        (lambda d: d["pcie"].update(device_link="pcie7-x16"), "pcie.device_link"),
        (lambda d: d.update(kind="link"), "kind"),
    ],
    ids=["misspelt", "negative", "missing", "fraction>1", "missing-achieved", "not-a-number",
         "negative-drives", "switch-without-uplink", "more-per-switch-than-slots",
         "unknown-link", "wrong-kind"],
)  # fmt: skip
def test_bad_host_file_names_file_and_field(scratch, edit_yaml, change, field):
    edit_yaml(scratch / "cost_models" / "host-dgx-a100.yaml", change)
    with pytest.raises(ConfigError) as exc:
        load_cluster(scratch / "topologies" / "dgx-a100.yaml")
    _expect(exc, file="host-dgx-a100.yaml", field=field)


def test_no_drives_means_no_drive_figures(scratch, edit_yaml):
    # drives: 0 with drive figures left in is a contradiction, rejected as unknown fields
    edit_yaml(scratch / "cost_models" / "host-dgx-a100.yaml", lambda d: d["nvme"].update(drives=0))
    with pytest.raises(ConfigError) as exc:
        load_cluster(scratch / "topologies" / "dgx-a100.yaml")
    _expect(exc, file="host-dgx-a100.yaml", field="nvme.drive_capacity_TB")

    def no_nvme(d):
        d["nvme"] = {"drives": 0}
        for k in ("nvme_read_fraction", "nvme_write_fraction"):
            d["achieved"].pop(k)

    edit_yaml(scratch / "cost_models" / "host-dgx-a100.yaml", no_nvme)
    h = load_cluster(scratch / "topologies" / "dgx-a100.yaml").host_profile
    assert h.nvme_bytes == h.nvme_read_bytes_per_s == h.nvme_write_bytes_per_s == 0
    assert "NVMe: none" in h.describe()


def test_more_devices_than_the_host_has_slots(scratch, edit_yaml):
    path = edit_yaml(
        scratch / "topologies" / "workstation-4090.yaml",
        lambda d: d["host_groups"][0].update(devices_per_host=2),
    )
    with pytest.raises(ConfigError) as exc:
        load_cluster(path)
    _expect(exc, file="workstation-4090.yaml", field="host_groups[0].host")
    assert "1 device slots" in str(exc.value)


def test_pcie_tree_fabric_and_host_profile_must_agree(scratch, edit_yaml):
    edit_yaml(
        scratch / "cost_models" / "host-4090-server.yaml",
        lambda d: d["pcie"].update(devices_per_switch=2),
    )
    with pytest.raises(ConfigError) as exc:
        load_cluster(scratch / "topologies" / "pcie-4090.yaml")
    _expect(exc, file="pcie-4090.yaml", field="host_groups[0].host")
    assert "devices per switch" in str(exc.value) and "fabric 4" in str(exc.value)


def test_host_profile_files_are_kind_host():
    # the loader's error lists: host profiles are found by kind, like the other profiles
    from autopar.cost.profiles import list_profiles

    hosts = list_profiles("host")
    assert {"host-dgx-a100", "host-dgx-h100", "host-4090-server", "host-workstation-4090"} <= set(
        hosts
    )
    assert all((PROFILE_DIR / f"{h}.yaml").is_file() for h in hosts)
