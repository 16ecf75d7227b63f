"""Price a published run the way a user would: through ``autopar plan`` with flags.

The benchmarks call the CLI's own entry point (``autopar.cli.main``) with ``--json`` to a
temporary file and read the plan back. The rule: a setting a user cannot state with a flag
does not exist for a benchmark. So every row's software stack (``--stack``, ``--attention``,
``--sequence-parallel``, ``--overlap-grad-reduce``) and published degrees (``--tp --pp --dp
--micro-batch-size --recompute --zero --schedule``) are flags; what the source does not publish
is left to the search, the same rule for every row.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopar.cli import main as cli_main

__all__ = ["CliPlan", "CliError", "plan_via_cli", "command_line"]


class CliError(RuntimeError):
    """``autopar plan`` exited with an error; the message is its stderr."""

    def __init__(self, code: int, stderr: str) -> None:
        super().__init__(
            f"exit {code}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}"
        )
        self.code = code
        self.stderr = stderr


@dataclass(frozen=True, slots=True)
class CliPlan:
    """What a benchmark reads from the plan JSON ``autopar plan --json`` wrote."""

    argv: tuple[str, ...]
    step_time_s: float
    mfu: float
    tflops_per_device: float
    memory_gib: float
    parallel: dict[str, int]
    micro_batch_size: int
    microbatches: int
    schedule: str
    virtual_stages: int
    zero_stage: int
    recompute: str
    sequence_parallel: bool
    stack: dict[str, Any]
    breakdown: dict[str, float]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def describe(self) -> str:
        p = self.parallel
        v = f" v{self.virtual_stages}" if self.virtual_stages > 1 else ""
        sp = " sp" if self.sequence_parallel else ""
        return (
            f"dp{p['dp']} tp{p['tp']} pp{p['pp']} b{self.micro_batch_size} {self.schedule}{v} "
            f"z{self.zero_stage} rc={self.recompute}{sp}"
        )


def command_line(argv: list[str] | tuple[str, ...]) -> str:
    """The shell command equivalent to ``argv`` (printed so any row can be re-run by hand)."""
    return "autopar " + " ".join(shlex.quote(a) for a in argv)


def plan_via_cli(
    model: str,
    *,
    cluster: str,
    nodes: int,
    global_batch: int,
    flags: list[str],
) -> CliPlan:
    """Run ``autopar plan MODEL --cluster C --nodes N --global-batch B FLAGS --json tmp``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        argv = [
            "plan", model, "--cluster", cluster, "--nodes", str(nodes),
            "--global-batch", str(global_batch), *flags, "--quiet", "--top", "0",
        ]  # fmt: skip
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = cli_main([*argv, "--json", str(out)])
        if code != 0:
            raise CliError(code, err.getvalue())
        d = json.loads(out.read_text())
    pred = d["predicted"]
    return CliPlan(
        argv=tuple(argv),
        step_time_s=float(pred["step_time_s"]),
        mfu=float(pred["mfu"]),
        tflops_per_device=float(pred["tflops_per_device"]),
        memory_gib=float(pred["memory_gib_per_device"]),
        parallel=dict(d["parallel"]),
        micro_batch_size=int(d["micro_batch_size"]),
        microbatches=int(d["microbatches"]),
        schedule=str(d["schedule"]),
        virtual_stages=int(d.get("virtual_stages") or 1),
        zero_stage=int(d["zero_stage"]),
        recompute=str(d["recompute"]),
        sequence_parallel=bool(d["sequence_parallel"]),
        stack=dict(d.get("stack") or {}),
        breakdown={k: float(v) for k, v in pred["breakdown"].items()},
        raw=d,
    )
