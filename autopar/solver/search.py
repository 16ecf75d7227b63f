"""The outer search: from a model, a cluster and a training setup to a Plan.

What is enumerated (each dimension can be pinned with ``fixed=``, Megatron-style names)
-------------------------------------------------------------------------------------
* ``tp`` (tensor parallel degree): divisors of the world size that divide the attention heads.
* ``pp`` (pipeline stages): divisors of ``world / tp`` up to the number of blocks.
* ``dp = world / (tp · pp)``, which must divide the global batch.
* the mesh is ``(pp, dp, tp)`` row-major with ``tp`` innermost, so tensor parallelism stays
  inside a host whenever ``tp <= devices per host``, data parallelism comes next and pipeline
  stages are the outermost (cross-host) axis. ``host_mapping`` in the Plan says which axis
  crosses hosts.
* ``micro_batch_size`` b: divisors of the per-replica batch ``B / dp`` (up to 64); the number of
  microbatches is ``M = B / (dp · b)``.
* ``schedule``: 1F1B (stages from the pipeline DP, unequal allowed), interleaved 1F1B with
  ``v >= 2`` model chunks per device, and GPipe only when pinned: GPipe has 1F1B's bubble and
  holds all M microbatches, so it is dominated. Interleaving cuts the blocks into ``pp · v``
  contiguous chunks, chunk c on pipeline rank ``c mod pp`` (Megatron's and
  ``torch.distributed.pipelining``'s looped placement), for every ``v`` with ``pp · v <=
  blocks``. The blocks need not divide evenly (``_chunk_sizes``): rank totals and chunk sizes
  each differ by at most one block, the short ranks are taken from the ends inwards (rank 0,
  rank pp-1, rank 1, ...), and on the first and last rank the short chunk is the one that also
  carries the embedding / the logits head. That is Llama 3 405B's layout (126 blocks on
  pp = 16: first and last stage one block short, arXiv 2407.21783 §3.3.2); when ``pp · v``
  divides the blocks it is Megatron's equal split. The Plan lists one Stage per chunk
  (``pp · v`` of them, chunk c on the devices of rank ``c mod pp``), which is what the emitter
  validates and runs.
* ``zero`` 0-3 and ``recompute`` none / selective (attention core) / full.

How a candidate is priced
-------------------------
Per layer and microbatch (``_costing.LayerCost``): forward and backward compute, exposed
tensor-parallel communication, what recompute re-runs (full: the forward; selective: the
attention core), activation bytes kept, gradient synchronisation and ZeRO-3 gathers. A stage's
latency is the sum over its layers plus the point-to-point send of its output (activation
forward, gradient backward). The pipeline takes ``Σ t_s + (M - 1) · max t_s`` (GPipe / 1F1B)
or ``(1/v) Σ t_s + (M - 1/v) · max t_s`` (interleaved; ``t_s`` sums all chunks rank s holds,
so uneven chunks are priced by the slowest rank's own total, and the fill/drain term counts each
rank's mean chunk ``t_s / v``; with chunks within one block of each other that is off by at
most about ``pp - 1`` block latencies of fill/drain). Gradient synchronisation over dp runs once
per step and overlaps the last microbatch's backward on each stage (DDP buckets); what does not
fit behind it is exposed. ZeRO-3 gathers weights for every use (forward, backward and the
recomputed forward) and reduce-scatters gradients per microbatch, prefetched behind compute:
each layer costs ``max(compute, gathers)``. The optimizer update streams weights, gradients and
optimizer state through HBM once.

Memory per device on the most loaded stage: weights, gradients and optimizer state (divided by
dp from ZeRO stage 3, 2 and 1 respectively), activations of the microbatches in flight for the
schedule (``pipeline.inflight_microbatches``, applied to the activations of all chunks the rank
holds) and transients (a recomputed layer's full activations; ZeRO-3's gathered weights). A
candidate over ``capacity · (1 - headroom)`` is dropped, and counted.

Search order and pruning
------------------------
1. Every candidate is priced analytically with Megatron's split (``_costing.analytic_layer_cost``,
   no solver): a uniform layer split first, then the pipeline DP (``pipeline.solve_stages``) only
   when its lower bound ``Σ t + (M - 1) · max(Σ t / pp, max_i t_i)`` can still beat the k-th
   best plan so far; a memory lower bound (state / pp) skips shapes that cannot fit at all.
   ZeRO 0, 1 and 2 cost the same time here, so the lowest stage that fits is kept.
2. The intra-op ILP (``sharding.layer_plan.solve_layer``) then runs on the distinct layers
   (embedding, one block, head) of the best few (dp, tp, micro-batch) shapes, cached on
   ``(signature, dp, tp, b)``, and those candidates are priced again with its costs and
   placements. Both pricers count the same things the same way (tensor-core attention, free
   views, bytes for elementwise ops, each stored tensor once, the training dtype, bucketed
   gradient all-reduces; ``tests/solver/test_pricing_agreement.py`` pins a GPT-3 block), so
   the cheaper of the two is a better plan, not a pricing convention. On a tie (``TIE_RTOL``)
   the ILP's is kept: its placements are derived from the graph rather than module names.
   ``solver`` records ``ilp_better_than_megatron_split`` / ``ilp_ties_megatron_split``,
   ``winner_pricing`` (who priced the winner) and ``placements_from``.
3. Placements on the ``dp`` axis say how a weight is *stored*: ``"R"`` unless ZeRO-3 (then the
   FSDP shard dim). The ILP runs with weights stored whole on dp (ZeRO is this search's own
   dimension); an ILP result that does shard storage over dp is only priced as ZeRO-3.

Which FLOPs the reported throughput counts
------------------------------------------
``tflops_per_device`` and ``mfu`` count *model* FLOPs: forward + backward of the traced graph
(``OpGraph.fwd_flops + bwd_flops``), never the recomputed forward, so MFU does not reward
recompute. Megatron-LM's published TFLOP/s include the recomputed forward (their factor 96 =
4 · 24); ``benchmarks/megatron.py`` applies their formula to compare like with like.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from autopar.config import TrainingConfig
from autopar.cost.memory import model_state_breakdown
from autopar.errors import ConfigError, InfeasibleError
from autopar.plan import (
    Alternative,
    MemoryBreakdown,
    Mesh,
    Parallel,
    Plan,
    Prediction,
    Stage,
    TimeBreakdown,
)
from autopar.solver._costing import (
    ATTENTION_KERNELS,
    LayerCost,
    analytic_layer_cost,
    ilp_layer_cost,
    in_training_dtype,
    layer_kind,
)
from autopar.solver.pipeline import inflight_microbatches, solve_stages

__all__ = ["search", "FIXED_KEYS", "SCHEDULES", "RECOMPUTE", "ZERO_STAGES"]

GiB = 1024**3
FIXED_KEYS = (
    "dp", "tp", "pp", "microbatches", "micro_batch_size", "recompute", "zero", "schedule",
    "virtual_stages", "sequence_parallel",
)  # fmt: skip
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
RECOMPUTE = ("none", "selective", "full")
ZERO_STAGES = (0, 1, 2, 3)
MAX_MICRO_BATCH = 64
TIE_RTOL = 1e-3
"""Relative step-time difference under which the ILP's and the analytic pricing of one
candidate count as a tie (the ILP's graph-derived placements are then preferred)."""
TIME_TERMS = ("compute", "recompute", "tp_comm", "pp_bubble", "pp_comm", "dp_comm")
_TERM_WORDS = {
    "compute": "compute",
    "recompute": "recompute",
    "tp_comm": "tensor-parallel comm",
    "pp_bubble": "pipeline bubble",
    "pp_comm": "pipeline p2p",
    "dp_comm": "data-parallel comm",
}


# ---------------------------------------------------------------------------------------------
# model preparation
# ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _LayerInfo:
    name: str
    signature: Any
    params: tuple[str, ...]
    graph: Any
    """The layer's own OpGraph at batch 1 (re-sized with ``with_batch``)."""
    graph_params: tuple[str, ...] = ()
    """``params`` as named inside ``graph`` (differs for blocks re-used by depth folding)."""

    def __post_init__(self) -> None:
        if not self.graph_params:
            self.graph_params = self.params


@dataclass(slots=True)
class _ModelInfo:
    name: str
    graph: Any
    layers: list[_LayerInfo]
    seq_len: int
    heads: int | None
    fwd_flops_per_seq: float
    bwd_flops_per_seq: float
    param_count: int

    @property
    def num_blocks(self) -> int:
        return sum(1 for layer in self.layers if layer_kind(layer.name) == "block")


def _prepare(model_or_graph: Any, config: TrainingConfig) -> _ModelInfo:
    """Trace (if needed), group into layers, and state everything at batch 1 in the training dtype.

    Depth folding: a zoo-style model (``model.layers`` an ``nn.ModuleDict`` of structurally
    identical blocks, forward skipping deleted keys) is traced with its first two blocks only and
    the block's layer graph is reused for every block, FQNs renamed. Tracing GPT-3 175B in full
    takes ~15 s on this machine; two blocks take ~0.4 s, and the search prices one distinct block
    anyway. Models whose blocks differ are traced in full.
    """
    from autopar.graph.layers import group_layers, layer_graph
    from autopar.graph.opgraph import OpGraph

    heads = None
    repeat: tuple[int, list[str]] | None = None
    if isinstance(model_or_graph, OpGraph):
        graph = model_or_graph
        name = graph.name
        heads = graph.metadata.get("heads") or graph.metadata.get("config", {}).get("heads")
    else:
        from autopar.graph.trace import trace

        model = model_or_graph
        cfg = getattr(model, "config", None)
        heads = getattr(cfg, "heads", None)
        inputs = None
        if config.seq_len is not None and hasattr(model, "example_inputs"):
            (example,) = model.example_inputs(batch_size=1)
            if example.dim() == 2 and example.shape[1] != config.seq_len:
                import torch

                vocab = getattr(cfg, "vocab", 2)
                inputs = (torch.randint(0, vocab, (1, config.seq_len), device=example.device),)
        shallow, keys = _shallow_copy(model)
        graph = trace(shallow if shallow is not None else model, inputs)
        if shallow is not None:
            repeat = (len(keys), keys)
        name = _model_name(model)
    if graph.batch_size != 1:
        graph = graph.with_batch(1)
    graph = in_training_dtype(graph, config.dtype)
    seq_len = config.seq_len or _seq_len_of(graph)
    grouped = list(group_layers(graph))
    layers = [
        _LayerInfo(
            name=layer.name,
            signature=layer.signature,
            params=tuple(layer.params),
            graph=layer_graph(graph, layer),
        )
        for layer in grouped
    ]
    if repeat is not None:
        layers = _unfold(layers, repeat[1])
    if not layers:
        raise ConfigError("the model has no layers to place", field="model")
    fwd = sum(float(layer.graph.fwd_flops) for layer in layers)
    bwd = sum(float(layer.graph.bwd_flops) for layer in layers)
    seen: dict[str, int] = {}
    for layer in layers:
        metas = layer.graph.params()
        for fqn, inner in zip(layer.params, layer.graph_params):
            if inner in metas:
                seen[fqn] = metas[inner].numel
    return _ModelInfo(
        name=name,
        graph=graph,
        layers=layers,
        seq_len=seq_len,
        heads=heads,
        fwd_flops_per_seq=fwd,
        bwd_flops_per_seq=bwd,
        param_count=int(sum(seen.values())),
    )


def _model_name(model: Any) -> str:
    cfg = getattr(model, "config", None)
    base = type(model).__name__.lower()
    if cfg is not None and hasattr(cfg, "layers") and hasattr(cfg, "hidden"):
        return f"{base}(layers={cfg.layers}, hidden={cfg.hidden})"
    return base


def _block_structure(block: Any) -> tuple:
    return tuple((n, tuple(p.shape), str(p.dtype)) for n, p in block.named_parameters()) + tuple(
        (n, type(m).__name__) for n, m in block.named_modules()
    )


def _shallow_copy(model: Any) -> tuple[Any, list[str]]:
    """A view of ``model`` with only its first two blocks, when all blocks are identical."""
    from torch import nn

    blocks = getattr(model, "layers", None)
    if not isinstance(blocks, nn.ModuleDict) or len(blocks) <= 2:
        return None, []
    keys = list(blocks.keys())
    ref = _block_structure(blocks[keys[0]])
    if any(_block_structure(blocks[k]) != ref for k in keys[1:]):
        return None, []
    import copy

    shallow = copy.copy(model)
    shallow._modules = dict(model._modules)
    shallow._parameters = dict(model._parameters)
    shallow._buffers = dict(model._buffers)
    shallow.layers = nn.ModuleDict({k: blocks[k] for k in keys[:2]})
    return shallow, keys


def _unfold(layers: list[_LayerInfo], keys: list[str]) -> list[_LayerInfo]:
    """Re-expand a two-block trace to all blocks: block 0 as traced, the rest copies of block 1."""
    blocks = [i for i, layer in enumerate(layers) if layer_kind(layer.name) == "block"]
    if len(blocks) != 2:
        raise ConfigError(
            f"depth folding expected 2 traced blocks, found {len(blocks)}", field="model"
        )
    first, second = layers[blocks[0]], layers[blocks[1]]
    out = layers[: blocks[0]] + [first]
    prefix = second.name + "."
    for key in keys[1:]:
        name = f"layers.{key}"
        params = tuple(
            (f"{name}." + p[len(prefix) :]) if p.startswith(prefix) else p for p in second.params
        )
        out.append(
            _LayerInfo(
                name=name,
                signature=second.signature,
                params=params,
                graph=second.graph,
                graph_params=second.params,
            )
        )
    out += layers[blocks[1] + 1 :]
    return out


def _seq_len_of(graph: Any) -> int:
    if "seq_len" in graph.metadata:
        return int(graph.metadata["seq_len"])
    for node in graph:
        if node.kind == "input" and node.output is not None and len(node.output.shape) >= 2:
            return int(node.output.shape[1])
    return 1


# ---------------------------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Shape:
    pp: int
    dp: int
    tp: int
    b: int

    @property
    def microbatches_for(self) -> Callable[[int], int]:
        return lambda batch: batch // (self.dp * self.b)


@dataclass(slots=True)
class _Priced:
    """One fully priced candidate."""

    shape: _Shape
    microbatches: int
    schedule: str
    virtual_stages: int
    zero: int
    recompute: str
    stages: np.ndarray
    """Pipeline rank of every layer (several chunks per rank when interleaved)."""
    step_s: float
    breakdown: TimeBreakdown
    memory: MemoryBreakdown
    peak_bytes: float
    source: str
    costs: tuple[LayerCost, ...] = field(repr=False, default=())

    @property
    def parallel(self) -> Parallel:
        return Parallel(dp=self.shape.dp, tp=self.shape.tp, pp=self.shape.pp)

    def key(self) -> tuple:
        s = self.shape
        return (
            s.pp,
            s.dp,
            s.tp,
            s.b,
            self.schedule,
            self.virtual_stages,
            self.zero,
            self.recompute,
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_fixed(fixed: dict[str, Any] | None) -> dict[str, Any]:
    fixed = dict(fixed or {})
    for k, v in fixed.items():
        if k not in FIXED_KEYS:
            raise ConfigError(f"unknown key {k!r}", field=f"fixed.{k}", allowed=FIXED_KEYS)
        if k == "recompute" and v not in RECOMPUTE:
            raise ConfigError(
                f"unknown recompute {v!r}", field="fixed.recompute", allowed=RECOMPUTE
            )
        if k == "schedule" and v not in SCHEDULES:
            raise ConfigError(f"unknown schedule {v!r}", field="fixed.schedule", allowed=SCHEDULES)
        if k == "zero" and v not in ZERO_STAGES:
            raise ConfigError(f"unknown ZeRO stage {v!r}", field="fixed.zero", allowed=ZERO_STAGES)
        if k == "sequence_parallel" and not isinstance(v, bool):
            raise ConfigError("must be true or false", field="fixed.sequence_parallel")
        if k in ("dp", "tp", "pp", "microbatches", "micro_batch_size", "virtual_stages") and (
            isinstance(v, bool) or not isinstance(v, int) or v < 1
        ):
            raise ConfigError(f"must be a positive integer, got {v!r}", field=f"fixed.{k}")
    return fixed


def _shapes(info: _ModelInfo, world: int, batch: int, fixed: dict[str, Any]) -> list[_Shape]:
    out = []
    for tp in _divisors(world):
        if "tp" in fixed and tp != fixed["tp"]:
            continue
        if info.heads is not None and info.heads % tp:
            continue
        for pp in _divisors(world // tp):
            if "pp" in fixed and pp != fixed["pp"]:
                continue
            if pp > max(1, info.num_blocks):
                continue
            dp = world // (tp * pp)
            if "dp" in fixed and dp != fixed["dp"]:
                continue
            if batch % dp:
                continue
            per_replica = batch // dp
            for b in _divisors(per_replica):
                if b > MAX_MICRO_BATCH and "micro_batch_size" not in fixed:
                    break
                if "micro_batch_size" in fixed and b != fixed["micro_batch_size"]:
                    continue
                if "microbatches" in fixed and per_replica // b != fixed["microbatches"]:
                    continue
                if pp > 1 and per_replica // b < pp:
                    # Fewer microbatches than stages leaves stages idle and is rejected by the
                    # pipeline schedules (torch.distributed.pipelining, Megatron-LM) we emit to.
                    continue
                out.append(_Shape(pp=pp, dp=dp, tp=tp, b=b))
    return out


# ---------------------------------------------------------------------------------------------
# pricing context
# ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Context:
    info: _ModelInfo
    cluster: Any
    config: TrainingConfig
    fixed: dict[str, Any]
    capacity_bytes: float
    compute_time_s: Any
    mesh_collective_time_s: Any
    collective_time_s: Any
    saved_tensors: Any
    LogicalMesh: Any
    attention_kernel: str = "fused"
    blocks: list = field(default_factory=list)
    optimizer_line: tuple = (0.0, 0.0)
    layer_graph_cache: dict = field(default_factory=dict)
    analytic_cache: dict = field(default_factory=dict)
    ilp_cache: dict = field(default_factory=dict)
    p2p_cache: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def sequence_parallel(self, tp: int) -> bool:
        return bool(self.fixed.get("sequence_parallel", tp > 1)) and tp > 1

    def layer_at(self, layer: _LayerInfo, batch: int) -> Any:
        key = (layer.signature, batch)
        hit = self.layer_graph_cache.get(key)
        if hit is None:
            hit = layer.graph if batch == 1 else layer.graph.with_batch(batch)
            self.layer_graph_cache[key] = hit
        return hit

    def full_mesh(self, shape: _Shape) -> Any:
        return self.LogicalMesh((shape.pp, shape.dp, shape.tp), ("pp", "dp", "tp"))

    def analytic(self, shape: _Shape) -> tuple[LayerCost, ...]:
        out = []
        mesh = self.full_mesh(shape)
        sp = self.sequence_parallel(shape.tp)
        for layer in self.info.layers:
            key = (layer.signature, shape.pp, shape.dp, shape.tp, shape.b, sp)
            hit = self.analytic_cache.get(key)
            if hit is None:
                g = self.layer_at(layer, shape.b)
                owned = set(layer.graph_params)  # a tied weight counts once, with its owner
                cost = analytic_layer_cost(
                    name=layer.name,
                    graph=g,
                    ops=tuple(g.ops()),
                    params={k: v for k, v in g.params().items() if k in owned},
                    input_bytes=_input_bytes(g),
                    output_bytes=_output_bytes(g),
                    dp=shape.dp,
                    tp=shape.tp,
                    full_mesh=mesh,
                    cluster=self.cluster,
                    dtype=self.config.dtype,
                    grad_bytes_per_param=self.config.dtype_bytes,
                    sequence_parallel=sp,
                    compute_time_s=self.compute_time_s,
                    mesh_collective_time_s=self.mesh_collective_time_s,
                    saved_tensors=self.saved_tensors,
                    collective_time_s=self.collective_time_s,
                    attention_kernel=self.attention_kernel,
                )
                cost = replace(cost, param_names=layer.graph_params)
                hit = (layer.graph_params, cost)
                self.analytic_cache[key] = hit
                self.stats["analytic_layer_prices"] = self.stats.get("analytic_layer_prices", 0) + 1
            rep_params, cost = hit
            out.append(cost)  # keyed by signature: name and FQNs are the representative's
        return tuple(out)

    def ilp(self, shape: _Shape, *, time_limit_s: float) -> tuple[LayerCost, ...]:
        from autopar.sharding.layer_plan import solve_layer

        base = self.analytic(shape)
        stage_mesh = self.LogicalMesh((shape.dp, shape.tp), ("dp", "tp"))
        microbatches = self.config.global_batch // (shape.dp * shape.b)
        out = []
        for layer, cost in zip(self.info.layers, base):
            key = (layer.signature, shape.dp, shape.tp, shape.b)
            hit = self.ilp_cache.get(key)
            if hit is None:
                g = self.layer_at(layer, shape.b * shape.dp)
                t0 = time.perf_counter()
                sharding = solve_layer(
                    g,
                    mesh=stage_mesh,
                    cluster=self.cluster,
                    dtype=self.config.dtype,
                    grad_sync_weight=1.0 / max(1, microbatches),
                    topology_aware=True,
                    time_limit_s=time_limit_s,
                    # ZeRO (incl. stage 3, the dp split of stored weights) is the search's own
                    # dimension, priced for every candidate; the ILP places compute and tp
                    replicated_param_axes=("dp",),
                )
                self.stats["ilp_solves"] = self.stats.get("ilp_solves", 0) + 1
                self.stats["ilp_time_s"] = self.stats.get("ilp_time_s", 0.0) + (
                    time.perf_counter() - t0
                )
                statuses = self.stats.setdefault("ilp_status", {})
                statuses[str(sharding.status)] = statuses.get(str(sharding.status), 0) + 1
                self.stats["ilp_max_gap"] = max(
                    self.stats.get("ilp_max_gap", 0.0), float(sharding.gap or 0.0)
                )
                # the layer graph is cached per signature: its FQNs are this (first) layer's
                per_dev = _params_per_dp_replica(
                    g, sharding.placements, shape, owned=set(layer.graph_params)
                )
                hit = (layer.graph_params, sharding, per_dev)
                self.ilp_cache[key] = hit
            rep_params, sharding, per_dev = hit
            priced = ilp_layer_cost(
                cost,
                sharding,
                params_per_device=per_dev,
                grad_sync_s=self.bucketed_grad_sync_s(shape, per_dev, sharding),
            )
            out.append(replace(priced, param_names=rep_params))
        return tuple(out)

    def bucketed_grad_sync_s(self, shape: _Shape, params_per_device: float, sharding: Any) -> float:
        """The ILP layer's gradient synchronisation as DDP runs it: bucketed, one all-reduce of
        the layer's gradients over dp (the analytic price), plus one over tp for gradients the
        ILP left partial there (sequence-parallel norms). The ILP itself prices one collective
        per parameter, where latency dominates for biases and norm weights."""
        mesh = self.full_mesh(shape)
        total = 0.0
        if shape.dp > 1 and params_per_device > 0:
            nbytes = params_per_device * self.config.dtype_bytes
            total += self.mesh_collective_time_s("all_reduce", nbytes, mesh, "dp", self.cluster)
        tp_bytes = sum(
            c.nbytes for c in sharding.collectives if c.phase == "grad_sync" and c.axis == "tp"
        )
        if shape.tp > 1 and tp_bytes > 0:
            total += self.mesh_collective_time_s("all_reduce", tp_bytes, mesh, "tp", self.cluster)
        return total

    def ilp_if_solved(self, shape: _Shape) -> tuple[LayerCost, ...] | None:
        """The ILP's LayerCosts of ``shape`` if every layer was already solved for it."""
        if all(
            (layer.signature, shape.dp, shape.tp, shape.b) in self.ilp_cache
            for layer in self.info.layers
        ):
            return self.ilp(shape, time_limit_s=0.0)  # all cached: no solver call
        return None

    def p2p_s(self, shape: _Shape, nbytes: float) -> float:
        """Send of one stage boundary's activation (all dp·tp pairs at once)."""
        if shape.pp == 1 or nbytes <= 0:
            return 0.0
        key = (shape.pp, shape.dp, shape.tp, nbytes)
        hit = self.p2p_cache.get(key)
        if hit is None:
            size = shape.dp * shape.tp
            # every boundary is priced on the ranks it joins and the slowest one is kept: with
            # stages smaller than a host, some boundaries stay inside a host and some cross hosts
            hit = max(
                self.collective_time_s("p2p", nbytes, (s * size, (s + 1) * size), self.cluster)
                for s in range(shape.pp - 1)
            )
            self.p2p_cache[key] = hit
        return hit


def _params_per_dp_replica(
    g: Any, placements: dict[str, tuple[str, ...]], shape: _Shape, *, owned: set[str]
) -> float:
    """Parameters one device holds before ZeRO: split by the non-dp axes of the stage mesh only.

    The ILP may store a weight sharded over dp (ZeRO-3-like); the search accounts for that with
    ``zero = 3`` (which divides by dp itself), so the dp split is left out here. A tied weight
    counts once, with the layer that owns it (as in the analytic pricing).
    """
    from autopar.plan import parse_placement

    sizes = (shape.dp, shape.tp)
    total = 0.0
    for fqn, meta in g.params().items():
        if fqn not in owned:
            continue
        n = float(meta.numel)
        for axis, text in enumerate(placements.get(fqn, ())):
            if axis == 0:
                continue  # dp: storage, handled by the ZeRO stage
            kind, _ = parse_placement(text)
            if kind == "S" and axis < len(sizes):
                n /= sizes[axis]
        total += n
    return total


def _tp_used_as_data(
    costs: tuple[LayerCost, ...], shape: _Shape, layers: list[_LayerInfo] | None = None
) -> bool:
    """tp > 1, yet some block weight matrix is left whole on tp.

    The ILP then splits that op's activations (batch or sequence) over the tp axis. A Plan
    carries parameter placements only, so the emitter would run the op replicated, at a cost
    the ILP never priced: such a result is not used. (With every weight whole, the candidate is
    just the (dp·tp, tp=1) shape, which is priced on its own.)
    """
    if shape.tp == 1:
        return False
    matrices: set[str] = set()
    for layer in layers or ():
        if layer_kind(layer.name) == "block":
            metas = layer.graph.params()
            matrices.update(
                real for real, own in zip(layer.params, layer.graph_params)
                if own in metas and len(metas[own].shape) >= 2
            )  # fmt: skip
    blocks = [c for c in costs if layer_kind(c.name) == "block"]
    if any(
        fqn in matrices and len(pl) > 1 and pl[1] == "R"
        for c in blocks
        for fqn, pl in c.placements.items()
    ):
        return True
    return bool(blocks) and not any(
        len(pl) > 1 and pl[1] != "R" for c in blocks for pl in c.placements.values()
    )


def _stores_sharded_on_dp(cost: LayerCost) -> bool:
    return any(pl and pl[0] != "R" for pl in cost.placements.values())


def _input_bytes(g: Any) -> float:
    total = 0.0
    for node in g:
        if node.kind == "input" and node.output is not None:
            total += node.output.nbytes
    return float(total)


def _output_bytes(g: Any) -> float:
    """Activation bytes leaving a layer (what the next stage receives).

    A tied weight also "leaves" the embedding layer (the head reads it) but is not sent per
    microbatch: parameters and buffers are left out, or the embedding's p2p and all-reduce would
    be priced on a V x h matrix instead of the b x s x h hidden state.
    """
    total = 0.0
    for node in g:
        if node.kind == "output":
            total += sum(
                m.nbytes
                for src, m in zip(node.inputs, node.input_metas)
                if src not in g or g.node(src).kind not in ("param", "buffer")
            ) or (node.output.nbytes if node.output is not None else 0)
    return float(total)


def _rename_placements(
    placements: dict[str, tuple[str, ...]], rep: tuple[str, ...], dst: tuple[str, ...]
) -> dict[str, tuple[str, ...]]:
    """The ILP solved a representative layer; give each real layer its own FQNs (by position)."""
    if rep == dst:
        return dict(placements)
    mapping = dict(zip(rep, dst))
    return {mapping.get(k, k): v for k, v in placements.items()}


# ---------------------------------------------------------------------------------------------
# evaluating one candidate
# ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Base:
    """Per-layer arrays of one shape's LayerCosts, built once per shape."""

    fwd: np.ndarray
    bwd: np.ndarray
    tp_fwd: np.ndarray
    tp_bwd: np.ndarray
    core_fwd: np.ndarray
    grad_sync: np.ndarray
    gather: np.ndarray
    reduce: np.ndarray
    params: np.ndarray
    act: np.ndarray
    core_act: np.ndarray
    inp: np.ndarray
    p2p: np.ndarray


def _base(ctx: _Context, shape: _Shape, costs: tuple[LayerCost, ...]) -> _Base:
    def arr(attr: str) -> np.ndarray:
        return np.fromiter((getattr(c, attr) for c in costs), dtype=float, count=len(costs))

    return _Base(
        fwd=arr("fwd_s"),
        bwd=arr("bwd_s"),
        tp_fwd=arr("tp_fwd_s"),
        tp_bwd=arr("tp_bwd_s"),
        core_fwd=arr("core_fwd_s"),
        grad_sync=arr("grad_sync_s"),
        gather=arr("zero3_gather_s"),
        reduce=arr("zero3_reduce_s"),
        params=arr("params_per_device"),
        act=arr("act_bytes"),
        core_act=arr("core_act_bytes"),
        inp=arr("input_bytes"),
        p2p=np.fromiter(
            (2.0 * ctx.p2p_s(shape, c.output_bytes) for c in costs), dtype=float, count=len(costs)
        ),
    )


@dataclass(slots=True)
class _Vectors:
    """Per-layer arrays for one (shape, recompute, zero) combination (see LayerCost methods)."""

    lat: np.ndarray
    hidden_zero3: np.ndarray
    exposed_zero3: np.ndarray
    compute: np.ndarray
    recompute: np.ndarray
    tp: np.ndarray
    bwd_window: np.ndarray
    grad_sync: np.ndarray
    saved: np.ndarray
    transient: np.ndarray
    weights: np.ndarray
    grads: np.ndarray
    optimizer: np.ndarray
    params: np.ndarray
    p2p: np.ndarray


def _vectors(ctx: _Context, b: _Base, dp: int, recompute: str, zero: int) -> _Vectors:
    cfg = ctx.config
    compute = b.fwd + b.bwd
    if recompute == "full":
        # re-run the forward, its tensor-parallel collectives included (those count as tp comm)
        rec, tp = b.fwd, 2.0 * b.tp_fwd + b.tp_bwd
        saved, trans = b.inp, b.act
    elif recompute == "selective":
        rec, tp = b.core_fwd, b.tp_fwd + b.tp_bwd
        saved, trans = np.maximum(0.0, b.act - b.core_act), b.core_act
    else:
        rec, tp = np.zeros_like(b.fwd), b.tp_fwd + b.tp_bwd
        saved, trans = b.act, np.zeros_like(b.fwd)
    base = compute + rec + tp
    if zero == 3 and dp > 1:
        # forward: the next layer's weights are prefetched behind this layer's compute;
        # backward (recompute + gradients): gathered on demand and reduce-scattered, exposed
        fwd = b.fwd + b.tp_fwd
        lat = base + np.maximum(0.0, b.gather - fwd) + b.gather + b.reduce
        hidden = np.minimum(b.gather, fwd)
        trans = trans + b.params * cfg.dtype_bytes  # one layer's gathered weights at a time
        sync = np.zeros_like(base)
    else:
        lat, hidden, sync = base, np.zeros_like(base), b.grad_sync
    # bytes per parameter of weights / grads / optimizer state after ZeRO (linear in the count)
    state = model_state_breakdown(
        num_params=1.0, dtype=cfg.dtype, optimizer=cfg.optimizer, zero_stage=zero, dp=dp
    )
    return _Vectors(
        lat=lat,
        hidden_zero3=hidden,
        exposed_zero3=lat - base,
        compute=compute,
        recompute=rec,
        tp=tp,
        bwd_window=b.bwd + b.tp_bwd,
        grad_sync=sync,
        saved=saved,
        transient=trans,
        weights=b.params * state.weights,
        grads=b.params * state.grads,
        optimizer=b.params * state.optimizer,
        params=b.params,
        p2p=b.p2p,
    )


def _optimizer_line(ctx: _Context) -> tuple[float, float]:
    """(intercept_s, s_per_param): the update streams weights, grads and state through HBM once.

    compute_time_s is linear in the work (a roofline of two linear terms), so two prices give
    the line and each candidate's devices are priced without calling it again.
    """
    cfg = ctx.config
    per_param_bytes = 2.0 * (cfg.optimizer_state_bytes + 2 * cfg.dtype_bytes)

    def t(n: float) -> float:
        return ctx.compute_time_s(
            flops=12.0 * n, bytes_moved=n * per_param_bytes, device=ctx.cluster.device, dtype="fp32"
        )

    t1, t2 = t(1e9), t(2e9)
    slope = (t2 - t1) / 1e9
    return t1 - slope * 1e9, slope


def _evaluate(
    ctx: _Context,
    shape: _Shape,
    vec: _Vectors,
    *,
    owner: np.ndarray,
    microbatches: int,
    schedule: str,
    virtual: int,
    zero: int,
    recompute: str,
    source: str,
    costs: tuple[LayerCost, ...],
    need: list[float],
) -> _Priced | None:
    """Step time and peak memory of one assignment of layers to pipeline ranks (module doc).

    ``owner[i]`` is the pipeline rank holding layer i. Returns None (and records the peak in
    ``need``) when the most loaded rank does not fit.
    """
    pp = shape.pp
    m = microbatches
    v = virtual if schedule == "interleaved_1f1b" else 1
    flight = inflight_microbatches(
        schedule=schedule, num_stages=pp, microbatches=m, virtual_stages=v
    )
    w = np.bincount(owner, vec.weights, pp)
    g = np.bincount(owner, vec.grads, pp)
    o = np.bincount(owner, vec.optimizer, pp)
    a = flight * np.bincount(owner, vec.saved, pp)
    other = np.zeros(pp)
    np.maximum.at(other, owner, vec.transient)
    totals = w + g + o + a + other
    worst = int(np.argmax(totals))
    peak = float(totals[worst])
    if peak > ctx.capacity_bytes * (1 + 1e-9):
        need.append(peak)
        return None
    bnd = np.nonzero(owner[:-1] != owner[1:])[0]  # a stage boundary follows these layers
    p2p_dev = np.bincount(owner[bnd], vec.p2p[bnd], pp)
    lat_dev = np.bincount(owner, vec.lat, pp) + p2p_dev
    w_sum, w_max = 1.0 / v, m - 1.0 / v
    slow = int(np.argmax(lat_dev))
    pipeline_s = w_sum * float(lat_dev.sum()) + w_max * float(lat_dev[slow])
    sync = np.bincount(owner, vec.grad_sync, pp)
    window = np.bincount(owner, vec.bwd_window, pp)
    exposed_sync = np.maximum(0.0, sync - window)
    params_dev = np.bincount(owner, vec.params, pp) / (shape.dp if zero >= 1 else 1)
    intercept, slope = ctx.optimizer_line
    opt = np.where(params_dev > 0, intercept + slope * params_dev, 0.0)
    tail = exposed_sync + opt
    last = int(np.argmax(tail))
    step = pipeline_s + float(tail[last])
    on_slow = owner == slow
    busy = m * float(lat_dev[slow])
    breakdown = TimeBreakdown(
        compute=m * float(vec.compute[on_slow].sum()) + float(opt[last]),
        recompute=m * float(vec.recompute[on_slow].sum()),
        tp_comm=m * float(vec.tp[on_slow].sum()),
        pp_comm=m * float(p2p_dev[slow]),
        pp_bubble=float(pipeline_s - busy),
        dp_comm=m * float(vec.exposed_zero3[on_slow].sum()) + float(exposed_sync[last]),
        overlapped_comm=m * float(vec.hidden_zero3[on_slow].sum())
        + float(min(sync[last], window[last])),
    )
    memory = MemoryBreakdown(
        weights=float(w[worst]),
        grads=float(g[worst]),
        optimizer=float(o[worst]),
        activations=float(a[worst]),
        other=float(other[worst]),
        capacity=float(ctx.capacity_bytes),
    )
    return _Priced(
        shape=shape,
        microbatches=m,
        schedule=schedule,
        virtual_stages=v,
        zero=zero,
        recompute=recompute,
        stages=owner,
        step_s=float(step),
        breakdown=breakdown,
        memory=memory,
        peak_bytes=peak,
        source=source,
        costs=costs,
    )


def _uniform_owner(num_layers: int, blocks: list[int], pp: int) -> np.ndarray | None:
    """Megatron's split: blocks evenly over stages (extra ones first), embedding first, head last."""
    owner = np.zeros(num_layers, dtype=np.int64)
    if pp == 1:
        return owner
    if pp > len(blocks):
        return None
    per, extra = divmod(len(blocks), pp)
    k = 0
    for s in range(pp):
        n = per + (1 if s < extra else 0)
        owner[blocks[k : k + n]] = s
        k += n
    owner[: blocks[0]] = 0
    owner[blocks[-1] + 1 :] = pp - 1
    return owner


def _ends_inward(n: int) -> list[int]:
    """0, n-1, 1, n-2, ...: the order in which ranks give up a block."""
    return list(dict.fromkeys(k for pair in zip(range(n), range(n - 1, -1, -1)) for k in pair))


def _chunk_sizes(num_blocks: int, pp: int, v: int) -> list[int] | None:
    """Blocks in each of the ``pp·v`` interleaved chunks (chunk c on rank c mod pp).

    Two levels, so that both chunks and ranks stay within one block of each other: rank totals
    are ``⌊blocks / pp⌋`` or one more, the short ranks taken from the ends inwards (rank 0 runs
    the embedding, rank pp-1 the logits head); each rank's total is then cut into v chunks that
    differ by at most one, its short chunks first on the first half of the ranks and last on the
    second half, so the embedding's and the head's chunks are the short ones. Chunk sizes
    overall differ by at most one (rank totals q and q+1 give chunks of ``⌊q/v⌋`` and
    ``⌈(q+1)/v⌉ <= ⌊q/v⌋ + 1``). Llama 3: 126 blocks, pp = 16, v = 4 gives chunk 0 and chunk 63
    one block each and every other chunk two. None when a chunk would be empty.
    """
    if pp < 1 or v < 1 or num_blocks < pp * v:
        return None
    q, extra = divmod(num_blocks, pp)
    per_rank = [q + 1] * pp if extra else [q] * pp
    if extra:
        for r in _ends_inward(pp)[: pp - extra]:
            per_rank[r] = q
    sizes = [0] * (pp * v)
    for r, total in enumerate(per_rank):
        a, b = divmod(total, v)
        local = [a] * (v - b) + [a + 1] * b  # short chunks first
        if 2 * r >= pp:
            local.reverse()  # second half: short chunks last
        for k, size in enumerate(local):
            sizes[k * pp + r] = size
    return sizes


def _interleaved_owner(num_layers: int, blocks: list[int], pp: int, v: int) -> np.ndarray | None:
    """Interleaved layout: ``pp·v`` contiguous chunks (``_chunk_sizes``), chunk c on rank c mod pp.

    With ``pp·v`` dividing the blocks this is Megatron's equal split.
    """
    if pp < 2 or v < 2:
        return None
    sizes = _chunk_sizes(len(blocks), pp, v)
    if sizes is None:
        return None
    owner = np.zeros(num_layers, dtype=np.int64)
    k = 0
    for c, size in enumerate(sizes):
        owner[blocks[k : k + size]] = c % pp
        k += size
    owner[: blocks[0]] = 0
    owner[blocks[-1] + 1 :] = pp - 1
    return owner


def _dp_owner(
    vec: _Vectors, pp: int, microbatches: int, schedule: str, capacity: float
) -> np.ndarray | None:
    """Unequal contiguous stages from the pipeline DP (pipeline.solve_stages), memory-feasible."""
    n = len(vec.lat)
    csum = np.concatenate([[0.0], np.cumsum(vec.lat)])
    lat = (csum[None, 1:] - csum[:-1, None])[:, :, None]
    ssum = np.concatenate([[0.0], np.cumsum(vec.weights + vec.grads + vec.optimizer)])
    state = ssum[None, 1:] - ssum[:-1, None]
    asum = np.concatenate([[0.0], np.cumsum(vec.saved)])
    act = (asum[None, 1:] - asum[:-1, None])[:, :, None]
    trans = np.zeros((n, n))
    for i in range(n):
        trans[i, i:] = np.maximum.accumulate(vec.transient[i:])
    state = (state + trans)[:, :, None]
    plan = solve_stages(
        latency_s=lat,
        mesh_devices=[1],
        total_devices=pp,
        num_stages=pp,
        w_sum=1.0,
        w_max=float(microbatches - 1),
        p2p_s=vec.p2p[:, None],
        state_bytes=state,
        act_bytes=act,
        inflight=inflight_microbatches(schedule=schedule, num_stages=pp, microbatches=microbatches),
        capacity_bytes=capacity,
    )
    if plan is None:
        return None
    owner = np.zeros(n, dtype=np.int64)
    for s, (i, j) in enumerate(zip(plan.starts, plan.ends)):
        owner[i : j + 1] = s
    return owner


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------
class _Progress:
    """Plain stderr lines, at most one per second, only once a search has run for a second."""

    __slots__ = ("enabled", "t0", "last", "label")

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.label = label

    def tick(self, done: int, total: int, best: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.t0 < 1.0 or now - self.last < 1.0:
            return
        self.last = now
        width = 24
        filled = int(width * done / max(1, total))
        best_txt = f"best {best:.3f} s/step" if math.isfinite(best) else "no plan yet"
        print(
            f"autopar {self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
            f"{best_txt} ({now - self.t0:.1f} s)",
            file=sys.stderr,
            flush=True,
        )


# ---------------------------------------------------------------------------------------------
# pricing the options of one shape
# ---------------------------------------------------------------------------------------------
def _options(fixed: dict[str, Any], key: str, default: Iterable[Any]) -> list[Any]:
    return [fixed[key]] if key in fixed else list(default)


@dataclass(slots=True)
class _DPJob:
    """A 1F1B candidate whose unequal split (pipeline DP) may beat the uniform one."""

    lower_bound_s: float
    shape: _Shape
    vectors: list[tuple[int, _Vectors]]
    """(zero stage, vectors) to try in order; the first that fits is kept."""
    microbatches: int
    schedule: str
    recompute: str
    source: str
    costs: tuple[LayerCost, ...]


def _price_shape(
    ctx: _Context,
    shape: _Shape,
    costs: tuple[LayerCost, ...],
    *,
    source: str,
    keep: Callable[[_Priced], None],
    need: list[float],
) -> list[_DPJob]:
    """Price the uniform / interleaved layouts of every option of one shape; return DP jobs.

    ZeRO 0, 1 and 2 take the same time in this model, so the lowest stage that fits is kept
    (and ZeRO-3 separately). GPipe has 1F1B's bubble and more memory, so it is priced only
    when pinned.
    """
    fixed = ctx.fixed
    info = ctx.info
    m = ctx.config.global_batch // (shape.dp * shape.b)
    n = len(info.layers)
    blocks = ctx.blocks
    pp = shape.pp
    base = _base(ctx, shape, costs)
    schedules = _options(fixed, "schedule", ("1f1b", "interleaved_1f1b") if pp > 1 else ("1f1b",))
    if pp == 1:
        schedules = [s for s in schedules if s != "interleaved_1f1b"] or ["1f1b"]
    zeros = _options(fixed, "zero", ZERO_STAGES)
    if shape.dp == 1:
        zeros = [z for z in zeros if z == 0] or zeros[:1]
    elif any(_stores_sharded_on_dp(c) for c in costs):
        # the ILP stores some weights sharded over dp: that is ZeRO-3 (gathered per use), so
        # only zero = 3 describes it (the Plan's dp placements are "R" otherwise)
        zeros = [z for z in zeros if z == 3]
        if not zeros:
            return []
    uniform = _uniform_owner(n, blocks, pp)
    jobs: list[_DPJob] = []
    for recompute in _options(fixed, "recompute", RECOMPUTE):
        for zero_class in (0, 3):
            tries = [z for z in zeros if (z == 3) == (zero_class == 3)]
            if not tries:
                continue
            vecs = [(z, _vectors(ctx, base, shape.dp, recompute, z)) for z in tries]
            for schedule in schedules:
                if schedule == "interleaved_1f1b":
                    if m % pp:
                        continue  # Megatron's interleaved schedule needs M divisible by pp
                    # every v that leaves each of the pp·v chunks at least one block
                    vs = _options(fixed, "virtual_stages", range(2, len(blocks) // pp + 1))
                    layouts = [(v, _interleaved_owner(n, blocks, pp, v)) for v in vs]
                else:
                    layouts = [(1, uniform)]
                for v, owner in layouts:
                    if owner is None:
                        continue
                    for zero, vec in vecs:
                        priced = _evaluate(
                            ctx, shape, vec, owner=owner, microbatches=m, schedule=schedule,
                            virtual=v, zero=zero, recompute=recompute, source=source,
                            costs=costs, need=need,
                        )  # fmt: skip
                        if priced is not None:
                            keep(priced)
                            break
                if schedule != "interleaved_1f1b" and pp > 1:
                    lat = vecs[0][1].lat
                    total = float(lat.sum())
                    lb = total + (m - 1) * max(total / pp, float(lat.max()))
                    mem_lb = (
                        float(
                            (vecs[-1][1].weights + vecs[-1][1].grads + vecs[-1][1].optimizer).sum()
                        )
                        / pp
                    )
                    if mem_lb > ctx.capacity_bytes:
                        need.append(mem_lb)
                        continue
                    jobs.append(
                        _DPJob(
                            lower_bound_s=lb,
                            shape=shape,
                            vectors=vecs,
                            microbatches=m,
                            schedule=schedule,
                            recompute=recompute,
                            source=source,
                            costs=costs,
                        )  # fmt: skip
                    )
    return jobs


def _run_dp(ctx: _Context, job: _DPJob, keep: Callable[[_Priced], None], need: list[float]) -> None:
    for zero, vec in job.vectors:
        ctx.stats["dp_runs"] = ctx.stats.get("dp_runs", 0) + 1
        owner = _dp_owner(vec, job.shape.pp, job.microbatches, job.schedule, ctx.capacity_bytes)
        if owner is None:
            continue
        priced = _evaluate(
            ctx, job.shape, vec, owner=owner, microbatches=job.microbatches,
            schedule=job.schedule, virtual=1, zero=zero, recompute=job.recompute,
            source=job.source, costs=job.costs, need=need,
        )  # fmt: skip
        if priced is not None:
            keep(priced)
            return


def search(
    model_or_graph: Any,
    cluster: Any,
    config: TrainingConfig | None = None,
    *,
    fixed: dict[str, Any] | None = None,
    top_k: int = 5,
    time_limit_s: float | None = None,
    progress: bool = True,
    layer_pricing: str = "ilp",
    ilp_shapes: int = 2,
    attention_kernel: str = "fused",
) -> Plan:
    """Search data / tensor / pipeline parallelism, schedule, ZeRO and recompute for a model.

    ``model_or_graph`` is an ``nn.Module`` (traced on meta/fake tensors) or an ``OpGraph``;
    ``fixed`` pins any of ``FIXED_KEYS`` (e.g. ``{"tp": 8, "pp": 8}`` prices "my current
    setup" and searches only the rest). ``layer_pricing="analytic"`` skips the intra-op ILP and
    prices layers with Megatron's split only; ``"ilp"`` (default) refines the best
    ``ilp_shapes`` (dp, tp, micro-batch) shapes with the ILP. ``attention_kernel`` says how
    attention runs on the target software stack: ``"fused"`` (FlashAttention, PyTorch SDPA's
    default on GPUs) or ``"unfused"`` (scores materialised, as in Megatron-LM 2021). Raises InfeasibleError, stating the
    least memory per device any candidate needed, when nothing fits.
    """
    from autopar.cost.collectives import collective_time_s, mesh_collective_time_s
    from autopar.cost.compute import compute_time_s
    from autopar.cost.memory import saved_tensors
    from autopar.topology.mesh import LogicalMesh

    t_start = time.perf_counter()
    config = config or TrainingConfig()
    fixed = _check_fixed(fixed)
    if attention_kernel not in ATTENTION_KERNELS:
        raise ConfigError(
            f"unknown attention kernel {attention_kernel!r}",
            field="attention_kernel",
            allowed=ATTENTION_KERNELS,
        )
    if layer_pricing not in ("ilp", "analytic"):
        raise ConfigError(
            f"unknown layer pricing {layer_pricing!r}",
            field="layer_pricing",
            allowed=("ilp", "analytic"),
        )
    info = _prepare(model_or_graph, config)
    world = int(cluster.num_devices)
    capacity = float(cluster.memory_bytes) * (1.0 - config.memory_headroom)
    ctx = _Context(
        info=info,
        cluster=cluster,
        config=config,
        fixed=fixed,
        capacity_bytes=capacity,
        compute_time_s=compute_time_s,
        mesh_collective_time_s=mesh_collective_time_s,
        collective_time_s=collective_time_s,
        saved_tensors=saved_tensors,
        LogicalMesh=LogicalMesh,
        attention_kernel=attention_kernel,
    )
    shapes = _shapes(info, world, config.global_batch, fixed)
    if not shapes:
        raise ConfigError(
            f"no (dp, tp, pp, micro-batch) layout of {world} devices fits global batch "
            f"{config.global_batch} with fixed={fixed or {}}: dp must divide the batch, tp the "
            f"attention heads ({info.heads}), pp at most {info.num_blocks} blocks",
            field="fixed",
        )

    best: dict[tuple, _Priced] = {}
    ranked: list[float] = []
    need: list[float] = []
    k = max(1, top_k)

    def keep(p: _Priced) -> None:
        key = p.key()
        old = best.get(key)
        if old is None or p.step_s < old.step_s:
            best[key] = p
        ranked.append(p.step_s)

    def bound() -> float:
        if len(ranked) < k + 1:
            return math.inf
        ranked.sort()
        del ranked[k + 1 :]
        return ranked[-1]

    bar = _Progress(progress, "search")
    jobs: list[_DPJob] = []
    ctx.blocks = [i for i, layer in enumerate(info.layers) if layer_kind(layer.name) == "block"]
    ctx.optimizer_line = _optimizer_line(ctx)
    for i, shape in enumerate(shapes):
        costs = ctx.analytic(shape)
        jobs += _price_shape(ctx, shape, costs, source="analytic", keep=keep, need=need)
        bar.tick(i + 1, len(shapes) + 1, min(ranked) if ranked else math.inf)
        if time_limit_s is not None and time.perf_counter() - t_start > time_limit_s:
            ctx.stats["stopped_early"] = True
            break
    # pipeline DP for unequal stages, best lower bound first, while it can reach the top k
    jobs.sort(key=lambda j: j.lower_bound_s)
    for job in jobs:
        if job.lower_bound_s >= bound():
            break
        _run_dp(ctx, job, keep, need)
    bar.tick(len(shapes) + 1, len(shapes) + 1, min(ranked) if ranked else math.inf)

    if not best and not need:
        # Nothing was rejected for memory: the pinned choices cannot be formed at all, and
        # blaming memory would send the user after the wrong fix.
        raise ConfigError(
            f"no plan can be formed with fixed={fixed}: a pinned schedule, microbatch count or "
            f"chunking does not fit {info.num_blocks} blocks and batch {config.global_batch} "
            "(interleaved_1f1b needs at least one block per chunk, i.e. blocks >= pp x chunks "
            "with chunks >= 2, and microbatches divisible by pp; a pipeline needs at least as "
            "many microbatches as stages)",
            field="fixed",
        )
    if not best:
        raise _infeasible(info, cluster, config, fixed, need, capacity)

    candidates = sorted(best.values(), key=lambda p: p.step_s)
    ilp_ran = False
    if layer_pricing == "ilp":
        refined: list[_Priced] = []
        keys: list[_Shape] = []
        for p in candidates:
            if p.shape not in keys:
                keys.append(p.shape)
            if len(keys) >= ilp_shapes:
                break
        elapsed = time.perf_counter() - t_start
        budget = None if time_limit_s is None else max(1.0, time_limit_s - elapsed)
        for shape in keys:
            per_call = 10.0 if budget is None else max(0.5, budget / (3 * len(keys)))
            costs = ctx.ilp(shape, time_limit_s=per_call)
            if _tp_used_as_data(costs, shape, info.layers):
                # every weight whole on tp: the ILP split the batch over the tp axis, i.e. the
                # (dp·tp, tp=1) shape, which is priced on its own; a Plan carries parameter
                # placements only, so this one could not be applied as priced
                ctx.stats["ilp_tp_as_data_parallel"] = (
                    ctx.stats.get("ilp_tp_as_data_parallel", 0) + 1
                )
                continue
            local: dict[tuple, _Priced] = {}

            def keep_local(p: _Priced, local: dict = local) -> None:
                old = local.get(p.key())
                if old is None or p.step_s < old.step_s:
                    local[p.key()] = p

            # the ILP's blocks with its own embedding/head, and with Megatron's: each layer meets
            # its neighbours in the canonical layout, so the two compose, and the ILP's
            # objective (gradient sync weighted 1/microbatches) cannot see how much of a large
            # embedding's gradient all-reduce the step leaves exposed
            mixed = tuple(
                c if layer_kind(c.name) == "block" else a
                for c, a in zip(costs, ctx.analytic(shape))
            )
            for variant in (costs, mixed) if mixed != costs else (costs,):
                for job in _price_shape(
                    ctx, shape, variant, source="ilp", keep=keep_local, need=need
                ):
                    _run_dp(ctx, job, keep_local, need)
            refined.extend(local.values())
        if refined:
            # both are feasible shardings of the same candidate: keep the cheaper one. On a tie
            # (within TIE_RTOL) the ILP's is kept: its placements come from the graph, Megatron's
            # from module names. The two price the same split alike (tests pin it), so a
            # difference is a different plan (or sequence parallelism, which only the analytic
            # split models), not a different price for the same plan.
            ilp_ran = True
            wins = ties = 0
            for p in refined:
                old = best.get(p.key())
                if old is None or p.step_s < old.step_s * (1.0 - TIE_RTOL):
                    wins += 1
                elif p.step_s <= old.step_s * (1.0 + TIE_RTOL):
                    ties += 1
                else:
                    continue
                best[p.key()] = p
            ctx.stats["ilp_candidates"] = len(refined)
            ctx.stats["ilp_better_than_megatron_split"] = wins
            ctx.stats["ilp_ties_megatron_split"] = ties
            candidates = sorted(best.values(), key=lambda p: p.step_s)
    winner = candidates[0]
    elapsed = time.perf_counter() - t_start
    stats = {
        "time_s": round(elapsed, 3),
        "shapes": len(shapes),
        "candidates_priced": len(best),
        "memory_infeasible": len(need),
        "pricing": "ilp" if ilp_ran else "analytic",
        **{k2: v for k2, v in ctx.stats.items()},
    }
    if "ilp_time_s" in stats:
        stats["ilp_time_s"] = round(stats["ilp_time_s"], 3)
    return _build_plan(ctx, winner, candidates, stats, k)


def _infeasible(
    info: _ModelInfo,
    cluster: Any,
    config: TrainingConfig,
    fixed: dict[str, Any],
    need: list[float],
    capacity: float,
) -> InfeasibleError:
    least = (
        min(need)
        if need
        else float(info.param_count)
        * (config.dtype_bytes * 2 + config.optimizer_state_bytes)
        / max(1, cluster.num_devices)
    )
    suggestions = []
    per_host = cluster.devices_per_host
    factor = least / max(capacity, 1.0)
    hosts = math.ceil(cluster.num_hosts * factor) if factor > 1 else cluster.num_hosts + 1
    suggestions.append(
        f"use at least {hosts} hosts ({hosts * per_host} devices) so the model states spread further"
    )
    if fixed.get("zero", 3) != 3:
        suggestions.append("allow ZeRO-3 (shard weights, gradients and optimizer state over dp)")
    if fixed.get("recompute", "full") != "full":
        suggestions.append("use full activation recompute (keep only each layer's input)")
    if fixed.get("micro_batch_size", 1) != 1:
        suggestions.append("use micro-batch size 1")
    for key in ("tp", "pp", "dp"):
        if key in fixed:
            suggestions.append(
                f"unpin {key}={fixed[key]} so the search can split the model further"
            )
    return InfeasibleError(
        f"{info.name} ({info.param_count / 1e9:.2f}B parameters) does not fit on "
        f"{cluster.num_devices} x {cluster.device.name} with batch {config.global_batch} in any "
        "layout searched",
        needed_bytes=float(least),
        available_bytes=float(capacity),
        suggestions=suggestions,
    )


# ---------------------------------------------------------------------------------------------
# plan assembly
# ---------------------------------------------------------------------------------------------
def _prediction(ctx: _Context, p: _Priced) -> Prediction:
    cfg = ctx.config
    info = ctx.info
    world = p.shape.pp * p.shape.dp * p.shape.tp
    tokens = cfg.global_batch * info.seq_len
    model_flops = (info.fwd_flops_per_seq + info.bwd_flops_per_seq) * cfg.global_batch
    tflops = model_flops / (p.step_s * world) / 1e12
    peak = ctx.cluster.device.peak_flop_per_s(cfg.dtype)
    return Prediction(
        step_time_s=p.step_s,
        tokens_per_s=tokens / p.step_s,
        tflops_per_device=tflops,
        mfu=tflops * 1e12 / peak,
        memory_gib_per_device=p.peak_bytes / GiB,
        breakdown=p.breakdown,
        memory=p.memory,
    )


def _why(alt: _Priced, win: _Priced) -> str:
    terms = {t: getattr(alt.breakdown, t) - getattr(win.breakdown, t) for t in TIME_TERMS}
    term, delta = max(terms.items(), key=lambda kv: kv[1])
    gap = alt.step_s - win.step_s
    if abs(gap) <= 1e-9 * max(1.0, win.step_s):
        return "ties on time; " + (
            "more memory" if alt.peak_bytes > win.peak_bytes else "same memory"
        )
    return f"+{_fmt(gap)} ({100 * gap / win.step_s:.1f}%), most on {_TERM_WORDS[term]} (+{_fmt(delta)})"


def _fmt(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1.0 else f"{s:.2f} s"


def _alternative(p: _Priced, win: _Priced) -> Alternative:
    return Alternative(
        parallel=p.parallel,
        microbatches=p.microbatches,
        micro_batch_size=p.shape.b,
        schedule=p.schedule,
        zero_stage=p.zero,
        recompute=p.recompute,
        step_time_s=p.step_s,
        memory_gib_per_device=p.peak_bytes / GiB,
        why=_why(p, win) if p is not win else "chosen",
    )


def _host_mapping(cluster: Any, shape: _Shape) -> str:
    per_host = cluster.devices_per_host
    parts = []
    inner = 1
    for name, deg in (("tp", shape.tp), ("dp", shape.dp), ("pp", shape.pp)):
        if deg == 1:
            continue
        lo, hi = inner, inner * deg
        if hi <= per_host:
            parts.append(f"{name}={deg} inside a host")
        elif lo >= per_host:
            parts.append(f"{name}={deg} across hosts")
        else:
            parts.append(f"{name}={deg} spans {hi // per_host} hosts ({per_host // lo} per host)")
        inner = hi
    body = ", ".join(parts) if parts else "single device"
    return f"{body} ({per_host} devices per host, tp innermost)"


def _same_tp_placements(a: tuple[LayerCost, ...], b: tuple[LayerCost, ...]) -> bool:
    """Do two pricings of one shape split every parameter alike on the non-dp axes?"""
    for ca, cb in zip(a, b):
        pa = _rename_placements(ca.placements, ca.param_names, cb.param_names)
        for fqn, pl in cb.placements.items():
            if fqn in pa and tuple(pa[fqn][1:]) != tuple(pl[1:]):
                return False
    return True


def _plan_placements(
    info: _ModelInfo, costs: tuple[LayerCost, ...], *, zero: int, dp: int
) -> dict[str, tuple[str, ...]]:
    """Per-parameter placements for the Plan, dp entry first (the stage mesh is (dp, tp)).

    The dp entry says how a parameter is *stored* over data-parallel ranks: ``"R"`` unless
    ZeRO-3, where it is the FSDP shard dim (the ILP's own dp shard dim when it chose one, else
    dim 0). ZeRO-1/2 shard optimizer state and gradients, never the stored weight.
    """
    placements: dict[str, tuple[str, ...]] = {}
    for layer, cost in zip(info.layers, costs):
        renamed = _rename_placements(cost.placements, cost.param_names, layer.params)
        for fqn, pl in renamed.items():
            pl = tuple(pl)
            if zero == 3 and dp > 1:
                head = pl[0] if pl and pl[0].startswith("S") else "S(0)"
            else:
                head = "R"
            placements.setdefault(fqn, (head, *pl[1:]))
    return placements


def _plan_stage_layers(owner: np.ndarray, *, pp: int, v: int) -> list[tuple[int, np.ndarray]]:
    """(pipeline rank, layer indices) of every Plan stage, in stage order.

    One stage per rank, or, interleaved, one per chunk: the maximal runs of consecutive layers
    on one rank, chunk c on rank c mod pp. The emitter (``autopar.emit.mesh``) expects exactly
    ``pp · v`` stages laid out that way.
    """
    if v <= 1:
        return [(s, np.nonzero(owner == s)[0]) for s in range(pp)]
    cuts = np.nonzero(owner[:-1] != owner[1:])[0] + 1
    runs = np.split(np.arange(len(owner)), cuts)
    ranks = [int(owner[r[0]]) for r in runs]
    if len(runs) != pp * v or any(r != c % pp for c, r in enumerate(ranks)):
        raise RuntimeError(f"interleaved layout is not pp x v = {pp} x {v} looped chunks: {ranks}")
    return list(zip(ranks, runs))


def _build_plan(
    ctx: _Context, win: _Priced, candidates: list[_Priced], stats: dict[str, Any], k: int
) -> Plan:
    info = ctx.info
    shape = win.shape
    names = [layer.name for layer in info.layers]
    size = shape.dp * shape.tp
    owner = np.asarray(win.stages)
    stages = tuple(
        Stage(
            layers=tuple(names[i] for i in members),
            devices=tuple(range(rank * size, (rank + 1) * size)),
        )
        for rank, members in _plan_stage_layers(owner, pp=shape.pp, v=win.virtual_stages)
    )
    costs = win.costs
    if win.source != "ilp":
        ilp_costs = ctx.ilp_if_solved(shape)
        if ilp_costs is not None and _same_tp_placements(ilp_costs, win.costs):
            # the ILP ran for this shape and chose the same split: name it from the graph
            costs = ilp_costs
    # "ilp", "analytic", or "analytic+ilp" (the ILP's blocks with Megatron's embedding/head)
    placements_from = "+".join(sorted({c.source for c in costs}))
    placements = _plan_placements(info, costs, zero=win.zero, dp=shape.dp)
    alternatives = []

    def visible(p: _Priced) -> tuple:  # what an Alternative row shows (v is folded in)
        return (p.shape, p.schedule, p.zero, p.recompute)

    seen = {visible(win)}
    for p in candidates:
        if len(alternatives) >= k:
            break
        if visible(p) in seen:
            continue
        seen.add(visible(p))
        alternatives.append(_alternative(p, win))
    landscape: dict[tuple[int, int, int], _Priced] = {}
    for p in candidates:
        key = (p.shape.dp, p.shape.tp, p.shape.pp)
        if key not in landscape or p.step_s < landscape[key].step_s:
            landscape[key] = p
    land = tuple(
        replace(_alternative(p, win), why=("chosen" if p is win else _why(p, win)))
        for p in sorted(landscape.values(), key=lambda p: p.step_s)
    )
    stats = dict(stats)
    stats["winner_pricing"] = win.source
    stats["placements_from"] = placements_from
    if win.source == "ilp":
        st = {c.status for c in win.costs}
        stats["winner_ilp_status"] = ",".join(sorted(st))
        stats["winner_ilp_gap"] = max((c.gap for c in win.costs), default=0.0)
    return Plan(
        model=info.name,
        cluster=f"{ctx.cluster.name}",
        num_devices=shape.pp * shape.dp * shape.tp,
        global_batch=ctx.config.global_batch,
        seq_len=info.seq_len,
        dtype=ctx.config.dtype,
        parallel=win.parallel,
        mesh=Mesh(
            shape=(shape.pp, shape.dp, shape.tp),
            dim_names=("pp", "dp", "tp"),
            host_mapping=_host_mapping(ctx.cluster, shape),
        ),
        stages=stages,
        microbatches=win.microbatches,
        micro_batch_size=shape.b,
        schedule=win.schedule,
        virtual_stages=win.virtual_stages,
        zero_stage=win.zero,
        recompute=win.recompute,
        sequence_parallel=ctx.sequence_parallel(shape.tp),
        placements=placements,
        predicted=_prediction(ctx, win),
        alternatives=tuple(alternatives),
        landscape=land,
        solver=stats,
    )
