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
"""

from __future__ import annotations

from pathlib import Path

from autopar.cost.profiles import (
    REPO_ROOT,
    YamlSection,
    apply_compute_calibration,
    load_calibration_profile,
    load_compute_calibration,
    load_device_profile,
    load_link_profile,
    read_yaml,
)
from autopar.errors import ConfigError
from autopar.topology.cluster import Cluster, Fabric, GroupLink, Host, HostGroup, Network

__all__ = [
    "TOPOLOGY_DIR",
    "load_cluster",
    "list_topologies",
    "shipped_topologies",
    "valid_node_counts",
]

TOPOLOGY_DIR = REPO_ROOT / "topologies"
FABRIC_KINDS = ("nvswitch", "nvlink_pairs", "pcie_tree")
NETWORK_KINDS = ("fat_tree", "rail_optimized", "single_switch")


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
    g.finish()
    return HostGroup(
        name=name,
        device=device,
        devices_per_host=dph,
        fabric=fabric,
        nic_count=nic_count,
        nic=nic,
        fraction=fraction,
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
