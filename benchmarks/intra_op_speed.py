"""How fast the intra-op ILP solves GPT-3 175B on a 2-D (dp, tp) = (8, 8) mesh of DGX A100s.

Targets (issue #5): one distinct block in under 2 s; the whole 96-layer model in under 5 s,
because the 96 identical blocks share one solve (``solve_layer`` caches on the layer's
structure) and only the embedding and head are solved besides. Tracing is timed apart: it is
the tracer's cost, paid once per model, not the solver's.

    python benchmarks/intra_op_speed.py            # full 96-layer model
    python benchmarks/intra_op_speed.py --layers 4 # same widths, fewer blocks (quick)
"""

from __future__ import annotations

import argparse
import time

import torch

from autopar.graph.layers import distinct_layers, group_layers, layer_graph
from autopar.graph.trace import trace
from autopar.models import build
from autopar.sharding import layer_plan
from autopar.topology.load import load_cluster
from autopar.topology.mesh import LogicalMesh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=96)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=16)
    args = ap.parse_args()

    dp, tp = 8, 8
    cluster = load_cluster("dgx-a100", nodes=dp * tp // 8)
    mesh = LogicalMesh((dp, tp), ("dp", "tp"))
    t0 = time.perf_counter()
    model = build("gpt3-175b", layers=args.layers, dtype=torch.bfloat16)
    graph = trace(model).with_batch(args.micro_batch * dp)
    t_trace = time.perf_counter() - t0
    layers = group_layers(graph)
    groups = distinct_layers(layers)
    graphs = {layer.name: layer_graph(graph, layer) for layer in layers}
    print(
        f"GPT-3 175B, {args.layers} blocks, batch {args.micro_batch * dp} x seq 2048 on "
        f"dgx-a100 x{cluster.num_hosts} hosts, mesh (dp, tp) = ({dp}, {tp})"
    )
    print(f"  trace + group: {t_trace:.2f} s  ({len(graph)} ops, {len(layers)} layers, "
          f"{len(groups)} distinct)")  # fmt: skip

    kw = dict(mesh=mesh, cluster=cluster, dtype="bf16", grad_sync_weight=1 / args.microbatches)
    block = next(layer for layer in layers if layer.name.startswith("layers."))
    times = []
    for _ in range(4):  # the first call also pays lazy imports (OR-Tools, cost model)
        layer_plan._solve_cached.cache_clear()
        t0 = time.perf_counter()
        res = layer_plan.solve_layer(graphs[block.name], **kw)
        times.append(time.perf_counter() - t0)
    warm = ", ".join(f"{t:.2f}" for t in times[1:])
    print(f"  one distinct block ({block.name}, {len(graphs[block.name])} ops): {min(times[1:]):.2f} s "
          f"best of 3 [{warm}] (first call incl. imports {times[0]:.2f} s) [target < 2 s] "
          f"status={res.status} gap={res.gap:.3g} decisions={res.num_decisions}")  # fmt: skip
    for op, strat in res.op_strategies.items():
        print(f"      {op:34s} {strat}")

    layer_plan._solve_cached.cache_clear()
    t0 = time.perf_counter()
    solved = cached = 0
    total_s = 0.0
    for layer in layers:
        r = layer_plan.solve_layer(graphs[layer.name], **kw)
        cached += r.cached
        solved += not r.cached
        total_s += r.objective_s
    t_model = time.perf_counter() - t0
    print(f"  whole model ({len(layers)} layers): {t_model:.2f} s [target < 5 s] "
          f"({solved} solved, {cached} from cache); sum of layer objectives "
          f"{total_s * 1e3:.1f} ms per microbatch")  # fmt: skip


if __name__ == "__main__":
    main()
