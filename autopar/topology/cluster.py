"""Cluster: hosts, devices, switches and links, and what limits a group of devices.

A cluster is a list of hosts (grouped into host groups that share a device kind, an intra-host
fabric and NICs), an inter-host network (fat tree with oversubscription, rail-optimised, or one
switch) and, when there are two host groups, a slower link between them. ``Cluster.graph`` is the
same thing as a networkx graph (devices, switches, NICs, links with SI bandwidth/latency) for
inspection and drawing; pricing does not walk the graph, it uses the closed-form analysis below.

Group analysis (``Cluster.analyze``) answers, for a set of global ranks, the two levels a
hierarchical collective crosses:

* **intra-host**: the bus bandwidth per device of a ring among the group's devices on one host,
  given the fabric (NVSwitch: the device's link; PCIe tree: device link, switch uplinks shared by
  the groups crossing them, the root complex; without peer-to-peer every hop bounces through
  host memory and uses the uplinks);
* **inter-host**: the bandwidth per device of the ring among hosts. *All groups of a mesh axis run
  at once*, so every device of a host communicates and a host's NICs are shared among all its
  devices: ``nic_count * nic_bandwidth / devices_per_host``. Crossing leaf switches divides by the
  oversubscription; crossing the link between host groups shares it among the rings that cross it
  (one per device of a host). The slowest host of the group sets the pace (a ring is as fast as
  its slowest hop), so a group touching Ethernet hosts is priced at Ethernet speed.

A calibration profile, when present, replaces the datasheet x achieved-fraction price of a level
with the measured one. Analyses are cached per group signature on the Cluster instance (a pure
function of the frozen cluster and the group).

Each host group may name a **host profile** (``cost_models/host-*.yaml``, read by
:func:`autopar.topology.load.load_host_profile`): CPU memory, the host<->device copy rate per device
when every device of the host copies at once (the PCIe path: device slot, shared switch uplink,
root complex), CPU Adam throughput and NVMe bandwidth and capacity. ``Cluster.host_profile``
returns it; host groups with different profiles are reduced to their field-wise slowest
(``HostProfile.slowest``).

The Cluster is data: it never prices work. Collective and compute prices are asked of
:mod:`autopar.cost` (``autopar.cost.describe.describe_cluster`` prints both for a cluster).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import networkx as nx

from autopar.cost.profiles import CalibrationProfile, DeviceProfile, LinkProfile, list_profiles
from autopar.errors import ConfigError

if TYPE_CHECKING:
    from autopar.topology.mesh import LogicalMesh

__all__ = [
    "FabricKind",
    "NetworkKind",
    "Fabric",
    "HostProfile",
    "HostGroup",
    "Host",
    "Network",
    "GroupLink",
    "GroupPath",
    "Cluster",
]

GiB = 1024**3
FabricKind = Literal["nvswitch", "nvlink_pairs", "pcie_tree"]
NetworkKind = Literal["fat_tree", "rail_optimized", "single_switch"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Fabric:
    """How the devices of one host talk to each other."""

    kind: FabricKind
    link: LinkProfile
    """Per-device link: NVLink port (nvswitch / nvlink_pairs) or the device's PCIe slot."""
    devices_per_switch: int = 0
    """pcie_tree: devices under one PCIe switch (0 = all devices on one switch)."""
    uplink: LinkProfile | None = None
    """pcie_tree: link from a PCIe switch up to the root complex."""
    p2p: bool = True
    """pcie_tree: GPU peer-to-peer DMA; without it every hop is staged through host memory."""
    root_bandwidth_bytes_per_s: float = math.inf
    """pcie_tree: per-direction capacity of the host bridge / root complex (datasheet)."""
    pcie: Fabric | None = None
    """nvlink_pairs: the PCIe tree used by traffic that is not inside one NVLink pair."""

    def describe(self) -> str:
        bw = self.link.bandwidth_bytes_per_s / 1e9
        if self.kind == "nvswitch":
            return f"NVSwitch, {self.link.name} {bw:g} GB/s per device per direction"
        if self.kind == "nvlink_pairs":
            assert self.pcie is not None
            return f"NVLink pairs ({self.link.name} {bw:g} GB/s), else {self.pcie.describe()}"
        up = self.uplink.name if self.uplink else "-"
        return (
            f"PCIe tree, {self.link.name} {bw:g} GB/s per device, {self.devices_per_switch} "
            f"devices per switch, uplink {up}, root {self.root_bandwidth_bytes_per_s / 1e9:g} GB/s,"
            f" p2p {'on' if self.p2p else 'off (staged through host memory)'}"
        )

    def signature(self, local: tuple[int, ...], devices_per_host: int) -> tuple:
        """What of ``local`` (sorted local indices) the price depends on: translated groups of
        the same shape share one analysis."""
        if self.kind == "nvswitch":
            return (len(local),)
        if self.kind == "pcie_tree":
            per = self.devices_per_switch or devices_per_host
            counts: dict[int, int] = {}
            for i in local:
                counts[i // per] = counts.get(i // per, 0) + 1
            return tuple(sorted(counts.values()))
        return local

    def ring(
        self, local: tuple[int, ...], devices_per_host: int, override: tuple[float, float] | None
    ) -> tuple[float, float, str]:
        """(bandwidth per device, latency per step, bottleneck) of a ring over ``local`` devices.

        ``override`` = calibrated (alpha_s, bandwidth) replaces the datasheet-derived price.
        """
        if override is not None:
            return override[1], override[0], "calibrated intra-host"
        k = len(local)
        if self.kind == "nvswitch":
            return (
                self.link.effective_bandwidth_bytes_per_s,
                self.link.effective_latency_s,
                (f"{self.link.name} per-device link"),
            )
        if self.kind == "nvlink_pairs":
            if k == 2 and local[0] // 2 == local[1] // 2:
                return (
                    self.link.effective_bandwidth_bytes_per_s,
                    self.link.effective_latency_s,
                    (f"{self.link.name} pair"),
                )
            assert self.pcie is not None
            return self.pcie.ring(local, devices_per_host, None)
        # pcie_tree
        per_switch = self.devices_per_switch or devices_per_host
        switches = len({i // per_switch for i in local})
        bw = self.link.effective_bandwidth_bytes_per_s
        lat = self.link.effective_latency_s
        why = f"{self.link.name} device link"
        concurrent_groups = devices_per_host / k
        if self.p2p:
            uplink_flows = per_switch * switches / k if switches > 1 else 0.0
            root_flows = concurrent_groups * switches if switches > 1 else 0.0
        else:
            # Every hop goes device -> host memory -> device: all devices of a switch send up
            # and receive down its uplink, and the root carries every device's hop.
            uplink_flows = float(min(per_switch, devices_per_host))
            root_flows = float(devices_per_host)
        if uplink_flows and self.uplink is not None:
            up = self.uplink.effective_bandwidth_bytes_per_s / uplink_flows
            lat += self.uplink.effective_latency_s
            if up < bw:
                bw, why = up, f"PCIe switch uplink shared by {uplink_flows:g} flows"
        if root_flows and math.isfinite(self.root_bandwidth_bytes_per_s):
            frac = self.link.bandwidth_fraction
            root = self.root_bandwidth_bytes_per_s * frac / root_flows
            if root < bw:
                bw, why = root, f"PCIe root complex shared by {root_flows:g} flows"
        return bw, lat, why


@dataclass(frozen=True, slots=True, kw_only=True)
class HostProfile:
    """What one host offers its devices besides their own memory, in SI units (achieved figures).

    Read from a ``kind: host`` profile by :func:`autopar.topology.load.load_host_profile`, which
    also works out the per-device copy rates from the host's PCIe tree. Every figure is per host
    except the two copy rates, which are per device *when all devices of the host copy at once*.
    """

    name: str
    """Profile name (the file stem), e.g. ``"host-dgx-a100"``."""
    memory_bytes: float
    """CPU memory per host."""
    h2d_bytes_per_s: float
    """Host->device, per device, when all devices of the host copy at once (achieved)."""
    d2h_bytes_per_s: float
    """Device->host, same convention."""
    cpu_adam_params_per_s: float
    """Fused CPU Adam (DeepSpeed ``cpu_adam``-style), parameters updated per second, whole host."""
    nvme_read_bytes_per_s: float
    """Per host, all drives together (0 if the host has none)."""
    nvme_write_bytes_per_s: float
    nvme_bytes: float
    """NVMe capacity per host (0 if none)."""
    source: str = ""
    torch_adam_params_per_s: float | None = None
    """Plain PyTorch Adam on CPU (``foreach``, several passes over memory), parameters per second
    for the whole host; ``None`` when the profile does not state it (never priced as zero)."""
    copy_path: str = ""
    """Human-readable PCIe path and what limits the per-device copy rate."""

    @staticmethod
    def slowest(profiles: tuple[HostProfile, ...]) -> HostProfile:
        """The field-wise minimum of ``profiles``: every figure is a per-host capacity or rate,
        a plan must fit the smallest host and a synchronous step waits for the slowest one."""
        if len(profiles) == 1:
            return profiles[0]
        torch_rates = [p.torch_adam_params_per_s for p in profiles]
        return HostProfile(
            name="slowest of " + ", ".join(p.name for p in profiles),
            memory_bytes=min(p.memory_bytes for p in profiles),
            h2d_bytes_per_s=min(p.h2d_bytes_per_s for p in profiles),
            d2h_bytes_per_s=min(p.d2h_bytes_per_s for p in profiles),
            cpu_adam_params_per_s=min(p.cpu_adam_params_per_s for p in profiles),
            nvme_read_bytes_per_s=min(p.nvme_read_bytes_per_s for p in profiles),
            nvme_write_bytes_per_s=min(p.nvme_write_bytes_per_s for p in profiles),
            nvme_bytes=min(p.nvme_bytes for p in profiles),
            source=" + ".join(p.source for p in profiles),
            torch_adam_params_per_s=None
            if any(r is None for r in torch_rates)
            else min(r for r in torch_rates if r is not None),
            copy_path="; ".join(f"{p.name}: {p.copy_path}" for p in profiles),
        )

    def describe(self) -> str:
        """One line per figure, as loaded (nothing priced)."""
        GB = 1e9
        torch_rate = (
            f"{self.torch_adam_params_per_s / 1e9:.3g}"
            if self.torch_adam_params_per_s is not None
            else "not stated"
        )
        nvme = (
            f"{self.nvme_bytes / 1e12:g} TB, read {self.nvme_read_bytes_per_s / GB:.3g} GB/s, "
            f"write {self.nvme_write_bytes_per_s / GB:.3g} GB/s per host"
            if self.nvme_bytes
            else "none"
        )
        return "\n".join(
            [
                f"  host {self.name}: {self.memory_bytes / GiB:g} GiB CPU memory per host"
                + (f"  ({self.source})" if self.source else ""),
                f"    host<->device per device, all devices copying: h2d "
                f"{self.h2d_bytes_per_s / GB:.3g} GB/s, d2h {self.d2h_bytes_per_s / GB:.3g} GB/s"
                + (f" ({self.copy_path})" if self.copy_path else ""),
                f"    CPU Adam per host: fused {self.cpu_adam_params_per_s / 1e9:.3g} G params/s, "
                f"PyTorch {torch_rate} G params/s",
                f"    NVMe: {nvme}",
            ]
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HostGroup:
    """Hosts that are built alike: device kind, fabric and NICs."""

    name: str
    device: DeviceProfile
    devices_per_host: int
    fabric: Fabric
    nic_count: int
    nic: LinkProfile
    fraction: float = 1.0
    """Share of the cluster's hosts in this group when the host count is scaled."""
    host: HostProfile | None = None
    """CPU memory, host<->device copies, CPU Adam and NVMe of these hosts (``None``: not stated,
    nothing that needs them can be priced)."""

    @property
    def nic_bandwidth_per_device_bytes_per_s(self) -> float:
        """Achieved NIC bandwidth each device gets when all devices of the host use the network."""
        return self.nic_count * self.nic.effective_bandwidth_bytes_per_s / self.devices_per_host


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    index: int
    group: HostGroup
    first_rank: int

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.group.devices_per_host)


@dataclass(frozen=True, slots=True, kw_only=True)
class Network:
    """The switched network between hosts of one host group."""

    kind: NetworkKind
    hosts_per_leaf: int = 0
    """Hosts under one leaf (fat_tree) or one rail block (rail_optimized); 0 = unbounded."""
    oversubscription: float = 1.0
    """Leaf downlink / uplink capacity ratio: traffic leaving a leaf gets 1/oversubscription."""
    switch_latency_s: float = 0.0
    """Latency of one switch hop."""

    def leaf_of(self, host_index: int) -> int:
        return host_index // self.hosts_per_leaf if self.hosts_per_leaf else 0

    def describe(self) -> str:
        blk = "hosts per rail block" if self.kind == "rail_optimized" else "hosts per leaf"
        per = f"{self.hosts_per_leaf} {blk}" if self.hosts_per_leaf else "one switch"
        return f"{self.kind}, {per}, oversubscription {self.oversubscription:g}:1"


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupLink:
    """The (slower) link joining two host groups, aggregated over ``count`` parallel links."""

    link: LinkProfile
    count: int

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.count * self.link.effective_bandwidth_bytes_per_s


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupPath:
    """What a device group crosses, reduced to the numbers a hierarchical collective needs."""

    size: int
    hosts: int
    """m: hosts the group touches."""
    per_host: int
    """k: the most devices the group has on one host."""
    intra_bandwidth_bytes_per_s: float
    intra_latency_s: float
    inter_bandwidth_bytes_per_s: float
    """Per device, inter-host ring phase (inf when the group stays in one host)."""
    inter_latency_s: float
    all_to_all_inter_s_per_byte: float
    """Seconds per byte of each device's all-to-all buffer spent on the inter-host part."""
    bottleneck: str


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Cluster:
    """A whole cluster; ranks are numbered host by host (host i owns ranks i·dph .. i·dph+dph-1)."""

    name: str
    hosts: tuple[Host, ...]
    network: Network
    between_groups: GroupLink | None = None
    calibration: CalibrationProfile | None = None
    description: str = ""
    file: str = ""
    graph: nx.Graph = field(init=False, repr=False, compare=False)
    _cache: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.hosts:
            raise ConfigError("a cluster needs at least one host", file=self.file, field="hosts")
        dph = {h.group.devices_per_host for h in self.hosts}
        dev = {h.group.device.name for h in self.hosts}
        if len(dph) != 1 or len(dev) != 1:
            raise ConfigError(
                "all host groups must have the same device kind and devices_per_host "
                f"(got {sorted(dev)} / {sorted(dph)})",
                file=self.file,
                field="host_groups",
            )
        cals = {h.group.device.compute_calibration for h in self.hosts}
        if len({h.group.device for h in self.hosts}) != 1:
            raise ConfigError(
                "all host groups must price their devices alike: same device profile and the "
                f"same compute calibration (got {sorted(cals)})",
                file=self.file,
                field="host_groups",
            )
        object.__setattr__(self, "_cache", {"path": {}, "sig": {}, "coef": {}, "mesh": {}})
        object.__setattr__(self, "graph", self._build_graph())

    def _key(self) -> tuple:
        return (self.name, self.hosts, self.network, self.between_groups, self.calibration)

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Cluster):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        # the cluster is frozen: hash its value once (searches use it as a cache key millions of times)
        h = self._cache.get("hash")
        if h is None:
            h = self._cache["hash"] = hash(self._key())
        return h

    # -- basic facts ---------------------------------------------------------------------------
    @property
    def num_hosts(self) -> int:
        return len(self.hosts)

    @property
    def devices_per_host(self) -> int:
        return self.hosts[0].group.devices_per_host

    @property
    def num_devices(self) -> int:
        return self.num_hosts * self.devices_per_host

    @property
    def device(self) -> DeviceProfile:
        return self.hosts[0].group.device

    @property
    def memory_bytes(self) -> float:
        """Memory per device, bytes."""
        return self.device.memory_bytes

    @property
    def host_groups(self) -> tuple[HostGroup, ...]:
        seen: dict[str, HostGroup] = {}
        for h in self.hosts:
            seen.setdefault(h.group.name, h.group)
        return tuple(seen.values())

    @property
    def has_host_profile(self) -> bool:
        """True when every host group names a host profile (see :attr:`host_profile`)."""
        return all(g.host is not None for g in self.host_groups)

    @property
    def host_profile(self) -> HostProfile:
        """The hosts' CPU memory, copy rates, CPU Adam and NVMe (:class:`HostProfile`).

        One host profile for every group is returned as is; groups with different profiles
        give their field-wise slowest (:meth:`HostProfile.slowest`): a plan must fit the
        smallest host and a synchronous step waits for the slowest. A group without a profile
        is an error naming the file and field (an unknown host is never priced as free).
        """
        hit = self._cache.get("host")
        if hit is not None:
            return hit
        groups = self.host_groups
        for i, g in enumerate(groups):
            if g.host is None:
                raise ConfigError(
                    f"host group '{g.name}' names no host profile: CPU memory, host<->device "
                    "bandwidth, CPU Adam and NVMe are unknown",
                    file=self.file or None,
                    field=f"host_groups[{i}].host",
                    allowed=list_profiles("host"),
                )
        unique = tuple(dict.fromkeys(g.host for g in groups if g.host is not None))
        prof = HostProfile.slowest(unique)
        self._cache["host"] = prof
        return prof

    def host_of(self, rank: int) -> int:
        """Index of the host that owns global ``rank``."""
        if not 0 <= rank < self.num_devices:
            raise ConfigError(
                f"rank {rank} outside the cluster's {self.num_devices} devices", field="rank"
            )
        return rank // self.devices_per_host

    def local_rank(self, rank: int) -> int:
        return rank % self.devices_per_host

    def mesh_groups(self, mesh: LogicalMesh, axis_name: str) -> tuple[tuple[int, ...], ...]:
        """Device groups of one mesh axis, after checking the mesh fits on this cluster."""
        if mesh.first_rank + mesh.size > self.num_devices:
            raise ConfigError(
                f"mesh {mesh.shape} from rank {mesh.first_rank} needs "
                f"{mesh.first_rank + mesh.size} devices, cluster {self.name} has {self.num_devices}",
                field="mesh",
            )
        return mesh.groups(axis_name)

    def bottleneck(self, group: tuple[int, ...]) -> str:
        """Human-readable limit of ``group``: which link sets its collective bandwidth."""
        return self.analyze(tuple(group)).bottleneck

    # -- group analysis ------------------------------------------------------------------------
    def analyze(self, group: tuple[int, ...]) -> GroupPath:
        """Bottleneck bandwidths and latencies of ``group`` (cached per group and signature)."""
        cache = self._cache["path"]
        path = cache.get(group)
        if path is None:
            path = self._analyze_uncached(tuple(group))
            cache[group] = path
        return path

    def _signature(self, group: tuple[int, ...]) -> tuple[tuple, tuple]:
        dph = self.devices_per_host
        by_host: dict[int, list[int]] = {}
        for raw in group:
            try:
                r = operator.index(raw)  # numpy integers are fine
            except TypeError:
                r = -1
            if not 0 <= r < self.num_devices:
                raise ConfigError(
                    f"group {group} has rank {raw!r} outside 0..{self.num_devices - 1}",
                    field="group",
                )
            by_host.setdefault(r // dph, []).append(r % dph)
        if sum(len(v) for v in by_host.values()) != len({*group}):
            raise ConfigError(f"group {group} repeats a rank", field="group")
        host_ids = sorted(by_host)
        leaves = {self.network.leaf_of(h) for h in host_ids}
        groups = tuple(sorted({self.hosts[h].group.name for h in host_ids}))
        side_counts = tuple(
            sum(1 for h in host_ids if self.hosts[h].group.name == g) for g in groups
        )
        locals_ = tuple(
            sorted((self.hosts[h].group.name, tuple(sorted(by_host[h]))) for h in host_ids)
        )
        shape = tuple(
            sorted(
                (g, len(loc), self.hosts[h].group.fabric.signature(loc, dph))
                for h in host_ids
                for g, loc in [(self.hosts[h].group.name, tuple(sorted(by_host[h])))]
            )
        )
        return (len(group), len(host_ids), len(leaves) > 1, groups, side_counts, shape), locals_

    def _analyze_uncached(self, group: tuple[int, ...]) -> GroupPath:
        sig, locals_ = self._signature(group)
        hit = self._cache["sig"].get(sig)
        if hit is not None:
            return hit
        n, m, spans_leaves, groups, side_counts, _ = sig
        dph = self.devices_per_host
        k = max(len(loc) for _, loc in locals_)
        cal_intra = cal_inter = None
        if self.calibration is not None:
            lv = self.calibration.level("intra_host")
            cal_intra = (lv.alpha_s, lv.bandwidth_bytes_per_s) if lv else None
            lv = self.calibration.level("inter_host")
            cal_inter = (lv.alpha_s, lv.bandwidth_bytes_per_s) if lv else None
        hg = {g.name: g for g in self.host_groups}
        # intra-host level: slowest host's ring
        intra_bw, intra_lat, why = math.inf, 0.0, "single device"
        for gname, loc in locals_:
            if len(loc) < 2:
                continue
            bw, lat, w = hg[gname].fabric.ring(loc, dph, cal_intra)
            if bw < intra_bw:
                intra_bw, why = bw, w
            intra_lat = max(intra_lat, lat)
        inter_bw, inter_lat, a2a = math.inf, 0.0, 0.0
        if m > 1:
            why = ""
            slowest = min(
                (hg[g] for g in groups), key=lambda g: g.nic_bandwidth_per_device_bytes_per_s
            )
            if cal_inter is not None:
                inter_bw, inter_lat = cal_inter[1], cal_inter[0]
                why = "calibrated inter-host"
            else:
                inter_bw = slowest.nic_bandwidth_per_device_bytes_per_s
                inter_lat = max(hg[g].nic.effective_latency_s for g in groups)
                why = (
                    f"{slowest.nic_count}x {slowest.nic.name} NICs of a '{slowest.name}' host "
                    f"shared by {dph} devices"
                )
            hops = 3 if spans_leaves else 1
            inter_lat += hops * self.network.switch_latency_s
            a2a_bw = inter_bw
            if spans_leaves and self.network.oversubscription > 1.0:
                inter_bw /= self.network.oversubscription
                a2a_bw = inter_bw
                why += f", leaf uplinks oversubscribed {self.network.oversubscription:g}:1"
            a2a = (n - k) / n / a2a_bw
            if len(groups) > 1 and self.between_groups is not None:
                link = self.between_groups
                ring_share = link.bandwidth_bytes_per_s / dph
                inter_lat += link.link.effective_latency_s
                if ring_share < inter_bw:
                    inter_bw = ring_share
                    why = (
                        f"link between host groups ({link.count}x {link.link.name}) shared by the "
                        f"{dph} rings crossing it"
                    )
                # every device on one side sends its share for the other side over the link
                cross = (
                    max(side * dph * (n - side * k) / n for side in side_counts)
                    / link.bandwidth_bytes_per_s
                )
                a2a = max(a2a, cross)
        path = GroupPath(
            size=n,
            hosts=m,
            per_host=k,
            intra_bandwidth_bytes_per_s=intra_bw,
            intra_latency_s=intra_lat,
            inter_bandwidth_bytes_per_s=inter_bw,
            inter_latency_s=inter_lat,
            all_to_all_inter_s_per_byte=a2a,
            bottleneck=why,
        )
        self._cache["sig"][sig] = path
        return path

    # -- graph ---------------------------------------------------------------------------------
    def _build_graph(self) -> nx.Graph:
        """Devices, switches, NICs and links as a networkx graph (SI attributes on every edge)."""
        g = nx.Graph(name=self.name)
        dph = self.devices_per_host

        def link(a: str, b: str, prof: LinkProfile, count: int = 1, kind: str = "") -> None:
            g.add_edge(
                a,
                b,
                kind=kind or prof.name,
                bandwidth_bytes_per_s=prof.bandwidth_bytes_per_s * count,
                latency_s=prof.latency_s,
                count=count,
            )

        for h in self.hosts:
            fab = h.group.fabric
            hp = f"h{h.index}"
            for j in range(dph):
                g.add_node(f"{hp}/gpu{j}", kind="device", host=h.index, rank=h.first_rank + j)
            if fab.kind == "nvswitch":
                g.add_node(f"{hp}/nvswitch", kind="switch", host=h.index)
                for j in range(dph):
                    link(f"{hp}/gpu{j}", f"{hp}/nvswitch", fab.link)
                pcie = None
            else:
                pcie = fab if fab.kind == "pcie_tree" else fab.pcie
                if fab.kind == "nvlink_pairs":
                    for j in range(0, dph - 1, 2):
                        link(f"{hp}/gpu{j}", f"{hp}/gpu{j + 1}", fab.link)
            g.add_node(f"{hp}/root", kind="switch", host=h.index)
            if pcie is not None:
                per = pcie.devices_per_switch or dph
                for s in range(math.ceil(dph / per)):
                    sw = f"{hp}/pcie{s}"
                    g.add_node(sw, kind="switch", host=h.index)
                    if pcie.uplink is not None:
                        link(sw, f"{hp}/root", pcie.uplink)
                    for j in range(s * per, min(dph, (s + 1) * per)):
                        link(f"{hp}/gpu{j}", sw, pcie.link)
            leaf = f"{h.group.name}/leaf{self.network.leaf_of(h.index)}"
            g.add_node(leaf, kind="switch")
            nics = h.group.nic_count
            for i in range(nics):
                nic = f"{hp}/nic{i}"
                g.add_node(nic, kind="nic", host=h.index)
                # host-side PCIe attachment: not a priced link (the NIC share is), shown for paths
                g.add_edge(nic, f"{hp}/root", kind="pcie-host", bandwidth_bytes_per_s=math.inf, latency_s=0.0)  # fmt: skip
                link(nic, leaf, h.group.nic)
            if pcie is None:
                # NVSwitch hosts: each GPU reaches "its" NIC through a shared PCIe switch
                # (GPUDirect RDMA, DGX layout); the NIC share per device is what is priced
                for j in range(dph):
                    g.add_edge(f"{hp}/gpu{j}", f"{hp}/nic{j * nics // dph}", kind="gpudirect",
                               bandwidth_bytes_per_s=math.inf, latency_s=0.0)  # fmt: skip
        leaves = [n for n, d in g.nodes(data=True) if "/leaf" in n]
        for gname in {h.group.name for h in self.hosts}:
            mine = [lf for lf in leaves if lf.startswith(f"{gname}/")]
            if len(mine) > 1:
                g.add_node(f"{gname}/spine", kind="switch")
                for lf in mine:
                    g.add_edge(
                        lf,
                        f"{gname}/spine",
                        kind="uplink",
                        oversubscription=self.network.oversubscription,
                    )
        if self.between_groups is not None:
            names = [hg.name for hg in self.host_groups]
            tops = [f"{n}/spine" if f"{n}/spine" in g else f"{n}/leaf0" for n in names]
            link(
                tops[0],
                tops[1],
                self.between_groups.link,
                self.between_groups.count,
                "between_groups",
            )
        return g

    # -- text ----------------------------------------------------------------------------------
    def describe(self) -> str:
        """Hosts, devices, fabrics, NICs and network as loaded: data only, nothing priced.

        :func:`autopar.cost.describe.describe_cluster` adds what the cost model assumes and the
        price of a 1 GiB all-reduce over representative groups.
        """
        dev = self.device
        peaks = ", ".join(f"{v / 1e12:g} {k}" for k, v in dev.peak_flops)
        lines = [
            f"cluster {self.name}: {self.num_hosts} hosts x {self.devices_per_host} "
            f"{dev.model} = {self.num_devices} devices"
            + (f"  ({self.description})" if self.description else ""),
            f"  device: {dev.name}: peak TFLOP/s {peaks}; {dev.memory_gib:g} GiB, "
            f"{dev.memory_bandwidth_bytes_per_s / 1e9:g} GB/s, {dev.sm_count} SMs"
            + (
                f"; compute calibration {dev.compute_calibration}"
                if dev.compute_calibration
                else ""
            ),
        ]
        for hg in self.host_groups:
            count = sum(1 for h in self.hosts if h.group is hg)
            idx = [h.index for h in self.hosts if h.group is hg]
            lines.append(
                f"  host group '{hg.name}': {count} hosts (h{idx[0]}..h{idx[-1]}); fabric: "
                f"{hg.fabric.describe()}; NICs: {hg.nic_count}x {hg.nic.name} "
                f"({hg.nic.bandwidth_bytes_per_s / 1e9:g} GB/s each, achieved "
                f"{hg.nic_bandwidth_per_device_bytes_per_s / 1e9:.1f} GB/s per device); "
                f"host: {hg.host.name if hg.host is not None else 'not stated'}"
            )
        if self.has_host_profile:
            lines.append(self.host_profile.describe())
        lines.append(f"  network: {self.network.describe()}")
        if self.between_groups is not None:
            bg = self.between_groups
            lines.append(
                f"  between groups: {bg.count}x {bg.link.name} "
                f"({bg.bandwidth_bytes_per_s / 1e9:.1f} GB/s achieved in total)"
            )
        if self.calibration is not None:
            lines.append(f"  calibration: {self.calibration.name} ({self.calibration.source})")
        lines.append(
            f"  graph: {self.graph.number_of_nodes()} nodes, {self.graph.number_of_edges()} links"
        )
        return "\n".join(lines)

    def representative_groups(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """(label, ranks) of the groups worth showing: one host, one device per host, the
        whole cluster, and a pair across the two host groups when there are two."""
        dph = self.devices_per_host
        reps: list[tuple[str, tuple[int, ...]]] = [("one host", tuple(range(dph)))]
        if self.num_hosts > 1:
            across = tuple(h.first_rank for h in self.hosts[: min(self.num_hosts, dph)])
            reps.append((f"one device on each of {len(across)} hosts", across))
            reps.append(("full cluster", tuple(range(self.num_devices))))
            groups = self.host_groups
            if len(groups) > 1:
                last = [h for h in self.hosts if h.group is groups[-1]][0]
                pair = (self.hosts[0].first_rank, last.first_rank)
                reps.append((f"2 devices: group '{groups[0].name}' + '{groups[-1].name}'", pair))
        return tuple(reps)
