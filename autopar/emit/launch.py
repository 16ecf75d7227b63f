"""``autopar launch plan.json -- train.py [args]``: torchrun with the world size the plan needs.

A thin wrapper, not a launcher: it computes ``--nnodes`` / ``--nproc-per-node`` from the plan
so users never count ranks, then runs ``python -m torch.distributed.run`` (torchrun) or, with
``dry_run``, prints that exact command. The training script finds the plan through the
``AUTOPAR_PLAN`` environment variable (torchrun passes its own ``RANK``/``WORLD_SIZE`` the same
way), so ``examples/train_gpt.py`` needs no arguments.

Nodes: ``nnodes`` if given; otherwise the plan's cluster file (``plan.cluster``) says how many
devices a host has; a cluster that cannot be loaded means a single node, said on stderr.
A multi-node command uses the c10d rendezvous; run the same line on every node with
``MASTER_ADDR`` set to the first node's address.
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

__all__ = ["PLAN_ENV", "torchrun_command", "launch"]

PLAN_ENV = "AUTOPAR_PLAN"
RDZV_PORT = 29500


def _devices_per_host(plan: Plan) -> int | None:
    """Devices per host of the plan's cluster, or None when the cluster file is unavailable."""
    try:
        from autopar.topology.load import load_cluster
    except ImportError:
        return None
    try:
        return int(load_cluster(plan.cluster).devices_per_host)
    except (ConfigError, OSError) as e:
        print(f"autopar launch: cluster {plan.cluster!r} not loaded ({e})", file=sys.stderr)
        return None


def torchrun_command(
    plan: Plan,
    script_argv: Sequence[str],
    *,
    nnodes: int | None = None,
    python: str | None = None,
) -> list[str]:
    """The torchrun argv that runs ``script_argv`` on ``plan.num_devices`` processes."""
    if not script_argv:
        raise ConfigError("no training script given: autopar launch plan.json -- train.py [args]")
    world = plan.num_devices
    if nnodes is None:
        per_host = _devices_per_host(plan)
        if per_host is None or per_host >= world:
            nnodes = 1
        else:
            nnodes = -(-world // per_host)
    if nnodes < 1 or world % nnodes:
        raise ConfigError(
            f"{world} ranks do not split evenly over nnodes={nnodes}",
            field="nnodes",
            allowed=[n for n in range(1, world + 1) if world % n == 0],
        )
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        cmd += ["--standalone", "--nnodes=1"]
    else:
        cmd += [
            f"--nnodes={nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=${{MASTER_ADDR}}:{RDZV_PORT}",
            "--rdzv-id=autopar",
        ]
    cmd.append(f"--nproc-per-node={world // nnodes}")
    return cmd + list(script_argv)


def launch(
    plan_path: str | Path,
    script_argv: Sequence[str],
    *,
    nnodes: int | None = None,
    dry_run: bool = False,
) -> int:
    """Run (or with ``dry_run`` print) torchrun for the plan; returns the exit code."""
    path = Path(plan_path).resolve()
    plan = Plan.from_json(path)
    cmd = torchrun_command(plan, script_argv, nnodes=nnodes)
    if dry_run:
        # quote every argument but leave ${MASTER_ADDR} for the shell to expand
        shown = " ".join(
            c.replace("${MASTER_ADDR}", '"${MASTER_ADDR}"')
            if "${MASTER_ADDR}" in c
            else shlex.quote(c)
            for c in cmd
        )
        print(f"{PLAN_ENV}={shlex.quote(str(path))} {shown}")
        return 0
    env = dict(os.environ)
    env[PLAN_ENV] = str(path)
    if any("${MASTER_ADDR}" in c for c in cmd):
        if "MASTER_ADDR" not in env:
            raise ConfigError("multi-node launch needs MASTER_ADDR (the first node's address)")
        cmd = [c.replace("${MASTER_ADDR}", env["MASTER_ADDR"]) for c in cmd]
    return subprocess.run(cmd, env=env, check=False).returncode
