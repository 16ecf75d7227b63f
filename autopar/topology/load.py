"""Read and validate topology files (``topologies/*.yaml``) into a :class:`Cluster`.

File format (every key is required unless marked optional; units are in the key names)::

    name: dgx-a100
    description: ...                      # optional
    hosts:
      default: 1                          # hosts when load_cluster(nodes=None)
      max: 560                            # optional, largest cluster the file describes
    host_groups:                          # one or two groups (two: see between_groups)
      - name: dgx
        fraction: 1.0                     # optional share of hosts (default: equal split)
        device: a100-sxm4-80gb            # cost_models/<device>.yaml, kind: device
        devices_per_host: 8
        fabric:
          kind: nvswitch | nvlink_pairs | pcie_tree
          link: nvlink3-nvswitch          # cost_models/<link>.yaml, kind: link
          # pcie_tree only: devices_per_switch, uplink (link profile), p2p, root_bandwidth_GBps
          # nvlink_pairs only: pcie: {a pcie_tree fabric for the traffic between pairs}
        nics: {count: 8, link: ib-hdr-200}
        host: host-dgx-a100               # optional, cost_models/<name>.yaml, kind: host (CPU
                                          # memory, PCIe to the devices, CPU Adam, NVMe); every
                                          # group names one or none does
        compute_calibration: compute-dgx   # optional, cost_models/<name>.yaml, kind:
                                           # compute_calibration, fitted for this device
    network:
      kind: fat_tree | rail_optimized | single_switch
      hosts_per_leaf: 20                  # fat_tree / rail_optimized (rail block); 0 = unbounded
      oversubscription: 1.0               # >= 1
      switch_latency_us: 0.13
    between_groups: {link: eth-100g, count: 4}   # required with two host groups, else forbidden
    calibration: calibrated-mycluster    # optional, cost_models/<name>.yaml, kind: calibration

Profiles are looked up in the ``cost_models`` directory beside the file's ``topologies``
directory first, then in the repository's ``cost_models``.

Host profile format (``kind: host``, read by :func:`load_host_profile`; datasheet figures first,
measured corrections under ``achieved:``)::

    kind: host
    model: NVIDIA DGX A100 (640 GB)
    devices: 8                            # device slots; a topology may use fewer, never more
    memory_GiB: 2048                      # CPU memory per host
    pcie:                                 # host <-> device path of each device
      device_link: pcie4-x16              # link profile of a device's slot
      uplink: pcie4-x16                   # optional: the PCIe switch's uplink to the CPU ...
      devices_per_switch: 2               # ... and the devices sharing it (with uplink only)
      root_bandwidth_GBps: 126            # optional: host bridge capacity per direction
    cpu:
      model: 2x AMD EPYC 7742
      memory_bandwidth_GBps: 409.6        # datasheet: channels x transfer rate x 8 bytes
    nvme:
      drives: 8                           # 0 = none (then no other key)
      drive_read_GBps: 6.4
      drive_write_GBps: 3.8
      drive_capacity_TB: 3.84
    achieved:
      fused_adam_memory_fraction: 0.2     # of memory bandwidth / ADAM_BYTES_PER_PARAM
      torch_adam_memory_fraction: 0.03
      nvme_read_fraction: 0.77            # with drives only
      nvme_write_fraction: 0.77

The per-device copy rate assumes every device the topology places on the host copies at once:
the slowest of the device's slot, its switch uplink shared by the devices under that switch (in
order: device i sits under switch i // devices_per_switch) and the root complex shared by all.
A host group whose fabric is a PCIe tree must describe the same tree as its host profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from autopar.cost.profiles import (
    PROFILE_DIR,
    REPO_ROOT,
    LinkProfile,
    YamlSection,
    apply_compute_calibration,
    find_profile,
    load_calibration_profile,
    load_compute_calibration,
    load_device_profile,
    load_link_profile,
    read_yaml,
)
from autopar.errors import ConfigError
from autopar.topology.cluster import (
    Cluster,
    Fabric,
    GroupLink,
    Host,
    HostGroup,
    HostProfile,
    Network,
)

__all__ = [
    "TOPOLOGY_DIR",
    "ADAM_BYTES_PER_PARAM",
    "load_cluster",
    "load_host_profile",
    "list_topologies",
    "shipped_topologies",
    "valid_node_counts",
]

TOPOLOGY_DIR = REPO_ROOT / "topologies"
FABRIC_KINDS = ("nvswitch", "nvlink_pairs", "pcie_tree")
NETWORK_KINDS = ("fat_tree", "rail_optimized", "single_switch")
GiB = 1024**3
#: CPU memory traffic of one mixed-precision Adam step, bytes per parameter: read the fp32 master
#: weight, fp32 gradient, momentum and variance (16), write weight, momentum and variance (12)
#: and the 16-bit weight copied back to the device (2). Host files give the achieved fraction of
#: ``memory bandwidth / ADAM_BYTES_PER_PARAM`` that a fused and a PyTorch CPU Adam reach.
ADAM_BYTES_PER_PARAM = 30


def list_topologies() -> list[str]:
    """Names of the shipped topology files."""
    return sorted(p.stem for p in TOPOLOGY_DIR.glob("*.yaml"))


shipped_topologies = list_topologies  # the name the CLI uses


def _resolve(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or len(p.parts) > 1:
        if not p.is_file():
            raise ConfigError("topology file not found", file=str(p))
        return p
    candidate = TOPOLOGY_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(
            f"unknown topology {str(name_or_path)!r}", field="topology", allowed=list_topologies()
        )
    return candidate


def load_cluster(
    name_or_path: str | Path,
    *,
    nodes: int | None = None,
    calibration: str | Path | None = None,
    compute_calibration: str | Path | None = None,
) -> Cluster:
    """Load a shipped topology by name (``dgx-a100``) or any topology file by path.

    ``nodes`` scales the host count (host groups split by their ``fraction``); ``calibration``
    names a ``kind: calibration`` profile (or its path) whose measured levels replace the
    datasheet prices, overriding the file's own ``calibration`` key. ``compute_calibration``
    names a ``kind: compute_calibration`` profile (or its path, written by ``autopar calibrate
    --compute``) whose fitted kernel efficiencies replace the device profile's achieved
    corrections in every host group, overriding the groups' own ``compute_calibration`` keys.
    """
    path = _resolve(name_or_path)
    doc = read_yaml(path)
    dirs = tuple(dict.fromkeys((path.parent.parent / "cost_models", REPO_ROOT / "cost_models")))
    dirs = tuple(d for d in dirs if d.is_dir())
    name = doc.string("name")
    description = doc.raw("description", "")
    hosts_doc = doc.section("hosts")
    default_nodes = hosts_doc.integer("default")
    max_nodes = hosts_doc.integer("max", 0, minimum=0)
    hosts_doc.finish()

    groups_doc = doc.sections("host_groups")
    if len(groups_doc) > 2:
        raise doc.error(
            "host_groups", f"at most two host groups are supported, got {len(groups_doc)}"
        )
    groups = [_host_group(g, dirs, len(groups_doc), compute_calibration) for g in groups_doc]
    named = [g.host is not None for g in groups]
    if any(named) and not all(named):
        raise doc.error(
            "host_groups",
            "either every host group names a host profile (host:) or none does; missing in "
            f"{[g.name for g in groups if g.host is None]}",
        )
    if abs(sum(g.fraction for g in groups) - 1.0) > 1e-9:
        raise doc.error(
            "host_groups", f"fractions must sum to 1, got {[g.fraction for g in groups]}"
        )

    net = doc.section("network")
    kind = net.choice("kind", NETWORK_KINDS)
    network = Network(
        kind=kind,  # type: ignore[arg-type]
        hosts_per_leaf=net.integer("hosts_per_leaf", 0, minimum=0)
        if kind != "single_switch"
        else 0,
        oversubscription=net.number("oversubscription", 1.0, minimum=1.0),
        switch_latency_s=net.number("switch_latency_us", 0.0) * 1e-6,
    )
    net.finish()

    between = None
    if len(groups) == 2:
        bg = doc.section("between_groups")
        between = GroupLink(
            link=load_link_profile(
                bg.string("link"), search_dirs=dirs, file=bg.file, field=bg.field("link")
            ),
            count=bg.integer("count"),
        )
        bg.finish()
    elif doc.has("between_groups"):
        raise doc.error("between_groups", "only allowed with two host_groups")

    cal_name = calibration if calibration is not None else doc.raw("calibration", None)
    cal = None
    if cal_name is not None:
        cal = load_calibration_profile(
            str(cal_name), search_dirs=dirs, file=str(path), field="calibration"
        )
    doc.finish()

    n_hosts = default_nodes if nodes is None else nodes
    counts = _split_hosts(n_hosts, groups, max_nodes, file=str(path))
    hosts = []
    for g, c in zip(groups, counts):
        for _ in range(c):
            i = len(hosts)
            hosts.append(Host(index=i, group=g, first_rank=i * g.devices_per_host))
    return Cluster(
        name=name,
        hosts=tuple(hosts),
        network=network,
        between_groups=between,
        calibration=cal,
        description=str(description),
        file=str(path),
    )


def valid_node_counts(fractions: list[float], *, max_nodes: int = 0, limit: int = 64) -> list[int]:
    """Host counts a file with these group fractions can form (up to ``limit``)."""
    top = min(limit, max_nodes) if max_nodes else limit
    return [n for n in range(1, top + 1) if _counts(n, fractions) is not None]


def _counts(n: int, fractions: list[float]) -> list[int] | None:
    counts = [n * f for f in fractions]
    rounded = [round(c) for c in counts]
    if any(abs(c - r) > 1e-9 or r < 1 for c, r in zip(counts, rounded)):
        return None
    return rounded


def _split_hosts(n: object, groups: list[HostGroup], max_nodes: int, *, file: str) -> list[int]:
    fractions = [g.fraction for g in groups]
    allowed = valid_node_counts(fractions, max_nodes=max_nodes, limit=16)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(
            f"node count must be a positive integer, got {n!r}",
            file=file,
            field="nodes",
            allowed=allowed,
        )
    if max_nodes and n > max_nodes:
        raise ConfigError(
            f"the file describes at most {max_nodes} hosts, asked for {n}",
            file=file,
            field="nodes",
            allowed=(f"1..{max_nodes} (hosts.max)",),
        )
    counts = _counts(n, fractions)
    if counts is None:
        names = ", ".join(f"{g.name}={g.fraction:g}" for g in groups)
        raise ConfigError(
            f"{n} hosts cannot be split into host groups ({names}) with a whole, non-zero "
            "number of hosts each",
            file=file,
            field="nodes",
            allowed=[*allowed, "..."],
        )
    return counts


def _host_group(
    g: YamlSection, dirs: tuple[Path, ...], n_groups: int, compute_calibration: str | Path | None
) -> HostGroup:
    name = g.string("name")
    fraction = g.number("fraction", 1.0 / n_groups, strict=True, maximum=1.0)
    device = load_device_profile(
        g.string("device"), search_dirs=dirs, file=g.file, field=g.field("device")
    )
    cal_name = g.raw("compute_calibration", None)
    if compute_calibration is not None:
        cal_name = compute_calibration
    elif cal_name is not None:
        cal_name = g.string("compute_calibration")
    if cal_name is not None:
        cal = load_compute_calibration(
            str(cal_name), search_dirs=dirs, file=g.file, field=g.field("compute_calibration")
        )
        device = apply_compute_calibration(device, cal)
    dph = g.integer("devices_per_host")
    fabric = _fabric(g.section("fabric"), dirs, top=True)
    nics = g.section("nics")
    nic_count = nics.integer("count")
    nic = load_link_profile(
        nics.string("link"), search_dirs=dirs, file=nics.file, field=nics.field("link")
    )
    nics.finish()
    host = None
    if g.raw("host", None) is not None:
        host_pcie = _read_host(
            g.string("host"), dirs, file=g.file, field=g.field("host"), devices_in_use=dph
        )
        _check_host_matches_fabric(host_pcie, fabric, dph, file=g.file, field=g.field("host"))
        host = host_pcie.profile
    g.finish()
    return HostGroup(
        name=name,
        device=device,
        devices_per_host=dph,
        fabric=fabric,
        nic_count=nic_count,
        nic=nic,
        fraction=fraction,
        host=host,
    )


def _fabric(f: YamlSection, dirs: tuple[Path, ...], *, top: bool) -> Fabric:
    kind = f.choice("kind", FABRIC_KINDS if top else ("pcie_tree",))
    link = load_link_profile(f.string("link"), search_dirs=dirs, file=f.file, field=f.field("link"))
    if kind == "nvswitch":
        f.finish()
        return Fabric(kind="nvswitch", link=link)
    if kind == "nvlink_pairs":
        pcie = _fabric(f.section("pcie"), dirs, top=False)
        f.finish()
        return Fabric(kind="nvlink_pairs", link=link, pcie=pcie)
    uplink_name = f.raw("uplink", None)
    uplink = None
    if uplink_name is not None:
        uplink = load_link_profile(
            f.string("uplink"), search_dirs=dirs, file=f.file, field=f.field("uplink")
        )
    fab = Fabric(
        kind="pcie_tree",
        link=link,
        devices_per_switch=f.integer("devices_per_switch", 0, minimum=0),
        uplink=uplink,
        p2p=f.boolean("p2p", True),
        root_bandwidth_bytes_per_s=f.number("root_bandwidth_GBps", float("inf"), strict=True) * 1e9,
    )
    f.finish()
    return fab


# --------------------------------------------------------------------------------------------
# host profiles (kind: host)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class _HostPcie:
    """A loaded host profile with the PCIe tree it was derived from (for the fabric check)."""

    profile: HostProfile
    devices: int
    device_link: LinkProfile
    uplink: LinkProfile | None
    devices_per_switch: int
    root_bandwidth_bytes_per_s: float


def load_host_profile(
    name: str,
    *,
    search_dirs: tuple[Path, ...] = (PROFILE_DIR,),
    file: str = "",
    field: str = "",
    devices_in_use: int | None = None,
) -> HostProfile:
    """Read ``cost_models/<name>.yaml`` (kind: host) into a :class:`HostProfile` (SI units).

    ``devices_in_use`` is how many of the host's device slots copy at once (default: all of
    them); the per-device copy rates are worked out for that many (see the module docstring).
    """
    return _read_host(
        name, search_dirs, file=file, field=field, devices_in_use=devices_in_use
    ).profile


def _read_host(
    name: str,
    search_dirs: tuple[Path, ...],
    *,
    file: str,
    field: str,
    devices_in_use: int | None,
) -> _HostPcie:
    path = find_profile(name, "host", search_dirs=search_dirs, file=file, field=field)
    doc = read_yaml(path)
    doc.choice("kind", ("host",))
    model = doc.string("model")
    devices = doc.integer("devices")
    k = devices if devices_in_use is None else devices_in_use
    if k > devices:
        raise ConfigError(
            f"host profile {path.stem!r} has {devices} device slots, the topology puts {k} "
            "devices on the host",
            file=file or str(path),
            field=field or "devices",
            allowed=(f"devices_per_host <= {devices}",),
        )
    memory = doc.number("memory_GiB", strict=True) * GiB

    pcie = doc.section("pcie")
    dev_link = load_link_profile(
        pcie.string("device_link"), search_dirs=search_dirs, file=pcie.file,
        field=pcie.field("device_link"),
    )  # fmt: skip
    uplink = None
    per_switch = 0
    if pcie.raw("uplink", None) is not None:
        uplink = load_link_profile(
            pcie.string("uplink"), search_dirs=search_dirs, file=pcie.file,
            field=pcie.field("uplink"),
        )  # fmt: skip
        per_switch = pcie.integer("devices_per_switch")
        if per_switch > devices:
            raise pcie.error(
                "devices_per_switch", f"must be <= devices ({devices}), got {per_switch}"
            )
    elif pcie.has("devices_per_switch"):
        raise pcie.error("devices_per_switch", "only allowed with an uplink (a PCIe switch)")
    root = pcie.number("root_bandwidth_GBps", math.inf, strict=True) * 1e9
    pcie.finish()

    cpu = doc.section("cpu")
    cpu.string("model")
    cpu_bw = cpu.number("memory_bandwidth_GBps", strict=True) * 1e9
    cpu.finish()

    nvme = doc.section("nvme")
    drives = nvme.integer("drives", minimum=0)
    read = write = capacity = 0.0
    if drives:
        read = drives * nvme.number("drive_read_GBps", strict=True) * 1e9
        write = drives * nvme.number("drive_write_GBps", strict=True) * 1e9
        capacity = drives * nvme.number("drive_capacity_TB", strict=True) * 1e12
    nvme.finish()

    ach = doc.section("achieved")
    fused = ach.number("fused_adam_memory_fraction", strict=True, maximum=1.0)
    torch_frac = ach.number("torch_adam_memory_fraction", strict=True, maximum=1.0)
    if drives:
        read *= ach.number("nvme_read_fraction", strict=True, maximum=1.0)
        write *= ach.number("nvme_write_fraction", strict=True, maximum=1.0)
    ach.finish()
    doc.finish()

    rate, path_text = _copy_rate(k, dev_link, uplink, per_switch, root)
    adam_rate = cpu_bw / ADAM_BYTES_PER_PARAM
    profile = HostProfile(
        name=path.stem,
        memory_bytes=memory,
        h2d_bytes_per_s=rate,
        d2h_bytes_per_s=rate,
        cpu_adam_params_per_s=adam_rate * fused,
        nvme_read_bytes_per_s=read,
        nvme_write_bytes_per_s=write,
        nvme_bytes=capacity,
        source=str(path),
        torch_adam_params_per_s=adam_rate * torch_frac,
        copy_path=f"{model}: {path_text}",
    )
    return _HostPcie(
        profile=profile,
        devices=devices,
        device_link=dev_link,
        uplink=uplink,
        devices_per_switch=per_switch,
        root_bandwidth_bytes_per_s=root,
    )


def _copy_rate(
    k: int, dev_link: LinkProfile, uplink: LinkProfile | None, per_switch: int, root: float
) -> tuple[float, str]:
    """Achieved host<->device bytes/s per device when ``k`` devices copy at once, and why.

    PCIe is full duplex: the same bound holds in each direction. The device slot gives
    ``dev_link``'s achieved rate; a switch uplink is shared by the devices under it
    (``min(per_switch, k)`` with devices filled in order); the root complex by all ``k``.
    """
    rate = dev_link.effective_bandwidth_bytes_per_s
    why = f"{dev_link.name} device slot"
    parts = [f"{dev_link.name} per device"]
    if uplink is not None:
        sharing = min(per_switch, k)
        parts.append(f"{per_switch} devices per switch on one {uplink.name} uplink")
        up = uplink.effective_bandwidth_bytes_per_s / sharing
        if up < rate:
            rate, why = up, f"{uplink.name} switch uplink shared by {sharing} devices"
    if math.isfinite(root):
        parts.append(f"root complex {root / 1e9:g} GB/s")
        share = root * dev_link.bandwidth_fraction / k
        if share < rate:
            rate, why = share, f"root complex shared by {k} devices"
    copying = f"{k} devices copy at once" if k > 1 else "one device copies"
    return rate, f"{', '.join(parts)}; {copying}, limit: {why}"


def _check_host_matches_fabric(
    host: _HostPcie, fabric: Fabric, dph: int, *, file: str, field: str
) -> None:
    """A PCIe-tree fabric and the host profile describe the same PCIe tree: they must agree."""
    tree = fabric if fabric.kind == "pcie_tree" else fabric.pcie
    if tree is None:
        return
    name = host.profile.name
    fab_per = tree.devices_per_switch or dph
    fab_up = tree.uplink.bandwidth_bytes_per_s if tree.uplink is not None else None
    host_up = host.uplink.bandwidth_bytes_per_s if host.uplink is not None else None
    checks = [
        ("device link GB/s", tree.link.bandwidth_bytes_per_s / 1e9,
         host.device_link.bandwidth_bytes_per_s / 1e9),
        ("switch uplink GB/s", fab_up and fab_up / 1e9, host_up and host_up / 1e9),
        ("root complex GB/s", tree.root_bandwidth_bytes_per_s / 1e9,
         host.root_bandwidth_bytes_per_s / 1e9),
    ]  # fmt: skip
    if tree.uplink is not None and host.uplink is not None:
        checks.append(("devices per switch", fab_per, host.devices_per_switch))
    for what, fab_value, host_value in checks:
        if fab_value != host_value:
            raise ConfigError(
                f"host profile {name!r} and the host group's PCIe-tree fabric disagree on the "
                f"{what}: fabric {fab_value}, host profile {host_value}",
                file=file,
                field=field,
            )
