"""Megatron-LM's published throughput against autopar, priced through ``autopar plan``.

Reproduces Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM" (SC21, arXiv 2104.04473), every row priced through the CLI's entry point
(``benchmarks/cli_pricing.py``: ``autopar.cli.main([...,"--json", tmp])``) with flags only:

* the software stack: ``--stack megatron-2021`` (unfused attention with the score tensor
  materialised, no sequence parallelism, gradient all-reduce after the pipeline flush; its
  source is in ``autopar/config.py`` STACKS);
* the published degrees: ``--tp --pp --dp --recompute full --zero 0`` and, for pipelined rows,
  ``--schedule interleaved_1f1b`` (the paper used the interleaved schedule; if the CLI cannot
  form it for a row, the pin is dropped, the same rule for every row); Table 2 also publishes
  the micro-batch size (``--micro-batch-size``) and ZeRO-3 (``--zero 3``).

What the paper does not publish (Table 1's micro-batch size, chunks per device) is left to the
search. One set of constants (``cost_models/*.yaml``) prices every row; no row is special-cased.

* Table 1 (``megatron_sc21_weak_scaling.csv``): GPT 1.7B-1T on DGX A100. Target: median
  |error| <= 8 %, max <= 15 % over the 22 rows of both tables.
* Table 2 (``megatron_sc21_zero3_vs_3d.csv``): DeepSpeed ZeRO-3 without model parallelism
  against 3D parallelism. 3D must be faster than ZeRO-3 in all 5 equal-GPU pairs. Table 2's
  ZeRO-3 rows informed the ZeRO-3 "rail" rule of ``autopar/cost/layer.py`` (weights gathered
  over one NIC per device across hosts), so those rows are a consistency check, not held-out
  validation.
* Free search: GPT-3 175B on 128 DGX A100 hosts with ``--stack megatron-core`` (FlashAttention,
  sequence parallelism, overlapped gradient reduction): its predicted MFU must stay <= 58 %,
  what the field measures on A100: Korthikanti et al. 2022 (arXiv 2205.05198, Table 5) 51.4 %
  at 175B and 56.3 % at 1T with selective recompute; MegaScale (Jiang et al., NSDI 2024,
  arXiv 2402.15627, abstract) 55.2 % for a 175B model on 12,288 A100s with FlashAttention-2
  and every collective overlapped, 1.34x Megatron-LM's.

* Split ranking (SC21 §5.4.1, Figure 13): for a 162.2B GPT on 64 A100s, (tp, pp) = (8, 8) beat
  every other split at batch 32 and 128. The model is the paper's (§5.4.1: 32 layers "to support
  pipeline-parallel size of 32", 128 attention heads, hidden 20480; 162.2B by the parameter
  formula below), priced at each (tp, pp) with tp x pp = 64, ``--stack megatron-2021 --dp 1
  --recompute full``, the rest searched. Target: (8, 8) fastest.
* Trends (SC21 §5.4.2-5.4.3, Figures 14-15): for a 5.9B GPT (32 layers, 32 heads, hidden 3840)
  on 64 A100s with micro-batch 1, throughput falls as pp grows at the expense of dp (tp = 1),
  and as tp grows at the expense of dp (pp = 1), at every batch size. The figures' batch sizes
  are not in the text; checked at 128 and 512 (at 32, dp = 32 leaves one microbatch per
  replica: a pipeline cannot form, so only the tp trend is checked there).

Like with like: the paper's TFLOP/s use ``F = 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))`` (forward
+ recomputed forward + backward), so a predicted step time T gives ``F / (T · gpus)``.

A second model side by side: ``--second-cluster TOPOLOGY`` prices every row again with that
topology file (e.g. one whose hosts reference another device or link profile, such as a
``autopar calibrate`` output) and prints its prediction and error in extra columns.

Run: ``python benchmarks/megatron.py [--table 1|2|both|none] [--no-free] [--no-splits] [--rows N]
[--second-cluster PATH] [--commands]``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "benchmarks"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cli_pricing import CliError, CliPlan, command_line, plan_via_cli  # noqa: E402

SEQ = 2048
VOCAB = 51200
STACK = ["--stack", "megatron-2021"]
MFU_LIMIT = 0.58


def megatron_flops(
    *, batch: int, layers: int, hidden: int, seq: int = SEQ, vocab: int = VOCAB
) -> float:
    """FLOPs per iteration as Megatron-LM counts them (SC21 eq. 3, full recompute included)."""
    h, s, ell = hidden, seq, layers
    return 96.0 * batch * s * ell * h * h * (1.0 + s / (6.0 * h) + vocab / (16.0 * ell * h))


def model_spec(layers: int, hidden: int, heads: int) -> str:
    return f"gpt:layers={layers},hidden={hidden},heads={heads},vocab={VOCAB},seq_len={SEQ}"


def price_row(
    *, layers: int, hidden: int, heads: int, gpus: int, batch: int, flags: list[str],
    cluster: str = "dgx-a100",
) -> CliPlan:  # fmt: skip
    """The row through ``autopar plan``; a pinned interleaved schedule the CLI cannot form for
    this row is dropped (plain 1F1B), the same rule for every row."""
    kw = dict(cluster=cluster, nodes=gpus // 8, global_batch=batch)
    try:
        return plan_via_cli(model_spec(layers, hidden, heads), flags=flags, **kw)
    except CliError:
        if "interleaved_1f1b" not in flags:
            raise
        i = flags.index("--schedule")
        return plan_via_cli(model_spec(layers, hidden, heads), flags=flags[:i] + flags[i + 2 :],
                            **kw)  # fmt: skip


def tflops(plan: CliPlan, *, batch: int, layers: int, hidden: int, gpus: int) -> float:
    f = megatron_flops(batch=batch, layers=layers, hidden=hidden)
    return f / (plan.step_time_s * gpus) / 1e12


class Row:
    """One published row, priced by the shipped model and optionally a second one."""

    def __init__(self, label: str, measured: float) -> None:
        self.label = label
        self.measured = measured
        self.pred: float | None = None
        self.second: float | None = None

    @staticmethod
    def err(pred: float | None, measured: float) -> float | None:
        return None if pred is None else 100.0 * (pred - measured) / measured


def _fmt_err(e: float | None) -> str:
    return f"{e:>+6.1f}" if e is not None else f"{'-':>6}"


def _run(
    r: dict[str, str], *, flags: list[str], second: str | None, show: bool
) -> tuple[CliPlan | None, float | None, float | None, str]:
    layers, hidden, heads = int(r["layers"]), int(r["hidden"]), int(r["heads"])
    gpus, batch = int(r["gpus"]), int(r["global_batch"])
    shape = dict(layers=layers, hidden=hidden, heads=heads, gpus=gpus, batch=batch)
    note = ""
    try:
        plan = price_row(flags=flags, **shape)
        pred = tflops(plan, batch=batch, layers=layers, hidden=hidden, gpus=gpus)
        if show:
            note = "\n      " + command_line(list(plan.argv))
    except CliError as e:
        plan, pred, note = None, None, f" ({e})"
    alt = None
    if second is not None:
        try:
            p2 = price_row(flags=flags, cluster=second, **shape)
            alt = tflops(p2, batch=batch, layers=layers, hidden=hidden, gpus=gpus)
        except CliError as e:
            note += f" (second: {e})"
    return plan, pred, alt, note


def _header(second: str | None) -> str:
    extra = f" | {'2nd':>6} {'err%':>6}" if second else ""
    return f"| {'meas':>5} {'pred':>6} {'err%':>6}{extra} |"


def _cols(measured: float, pred: float | None, alt: float | None, second: str | None) -> str:
    p = f"{pred:>6.1f}" if pred is not None else f"{'-':>6}"
    s = f"| {measured:>5.0f} {p} {_fmt_err(Row.err(pred, measured))}"
    if second:
        a = f"{alt:>6.1f}" if alt is not None else f"{'-':>6}"
        s += f" | {a} {_fmt_err(Row.err(alt, measured))}"
    return s + " |"


def _stats(rows: list[Row], label: str, second: str | None) -> None:
    for name, attr in (("autopar", "pred"), (second, "second")):
        if name is None:
            continue
        errs = [abs(Row.err(getattr(r, attr), r.measured)) for r in rows
                if getattr(r, attr) is not None]  # fmt: skip
        if errs:
            print(f"{label} [{name}]: {len(errs)} rows, median |error| "
                  f"{statistics.median(errs):.1f}%, max |error| {max(errs):.1f}%")  # fmt: skip


def table1(*, rows: int | None, second: str | None, show: bool) -> list[Row]:
    path = SHARED / "megatron_sc21_weak_scaling.csv"
    data = list(csv.DictReader(path.open()))[:rows]
    print(f"\n== Table 1: {path.name} (Megatron-LM SC21, weak scaling), --stack megatron-2021 ==")
    print(
        f"{'params':>7} {'gpus':>5} {'tp':>2} {'pp':>3} {'B':>5} {_header(second)} plan as priced"
    )
    out = []
    for r in data:
        tp, pp, gpus = int(r["tp"]), int(r["pp"]), int(r["gpus"])
        flags = [*STACK, "--tp", str(tp), "--pp", str(pp), "--dp", str(gpus // (tp * pp)),
                 "--recompute", "full", "--zero", "0"]  # fmt: skip
        if pp > 1:
            flags += ["--schedule", "interleaved_1f1b"]
        t0 = time.perf_counter()
        plan, pred, alt, note = _run(r, flags=flags, second=second, show=show)
        row = Row(f"{r['params_billion']}B@{gpus}", float(r["measured_tflops_per_gpu"]))
        row.pred, row.second = pred, alt
        out.append(row)
        desc = plan.describe() if plan else "no plan"
        print(
            f"{r['params_billion']:>7} {gpus:>5} {tp:>2} {pp:>3} {int(r['global_batch']):>5} "
            f"{_cols(row.measured, pred, alt, second)} {desc} [{time.perf_counter() - t0:.1f} s]"
            f"{note}",
            flush=True,
        )
    _stats(out, "Table 1", second)
    return out


def table2(*, second: str | None, show: bool) -> tuple[list[Row], list[tuple[str, bool]]]:
    path = SHARED / "megatron_sc21_zero3_vs_3d.csv"
    data = list(csv.DictReader(path.open()))
    print(f"\n== Table 2: {path.name} (ZeRO-3 vs 3D), --stack megatron-2021 ==")
    print("   (ZeRO-3 rows informed the rail rule in autopar/cost/layer.py: a consistency check,")
    print("    not held-out validation)")
    print(f"{'scheme':>6} {'params':>7} {'gpus':>5} {'B':>5} {'mb':>3} {_header(second)} plan")
    out: list[Row] = []
    by_key: dict[tuple[str, str, int], float] = {}
    for r in data:
        tp, pp, gpus = int(r["tp"]), int(r["pp"]), int(r["gpus"])
        zero3 = r["scheme"] == "zero3"
        flags = [*STACK, "--tp", str(tp), "--pp", str(pp), "--dp", str(gpus // (tp * pp)),
                 "--micro-batch-size", r["micro_batch"], "--recompute", "full",
                 "--zero", "3" if zero3 else "0"]  # fmt: skip
        if pp > 1:
            flags += ["--schedule", "interleaved_1f1b"]
        t0 = time.perf_counter()
        plan, pred, alt, note = _run(r, flags=flags, second=second, show=show)
        row = Row(
            f"{r['scheme']} {r['params_billion']}B@{gpus}", float(r["measured_tflops_per_gpu"])
        )
        row.pred, row.second = pred, alt
        out.append(row)
        if plan is not None:
            by_key[(r["scheme"], r["params_billion"], gpus)] = plan.step_time_s
        extra = ""
        if plan is not None:
            b = plan.breakdown
            extra = (f" step {plan.step_time_s:.1f} s (dp comm exposed {b['dp_comm']:.1f} s, "
                     f"hidden {b['overlapped_comm']:.1f} s)")  # fmt: skip
        desc = plan.describe() if plan else "no plan"
        print(
            f"{r['scheme']:>6} {r['params_billion']:>7} {gpus:>5} {int(r['global_batch']):>5} "
            f"{int(r['micro_batch']):>3} {_cols(row.measured, pred, alt, second)} {desc}{extra} "
            f"[{time.perf_counter() - t0:.1f} s]{note}",
            flush=True,
        )
    _stats(out, "Table 2", second)
    pairs = []
    for (scheme, params, gpus), t3 in sorted(by_key.items()):
        if scheme != "zero3" or ("3d", params, gpus) not in by_key:
            continue
        t_3d = by_key[("3d", params, gpus)]
        pairs.append((f"{params}B@{gpus}", t_3d < t3))
        print(f"  pair {params}B on {gpus} GPUs: 3D {t_3d:.1f} s/step vs ZeRO-3 {t3:.1f} s/step "
              f"({'3D faster' if t_3d < t3 else 'ZeRO-3 FASTER'})")  # fmt: skip
    return out, pairs


def free_search(show: bool) -> float | None:
    """GPT-3 175B free search on 128 DGX A100 hosts, megatron-core stack: predicted MFU."""
    print("\n== Free search: GPT-3 175B, 128 DGX A100 hosts (1,024 GPUs), --stack megatron-core ==")
    try:
        plan = plan_via_cli("gpt3-175b", cluster="dgx-a100", nodes=128, global_batch=1536,
                            flags=["--stack", "megatron-core"])  # fmt: skip
    except CliError as e:
        print(f"  no plan ({e})")
        return None
    ok = plan.mfu <= MFU_LIMIT
    print(f"  {plan.describe()}: {plan.step_time_s:.2f} s/step, MFU {plan.mfu:.1%} "
          f"(target <= {MFU_LIMIT:.0%}: {'ok' if ok else 'ABOVE'})")  # fmt: skip
    if show:
        print("      " + command_line(list(plan.argv)))
    return plan.mfu


def _step_on_64(spec: str, *, batch: int, pins: list[str], label: str, show: bool) -> float | None:
    """Step time of ``spec`` on 64 A100s (8 DGX hosts) with the SC21 stack and ``pins``."""
    try:
        plan = plan_via_cli(spec, cluster="dgx-a100", nodes=8, global_batch=batch,
                            flags=[*STACK, *pins])  # fmt: skip
    except CliError as e:
        print(f"  {label} B={batch}: no plan ({e})")
        return None
    if show:
        print("      " + command_line(list(plan.argv)))
    return plan.step_time_s


def split_ranking(show: bool) -> bool:
    """SC21 Figure 13's finding: on 64 GPUs (tp, pp) = (8, 8) is the fastest split."""
    print("\n== Split ranking: 162.2B GPT (32 layers, hidden 20480) on 64 A100s "
          "(SC21 Figure 13: (8, 8) fastest) ==")  # fmt: skip
    ok = True
    for batch in (32, 128):
        times: dict[tuple[int, int], float] = {}
        for tp in (2, 4, 8, 16):
            pins = ["--tp", str(tp), "--pp", str(64 // tp), "--dp", "1", "--recompute", "full"]
            t = _step_on_64(model_spec(32, 20480, 128), batch=batch, pins=pins, label=f"tp{tp}",
                            show=show)  # fmt: skip
            if t is not None:
                times[(tp, 64 // tp)] = t
        order = sorted(times, key=times.__getitem__)
        best = bool(order) and order[0] == (8, 8)
        ok = ok and best
        ranked = ", ".join(f"({t}, {p}) {times[(t, p)]:.2f} s" for t, p in order)
        print(f"  B={batch}: {ranked}  [(8, 8) fastest: {'yes' if best else 'NO'}]")
    return ok


def trends(show: bool) -> bool:
    """SC21 Figures 14-15: on 64 GPUs, more pp (or tp) at the expense of dp is slower."""
    print("\n== Trends: 5.9B GPT (32 layers, hidden 3840) on 64 A100s, micro-batch 1 "
          "(SC21 Figures 14-15: throughput falls as pp or tp replaces dp) ==")  # fmt: skip
    ok = True
    for axis, batches in (("pp", (128, 512)), ("tp", (32, 128, 512))):
        for batch in batches:
            times: list[tuple[int, float]] = []
            for degree in (2, 4, 8, 16, 32):
                pins = ["--tp", str(degree if axis == "tp" else 1),
                        "--pp", str(degree if axis == "pp" else 1), "--dp", str(64 // degree),
                        "--micro-batch-size", "1"]  # fmt: skip
                t = _step_on_64(model_spec(32, 3840, 32), batch=batch, pins=pins,
                                label=f"{axis}={degree}", show=show)  # fmt: skip
                if t is not None:
                    times.append((degree, t))
            falls = all(a[1] < b[1] for a, b in zip(times, times[1:])) and len(times) == 5
            ok = ok and falls
            shown = ", ".join(f"{axis}{d} {t:.2f} s" for d, t in times)
            print(f"  B={batch}: {shown}  [slower as {axis} grows: {'yes' if falls else 'NO'}]")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", choices=("1", "2", "both", "none"), default="both")
    ap.add_argument("--no-free", action="store_true", help="skip the 175B free-search MFU check")
    ap.add_argument(
        "--no-splits", action="store_true", help="skip the split-ranking and trend checks"
    )
    ap.add_argument("--rows", type=int, default=None, help="only the first N rows of table 1")
    ap.add_argument("--second-cluster", default=None, metavar="TOPOLOGY",
                    help="price every row again on this topology (a second cost model)")  # fmt: skip
    ap.add_argument("--commands", action="store_true", help="print each row's autopar command")
    args = ap.parse_args(argv)
    rows: list[Row] = []
    pairs: list[tuple[str, bool]] = []
    if args.table in ("1", "both"):
        rows += table1(rows=args.rows, second=args.second_cluster, show=args.commands)
    if args.table in ("2", "both"):
        t2, pairs = table2(second=args.second_cluster, show=args.commands)
        rows += t2
    if args.table == "both":
        print()
        _stats(rows, "Tables 1+2 (target median <= 8 %, max <= 15 %)", args.second_cluster)
        won = sum(ok for _, ok in pairs)
        print(f"3D faster than ZeRO-3 in {won} of {len(pairs)} equal-GPU pairs (target: all 5)")
    if not args.no_splits:
        split_ranking(args.commands)
        trends(args.commands)
    if not args.no_free:
        free_search(args.commands)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
