"""``autopar launch plan.json -- train.py [args]``: torchrun laid out the way the plan was priced.

A thin wrapper, not a launcher: it takes ``--nnodes`` / ``--nproc-per-node`` from the cluster the
plan was searched on (``plan.cluster_info``: hosts and devices per host, recorded by the search;
the topology is never re-loaded), so users never count ranks, then runs
``python -m torch.distributed.run`` (torchrun) or, with ``dry_run``, prints the exact command.
The training script finds the plan through the ``AUTOPAR_PLAN`` environment variable (torchrun
passes its own ``RANK``/``WORLD_SIZE`` the same way), so ``examples/train_gpt.py`` needs no
arguments.

Multi-node: the dry run prints one line per node, node ``i`` with ``--node-rank=i`` and the
static rendezvous at ``${MASTER_ADDR}:29500`` (node 0's address), so node ``i`` runs global
ranks ``i * nproc .. (i + 1) * nproc - 1``: exactly the row-major layout the plan's host mapping
priced (tp innermost, inside a host). Launching for real, ``node_rank`` picks that node's line;
without it every node runs the same c10d-rendezvous line (ranks stay contiguous per node, the
order of nodes is the rendezvous's).

``nnodes`` / ``nproc_per_node`` override the plan's layout; they must multiply to the plan's
device count (``ConfigError`` naming the flag otherwise). A layout other than the priced one
(e.g. one CPU host running a 2-host plan) is allowed with a note on stderr.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from autopar.errors import ConfigError
from autopar.plan import Plan

__all__ = [
    "PLAN_ENV",
    "RDZV_PORT",
    "node_layout",
    "torchrun_command",
    "torchrun_commands",
    "launch",
]

PLAN_ENV = "AUTOPAR_PLAN"
RDZV_PORT = 29500


def _positive(value: object, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"must be a positive integer, got {value!r}", field=flag)
    return value


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n <= 4096 else []


def node_layout(
    plan: Plan, *, nnodes: int | None = None, nproc_per_node: int | None = None
) -> tuple[int, int]:
    """``(nodes, processes per node)`` for the plan: the plan's own cluster unless overridden.

    Overrides must multiply to ``plan.num_devices`` (``ConfigError`` naming the flag); one that
    differs from the cluster the plan was priced on is allowed and said on stderr.
    """
    world = plan.num_devices
    info = plan.cluster_info
    if nnodes is None and nproc_per_node is None:
        if info is not None:
            return info.nodes, info.devices_per_host
        print(
            "autopar launch: the plan records no cluster layout (cluster_info); launching "
            f"{world} processes on one node (pass --nnodes to spread them)",
            file=sys.stderr,
        )
        return 1, world
    if nnodes is not None:
        nnodes = _positive(nnodes, "--nnodes")
    if nproc_per_node is not None:
        nproc_per_node = _positive(nproc_per_node, "--nproc-per-node")
    if nnodes is not None and nproc_per_node is not None:
        if nnodes * nproc_per_node != world:
            raise ConfigError(
                f"--nnodes={nnodes} x --nproc-per-node={nproc_per_node} = "
                f"{nnodes * nproc_per_node} processes but the plan has {world} ranks",
                field="--nnodes",
            )
    elif nnodes is not None:
        if world % nnodes:
            raise ConfigError(
                f"the plan's {world} ranks do not split evenly over nnodes={nnodes}",
                field="--nnodes",
                allowed=_divisors(world),
            )
        nproc_per_node = world // nnodes
    else:
        assert nproc_per_node is not None
        if world % nproc_per_node:
            raise ConfigError(
                f"the plan's {world} ranks do not split evenly into nproc_per_node="
                f"{nproc_per_node} per node",
                field="--nproc-per-node",
                allowed=_divisors(world),
            )
        nnodes = world // nproc_per_node
    if info is not None and (nnodes, nproc_per_node) != (info.nodes, info.devices_per_host):
        print(
            f"autopar launch: note: the plan was priced for {info.nodes} host(s) x "
            f"{info.devices_per_host} devices ({info.name}); launching {nnodes} x "
            f"{nproc_per_node} places its mesh axes on other links than priced",
            file=sys.stderr,
        )
    return nnodes, nproc_per_node


def torchrun_command(
    plan: Plan,
    script_argv: Sequence[str],
    *,
    nnodes: int | None = None,
    nproc_per_node: int | None = None,
    node_rank: int | None = None,
    python: str | None = None,
) -> list[str]:
    """The torchrun argv that runs ``script_argv`` as ``plan.num_devices`` processes.

    Multi-node: with ``node_rank`` that node's line (static rendezvous, ranks laid out by node);
    without it the line every node can run (c10d rendezvous).
    """
    _need_script(script_argv)
    nodes, per_node = node_layout(plan, nnodes=nnodes, nproc_per_node=nproc_per_node)
    return _argv(nodes, per_node, node_rank, script_argv, python)


def _need_script(script_argv: Sequence[str]) -> None:
    if not script_argv:
        raise ConfigError("no training script given: autopar launch plan.json -- train.py [args]")


def _argv(
    nodes: int, per_node: int, node_rank: int | None, script_argv: Sequence[str], python: str | None
) -> list[str]:
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    endpoint = f"--rdzv-endpoint=${{MASTER_ADDR}}:{RDZV_PORT}"
    if nodes == 1:
        cmd += ["--standalone", "--nnodes=1"]
    elif node_rank is None:
        cmd += [f"--nnodes={nodes}", "--rdzv-backend=c10d", endpoint, "--rdzv-id=autopar"]
    else:
        if isinstance(node_rank, bool) or not isinstance(node_rank, int):
            raise ConfigError(f"must be an integer, got {node_rank!r}", field="--node-rank")
        if not 0 <= node_rank < nodes:
            raise ConfigError(
                f"node rank {node_rank} but the launch has {nodes} nodes",
                field="--node-rank",
                allowed=range(nodes),
            )
        cmd += [f"--nnodes={nodes}", f"--node-rank={node_rank}", "--rdzv-backend=static", endpoint]
    cmd.append(f"--nproc-per-node={per_node}")
    return cmd + list(script_argv)


def torchrun_commands(
    plan: Plan,
    script_argv: Sequence[str],
    *,
    nnodes: int | None = None,
    nproc_per_node: int | None = None,
    python: str | None = None,
) -> list[list[str]]:
    """One torchrun argv per node (node ``i`` at ``--node-rank=i``); one line on one node."""
    _need_script(script_argv)
    nodes, per_node = node_layout(plan, nnodes=nnodes, nproc_per_node=nproc_per_node)
    if nodes == 1:
        return [_argv(1, per_node, None, script_argv, python)]
    return [_argv(nodes, per_node, i, script_argv, python) for i in range(nodes)]


def _shown(cmd: Sequence[str]) -> str:
    """Quote every argument but leave ${MASTER_ADDR} for the shell to expand."""
    return " ".join(
        c.replace("${MASTER_ADDR}", '"${MASTER_ADDR}"') if "${MASTER_ADDR}" in c else shlex.quote(c)
        for c in cmd
    )


def launch(
    plan_path: str | Path,
    script_argv: Sequence[str],
    *,
    nnodes: int | None = None,
    nproc_per_node: int | None = None,
    node_rank: int | None = None,
    dry_run: bool = False,
) -> int:
    """Run (or with ``dry_run`` print, one line per node) torchrun for the plan; returns the
    exit code. The plan is read with ``Plan.from_json``, so an inconsistent plan is refused
    (``ConfigError`` naming the field) before anything starts."""
    path = Path(plan_path).resolve()
    plan = Plan.from_json(path)
    env_prefix = f"{PLAN_ENV}={shlex.quote(str(path))}"
    if dry_run:
        if node_rank is not None:
            cmds = [torchrun_command(plan, script_argv, nnodes=nnodes,
                                     nproc_per_node=nproc_per_node, node_rank=node_rank)]  # fmt: skip
        else:
            cmds = torchrun_commands(
                plan, script_argv, nnodes=nnodes, nproc_per_node=nproc_per_node
            )
        if len(cmds) > 1 or node_rank is not None:
            print(
                f"autopar launch: run line i on host i (node 0 first), with MASTER_ADDR set to "
                f"node 0's address and {path} present on every host",
                file=sys.stderr,
            )
        for cmd in cmds:
            print(f"{env_prefix} {_shown(cmd)}")
        return 0
    cmd = torchrun_command(
        plan, script_argv, nnodes=nnodes, nproc_per_node=nproc_per_node, node_rank=node_rank
    )
    env = dict(os.environ)
    env[PLAN_ENV] = str(path)
    if any("${MASTER_ADDR}" in c for c in cmd):
        if "MASTER_ADDR" not in env:
            raise ConfigError(
                "multi-node launch needs MASTER_ADDR (the first node's address)",
                field="MASTER_ADDR",
            )
        cmd = [c.replace("${MASTER_ADDR}", env["MASTER_ADDR"]) for c in cmd]
    return subprocess.run(cmd, env=env, check=False).returncode
