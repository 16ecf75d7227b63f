"""``autopar launch``: the layout comes from the plan's cluster, overrides are checked against
the plan, and the per-node lines really form one job with ranks laid out by node."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace

import pytest

from autopar.emit.launch import RDZV_PORT, node_layout, torchrun_command, torchrun_commands
from autopar.errors import ConfigError
from autopar.plan import ClusterInfo
from tests.emit.workers import make_plan


def _on(nodes: int, per_host: int):
    """A valid dp-only plan made on ``nodes`` hosts x ``per_host`` devices."""
    world = nodes * per_host
    plan = make_plan(layers=2, dp=world)
    info = ClusterInfo(name="pod", nodes=nodes, devices_per_host=per_host, device="cpu")
    plan = replace(plan, cluster_info=info, global_batch=world, microbatches=1, micro_batch_size=1)
    plan.validate()
    return plan


def test_layout_comes_from_the_plans_cluster():
    assert node_layout(_on(2, 8)) == (2, 8)
    assert node_layout(_on(1, 4)) == (1, 4)


def test_a_plan_without_cluster_info_runs_on_one_node(capsys):
    assert node_layout(make_plan(layers=2, dp=4)) == (1, 4)
    assert "cluster_info" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kw, layout",
    [({"nnodes": 4}, (4, 4)), ({"nproc_per_node": 2}, (8, 2)),
     ({"nnodes": 1, "nproc_per_node": 16}, (1, 16))],
)  # fmt: skip
def test_overrides_that_multiply_to_the_world_are_used_and_said(kw, layout, capsys):
    assert node_layout(_on(2, 8), **kw) == layout
    assert "priced for 2 host(s) x 8" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kw, flag",
    [({"nnodes": 3}, "--nnodes"), ({"nproc_per_node": 3}, "--nproc-per-node"),
     ({"nnodes": 2, "nproc_per_node": 4}, "--nnodes"), ({"nnodes": 0}, "--nnodes"),
     ({"nnodes": True}, "--nnodes")],
)  # fmt: skip
def test_overrides_against_the_plan_are_refused_naming_the_flag(kw, flag):
    with pytest.raises(ConfigError) as info:
        node_layout(_on(2, 8), **kw)
    assert info.value.field == flag


def test_one_line_per_node_with_its_rank():
    lines = torchrun_commands(_on(2, 8), ["train.py"], python="python")
    assert len(lines) == 2
    for rank, cmd in enumerate(lines):
        assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
        assert f"--node-rank={rank}" in cmd and "--nnodes=2" in cmd
        assert "--rdzv-backend=static" in cmd and "--nproc-per-node=8" in cmd
        assert cmd[-1] == "train.py"
    (single,) = torchrun_commands(_on(1, 8), ["train.py"], python="python")
    assert "--standalone" in single and "--nproc-per-node=8" in single
    with pytest.raises(ConfigError) as info:
        torchrun_command(_on(2, 8), ["train.py"], node_rank=2)
    assert info.value.field == "--node-rank"


# one write per line (shorter than PIPE_BUF, so atomic): the two ranks of a node share a pipe
SCRIPT = """
import os
import sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.tensor([dist.get_rank()])
dist.all_reduce(t)
sys.stdout.write(f"node {os.environ['GROUP_RANK']} rank {dist.get_rank()} of "
                 f"{dist.get_world_size()} sum {int(t)} plan {os.environ.get('AUTOPAR_PLAN')}\\n")
sys.stdout.flush()
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_per_node_lines_form_one_job_with_ranks_laid_out_by_node(tmp_path):
    """Both node lines on this host (MASTER_ADDR = localhost): node i runs ranks 2i, 2i + 1."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "AUTOPAR_PLAN": "plan.json",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = []
    for cmd in torchrun_commands(_on(2, 2), [str(script)], python=sys.executable):
        cmd = [c.replace("${MASTER_ADDR}", "127.0.0.1").replace(str(RDZV_PORT), str(port))
               for c in cmd]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        finally:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    for node, out in enumerate(outs):
        lines = sorted(line for line in out.splitlines() if line.startswith("node "))
        assert lines == [
            f"node {node} rank {2 * node + r} of 4 sum 6 plan plan.json" for r in range(2)
        ], out
