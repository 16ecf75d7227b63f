"""Held-out check: published training runs priced through ``autopar plan``, never tuned on.

``benchmarks/megatron.py`` checks the model on the Megatron-LM SC21 tables in ``shared/``; this
script checks that the same constants generalise to other papers, models, clusters and GPUs.
The rows live in ``benchmarks/data/published_training.csv`` (sources and columns in
``benchmarks/data/README.md``): Korthikanti et al. 2022 (selective recompute and sequence
parallelism, GPT 22B-1T on Selene), MT-NLG 530B (Selene, up to 3360 GPUs), BLOOM-176B (Jean Zay:
four 100 Gb/s Omni-Path NICs per node instead of eight 200 Gb/s InfiniBand), Llama 3 405B (H100,
Meta's RoCE cluster, 8K and 16K GPUs), NeMo-Megatron's GPT-3 175B on 16-128 DGX A100 nodes,
FlashAttention-2's end-to-end GPT 1.3B / 2.7B on 8 A100s, and, printed but excluded from the
statistics, OPT-175B
(FLOP convention and batch not published) and two NeMo H100 FP8 runs (autopar has no FP8).
The two cluster files in ``benchmarks/data/topologies`` are written from the papers' hardware
descriptions.

How a row is priced: through the CLI's entry point (``benchmarks/cli_pricing.py``) with flags
only. The row's software stack: ``--attention`` from ``attention_kernel`` (``unfused``: the
score tensor materialised, Megatron-LM / Megatron-DeepSpeed 2021-22; ``fused``: FlashAttention,
``--attention flash``), ``--sequence-parallel on|off`` from ``sequence_parallel`` and
``--overlap-grad-reduce on|off`` from ``overlap_grad_reduce``, ``--grad-dtype`` from
``grad_dtype`` and ``--pipeline-scatter-gather on|off`` from ``pipeline_scatter_gather`` (the
framework's pipeline sends: Megatron-LM's split over tp, or DeepSpeed's whole) where the source
states them or its framework fixes them. Its
published degrees: ``--tp --pp --dp --micro-batch-size --schedule --virtual-stages --recompute
--zero``. What is not published is left to the search, the same rule for every row. If the CLI
cannot form the published configuration, pins are released in a fixed order (chunks per device,
schedule, recompute, ZeRO) and the row says so.

Like with like (the ``metric`` column):

* ``iter_time_s``: the source publishes the iteration time. The error is on throughput,
  ``T_published / T_predicted - 1``, independent of any FLOP-counting convention.
* ``tflops_model``: the source publishes model-FLOP TFLOP/s (MFU in the sense of Chowdhery et
  al., no recompute). The prediction is ``F / (T_predicted · gpus)`` with
  ``F = B · s · (6 · N + 12 · l · h · s)`` (PaLM's appendix B count, N all parameters).
* ``tokens_per_s_per_gpu``: ``B · s / (T_predicted · gpus)``, convention-free like iteration time.
* ``tflops_unknown``: the FLOP convention is not published; compared with autopar's own model
  TFLOP/s and flagged, never counted in the statistics.

``--second-cluster``: not used here (rows name their own clusters).

Run: ``python benchmarks/generalization.py [--only ID[,ID...]] [--commands]``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cli_pricing import CliError, CliPlan, command_line, plan_via_cli  # noqa: E402

CSV_PATH = DATA / "published_training.csv"
#: CSV column -> CLI flag, for the integer degrees the source publishes
INT_FLAGS = (("tp", "--tp"), ("pp", "--pp"), ("dp", "--dp"), ("micro_batch", "--micro-batch-size"),
             ("zero", "--zero"))  # fmt: skip
ATTENTION = {"unfused": "unfused", "fused": "flash"}
ON_OFF = {"true": "on", "false": "off"}
#: pins released, in this order, when the CLI cannot form the published configuration
RELEASE = ("--virtual-stages", "--schedule", "--recompute", "--zero")


def read_rows(path: Path = CSV_PATH) -> list[dict[str, str]]:
    """The published rows, as strings (empty = not published)."""
    with path.open() as f:
        return list(csv.DictReader(f))


def model_spec(row: dict[str, str]) -> str:
    """The row's model as ``autopar plan`` takes it (``family:key=value,...``)."""
    keys = ["layers", "hidden", "heads", "ffn_hidden", "vocab", "seq_len"]
    if row["family"] == "llama":
        keys.insert(3, "kv_heads")
    elif row["family"] != "gpt":
        raise ValueError(f"unknown family {row['family']!r}")
    return f"{row['family']}:" + ",".join(f"{k}={int(row[k])}" for k in keys)


def cluster_name(row: dict[str, str]) -> str:
    """Shipped topology name or a path relative to the repository."""
    topo = row["topology"]
    return str(ROOT / topo) if topo.endswith((".yaml", ".yml")) else topo


def stack_flags(row: dict[str, str]) -> list[str]:
    """The row's software stack, as far as its source states it."""
    flags = ["--attention", ATTENTION[row["attention_kernel"]]]
    if row["sequence_parallel"]:
        flags += ["--sequence-parallel", ON_OFF[row["sequence_parallel"]]]
    if row["overlap_grad_reduce"]:
        flags += ["--overlap-grad-reduce", ON_OFF[row["overlap_grad_reduce"]]]
    if row["grad_dtype"]:
        flags += ["--grad-dtype", row["grad_dtype"]]
    if row["pipeline_scatter_gather"]:
        flags += ["--pipeline-scatter-gather", ON_OFF[row["pipeline_scatter_gather"]]]
    return flags


def degree_flags(row: dict[str, str]) -> list[str]:
    """Every published degree and setting that has a CLI flag."""
    flags: list[str] = []
    for col, flag in INT_FLAGS:
        if row[col]:
            flags += [flag, str(int(row[col]))]
    if row["schedule"]:
        flags += ["--schedule", row["schedule"]]
    if row["virtual_stages"] and row["schedule"] == "interleaved_1f1b":
        flags += ["--virtual-stages", str(int(row["virtual_stages"]))]
    if row["recompute"]:
        flags += ["--recompute", row["recompute"]]
    return flags


def unpriceable_reason(row: dict[str, str]) -> str | None:
    """Why a row cannot be priced by this model at all (a modelling gap, stated, not hidden)."""
    if row["cp"] and int(row["cp"]) > 1:
        return f"context parallelism cp={row['cp']} is not modelled"
    return None


def priced_dtype(row: dict[str, str]) -> str:
    """The training dtype priced: autopar has no FP8 training, so FP8 rows are priced in BF16."""
    return "bf16" if row["dtype"] == "fp8" else row["dtype"]


def param_count(row: dict[str, str]) -> float:
    from autopar.models import parse_model_spec

    model = parse_model_spec(model_spec(row))
    return float(sum(p.numel() for p in model.parameters()))


def palm_model_flops(*, row: dict[str, str], params: float) -> float:
    """Model FLOPs per step, Chowdhery et al. (PaLM, appendix B): tokens · (6N + 12·l·h·s)."""
    b, s = int(row["global_batch"]), int(row["seq_len"])
    ell, h = int(row["layers"]), int(row["hidden"])
    return b * s * (6.0 * params + 12.0 * ell * h * s)


def predicted_metric(plan: CliPlan, *, row: dict[str, str]) -> float:
    """The prediction in the unit the source publishes (see the module docstring)."""
    t = plan.step_time_s
    if row["metric"] == "iter_time_s":
        return t
    if row["metric"] == "tflops_model":
        return palm_model_flops(row=row, params=param_count(row)) / (t * int(row["gpus"])) / 1e12
    if row["metric"] == "tokens_per_s_per_gpu":
        return int(row["global_batch"]) * int(row["seq_len"]) / (t * int(row["gpus"]))
    return plan.tflops_per_device


def throughput_error_pct(*, row: dict[str, str], published: float, predicted: float) -> float:
    """Signed error on throughput: positive = autopar predicts faster than measured."""
    if row["metric"] == "iter_time_s":
        return 100.0 * (published / predicted - 1.0)
    return 100.0 * (predicted / published - 1.0)


def price_published(row: dict[str, str]) -> tuple[CliPlan, list[str]]:
    """The published configuration through the CLI; pins the CLI cannot form are released in
    ``RELEASE`` order (same rule for every row). Returns the plan and what was released."""
    flags = ["--dtype", priced_dtype(row), "--optimizer", "adam", *stack_flags(row),
             *degree_flags(row)]  # fmt: skip
    kw: dict[str, Any] = dict(
        cluster=cluster_name(row), nodes=int(row["gpus"]) // 8,
        global_batch=int(row["global_batch"]),
    )  # fmt: skip
    relaxed: list[str] = []
    while True:
        try:
            return plan_via_cli(model_spec(row), flags=flags, **kw), relaxed
        except CliError:
            for flag in RELEASE:
                if flag in flags:
                    i = flags.index(flag)
                    relaxed.append(f"{flag} {flags[i + 1]}")
                    flags = flags[:i] + flags[i + 2 :]
                    break
            else:
                raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated row ids")
    ap.add_argument("--commands", action="store_true", help="print each row's autopar command")
    args = ap.parse_args(argv)
    rows = read_rows()
    if args.only:
        wanted = set(args.only.split(","))
        rows = [r for r in rows if r["id"] in wanted]

    print(f"== held-out published runs: {CSV_PATH.relative_to(ROOT)} ({len(rows)} rows) ==")
    print(
        f"{'row':<24} {'metric':<20} {'published':>9} {'predicted':>9} {'err%':>7}  plan as priced"
    )
    errors: list[tuple[str, float]] = []
    t_all = time.perf_counter()
    for row in rows:
        t0 = time.perf_counter()
        rid, published = row["id"], float(row["published_value"])
        head = f"{rid:<24} {row['metric']:<20} {published:>9.2f}"
        why = unpriceable_reason(row)
        if why is not None:
            print(f"{head} {'-':>9} {'-':>7}  not priced: {why}")
            continue
        try:
            plan, relaxed = price_published(row)
        except CliError as e:
            print(f"{head} {'-':>9} {'-':>7}  no plan: {e}")
            continue
        pred = predicted_metric(plan, row=row)
        err = throughput_error_pct(row=row, published=published, predicted=pred)
        if row["certain"] == "yes":
            errors.append((rid, err))
        b = plan.breakdown
        flag = "" if row["certain"] == "yes" else " [uncertain row: not in statistics]"
        if row["dtype"] != priced_dtype(row):
            flag += f" [{row['dtype']} run priced in {priced_dtype(row)}]"
        if relaxed:
            flag += f" [published {', '.join(relaxed)} not formed by the CLI: left to the search]"
        print(
            f"{head} {pred:>9.2f} {err:>+7.1f}  {plan.describe()}{flag}\n"
            f"{'':<24} step {plan.step_time_s:.2f} s = compute {b['compute']:.2f} + "
            f"recompute {b['recompute']:.2f} + tp {b['tp_comm']:.2f} + bubble "
            f"{b['pp_bubble']:.2f} + p2p {b['pp_comm']:.2f} + dp {b['dp_comm']:.2f}; model MFU "
            f"{plan.mfu:.1%}; {plan.memory_gib:.0f} GiB/dev  [{time.perf_counter() - t0:.1f} s]",
            flush=True,
        )
        if args.commands:
            print(f"{'':<24} {command_line(list(plan.argv))}")
    if errors:
        abs_err = [abs(e) for _, e in errors]
        worst = max(errors, key=lambda x: abs(x[1]))
        print(
            f"\n{len(errors)} priced rows: median |error| {statistics.median(abs_err):.1f}%, "
            f"mean signed {statistics.mean(e for _, e in errors):+.1f}%, max |error| "
            f"{abs(worst[1]):.1f}% ({worst[0]})   [total {time.perf_counter() - t_all:.0f} s]"
        )
        k22 = [(rid, e) for rid, e in errors if rid.startswith(("k22", "k175", "k530", "k1t"))]
        if k22:
            bad = [rid for rid, e in k22 if abs(e) > 10.0]
            print(f"Korthikanti 2022 rows: {len(k22)} priced, max |error| "
                  f"{max(abs(e) for _, e in k22):.1f}% (target +-10 %: "
                  f"{'ok' if not bad else 'outside: ' + ', '.join(bad)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
