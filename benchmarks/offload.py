"""Published single-node offload results next to autopar's prediction, through ``autopar plan``.

The rows (``benchmarks/data/offload/published.csv``, sources and columns in its README) are
single-node runs that only fit with offload: ZeRO-Offload (arXiv 2101.06840) and ZeRO-3 Offload on
one V100-32GB and on one DGX-2, and Fuyou (arXiv 2403.06504) on one RTX 4090 with SSDs. Each row
names where its number was read (``where``). Two kinds of row:

* ``tflops_unknown``: a published TFLOP/s per GPU whose FLOP convention the source does not
  state. Printed next to autopar's model TFLOP/s (forward + backward, recompute not counted) and
  its hardware TFLOP/s (recomputed forward counted); never counted in any statistic.
* ``trainable``: a published capacity claim ("trains a 40B model on one V100"). autopar says
  whether it finds a plan that fits and at what predicted speed.

How a row is priced: through the CLI's entry point (``benchmarks/cli_pricing.py``, the same
path as ``benchmarks/generalization.py``) with flags only: the model as ``gpt:layers=..``, the
row's topology file (``benchmarks/data/offload/topologies``, whose device and host profiles are
in ``benchmarks/data/offload/cost_models``), ``--global-batch``, ``--dtype``, ``--attention``,
and ``--micro-batch-size`` / ``--recompute`` where the row states them. Offload is whatever the
CLI offers: if ``autopar plan`` accepts ``--offload`` the script passes ``--offload auto``,
otherwise it passes nothing and the search uses its default. A row that does not fit prints
``infeasible (exit 3)`` with the memory the search found missing; a row the CLI refuses (exit 2,
e.g. a missing profile) prints the error. The script never stops on a row.

Run: ``python benchmarks/offload.py [--only ID[,ID...]] [--commands] [--time-limit S]``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data" / "offload"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cli_pricing import CliError, CliPlan, command_line, plan_via_cli  # noqa: E402

from autopar.cli import build_parser  # noqa: E402

CSV_PATH = DATA / "published.csv"
METRICS = ("tflops_unknown", "trainable")
ATTENTION = {"unfused": "unfused", "fused": "flash"}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What ``autopar plan`` made of one row: a plan, or the exit code and its message."""

    argv: tuple[str, ...]
    plan: CliPlan | None
    code: int
    message: str
    seconds: float


def read_rows(path: Path = CSV_PATH) -> list[dict[str, str]]:
    """The published rows, as strings (empty = not published)."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["metric"] not in METRICS:
            raise ValueError(f"{path}: row {row['id']}: unknown metric {row['metric']!r}")
    return rows


def model_spec(row: dict[str, str]) -> str:
    """The row's model as ``autopar plan`` takes it (``family:key=value,...``)."""
    if row["family"] != "gpt":
        raise ValueError(f"row {row['id']}: unknown family {row['family']!r}")
    keys = ("layers", "hidden", "heads", "vocab", "seq_len")
    return "gpt:" + ",".join(f"{k}={int(row[k])}" for k in keys)


def cluster_path(row: dict[str, str]) -> str:
    """Shipped topology name or a path relative to the repository."""
    topo = row["topology"]
    return str(ROOT / topo) if topo.endswith((".yaml", ".yml")) else topo


def cli_offload_flags() -> list[str]:
    """``["--offload", "auto"]`` when ``autopar plan`` has that flag, else nothing.

    Asked of the CLI's own parser, so the script picks offload up the day the flag lands.
    """
    probe = ["plan", "m", "--cluster", "c", "--offload", "auto"]
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            build_parser().parse_args(probe)
        except SystemExit:
            return []
    return ["--offload", "auto"]


def row_flags(row: dict[str, str], *, offload: list[str], time_limit: float | None) -> list[str]:
    """Every setting the row states that has a CLI flag, plus the offload flag if any."""
    flags = ["--dtype", row["dtype"]]
    if row["attention_kernel"]:
        flags += ["--attention", ATTENTION[row["attention_kernel"]]]
    if row["micro_batch"]:
        flags += ["--micro-batch-size", str(int(row["micro_batch"]))]
    if row["recompute"]:
        flags += ["--recompute", row["recompute"]]
    if time_limit is not None:
        flags += ["--time-limit", f"{time_limit:g}"]
    return flags + offload


def price(row: dict[str, str], *, offload: list[str], time_limit: float | None) -> Outcome:
    """Run ``autopar plan`` for the row; exit codes become an outcome, never an exception."""
    flags = row_flags(row, offload=offload, time_limit=time_limit)
    t0 = time.perf_counter()
    argv = (
        "plan", model_spec(row), "--cluster", cluster_path(row), "--nodes", "1",
        "--global-batch", row["global_batch"], *flags,
    )  # fmt: skip
    try:
        plan = plan_via_cli(
            model_spec(row), cluster=cluster_path(row), nodes=1,
            global_batch=int(row["global_batch"]), flags=flags,
        )  # fmt: skip
    except CliError as e:
        return Outcome(argv, None, e.code, _first_line(e.stderr), time.perf_counter() - t0)
    return Outcome(plan.argv, plan, 0, "", time.perf_counter() - t0)


def _first_line(stderr: str) -> str:
    """The error line of ``autopar``'s stderr, cut before its suggestions."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("autopar:")]
    text = lines[-1] if lines else (stderr.strip().splitlines() or [""])[-1]
    for prefix in ("autopar: infeasible: ", "autopar: error: "):
        text = text.removeprefix(prefix)
    return text.split(". To make it fit")[0]


def tokens_per_s_per_gpu(plan: CliPlan, row: dict[str, str]) -> float:
    return int(row["global_batch"]) * int(row["seq_len"]) / plan.step_time_s / int(row["gpus"])


def hardware_tflops(plan: CliPlan) -> float:
    """Model TFLOP/s with the recomputed forward counted (what a GPU executes)."""
    compute = plan.breakdown.get("compute", 0.0)
    extra = plan.breakdown.get("recompute", 0.0)
    return plan.tflops_per_device * (compute + extra) / compute if compute > 0 else float("nan")


def where_state_lives(plan: CliPlan) -> str:
    """The plan's offload choice as the plan JSON states it (absent before offload exists)."""
    mode = plan.raw.get("offload")
    if mode is None:
        return "offload: not in the plan format"
    device = plan.raw.get("offload_device", "cpu")
    acts = plan.raw.get("activation_offload_layers") or ()
    text = f"offload {mode}" + (f" ({device})" if mode != "none" else "")
    if "offload" in plan.breakdown:
        text += f", {plan.breakdown['offload']:.2f} s exposed"
    return text + (f", activations of {len(acts)} blocks on host" if acts else "")


def published_text(row: dict[str, str]) -> str:
    if row["metric"] == "trainable":
        text = "trains"
    else:
        text = f"{float(row['published_value']):g} TFLOP/s/GPU (conv. n/s)"
    return text + (f"; {row['published_other']}" if row["published_other"] else "")


def predicted_text(row: dict[str, str], out: Outcome) -> str:
    if out.plan is None:
        kind = {3: "infeasible", 2: "error"}.get(out.code, "failed")
        return f"{kind} (exit {out.code}): {out.message}"
    p = out.plan
    head = "fits: " if row["metric"] == "trainable" else ""
    return (
        f"{head}{p.tflops_per_device:.1f} TFLOP/s model ({hardware_tflops(p):.1f} with recompute), "
        f"{tokens_per_s_per_gpu(p, row):,.0f} tokens/s/GPU, step {p.step_time_s:.2f} s; "
        f"{p.describe()}; {where_state_lives(p)}; {p.memory_gib:.1f} GiB/device"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated row ids")
    ap.add_argument("--commands", action="store_true", help="print each row's autopar command")
    ap.add_argument("--time-limit", type=float, default=None, help="search budget per row, s")
    args = ap.parse_args(argv)
    rows = read_rows()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {r["id"] for r in rows}
        if unknown:
            ap.error(f"unknown row ids {sorted(unknown)}; known: {[r['id'] for r in rows]}")
        rows = [r for r in rows if r["id"] in wanted]
    offload = cli_offload_flags()
    print(
        "autopar plan offload flag: "
        + (" ".join(offload) if offload else "none yet (the search's default is priced)")
    )
    print(f"rows: {CSV_PATH.relative_to(ROOT)}; every row is certain=no (see its notes)\n")
    counts = {"fits": 0, "infeasible": 0, "error": 0}
    for row in rows:
        out = price(row, offload=offload, time_limit=args.time_limit)
        counts["fits" if out.plan else "infeasible" if out.code == 3 else "error"] += 1
        print(f"{row['id']}  [{row['source']}]")
        print(f"  where:     {row['where']}")
        print(
            f"  setup:     {row['gpus']}x {row['gpu']}, {row['family']} {row['params_billion']}B "
            f"({row['layers']} x {row['hidden']}, seq {row['seq_len']}), {row['dtype']}, "
            f"global batch {row['global_batch']}"
            + (f", micro-batch {row['micro_batch']}" if row["micro_batch"] else "")
        )
        print(f"  published: {published_text(row)}")
        print(f"  autopar:   {predicted_text(row, out)}   [{out.seconds:.1f} s]")
        if args.commands:
            print(f"  command:   {command_line(out.argv)}")
        print()
    print(
        f"{len(rows)} rows: {counts['fits']} planned, {counts['infeasible']} infeasible (exit 3), "
        f"{counts['error']} errors"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
