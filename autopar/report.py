"""The plan as one self-contained HTML page: schedule, memory, cluster, landscape, facts.

``write_report(plan, path)`` writes a single HTML file that works offline: every chart is a
matplotlib SVG inlined in the page, the styles are inline, no script, font or image is fetched.
Like :mod:`autopar.explain` it reads only the Plan (and, for the cluster picture, the Cluster the
plan names), so a plan read back from JSON gives the same page as a freshly searched one.

Sections:

1. **Pipeline schedule**: one timeline row per pipeline rank, simulated op by op by
   :func:`autopar.solver.pipeline.simulate_schedule` from the plan's per-stage costs
   (``Prediction.stages``) and per-rank tails (``Prediction.rank_tail_s``): forwards, backwards,
   point-to-point sends, idle time (bubbles) and the tail (exposed gradient sync and optimizer).
   The plan's priced step time is marked; when the closed-form price and the simulation differ,
   the picture says by how much.
2. **Memory** per pipeline rank, stacked (weights, gradients, optimizer, activations, other)
   against the usable capacity.
3. **Cluster**: hosts, devices and links (networkx graph of the Cluster), coloured by the plan's
   pp / dp / tp groups (ranks row-major over ``(pp, dp, tp)``), and the links weighted by the
   traffic each axis puts on them, the busiest highlighted.
4. **Landscape**: the best step time of every (dp, tp, pp) shape, split like the breakdown,
   the chosen plan marked, and the runners-up with why they lost.
5. **Facts**: the stated software stack, the assumptions, the solver's statistics and the ops
   without a sharding rule.

The figure functions (``timeline_figure``, ``memory_figure``, ``cluster_figure``,
``landscape_figure``) return matplotlib Figures, so a notebook shows the same pictures.
matplotlib is needed here only (``pip install matplotlib``).
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx

from autopar.errors import AutoparError, ConfigError
from autopar.explain import TERM_WORDS, host_mapping, render, why
from autopar.plan import Alternative, MemoryBreakdown, Plan
from autopar.solver.pipeline import Timeline, simulate_schedule

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from autopar.topology.cluster import Cluster

__all__ = [
    "write_report",
    "render_html",
    "plan_timeline",
    "timeline_figure",
    "memory_figure",
    "cluster_figure",
    "cluster_view",
    "plan_groups",
    "link_traffic",
    "landscape_figure",
]

GiB = 1024**3
AXES = ("pp", "dp", "tp")
AXIS_COLOURS = {"tp": "#F58518", "dp": "#E45756", "pp": "#54A24B"}
TERM_COLOURS = {
    "compute": "#4C78A8",
    "recompute": "#72B7B2",
    "tp_comm": AXIS_COLOURS["tp"],
    "pp_bubble": "#BAB0AC",
    "pp_comm": AXIS_COLOURS["pp"],
    "dp_comm": AXIS_COLOURS["dp"],
}
MEMORY_PARTS = (
    ("weights", "weights", "#4C78A8"),
    ("grads", "gradients", "#F58518"),
    ("optimizer", "optimizer", "#54A24B"),
    ("activations", "activations", "#B279A2"),
    ("other", "other", "#BAB0AC"),
)
OP_COLOURS = {"F": ("#4C78A8", "#9ECAE9"), "B": ("#54A24B", "#98D68C")}
SEND_COLOUR = "#333333"
TAIL_COLOUR = "#E45756"
IDLE_COLOUR = "#EEEEEE"
PRICE_COLOUR = "#D62728"
AGREE_REL = 1e-3
"""Simulation and closed-form price closer than this (relative) are said to agree."""
LANDSCAPE_BARS = 24


def _mpl():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is in the test extra
        raise AutoparError(
            "the plan report draws its charts with matplotlib: pip install matplotlib"
        ) from e
    return matplotlib, Figure


def _fmt_s(seconds: float) -> str:
    if abs(seconds) >= 1.0:
        return f"{seconds:.3f} s"
    if abs(seconds) >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _time_unit(span_s: float) -> tuple[float, str]:
    return (1.0, "s") if span_s >= 1.0 else (1e3, "ms")


# ---------------------------------------------------------------------------------------------
# 1. pipeline schedule
# ---------------------------------------------------------------------------------------------
def plan_timeline(plan: Plan, *, overlap_p2p: bool = False) -> Timeline:
    """Simulate the plan's schedule on its per-stage costs (``Prediction.stages``) and tails;
    sends hold their sender by default, as the search prices them."""
    pred = plan.predicted
    if pred is None or not pred.stages:
        raise ConfigError(
            "the plan has no per-stage costs (predicted.stages): re-run `autopar plan` to get them",
            field="predicted.stages",
        )
    pp = plan.parallel.pp
    v = plan.virtual_stages if plan.schedule == "interleaved_1f1b" else 1
    if len(pred.stages) != pp * v:
        raise ConfigError(
            f"predicted.stages has {len(pred.stages)} entries, the schedule needs pp x v = "
            f"{pp} x {v}",
            field="predicted.stages",
        )
    tails = pred.rank_tail_s if len(pred.rank_tail_s) == pp else None
    try:
        return simulate_schedule(
            schedule=plan.schedule,
            num_ranks=pp,
            virtual_stages=v,
            microbatches=plan.microbatches,
            fwd_s=[s.fwd_s for s in pred.stages],
            bwd_s=[s.bwd_s for s in pred.stages],
            send_s=[s.send_s for s in pred.stages],
            tail_s=tails,
            overlap_p2p=overlap_p2p,
        )
    except ValueError as e:
        raise ConfigError(f"cannot simulate the plan's schedule: {e}", field="schedule") from e


def _agreement(plan: Plan, tl: Timeline) -> str:
    """One sentence: does the simulated makespan agree with the plan's closed-form price?"""
    priced = plan.predicted.step_time_s if plan.predicted is not None else float("nan")
    gap = tl.makespan_s - priced
    if not math.isfinite(priced) or priced <= 0:
        return f"simulated step {_fmt_s(tl.makespan_s)}"
    if abs(gap) <= AGREE_REL * priced:
        return f"simulated step {_fmt_s(tl.makespan_s)} agrees with the priced {_fmt_s(priced)}"
    side = "longer" if gap > 0 else "shorter"
    return (
        f"simulated step {_fmt_s(tl.makespan_s)} is {_fmt_s(abs(gap))} ({100 * abs(gap) / priced:.1f}%)"
        f" {side} than the closed-form price {_fmt_s(priced)}"
    )


def _op_bars(
    ax: Axes, tl: Timeline, *, scale: float, gid_prefix: str | None, window: tuple[float, float]
) -> None:
    """Draw the intervals of the timeline that overlap ``window`` (seconds) on ``ax``, rank 0
    on top, one grey band per rank (the idle time shows through)."""
    v = tl.virtual_stages
    lo, hi = window
    for r in range(tl.num_ranks):
        y = r
        band = ax.axhspan(y - 0.45, y + 0.45, color=IDLE_COLOUR, lw=0, zorder=0)
        if gid_prefix is not None:
            band.set_gid(f"{gid_prefix}-row-{r}")
        mine = [e for e in tl.events if e.rank == r and e.end_s >= lo and e.start_s <= hi]
        for kind in ("F", "B"):
            ops = [e for e in mine if e.kind == kind]
            if not ops:
                continue
            shades = OP_COLOURS[kind]
            colours = [shades[(e.chunk if v > 1 else e.microbatch) % 2] for e in ops]
            coll = ax.broken_barh(
                [(e.start_s * scale, (e.end_s - e.start_s) * scale) for e in ops],
                (y - 0.4, 0.62),
                facecolors=colours,
                edgecolor="white",
                linewidth=0.25,
                zorder=2,
            )
            if gid_prefix is not None:
                coll.set_gid(f"{gid_prefix}-r{r}-{kind}")
        sends = [e for e in mine if e.kind == "send"]
        if sends:
            ax.broken_barh(
                [(e.start_s * scale, (e.end_s - e.start_s) * scale) for e in sends],
                (y + 0.26, 0.14),
                facecolors=[SEND_COLOUR if not e.grad else "#888888" for e in sends],
                linewidth=0,
                zorder=2,
            )
        tails = [e for e in mine if e.kind == "tail"]
        if tails:
            ax.broken_barh(
                [(e.start_s * scale, (e.end_s - e.start_s) * scale) for e in tails],
                (y - 0.4, 0.8),
                facecolors=TAIL_COLOUR,
                edgecolor="white",
                hatch="///",
                linewidth=0.0,
                zorder=2,
            )


def timeline_figure(plan: Plan, timeline: Timeline | None = None) -> Figure:
    """One row per pipeline rank: F / B per microbatch and chunk, sends, bubbles, the tail.

    Top: the whole step with the simulated makespan and the priced step time marked. Below: the
    warm-up and the cool-down zoomed in, where the bubbles are.
    """
    _, Figure = _mpl()
    from matplotlib.patches import Patch

    tl = timeline if timeline is not None else plan_timeline(plan)
    priced = plan.predicted.step_time_s if plan.predicted is not None else None
    span = max(tl.makespan_s, priced or 0.0)
    scale, unit = _time_unit(span)
    pp = tl.num_ranks
    # windows (seconds): the whole step, the warm-up and the cool-down with the tails
    ops = sorted(e.end_s - e.start_s for e in tl.events if e.kind in ("F", "B"))
    op = ops[len(ops) // 2] if ops else span / 100
    first = max(min(e.start_s for e in tl.events if e.rank == r) for r in range(pp))
    last_compute = min(
        max(e.end_s for e in tl.events if e.rank == r and e.kind in ("F", "B")) for r in range(pp)
    )
    windows = (
        (0.0, span * 1.01),
        (0.0, max(min(span * 0.5, first + 8 * op), op)),
        (max(span * 0.5, last_compute - 8 * op), span * 1.005),
    )
    row_in = max(0.12, min(0.42, 8.0 / pp))
    fig = Figure(figsize=(12, 1.9 + 2 * row_in * pp + 0.6), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1.25, 1.0])
    main = fig.add_subplot(grid[0, :])
    zooms = (fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1]))
    labels = [
        f"rank {r}\nidle {_fmt_s(tl.rank_idle_s(r))}" if pp <= 16 else f"{r}" for r in range(pp)
    ]
    for ax, prefix, window in zip((main, *zooms), ("timeline", None, None), windows):
        _op_bars(ax, tl, scale=scale, gid_prefix=prefix, window=window)
        ax.set_xlim(window[0] * scale, window[1] * scale)
        ax.set_ylim(pp - 0.5, -0.5)
        ax.set_yticks(range(pp), labels if ax is main else [f"rank {r}" for r in range(pp)])
        ax.tick_params(axis="y", labelsize=7 if pp <= 16 else 5, length=0)
        ax.set_xlabel(f"time ({unit})", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.axvline(tl.makespan_s * scale, color="black", lw=1.2, zorder=3)
        if priced is not None:
            ax.axvline(priced * scale, color=PRICE_COLOUR, lw=1.2, ls="--", zorder=3)
    zooms[0].set_title("warm-up (fill)", fontsize=8, loc="left")
    zooms[1].set_title("cool-down (drain) and tail", fontsize=8, loc="left")
    sched = plan.schedule + (f", v={tl.virtual_stages}" if tl.virtual_stages > 1 else "")
    main.set_title(
        f"pipeline schedule: {sched}, {tl.microbatches} microbatches on {pp} pipeline ranks  |  "
        + _agreement(plan, tl),
        fontsize=9,
        loc="left",
    )
    handles = [
        Patch(color=OP_COLOURS["F"][0], label="forward"),
        Patch(color=OP_COLOURS["B"][0], label="backward"),
        Patch(color=SEND_COLOUR, label="p2p send (activation; grey: gradient)"),
        Patch(facecolor=TAIL_COLOUR, hatch="///", label="tail: exposed grad sync + optimizer"),
        Patch(color=IDLE_COLOUR, label="idle (bubble)"),
    ]
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], color="black", lw=1.2, label="simulated step"))
    if priced is not None:
        handles.append(Line2D([], [], color=PRICE_COLOUR, lw=1.2, ls="--", label="priced step"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=7,
               frameon=False)  # fmt: skip
    return fig


# ---------------------------------------------------------------------------------------------
# 2. memory
# ---------------------------------------------------------------------------------------------
def memory_figure(plan: Plan, *, device_bytes: float | None = None) -> Figure:
    """Peak memory per pipeline rank, stacked by kind, against the usable capacity."""
    _, Figure = _mpl()
    pred = plan.predicted
    ranks: Sequence[MemoryBreakdown] = (
        pred.rank_memory if pred is not None and pred.rank_memory else
        ((pred.memory,) if pred is not None else ())
    )  # fmt: skip
    n = len(ranks)
    host = [getattr(m, "host", 0.0) / GiB for m in ranks]  # offloaded state (newer plans)
    width = min(12, 3 + 0.55 * max(n, 1)) * (1.6 if any(host) else 1.0)
    fig = Figure(figsize=(width, 3.6), layout="constrained")
    ax, host_ax = fig.subplots(1, 2, squeeze=True) if any(host) else (fig.add_subplot(), None)
    bottoms = [0.0] * n
    for attr, label, colour in MEMORY_PARTS:
        vals = [getattr(m, attr) / GiB for m in ranks]
        bars = ax.bar(range(n), vals, bottom=bottoms, color=colour, label=label, width=0.7)
        for r, bar in enumerate(bars):
            bar.set_gid(f"memory-rank-{r}-{attr}")
        bottoms = [b + x for b, x in zip(bottoms, vals)]
    cap = max((m.capacity for m in ranks), default=0.0) / GiB
    if cap:
        ax.axhline(cap, color=PRICE_COLOUR, ls="--", lw=1.2, label=f"usable {cap:.1f} GiB")
    if device_bytes:
        ax.axhline(device_bytes / GiB, color="black", lw=0.8, ls=":",
                   label=f"device {device_bytes / GiB:.0f} GiB")  # fmt: skip
    for r, total in enumerate(bottoms):
        ax.annotate(f"{total:.1f}", (r, total), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 2), textcoords="offset points")  # fmt: skip
    ax.set_xticks(range(n), [f"rank {r}" for r in range(n)] if n > 1 else ["most loaded"],
                  fontsize=7, rotation=0 if n <= 16 else 90)  # fmt: skip
    ax.set_ylabel("GiB per device", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("peak memory per device, by pipeline rank", fontsize=9, loc="left")
    fig.legend(fontsize=7, loc="outside right upper", frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if host_ax is not None:
        bars = host_ax.bar(range(n), host, color="#9D755D", width=0.7)
        for r, bar in enumerate(bars):
            bar.set_gid(f"memory-rank-{r}-host")
        host_cap = max((getattr(m, "host_capacity", 0.0) for m in ranks), default=0.0) / GiB
        if host_cap:
            host_ax.axhline(host_cap, color=PRICE_COLOUR, ls="--", lw=1.2)
            host_ax.annotate(f"host share {host_cap:.0f} GiB", (n - 0.5, host_cap), ha="right",
                             va="bottom", fontsize=7, color=PRICE_COLOUR)  # fmt: skip
        host_ax.set_xticks(range(n), [f"rank {r}" for r in range(n)], fontsize=7)
        host_ax.set_ylabel("GiB of host memory per device", fontsize=8)
        host_ax.tick_params(axis="y", labelsize=7)
        host_ax.set_title("offloaded to the host", fontsize=9, loc="left")
        for side in ("top", "right"):
            host_ax.spines[side].set_visible(False)
    return fig


# ---------------------------------------------------------------------------------------------
# 3. cluster
# ---------------------------------------------------------------------------------------------
def plan_groups(plan: Plan) -> dict[str, list[tuple[int, ...]]]:
    """Global ranks of every pp / dp / tp group (ranks row-major over (pp, dp, tp))."""
    p = plan.parallel
    dims = {"pp": p.pp, "dp": p.dp, "tp": p.tp}
    strides = {"tp": 1, "dp": p.tp, "pp": p.tp * p.dp}
    out: dict[str, list[tuple[int, ...]]] = {}
    for axis in AXES:
        others = [a for a in AXES if a != axis]
        groups = []
        for i in range(dims[others[0]]):
            for j in range(dims[others[1]]):
                base = i * strides[others[0]] + j * strides[others[1]]
                groups.append(tuple(base + k * strides[axis] for k in range(dims[axis])))
        out[axis] = sorted(groups)
    return out


def _layer(kind: str, name: str) -> int:
    """Drawing level: devices, host switches, the host's PCIe root, NICs, leaves, spine."""
    if kind == "device":
        return 0
    if kind == "nic":
        return 3
    if name.endswith("/root"):
        return 2
    if "/leaf" in name:
        return 4
    if name.endswith("/spine"):
        return 5
    return 1  # NVSwitch, PCIe switch


def _shown_hosts(cluster: Cluster, plan: Plan | None, max_hosts: int) -> list[int]:
    """Hosts worth drawing: each pipeline stage's first hosts (all hosts when few)."""
    if cluster.num_hosts <= max_hosts:
        return list(range(cluster.num_hosts))
    if plan is None:
        return list(range(max_hosts))
    p = plan.parallel
    per_stage = p.dp * p.tp
    stages = list(range(p.pp))
    if len(stages) > max_hosts:
        stages = sorted({round(i * (p.pp - 1) / (max_hosts - 1)) for i in range(max_hosts)})
    k = max(1, max_hosts // len(stages))
    hosts: list[int] = []
    for s in stages:
        mine: list[int] = []
        for rank in range(s * per_stage, min((s + 1) * per_stage, cluster.num_devices)):
            h = cluster.host_of(rank)
            if h not in mine:
                mine.append(h)
            if len(mine) == k:
                break
        hosts += [h for h in mine if h not in hosts]
    return hosts[:max_hosts]


def cluster_view(cluster: Cluster, plan: Plan | None = None, *, max_hosts: int = 8) -> nx.Graph:
    """The part of ``cluster.graph`` worth drawing, with a ``pos`` attribute on every node.

    At most ``max_hosts`` hosts (each pipeline stage's first hosts when a plan is given), their
    devices, switches and NICs, and the network switches joining them. Layout: networkx's
    multipartite layout by level (devices, host switches, NICs, leaves, spine), each switch
    centred over what it connects below.
    """
    g = cluster.graph
    hosts = set(_shown_hosts(cluster, plan, max_hosts))
    keep = {n for n, d in g.nodes(data=True) if d.get("host") in hosts}
    leaves = {m for n in keep for m in g.neighbors(n) if "host" not in g.nodes[m]}
    spines = {m for n in leaves for m in g.neighbors(n) if "host" not in g.nodes[m]}
    view = nx.Graph(g.subgraph(keep | leaves | spines))
    for n, d in view.nodes(data=True):
        d["layer"] = _layer(d.get("kind", ""), n)
    pos = nx.multipartite_layout(view, subset_key="layer", align="horizontal")
    devices = sorted((n for n, d in view.nodes(data=True) if d["layer"] == 0),
                     key=lambda n: view.nodes[n]["rank"])  # fmt: skip
    xs = sorted(pos[n][0] for n in devices)
    lo, width = xs[0], (xs[-1] - xs[0]) or 1.0
    x = {n: (xs[i] - lo) / width for i, n in enumerate(devices)}  # rank order, left to right
    levels = sorted({d["layer"] for _, d in view.nodes(data=True)})
    for level in levels[1:]:
        for n, d in view.nodes(data=True):
            if d["layer"] != level:
                continue
            below = [m for m in view.neighbors(n) if view.nodes[m]["layer"] < level and m in x]
            if below:  # centred over its lowest placed neighbours
                low = min(view.nodes[m]["layer"] for m in below)
                xs_below = [x[m] for m in below if view.nodes[m]["layer"] == low]
                x[n] = sum(xs_below) / len(xs_below)
    for n in view.nodes:  # nothing below (a host's PCIe root behind its NICs): its neighbours
        if n not in x:
            near = [x[m] for m in view.neighbors(n) if m in x]
            x[n] = sum(near) / len(near) if near else 0.5
    step = 1.0 / max(1, len(devices))
    for level in levels[1:]:  # spread nodes of one level that landed on one spot
        spots: dict[float, list[str]] = {}
        for n, d in view.nodes(data=True):
            if d["layer"] == level:
                spots.setdefault(round(x[n], 9), []).append(n)
        for names in spots.values():
            for i, n in enumerate(names):
                x[n] += (i - (len(names) - 1) / 2) * step
    pos = {n: (x[n], float(view.nodes[n]["layer"])) for n in view.nodes}
    nx.set_node_attributes(view, pos, "pos")
    view.graph["hosts_shown"] = sorted(hosts)
    view.graph["devices_per_host"] = cluster.devices_per_host
    return view


def link_traffic(view: nx.Graph, plan: Plan) -> dict[tuple[str, str], dict[str, float]]:
    """Seconds per step each axis keeps each drawn link busy (edge -> axis -> seconds).

    Every group of an axis is a ring (tp, dp) or a chain of stages (pp; a ring when the schedule
    is interleaved) over its ranks, hop by hop along the shortest path between two devices in
    the drawn graph. A group's time goes to the level that limits it: the hops between hosts
    when the group spans hosts, the hops inside a host otherwise. The groups of one axis run at
    once (the price already shares links among them), so a link that carries an axis is busy
    for that axis's time of the step (``Prediction.breakdown``): tp the tensor-parallel
    communication, dp the data-parallel one (exposed and overlapped), pp the point-to-point
    transfers. Hops to hosts that are not drawn are left out.
    """
    pred = plan.predicted
    if pred is None:
        return {}
    b = pred.breakdown
    weight = {"tp": b.tp_comm, "dp": b.dp_comm + b.overlapped_comm, "pp": b.pp_comm}
    node_of = {d["rank"]: n for n, d in view.nodes(data=True) if d.get("kind") == "device"}
    host_of = {r: view.nodes[n]["host"] for r, n in node_of.items()}
    per_host = view.graph["devices_per_host"]
    load: dict[tuple[str, str], dict[str, float]] = {}
    for axis, groups in plan_groups(plan).items():
        if len(groups[0]) < 2 or weight[axis] <= 0.0:
            continue
        ring = axis != "pp" or plan.schedule == "interleaved_1f1b"
        for group in groups:
            spans_hosts = len({r // per_host for r in group}) > 1
            shown = [r for r in group if r in node_of]
            hops = list(zip(shown, shown[1:]))
            if ring and len(shown) == len(group) > 2:
                hops.append((shown[-1], shown[0]))
            for a, c in hops:
                if (host_of[a] != host_of[c]) != spans_hosts:
                    continue
                path = nx.shortest_path(view, node_of[a], node_of[c])
                for u, w in zip(path, path[1:]):
                    load.setdefault((min(u, w), max(u, w)), {})[axis] = weight[axis]
    return load


def _group_colours(n: int) -> list[str]:
    matplotlib, _ = _mpl()
    cmap = matplotlib.colormaps["tab20"]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return [matplotlib.colors.to_hex(cmap(order[i % 20])) for i in range(n)]


def _draw_base(ax: Axes, view: nx.Graph, *, edge_colour: str = "#DDDDDD") -> None:
    """Hosts as shaded boxes, links, switches and NICs (devices are drawn by the caller)."""
    from matplotlib.patches import FancyBboxPatch

    pos = nx.get_node_attributes(view, "pos")
    hosts: dict[int, list[float]] = {}
    for n, d in view.nodes(data=True):
        if "host" in d and d.get("kind") in ("device", "nic", "switch"):
            hosts.setdefault(d["host"], []).append(pos[n][0])
    pad = 0.4 / max(1, sum(1 for _, d in view.nodes(data=True) if d.get("kind") == "device"))
    for h, xs in hosts.items():
        lo, hi = min(xs) - pad, max(xs) + pad
        ax.add_patch(FancyBboxPatch((lo, -0.3), hi - lo, 3.6, boxstyle="round,pad=0,rounding_size=0.01",
                                    facecolor="#F4F4F4", edgecolor="#CCCCCC", lw=0.5, zorder=0))  # fmt: skip
        ax.text(
            (lo + hi) / 2, -0.45, f"host {h}", ha="center", va="top", fontsize=6, color="#555555"
        )
    nx.draw_networkx_edges(view, pos, ax=ax, edge_color=edge_colour, width=0.5)
    others = [n for n, d in view.nodes(data=True) if d.get("kind") != "device"]
    shapes = {"switch": "s", "nic": "D"}
    for kind, marker in shapes.items():
        nodes = [n for n in others if view.nodes[n].get("kind") == kind]
        nx.draw_networkx_nodes(view, pos, nodelist=nodes, ax=ax, node_size=14, node_shape=marker,
                               node_color="#888888" if kind == "switch" else "#C7C7C7")  # fmt: skip
    ax.set_axis_off()


def _device_labels(ax: Axes, view: nx.Graph, size: float) -> None:
    pos = nx.get_node_attributes(view, "pos")
    devices = {n: str(d["rank"]) for n, d in view.nodes(data=True) if d.get("kind") == "device"}
    nx.draw_networkx_labels(view, pos, labels=devices, ax=ax, font_size=size)


def cluster_figure(cluster: Cluster, plan: Plan | None = None, *, max_hosts: int = 8) -> Figure:
    """The cluster as a graph; with a plan, its pp / dp / tp groups and link traffic.

    Without a plan: one panel, devices, switches and NICs by kind. With one: a panel per mesh
    axis whose degree is above 1 (devices of one group share a colour) and a panel of the links
    weighted by the traffic the plan puts on them (``link_traffic``), the busiest highlighted.
    """
    _, Figure = _mpl()
    from matplotlib.lines import Line2D

    view = cluster_view(cluster, plan, max_hosts=max_hosts)
    pos = nx.get_node_attributes(view, "pos")
    devices = [n for n, d in view.nodes(data=True) if d.get("kind") == "device"]
    label_size = 6 if len(devices) <= 40 else 4
    shown = view.graph["hosts_shown"]
    head = (
        f"{cluster.name}: {cluster.num_hosts} hosts x {cluster.devices_per_host} "
        f"{cluster.device.model}"
        + (
            f" (showing hosts {', '.join(map(str, shown))})"
            if len(shown) < cluster.num_hosts
            else ""
        )
    )
    if plan is None:
        fig = Figure(figsize=(12, 3.2), layout="constrained")
        ax = fig.add_subplot()
        _draw_base(ax, view)
        nx.draw_networkx_nodes(view, pos, nodelist=devices, ax=ax, node_size=40,
                               node_color="#54A24B")  # fmt: skip
        _device_labels(ax, view, label_size)
        ax.set_title(head + "  (green: devices, squares: switches, diamonds: NICs)",
                     fontsize=9, loc="left")  # fmt: skip
        return fig
    axes = [a for a in AXES if getattr(plan.parallel, a) > 1]
    fig = Figure(figsize=(12, 2.6 * (len(axes) + 1) + 0.4), layout="constrained")
    panels = fig.subplots(len(axes) + 1, 1, squeeze=False)[:, 0]
    groups = plan_groups(plan)
    for ax, axis in zip(panels, axes):
        _draw_base(ax, view)
        member = {r: i for i, g in enumerate(groups[axis]) for r in g}
        colours = _group_colours(len(groups[axis]))
        ranks = [view.nodes[n]["rank"] for n in devices]
        fill = [colours[member[r]] if r in member else "#FFFFFF" for r in ranks]
        coll = nx.draw_networkx_nodes(view, pos, nodelist=devices, ax=ax, node_size=42,
                                      node_color=fill, edgecolors="#555555", linewidths=0.4)  # fmt: skip
        coll.set_gid(f"cluster-{axis}-groups")
        _device_labels(ax, view, label_size)
        size = len(groups[axis][0])
        what = {"pp": "pipeline", "dp": "data-parallel", "tp": "tensor-parallel"}[axis]
        ax.set_title(
            f"{what} groups: {axis}={size}, {len(groups[axis])} groups of {size} ranks "
            f"(one colour per group; colours repeat)",
            fontsize=8,
            loc="left",
        )
    panels[0].set_title(head + "\n" + panels[0].get_title(loc="left"), fontsize=8, loc="left")
    ax = panels[-1]
    _draw_base(ax, view, edge_colour="#EEEEEE")
    nx.draw_networkx_nodes(view, pos, nodelist=devices, ax=ax, node_size=30,
                           node_color="#DDDDDD", edgecolors="#888888", linewidths=0.3)  # fmt: skip
    load = link_traffic(view, plan)
    if load:
        total = {e: sum(per.values()) for e, per in load.items()}
        peak = max(total.values())
        ranked = sorted(total, key=total.get, reverse=True)
        busiest = set(ranked[: max(1, len(ranked) // 10)]) | {
            e for e in ranked if total[e] >= 0.5 * peak
        }
        for axis in AXES:
            edges = [e for e in load if max(load[e], key=load[e].get) == axis]
            if not edges:
                continue
            coll = nx.draw_networkx_edges(
                view, pos, edgelist=edges, ax=ax, edge_color=AXIS_COLOURS[axis],
                width=[0.6 + 3.4 * total[e] / peak for e in edges],
                alpha=[1.0 if e in busiest else 0.35 for e in edges],
            )  # fmt: skip
            coll.set_gid(f"cluster-traffic-{axis}")
        b = plan.predicted.breakdown
        secs = {"tp": b.tp_comm, "dp": b.dp_comm + b.overlapped_comm, "pp": b.pp_comm}
        handles = [
            Line2D(
                [], [], color=AXIS_COLOURS[a], lw=2.5, label=f"{a}: {_fmt_s(secs[a])} per step"
            )  # fmt: skip
            for a in AXES
            if any(max(per, key=per.get) == a for per in load.values())
        ]
        ax.legend(handles=handles, fontsize=7, loc="upper right", frameon=False)
    ax.set_title(
        "link traffic: width = seconds per step the plan keeps a link busy (summed over the axes "
        "using it), colour = the axis that uses it most; the busiest links drawn solid",
        fontsize=8,
        loc="left",
    )
    return fig


# ---------------------------------------------------------------------------------------------
# 4. landscape
# ---------------------------------------------------------------------------------------------
def _is_chosen(a: Alternative, plan: Plan) -> bool:
    pred = plan.predicted
    return (
        pred is not None
        and a.parallel == plan.parallel
        and a.step_time_s <= pred.step_time_s * (1 + 1e-9)
    )


def landscape_figure(plan: Plan, *, max_bars: int = LANDSCAPE_BARS) -> Figure:
    """Best step time of every (dp, tp, pp) shape, stacked by the breakdown, chosen marked."""
    _, Figure = _mpl()
    ranked = sorted(plan.landscape, key=lambda a: a.step_time_s)
    shown = ranked[:max_bars]
    if plan.predicted is not None and not any(_is_chosen(a, plan) for a in shown):
        pred = plan.predicted
        shown = [
            Alternative(
                parallel=plan.parallel,
                microbatches=plan.microbatches,
                micro_batch_size=plan.micro_batch_size,
                schedule=plan.schedule,
                zero_stage=plan.zero_stage,
                recompute=plan.recompute,
                step_time_s=pred.step_time_s,
                memory_gib_per_device=pred.memory_gib_per_device,
                breakdown=pred.breakdown,
            ),  # fmt: skip
            *shown[: max_bars - 1],
        ]
        shown.sort(key=lambda a: a.step_time_s)
    n = len(shown)
    fig = Figure(figsize=(12, 1.2 + 0.24 * max(n, 1)), layout="constrained")
    ax = fig.add_subplot()
    scale, unit = _time_unit(max((a.step_time_s for a in shown), default=1.0))
    left = [0.0] * n
    spare = iter(("#9D755D", "#FF9DA6", "#EECA3B", "#79706E"))
    for term in TERM_WORDS:  # explain's terms: they add up to the step time
        colour = TERM_COLOURS.get(term) or next(spare, "#79706E")
        vals = [getattr(a.breakdown, term, 0.0) * scale for a in shown]
        if not any(vals):
            continue
        bars = ax.barh(range(n), vals, left=left, color=colour, label=TERM_WORDS[term], height=0.7)
        for i, bar in enumerate(bars):
            p = shown[i].parallel
            bar.set_gid(f"landscape-dp{p.dp}-tp{p.tp}-pp{p.pp}-{term}")
        left = [x + v for x, v in zip(left, vals)]
    labels = []
    for i, a in enumerate(shown):
        p = a.parallel
        label = f"dp={p.dp} tp={p.tp} pp={p.pp}"
        chosen = _is_chosen(a, plan)
        labels.append(label + ("  (chosen)" if chosen else ""))
        ax.annotate(
            _fmt_s(a.step_time_s), (a.step_time_s * scale, i), xytext=(3, 0),
            textcoords="offset points", va="center", fontsize=6,
            fontweight="bold" if chosen else "normal",
        )  # fmt: skip
    ax.set_yticks(range(n), labels, fontsize=7)
    for tick, a in zip(ax.get_yticklabels(), shown):
        if _is_chosen(a, plan):
            tick.set_fontweight("bold")
            tick.set_color(PRICE_COLOUR)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel(f"step time ({unit})", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    more = len(ranked) - len([a for a in shown if a in ranked])
    ax.set_title(
        "best plan of each (dp, tp, pp) shape, fastest first"
        + (f" ({more} slower shapes not shown)" if more > 0 else ""),
        fontsize=9,
        loc="left",
    )
    fig.legend(fontsize=7, loc="outside right upper", frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------
def _svg(fig: Figure, name: str) -> str:
    """The figure as an inline ``<svg>`` element (text as paths: no font is needed)."""
    matplotlib, _ = _mpl()
    buf = io.StringIO()
    params = {"svg.fonttype": "path", "svg.hashsalt": f"autopar-{name}", "svg.id": f"svg-{name}"}
    with matplotlib.rc_context(params):
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
color:#222;background:#fff}
main{max-width:1200px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 4px}h3{font-size:14px;margin:16px 0 4px}h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid #ddd;
padding-bottom:3px}p.sub{color:#555;margin:0 0 10px;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:8px;margin:10px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:6px 10px;min-width:120px}
.card b{display:block;font-size:17px}.card span{font-size:11px;color:#666}
figure{margin:6px 0}figure svg{max-width:100%;height:auto}
figcaption,.note{font-size:12px;color:#555}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border-bottom:1px solid #eee;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{font-size:11px;background:#f8f8f8;padding:8px;overflow-x:auto}
.warn{color:#a33}
"""


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], *, num: Sequence[int] = ()) -> str:
    out = ["<table><thead><tr>", *(f"<th>{html.escape(h)}</th>" for h in head), "</tr></thead>"]
    out.append("<tbody>")
    for row in rows:
        cells = (
            f'<td class="num">{html.escape(str(c))}</td>'
            if i in num
            else f"<td>{html.escape(str(c))}</td>"
            for i, c in enumerate(row)
        )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


@dataclass(slots=True)
class _Section:
    id: str
    title: str
    body: str
    attrs: str = ""

    def html(self) -> str:
        return (
            f'<section id="{self.id}"{self.attrs}><h2>{html.escape(self.title)}</h2>'
            f"{self.body}</section>"
        )


def _figure(fig: Figure, name: str, caption: str) -> str:
    return f"<figure>{_svg(fig, name)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _load_cluster(plan: Plan) -> tuple[Cluster | None, str]:
    info = plan.cluster_info
    if info is None:
        return None, "the plan does not name its cluster (no cluster_info)"
    from autopar.topology.load import load_cluster

    try:
        return load_cluster(info.path or info.name, nodes=info.nodes), ""
    except AutoparError as e:
        return None, f"cannot load cluster {info.path or info.name!r}: {e}"


def _timeline_section(plan: Plan) -> _Section:
    try:
        tl = plan_timeline(plan)
    except ConfigError as e:
        return _Section(
            "timeline", "1. Pipeline schedule", f'<p class="warn">{html.escape(str(e))}</p>'
        )
    fig = timeline_figure(plan, tl)
    pred = plan.predicted
    gap = tl.makespan_s - pred.step_time_s
    rows = [
        (r, _fmt_s(tl.rank_busy_s[r]), _fmt_s(tl.rank_idle_s(r)),
         _fmt_s(pred.rank_tail_s[r]) if len(pred.rank_tail_s) > r else "-", _fmt_s(tl.rank_end_s[r]))
        for r in range(tl.num_ranks)
    ]  # fmt: skip
    b = pred.breakdown
    caption = (
        "Simulated op by op (autopar.solver.pipeline.simulate_schedule) from the plan's per-stage "
        "forward, backward and send times; sends overlap compute (asynchronous p2p). The priced "
        "step is the closed form Σ t_s + (M − 1/v)·max t_s plus the largest tail, with each "
        "rank's sends counted in its t_s. "
        f"Communication hidden behind compute (not drawn): {_fmt_s(b.overlapped_comm)}."
    )
    body = (
        f'<p class="sub">{html.escape(_agreement(plan, tl))}'
        + (f" (difference {gap:+.4g} s)" if abs(gap) > AGREE_REL * pred.step_time_s else "")
        + "</p>"
        + _figure(fig, "timeline", caption)
        + _table(
            ("pipeline rank", "compute", "idle (bubble)", "tail", "ends at"), rows, num=(1, 2, 3, 4)
        )  # fmt: skip
    )
    attrs = (
        f' data-pipeline-ranks="{tl.num_ranks}" data-simulated-s="{tl.makespan_s:.6g}"'
        f' data-priced-s="{pred.step_time_s:.6g}"'
    )
    return _Section("timeline", "1. Pipeline schedule", body, attrs)


def _memory_section(plan: Plan, cluster: Cluster | None) -> _Section:
    pred = plan.predicted
    if pred is None:
        return _Section("memory", "2. Memory", '<p class="warn">the plan has no prediction</p>')
    fig = memory_figure(plan, device_bytes=cluster.memory_bytes if cluster is not None else None)
    ranks = pred.rank_memory or (pred.memory,)
    rows = [
        (r, *(f"{getattr(m, a) / GiB:.2f}" for a, _, _ in MEMORY_PARTS), f"{m.total / GiB:.2f}",
         f"{m.capacity / GiB:.2f}")
        for r, m in enumerate(ranks)
    ]  # fmt: skip
    head = ("pipeline rank", *(label for _, label, _ in MEMORY_PARTS), "total", "usable")
    if any(getattr(m, "host", 0.0) for m in ranks):  # offloaded model state / activations
        rows = [(*row, f"{getattr(m, 'host', 0.0) / GiB:.2f}") for row, m in zip(rows, ranks)]
        head = (*head, "host (offloaded)")
    caption = (
        "Peak bytes per device on each pipeline rank: activations of the microbatches the "
        f"{plan.schedule} schedule keeps in flight, weights / gradients / optimizer state after "
        f"ZeRO stage {plan.zero_stage}, transients (recompute, gathered weights) as other. "
        "The usable capacity is the device memory less the configured headroom."
    )
    return _Section(
        "memory", "2. Memory per pipeline rank (GiB per device)",
        _figure(fig, "memory", caption) + _table(head, rows, num=tuple(range(1, len(head)))),
        f' data-pipeline-ranks="{len(ranks)}"',
    )  # fmt: skip


def _cluster_section(plan: Plan, cluster: Cluster | None, why_not: str) -> _Section:
    title = "3. Cluster, groups and link traffic"
    if cluster is None:
        return _Section("cluster", title, f'<p class="warn">{html.escape(why_not)}</p>')
    if cluster.num_devices < plan.num_devices:
        msg = (
            f"cluster {cluster.name} has {cluster.num_devices} devices, the plan {plan.num_devices}"
        )
        return _Section("cluster", title, f'<p class="warn">{html.escape(msg)}</p>')
    fig = cluster_figure(cluster, plan)
    mapping = host_mapping(plan)
    caption = (
        "Ranks are laid out row-major over (pp, dp, tp): tp innermost, so neighbouring ranks "
        "share a host. Squares are switches (NVSwitch / PCIe / network leaves and spine), "
        "diamonds NICs. " + (f"Host mapping: {mapping}." if mapping else "")
    )
    return _Section("cluster", title, _figure(fig, "cluster", caption))


def _landscape_section(plan: Plan) -> _Section:
    parts = []
    if plan.landscape:
        caption = (
            "Each bar is the fastest plan the search found for one (dp, tp, pp) shape, split like "
            "the step-time breakdown (exposed time on the slowest pipeline rank)."
        )
        parts.append(_figure(landscape_figure(plan), "landscape", caption))
    pred = plan.predicted
    if plan.alternatives and pred is not None:
        rows = [
            (a.parallel.dp, a.parallel.tp, a.parallel.pp, a.micro_batch_size, a.microbatches,
             a.schedule + (f" v={a.virtual_stages}" if a.virtual_stages > 1 else ""),
             a.zero_stage, a.recompute, "on" if a.sequence_parallel else "off",
             _fmt_s(a.step_time_s), f"{a.memory_gib_per_device:.1f}",
             why(a, pred.step_time_s, pred.breakdown))
            for a in plan.alternatives
        ]  # fmt: skip
        head = ("dp", "tp", "pp", "mbs", "#mb", "schedule", "ZeRO", "recompute", "sp", "step",
                "GiB/dev", "why it lost")  # fmt: skip
        parts.append("<h3>Runners-up</h3>" + _table(head, rows, num=(0, 1, 2, 3, 4, 6, 9, 10)))
    if not parts:
        parts.append('<p class="note">the plan carries no landscape or runners-up</p>')
    return _Section("landscape", "4. Landscape and runners-up", "".join(parts))


def _facts_section(plan: Plan, cluster: Cluster | None) -> _Section:
    s = plan.stack
    stack_rows = [
        ("stack", s.name or "(none named)"),
        ("attention", s.attention),
        ("sequence parallel allowed", s.sequence_parallel),
        ("sequence parallel chosen", "on" if plan.sequence_parallel else "off"),
        ("gradient reduction", "overlapped with backward" if s.overlap_grad_reduce else "exposed"),
        ("gradient dtype", plan.grad_dtype),
        ("pipeline sends", "split over tp, all-gathered on arrival (scatter/gather)"
         if s.pipeline_scatter_gather else "whole tensors"),
    ]  # fmt: skip
    pred = plan.predicted
    assumptions = [
        ("model", plan.model + (f"  ({plan.model_spec})" if plan.model_spec else "")),
        ("batch", f"{plan.global_batch} global"
         + (f" x seq {plan.seq_len}" if plan.seq_len else "")
         + f"; {plan.microbatches} microbatches of {plan.micro_batch_size} per dp rank"),
        ("precision / optimizer", f"{plan.dtype}, {plan.optimizer}"),
        ("ZeRO / recompute", f"stage {plan.zero_stage} / {plan.recompute}"),
    ]  # fmt: skip
    info = plan.cluster_info
    if info is not None:
        assumptions.append(
            ("cluster", f"{info.name}: {info.nodes} hosts x {info.devices_per_host} {info.device}")
        )
    if cluster is not None:
        dev = cluster.device
        assumptions.append(("device memory", f"{dev.memory_gib:g} GiB"))
        if dev.compute_calibration:
            assumptions.append(("compute calibration", str(dev.compute_calibration)))
        if cluster.calibration is not None:
            assumptions.append(("network calibration", cluster.calibration.name))
        else:
            assumptions.append(
                ("network", "datasheet bandwidths x achieved fractions (not calibrated)")
            )
    if pred is not None:
        assumptions.append(("usable memory", f"{pred.memory.capacity / GiB:.1f} GiB per device"))
    assumptions += [
        ("pipeline price", "Σ t_s + (M − 1/v)·max t_s over pipeline ranks, t_s including the rank's "
         "sends, plus the largest tail (exposed gradient sync + optimizer step)"),
        ("schedule picture", "op-by-op simulation of the same stage costs; p2p sends asynchronous"),
        ("communication", "priced on the links each group crosses (hierarchical collectives)"),
    ]  # fmt: skip
    solver_rows = [
        (k, v if not isinstance(v, dict | list) else ", ".join(f"{a}={b}" for a, b in v.items())
         if isinstance(v, dict) else ", ".join(map(str, v)))
        for k, v in plan.solver.items()
    ]  # fmt: skip
    unknown = (
        _table(("op", "count"), sorted(plan.unknown_ops.items()), num=(1,))
        if plan.unknown_ops
        else '<p class="note">every op of the model has a sharding rule</p>'
    )
    body = (
        "<h3>Software stack</h3>"
        + _table(("", ""), stack_rows)
        + "<h3>Assumptions</h3>"
        + _table(("", ""), assumptions)
        + "<h3>Solver</h3>"
        + (_table(("fact", "value"), solver_rows) if solver_rows else "<p>-</p>")
        + "<h3>Ops without a sharding rule (run replicated)</h3>"
        + unknown
        + (
            f"<h3>Whole on every tp rank (a dimension does not divide by tp={plan.parallel.tp})"
            "</h3>"
            + _table(
                ("parameter", "shape"),
                [(n, " x ".join(map(str, d))) for n, d in sorted(plan.indivisible_params.items())],
            )
            if plan.indivisible_params
            else ""
        )
        + "<details><summary>The plan as <code>autopar explain</code> prints it</summary>"
        + f"<pre>{html.escape(render(plan))}</pre></details>"
    )
    return _Section("facts", "5. Stack, assumptions and solver", body)


def _cards(plan: Plan) -> str:
    p = plan.parallel
    cards = [(f"dp={p.dp} tp={p.tp} pp={p.pp}", "parallelism")]
    sched = plan.schedule + (f" v={plan.virtual_stages}" if plan.virtual_stages > 1 else "")
    cards.append((sched, f"{plan.microbatches} microbatches x {plan.micro_batch_size}"))
    pred = plan.predicted
    if pred is not None:
        unit = "tokens/s" if plan.seq_len else "samples/s"
        cards += [
            (_fmt_s(pred.step_time_s), "step time (priced)"),
            (f"{pred.tokens_per_s:,.0f}", unit),
            (f"{pred.tflops_per_device:.1f}", "TFLOP/s per device"),
            (f"{100 * pred.mfu:.1f}%", "MFU"),
            (f"{pred.memory_gib_per_device:.1f} GiB", "peak memory per device"),
        ]
    return (
        '<div class="cards">'
        + "".join(
            f"<div class=card><b>{html.escape(a)}</b><span>{html.escape(b)}</span></div>"
            for a, b in cards
        )
        + "</div>"
    )


def render_html(plan: Plan, *, cluster: Cluster | None = None) -> str:
    """The report as one HTML document (see the module docstring)."""
    why_not = ""
    if cluster is None:
        cluster, why_not = _load_cluster(plan)
    sections = [
        _timeline_section(plan),
        _memory_section(plan, cluster),
        _cluster_section(plan, cluster, why_not),
        _landscape_section(plan),
        _facts_section(plan, cluster),
    ]
    title = f"autopar plan: {plan.model} on {plan.cluster} ({plan.num_devices} devices)"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="sub">mesh {tuple(plan.mesh.shape)} over {tuple(plan.mesh.dim_names)}'
        + (f"; {html.escape(host_mapping(plan))}" if host_mapping(plan) else "")
        + "</p>"
        + _cards(plan)
        + "".join(s.html() for s in sections)
        + "</main></body></html>\n"
    )


def write_report(plan: Plan, path: str | Path, *, cluster: Cluster | None = None) -> Path:
    """Write the plan's self-contained HTML report to ``path``; returns the path.

    ``cluster`` is the Cluster the plan was searched on; by default it is loaded from
    ``plan.cluster_info`` (the cluster section says so when that fails).
    """
    out = Path(path)
    text = render_html(plan, cluster=cluster)
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write the report ({e.strerror})", file=str(out)) from e
    return out
