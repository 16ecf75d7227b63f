"""Search time: how long autopar takes to plan, and how that grows with depth and cluster size.

Cases (issue #6, "Search speed"):

* GPT-3 175B on 128 ``dgx-a100`` hosts (1024 GPUs), batch 1536: full search (every tp / pp / dp,
  micro-batch, schedule, ZeRO and recompute, ILP refinement on the best shapes) under 30 s.
* Llama-3 8B on 8 ``dgx-h100`` hosts (64 GPUs), batch 512 x 8192: under 10 s.
  (For reference, the issue quotes PyTorch autoparallel at 167 s and Galvatron at 690 s for a
  LLaMA-7B / 64-GPU job on this same 2-core machine.)
* Tables: GPT-3 175B shape with 24 -> 96 layers on 1024 GPUs; and 8 -> 4096 GPUs at 96 layers.

Every case runs ``autopar plan`` through the CLI's entry point (``benchmarks/cli_pricing.py``),
so the time is what a user waits for: building the model on meta tensors, tracing
(depth-folded: two blocks), grouping, pricing, the ILP, the search (offload searched where
the topology has a host profile, the default) and writing the plan. The solver's own time is
shown beside it. Run: ``python benchmarks/search_scaling.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli_pricing import CliError, CliPlan, plan_via_cli  # noqa: E402


def timed(model: str, cluster: str, nodes: int, batch: int, flags: list[str] | None = None):
    t0 = time.perf_counter()
    plan = plan_via_cli(model, cluster=cluster, nodes=nodes, global_batch=batch,
                        flags=flags or [])  # fmt: skip
    return time.perf_counter() - t0, plan


def _row(label: str, seconds: float, plan: CliPlan) -> str:
    p, s = plan.parallel, plan.raw["solver"]
    return (
        f"{label:<34} {seconds:>7.2f} s wall (search {s['time_s']:.2f} s)  "
        f"dp{p['dp']} tp{p['tp']} pp{p['pp']} b{plan.micro_batch_size} {plan.schedule} "
        f"z{plan.zero_stage} rc={plan.recompute} off={plan.raw.get('offload', 'none')}  "
        f"{plan.tflops_per_device:.0f} TFLOP/s/GPU  shapes={s['shapes']} "
        f"priced={s['candidates_priced']} ilp={s.get('ilp_solves', 0)}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the two headline cases")
    args = ap.parse_args(argv)

    print("== headline cases ==")
    sec, plan = timed("gpt3-175b", "dgx-a100", 128, 1536)
    print(_row("GPT-3 175B, 1024 x A100 (<30 s)", sec, plan), flush=True)
    sec, plan = timed("llama3-8b", "dgx-h100", 8, 512, ["--seq", "8192"])
    print(_row("Llama-3 8B, 64 x H100 (<10 s)", sec, plan), flush=True)
    sec, plan = timed("llama3-70b", "pcie-4090", 1, 64)
    print(_row("Llama-3 70B, 8 x RTX 4090 (offload)", sec, plan), flush=True)
    if args.quick:
        return 0

    print("\n== search time vs depth (GPT-3 175B shape, 1024 x A100, batch 1536) ==")
    for layers in (24, 48, 72, 96):
        spec = f"gpt:layers={layers},hidden=12288,heads=96,vocab=51200,seq_len=2048"
        sec, plan = timed(spec, "dgx-a100", 128, 1536)
        print(_row(f"{layers} layers", sec, plan), flush=True)

    print("\n== search time vs GPUs (GPT-3 175B, batch 1536) ==")
    for gpus in (8, 64, 512, 1024, 2048, 4096):
        try:
            sec, plan = timed("gpt3-175b", "dgx-a100", gpus // 8, 1536)
            print(_row(f"{gpus} GPUs", sec, plan), flush=True)
        except CliError as e:  # infeasible on too few GPUs: report, keep going
            print(f"{f'{gpus} GPUs':<34} exit {e.code}: {str(e)[:110]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
