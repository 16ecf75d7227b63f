"""Trace time and peak memory for the largest zoo models (issue #3 targets: < 30 s, < 4 GiB).

Each model is traced in its own subprocess so its peak RSS is measured on its own:

    python benchmarks/trace.py                      # gpt3-175b and llama3-405b
    python benchmarks/trace.py gpt3-13b llama3-8b   # any zoo names

Reported per model: build time (meta, no weights), trace time (two fake-tensor traces, the
second for batch dims), operator nodes, distinct blocks / blocks, peak RSS of the process.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

DEFAULT_MODELS = ("gpt3-175b", "llama3-405b")
TARGET_TRACE_S = 30.0
TARGET_RSS_GIB = 4.0


def measure(name: str) -> dict[str, object]:
    """Build + trace ``name`` in this process and report the figures."""
    from autopar.graph import distinct_layers, group_layers, trace
    from autopar.models import build

    t0 = time.perf_counter()
    model = build(name)
    t1 = time.perf_counter()
    c1 = time.process_time()
    graph = trace(model)
    t2 = time.perf_counter()
    c2 = time.process_time()
    layers = group_layers(graph)
    t3 = time.perf_counter()
    blocks = [lay for lay in layers if lay.name.startswith("layers.")]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return {
        "model": name,
        "build_s": t1 - t0,
        "trace_s": t2 - t1,
        "trace_cpu_s": c2 - c1,
        "group_s": t3 - t2,
        "ops": len(graph),
        "params_B": graph.param_count / 1e9,
        "fwd_TFLOP_per_seq": graph.fwd_flops / 1e12,
        "blocks": len(blocks),
        "distinct_blocks": len(distinct_layers(blocks)),
        "peak_rss_GiB": peak_kib / 1024**2,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.models[0])))
        return 0
    ok = True
    header = (f"{'model':<14}{'trace_s':>9}{'cpu_s':>8}{'build_s':>9}{'ops':>8}{'params':>10}"
              f"{'blocks':>8}{'distinct':>9}{'peak_RSS':>10}")  # fmt: skip
    print(header)
    for name in args.models:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name], capture_output=True, text=True
        )
        if proc.returncode != 0:
            print(f"{name:<14} FAILED\n{proc.stderr[-2000:]}")
            ok = False
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        within = r["trace_s"] < TARGET_TRACE_S and r["peak_rss_GiB"] < TARGET_RSS_GIB
        ok &= within
        print(
            f"{r['model']:<14}{r['trace_s']:>8.1f}s{r['trace_cpu_s']:>7.1f}s"
            f"{r['build_s']:>8.1f}s{r['ops']:>8}"
            f"{r['params_B']:>9.1f}B{r['blocks']:>8}{r['distinct_blocks']:>9}"
            f"{r['peak_rss_GiB']:>7.2f}GiB  {'ok' if within else 'OVER TARGET'}"
        )
    print(f"targets: trace < {TARGET_TRACE_S:.0f} s, peak RSS < {TARGET_RSS_GIB:.0f} GiB per model")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
