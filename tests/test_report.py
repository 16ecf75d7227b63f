"""The HTML plan report: what it draws, that it is self-contained, and that Chromium renders it.

The browser test renders the report of a searched GPT-3 175B plan in Debian's headless Chromium
(``.ci/run`` installs it) and checks the console, the DOM and the screenshot; it is skipped, with
the reason, where no Chromium is installed.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

import autopar  # noqa: E402
from autopar.errors import ConfigError  # noqa: E402
from autopar.explain import why  # noqa: E402
from autopar.plan import Plan  # noqa: E402
from autopar.report import (  # noqa: E402
    cluster_view,
    link_traffic,
    plan_groups,
    plan_timeline,
    render_html,
    write_report,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
)  # fmt: skip


@pytest.fixture(scope="module")
def gpt3():
    """A searched GPT-3 175B plan on 128 DGX A100 (Megatron-LM's setting) and its cluster."""
    cluster = autopar.load_cluster("dgx-a100", nodes=128)
    plan = autopar.search(
        autopar.models.build("gpt3-175b"), cluster, autopar.TrainingConfig(global_batch=1536),
        progress=False,
    )  # fmt: skip
    return plan, cluster


@pytest.fixture(scope="module")
def gpt3_html(gpt3, tmp_path_factory):
    plan, cluster = gpt3
    path = write_report(plan, tmp_path_factory.mktemp("report") / "plan.html", cluster=cluster)
    return path, path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# content
# ---------------------------------------------------------------------------------------------
def test_one_timeline_row_and_one_memory_bar_per_pipeline_rank(gpt3, gpt3_html):
    plan, _ = gpt3
    _, text = gpt3_html
    pp = plan.parallel.pp
    assert pp > 1
    assert sorted(re.findall(r'id="timeline-row-(\d+)"', text)) == sorted(map(str, range(pp)))
    assert len(re.findall(r'id="memory-rank-\d+-weights"', text)) == pp
    assert f'data-pipeline-ranks="{pp}"' in text
    # forwards and backwards drawn on every rank
    for r in range(pp):
        assert f'id="timeline-r{r}-F"' in text and f'id="timeline-r{r}-B"' in text


def test_the_page_fetches_nothing(gpt3_html):
    _, text = gpt3_html

    class Refs(HTMLParser):
        def __init__(self):
            super().__init__()
            self.refs, self.tags = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.refs += [v for k, v in attrs if k in ("src", "href", "xlink:href") and v]

    parser = Refs()
    parser.feed(text)
    assert parser.refs, "the SVGs reference their own clip paths and glyphs"
    assert all(v.startswith(("#", "data:")) for v in parser.refs), {
        v for v in parser.refs if not v.startswith(("#", "data:"))
    }
    assert "script" not in parser.tags and "@import" not in text
    assert re.findall(r"url\((?!#)", text) == []
    assert parser.tags.count("svg") >= 4  # timeline, memory, cluster, landscape


def test_the_simulation_is_compared_with_the_price(gpt3, gpt3_html):
    plan, _ = gpt3
    _, text = gpt3_html
    tl = plan_timeline(plan)
    priced = plan.predicted.step_time_s
    assert f'data-simulated-s="{tl.makespan_s:.6g}"' in text
    assert f'data-priced-s="{priced:.6g}"' in text
    # the simulation is the same model: its makespan is within a few percent of the price
    assert abs(tl.makespan_s - priced) < 0.05 * priced
    assert ("agrees with" in text) == (abs(tl.makespan_s - priced) <= 1e-3 * priced)
    # the tail of every rank starts after its last backward and that backward's send (a
    # send holds its sender, as the search prices it)
    for r, tail in enumerate(plan.predicted.rank_tail_s):
        mine = [e for e in tl.events if e.rank == r]
        t = [e for e in mine if e.kind == "tail"]
        assert len(t) == 1 and t[0].end_s - t[0].start_s == pytest.approx(tail)
        assert t[0].start_s == pytest.approx(max(e.end_s for e in mine if e.kind in ("B", "send")))


def test_landscape_marks_the_chosen_shape_and_says_why_runners_up_lost(gpt3, gpt3_html):
    plan, _ = gpt3
    _, text = gpt3_html
    p = plan.parallel
    assert f'id="landscape-dp{p.dp}-tp{p.tp}-pp{p.pp}-compute"' in text
    assert plan.alternatives
    for a in plan.alternatives:
        reason = why(a, plan.predicted.step_time_s, plan.predicted.breakdown)
        assert reason.replace("+", "") in text.replace("+", "")


def test_facts_list_stack_solver_and_unknown_ops(gpt3):
    plan, cluster = gpt3
    plan = dataclasses.replace(plan, unknown_ops={"aten.weird_op.default": 3})
    text = render_html(plan, cluster=cluster)
    assert "aten.weird_op.default" in text
    assert f"<td>{plan.stack.attention}</td>" in text
    for key in ("time_s", "candidates_priced"):
        assert f"<td>{key}</td><td>{plan.solver[key]}</td>" in text


def test_facts_list_weights_tp_cannot_split(gpt3):
    plan, cluster = gpt3
    assert "Whole on every tp rank" not in render_html(plan, cluster=cluster)
    plan = dataclasses.replace(plan, indivisible_params={"tok_embed.weight": (50257, 12288)})
    text = render_html(plan, cluster=cluster)
    assert f"Whole on every tp rank (a dimension does not divide by tp={plan.parallel.tp})" in text
    assert "<td>tok_embed.weight</td><td>50257 x 12288</td>" in text


def test_a_plan_read_back_from_json_gives_the_same_page(gpt3, gpt3_html):
    plan, cluster = gpt3
    _, text = gpt3_html
    again = Plan.from_json(plan.to_json())
    assert render_html(again, cluster=cluster) == text


def test_tp_traffic_stays_in_hosts_and_dp_pp_traffic_crosses_them(gpt3):
    plan, cluster = gpt3
    view = cluster_view(cluster, plan)
    load = link_traffic(view, plan)
    host = {n: d.get("host") for n, d in view.nodes(data=True)}

    def inside(edge):
        a, b = edge
        return host[a] is not None and host[a] == host[b]

    tp = [e for e, per in load.items() if "tp" in per]
    cross = [e for e, per in load.items() if {"dp", "pp"} & set(per)]
    assert tp and all(inside(e) for e in tp)
    # dp (64 ranks over 32 hosts) and pp (4 stages on 4 hosts) are limited by the network
    assert cross and not any("nvswitch" in a or "nvswitch" in b for a, b in cross)
    assert any(host[a] is None or host[b] is None for a, b in cross)  # leaf / spine links
    # the busiest link leaving a host carries the axis the breakdown weighs most of the two
    b = plan.predicted.breakdown
    heaviest = "pp" if b.pp_comm > b.dp_comm + b.overlapped_comm else "dp"
    busiest = max(cross, key=lambda e: sum(load[e].values()))
    assert heaviest in load[busiest]


def test_groups_are_row_major_over_pp_dp_tp(gpt3):
    plan, _ = gpt3
    p = plan.parallel
    groups = plan_groups(plan)
    for axis, size in (("pp", p.pp), ("dp", p.dp), ("tp", p.tp)):
        ranks = sorted(r for g in groups[axis] for r in g)
        assert ranks == list(range(p.world_size)) and all(len(g) == size for g in groups[axis])
    assert groups["tp"][0] == tuple(range(p.tp))
    # the plan's stages hold the ranks of one pipeline position each (chunk c on rank c % pp)
    for c, stage in enumerate(plan.stages):
        assert set(stage.devices) == {g[c % p.pp] for g in groups["pp"]}


def test_a_plan_without_stage_costs_still_renders(gpt3):
    plan, cluster = gpt3
    bare = dataclasses.replace(plan, predicted=dataclasses.replace(plan.predicted, stages=()))
    with pytest.raises(ConfigError, match="per-stage costs"):
        plan_timeline(bare)
    text = render_html(bare, cluster=cluster)
    assert "re-run" in text and 'id="timeline-row-' not in text
    assert 'id="memory-rank-0-weights"' in text


def test_a_1f1b_plan_without_a_known_cluster(tmp_path):
    plan = autopar.search(
        autopar.models.build("gpt3-125m"), autopar.load_cluster("dgx-a100", nodes=2),
        autopar.TrainingConfig(global_batch=64), progress=False,
        fixed={"pp": 2, "schedule": "1f1b"},
    )  # fmt: skip
    info = dataclasses.replace(plan.cluster_info, name="no-such-topology")
    path = write_report(dataclasses.replace(plan, cluster_info=info), tmp_path / "r.html")
    text = path.read_text()
    assert len(re.findall(r'id="timeline-row-\d+"', text)) == 2
    assert "cannot load cluster" in text and 'id="svg-cluster"' not in text


# ---------------------------------------------------------------------------------------------
# in a browser
# ---------------------------------------------------------------------------------------------
def chromium(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def console_messages(stderr: str) -> list[str]:
    """Console output the page produced (Chromium logs it as ``INFO:CONSOLE``); the report has
    no script, so any message is an error (a failed load, a parse error, a blocked request)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def screenshot(url: str, tmp: Path, png: Path, size: str) -> list[str]:
    run = chromium(url, tmp, "--enable-logging=stderr", "--v=0", f"--screenshot={png}",
                   f"--window-size={size}")  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return console_messages(run.stderr)


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run does)"
)


@needs_chromium
def test_the_console_check_catches_errors(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                    "<script>notDefined();</script></body></html>")  # fmt: skip
    errors = screenshot(page.as_uri(), tmp_path, tmp_path / "bad.png", "400,300")
    assert any("notDefined" in line for line in errors)


@needs_chromium
def test_gpt3_report_renders_in_headless_chromium(gpt3, gpt3_html, tmp_path):
    plan, _ = gpt3
    path, _ = gpt3_html
    png = tmp_path / "report.png"
    errors = screenshot(path.as_uri(), tmp_path, png, "1280,4000")
    assert errors == []
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (1280, 4000)
        colours = im.convert("RGB").resize((320, 1000)).getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 50  # drawn charts, not a blank page
    # the browser's DOM: one timeline row per pipeline rank, every chart parsed as SVG
    dom = chromium(path.as_uri(), tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    rows = re.findall(r'<g id="timeline-row-(\d+)"', dom.stdout)
    assert sorted(map(int, rows)) == list(range(plan.parallel.pp))
    assert len(re.findall(r"<svg ", dom.stdout)) >= 4


def test_a_one_gpu_offload_plan_renders_with_its_host_memory(tmp_path):
    """One device on a CPU root port (no PCIe switch) and model state in host memory: the
    cluster drawing and the memory section still render, and say where the bytes are."""
    cluster = autopar.load_cluster("workstation-4090", nodes=1)
    plan = autopar.search(
        autopar.models.build("gpt3-13b"), cluster, autopar.TrainingConfig(global_batch=16),
        progress=False,
    )  # fmt: skip
    assert plan.offload != "none"
    text = write_report(plan, tmp_path / "plan.html", cluster=cluster).read_text()
    assert "host memory" in text.lower()
