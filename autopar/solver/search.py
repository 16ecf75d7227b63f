"""The outer search: from a model, a cluster and a training setup to a Plan.

One pricer, from the traced graph
---------------------------------
Every candidate is priced from the traced layers' ops and the sharding rules; no module or
parameter name is consulted (names only label output). For each tensor-parallel degree, each
distinct layer structure and each boundary layout (activations whole over tp, or token-split:
sequence parallelism), the intra-op ILP (``sharding.layer_plan.choose_layer``) chooses every
op's sharding once, on a tp axis laid out as the innermost axis of the whole cluster. The chosen
strategy is then re-priced per micro-batch size (``price_layer``: compute of each local shard,
the collectives and resharding it implies per phase, the activations it saves at their layouts,
the attention core found by its ops) and per recompute / ZeRO / schedule option (numpy over
layers, ``solver.pricing``). Megatron's column/row split is one strategy the rules express; the
ILP finds it where it is best, and other splits where they are.

Memory
------
The ILP's time-optimal choice may keep weights whole over tp (splitting tokens instead) when
that saves communication. When a shape's time-optimal choices do not fit without recompute or
ZeRO-3, the search asks the ILP for the *lean* choice: the least memory (weights, gradients and
optimizer state per weight byte, plus saved activations), then the fastest plan within it —
CP-SAT with the memory row. Both are priced; the faster feasible one wins.

What is enumerated
------------------
Shapes (pp, dp, tp, micro-batch) come from ``solver.candidates``; per shape: sequence
parallelism (``auto`` searches both, ``on`` / ``off`` pins it), the schedule (1F1B with the
pipeline DP's unequal stages, interleaved 1F1B with ``v >= 2`` chunks per device, GPipe only
when pinned), ZeRO 0-3 and recompute none / selective / full. Pricing of one candidate is in
``solver.pricing``.

Tied parameters
---------------
A parameter used by two layers (tied input/output embeddings) gets its layout from the layer that
owns it (the first user); the other layer's ILP is solved with that layout pinned. When the two
layers sit on different pipeline ranks, both ranks hold a copy and the gradients are all-reduced
between them once per step (Megatron-LM's embedding group): the copy's memory and the
all-reduce are priced.

Which FLOPs the reported throughput counts
------------------------------------------
``tflops_per_device`` and ``mfu`` count model FLOPs: forward + backward of the traced graph,
never the recomputed forward.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from autopar.config import TrainingConfig
from autopar.cost.layer import LayerCost, layer_cost
from autopar.errors import ConfigError, InfeasibleError
from autopar.plan import (
    Alternative,
    ClusterInfo,
    LayerSpec,
    Mesh,
    OpPlacement,
    Plan,
    Prediction,
    Stack,
    Stage,
)
from autopar.solver.candidates import (
    FIXED_KEYS,
    RECOMPUTE,
    SCHEDULES,
    ZERO_STAGES,
    Shape,
    check_fixed,
    enumerate_shapes,
    no_shapes_reason,
)
from autopar.solver.pipeline import simulate_schedule
from autopar.solver.pricing import (
    DPJob,
    HostRates,
    Priced,
    PricingContext,
    plan_stage_layers,
    price_shape,
    run_dp,
    stage_details,
)

__all__ = ["search", "FIXED_KEYS", "SCHEDULES", "RECOMPUTE", "ZERO_STAGES"]

GiB = 1024**3
VARIANTS = (0, 1)
"""Memory levels of the layer choices: 0 time-optimal, 1 lean (least memory, then fastest)."""


# ---------------------------------------------------------------------------------------------
# the search's state: layer choices and prices, cached
# ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Context:
    model: Any
    """The PreparedModel."""
    cluster: Any
    config: TrainingConfig
    fixed: dict[str, Any]
    world: int
    capacity_bytes: float
    ilp_time_limit_s: float = 10.0
    graphs: dict = field(default_factory=dict)
    choices: dict = field(default_factory=dict)
    prices: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)
    p2p_cache: dict = field(default_factory=dict)
    tied_cache: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def count(self, key: str, n: float = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    # -- layers at a micro-batch --------------------------------------------------------------
    def representative(self) -> dict[str, Any]:
        """Signature -> the first layer with it (its graph names the choice's nodes)."""
        rep: dict[str, Any] = {}
        for layer in self.model.layers:
            rep.setdefault(layer.signature, layer)
        return rep

    def graph_at(self, layer: Any, b: int) -> Any:
        key = (layer.signature, b)
        hit = self.graphs.get(key)
        if hit is None:
            rep = self.representative()[layer.signature]
            hit = rep.graph if b == 1 else rep.graph.with_batch(b)
            self.graphs[key] = hit
        return hit

    def grad_sync_weight(self, tp: int) -> float:
        dp = max(1, self.world // tp)
        return 1.0 / max(1, self.config.global_batch // dp)

    # -- the ILP's choices, in model order (tied weights pinned to their owner's layout) -------
    def layer_choices(self, tp: int, sp: bool, variant: int) -> dict[str, Any]:
        """Signature -> LayerChoice for every distinct layer."""
        key = (tp, sp, variant)
        hit = self.choices.get(key)
        if hit is not None:
            return hit
        from autopar.sharding.layer_plan import choose_layer

        cfg = self.config
        multiplier = cfg.state_bytes_per_param / cfg.dtype_bytes
        owner_layout: dict[str, str] = {}
        out: dict[str, Any] = {}
        for layer in self.model.layers:
            if layer.signature in out:
                continue
            rep = self.representative()[layer.signature]
            g = self.graph_at(rep, 1)
            owned = set(rep.graph_params)
            pins = tuple(
                sorted(
                    (n.name, owner_layout[n.params[0]])
                    for n in g
                    if n.kind == "param" and n.params and n.params[0] not in owned
                    and n.params[0] in owner_layout
                )
            )  # fmt: skip
            t0 = time.perf_counter()
            try:
                choice = choose_layer(
                    g, tp=tp, world=self.world, cluster=self.cluster, dtype=cfg.dtype,
                    sequence_parallel=sp, grad_sync_weight=self.grad_sync_weight(tp),
                    time_limit_s=self.ilp_time_limit_s, pinned=pins, lean=variant > 0,
                    param_memory_multiplier=multiplier, attention=cfg.attention_kernel,
                )  # fmt: skip
            except InfeasibleError:
                choice = None
            self.count("ilp_solves")
            self.count("ilp_time_s", time.perf_counter() - t0)
            if choice is None:
                out[layer.signature] = None
                continue
            if variant > 0:
                self.count("ilp_memory_bound_solves")
            statuses = self.stats.setdefault("ilp_status", {})
            statuses[choice.status] = statuses.get(choice.status, 0) + 1
            self.stats["ilp_max_gap"] = max(self.stats.get("ilp_max_gap", 0.0), choice.gap)
            for n in g:
                if n.kind == "param" and n.params and n.params[0] in owned:
                    fqn = n.params[0]
                    if n.name in choice.select:
                        owner_layout.setdefault(fqn, choice.select[n.name])
            out[layer.signature] = choice
        self.choices[key] = out
        return out

    def distinct_variant(self, tp: int, sp: bool) -> bool:
        """Does the lean choice differ from the time-optimal one for any layer?"""
        a, b = self.layer_choices(tp, sp, 0), self.layer_choices(tp, sp, 1)
        return any(
            (a[s] is None) != (b[s] is None) or (a[s] is not None and a[s].select != b[s].select)
            for s in a
        )

    # -- prices ---------------------------------------------------------------------------------
    def layer_price(self, layer: Any, tp: int, b: int, sp: bool, variant: int) -> Any:
        from autopar.sharding.layer_plan import price_layer

        key = (layer.signature, tp, b, sp, variant)
        if key in self.prices:
            return self.prices[key]
        choice = self.layer_choices(tp, sp, variant).get(layer.signature)
        price = None
        if choice is not None:
            rep = self.representative()[layer.signature]
            try:
                price = price_layer(
                    self.graph_at(rep, b), choice, tp=tp, world=self.world,
                    cluster=self.cluster, dtype=self.config.dtype,
                    owned_params=frozenset(rep.graph_params),
                    attention=self.config.attention_kernel,
                )  # fmt: skip
            except KeyError:  # the choice splits a dim that does not divide at this batch
                price = None
            self.count("layer_prices")
        self.prices[key] = price
        return price

    def shape_costs(self, shape: Shape, sp: bool, variant: int) -> tuple[LayerCost, ...] | None:
        """Every layer's cost on ``shape``; layers sharing a signature share one LayerCost."""
        key = (shape, sp, variant)
        if key in self.costs:
            return self.costs[key]
        from autopar.topology.mesh import LogicalMesh

        mesh = LogicalMesh((shape.pp, shape.dp, shape.tp), ("pp", "dp", "tp"))
        cfg = self.config
        by_sig: dict[str, LayerCost | None] = {}
        out: list[LayerCost] = []
        for layer in self.model.layers:
            if layer.signature not in by_sig:
                price = self.layer_price(layer, shape.tp, shape.b, sp, variant)
                if price is not None and shape.pp > 1:
                    tied = self.tied_numel(layer, shape.tp, sp, variant)
                    if tied > 0:
                        # a copy of a tied weight lives on this layer's stage too (Megatron)
                        price = replace(price, param_numel=price.param_numel + tied)
                by_sig[layer.signature] = (
                    None
                    if price is None
                    else layer_cost(
                        price,
                        name=layer.name,
                        kind=layer.kind,
                        dp=shape.dp,
                        full_mesh=mesh,
                        cluster=self.cluster,
                        dtype_bytes=cfg.dtype_bytes,
                        grad_bytes=cfg.grad_bytes,
                    )  # fmt: skip
                )
            cost = by_sig[layer.signature]
            if cost is None:
                self.costs[key] = None
                return None
            out.append(cost)
        result = tuple(out)
        self.costs[key] = result
        return result

    def tied_numel(self, layer: Any, tp: int, sp: bool, variant: int) -> float:
        """Parameters this layer uses but another layer owns (tied), per device."""
        key = (layer.signature, tp, sp, variant)
        if key in self.tied_cache:
            return self.tied_cache[key]
        rep = self.representative()[layer.signature]
        g = rep.graph
        owned = set(rep.graph_params)
        price = self.layer_price(layer, tp, 1, sp, variant)
        total = 0.0
        if price is not None:
            from autopar.plan import parse_placement

            for n in g:
                if n.kind == "param" and n.params and n.params[0] not in owned and n.output:
                    kind, _ = parse_placement(price.placements.get(n.params[0], "R"))
                    total += n.output.numel / (tp if kind == "S" else 1)
        self.tied_cache[key] = total
        return total

    def p2p_s(self, shape: Shape, nbytes: float, split: bool = False) -> float:
        """Send of one stage boundary's activation (all dp x tp pairs at once). ``split``:
        Megatron-LM's scatter/gather (SC21 §4.1): each tp rank sends 1/tp of the replicated
        activation and the receiving stage all-gathers it over its tp group."""
        from autopar.cost.collectives import collective_time_s

        if shape.pp == 1 or nbytes <= 0:
            return 0.0
        split = split and shape.tp > 1
        key = (shape.pp, shape.dp, shape.tp, nbytes, split)
        hit = self.p2p_cache.get(key)
        if hit is None:
            size = shape.dp * shape.tp
            sent = nbytes / shape.tp if split else nbytes

            def boundary(s: int) -> float:
                t = collective_time_s("p2p", sent, (s * size, (s + 1) * size), self.cluster)
                if split:
                    tp_group = tuple(range((s + 1) * size, (s + 1) * size + shape.tp))
                    t += collective_time_s("all_gather", nbytes, tp_group, self.cluster)
                return t

            # every boundary is priced on the ranks it joins and the slowest one is kept
            hit = max(boundary(s) for s in range(shape.pp - 1))
            self.p2p_cache[key] = hit
        return hit

    def tied_sync_s(self, shape: Shape, costs: tuple[LayerCost, ...], sp: bool, v: int) -> float:
        """All-reduce of tied weights' gradients between the first and last pipeline rank."""
        from autopar.cost.collectives import collective_time_s

        if shape.pp == 1:
            return 0.0
        numel = sum(self.tied_numel(layer, shape.tp, sp, v) for layer in self.model.layers)
        if numel <= 0:
            return 0.0
        size = shape.dp * shape.tp
        pair = (0, (shape.pp - 1) * size)
        return collective_time_s("all_reduce", numel * self.config.grad_bytes, pair, self.cluster)


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
# the search
# ---------------------------------------------------------------------------------------------
def _sp_options(mode: str, tp: int, fixed: dict[str, Any]) -> tuple[bool, ...]:
    if tp == 1:
        return (False,)
    if "sequence_parallel" in fixed:
        return (bool(fixed["sequence_parallel"]),)
    return {"on": (True,), "off": (False,)}.get(mode, (False, True))


def _check_args(model_or_graph: Any, cluster: Any, config: Any) -> None:
    from torch import nn

    from autopar.graph.opgraph import OpGraph

    if not isinstance(model_or_graph, nn.Module | OpGraph):
        raise ConfigError(
            f"model must be a torch.nn.Module or an autopar OpGraph, got "
            f"{type(model_or_graph).__name__}",
            field="model",
        )
    if not all(hasattr(cluster, a) for a in ("num_devices", "memory_bytes", "device")):
        raise ConfigError(
            f"cluster must be a Cluster from autopar.load_cluster(...), got "
            f"{type(cluster).__name__}"
            + (" (load it first: autopar.load_cluster(name, nodes=N))" if isinstance(cluster, str) else ""),
            field="cluster",
        )  # fmt: skip
    if not isinstance(config, TrainingConfig):
        raise ConfigError(
            f"config must be an autopar.TrainingConfig, got {type(config).__name__}",
            field="config",
        )


def search(
    model_or_graph: Any,
    cluster: Any,
    config: TrainingConfig | None = None,
    *,
    fixed: dict[str, Any] | None = None,
    top_k: int = 5,
    time_limit_s: float | None = None,
    progress: bool = True,
    model_spec: str | None = None,
) -> Plan:
    """Search data / tensor / pipeline parallelism, per-op shardings, schedule, ZeRO and
    recompute for a model on a cluster (see the module docstring).

    ``model_or_graph`` is an ``nn.Module`` (traced on meta/fake tensors) or an ``OpGraph``;
    ``fixed`` pins any of ``FIXED_KEYS`` (e.g. ``{"tp": 8, "pp": 8}`` prices "my current setup"
    and searches the rest). ``model_spec`` (what rebuilds the model, e.g. ``"gpt3-175b"``) is
    recorded in the plan for ``autopar launch``. Raises InfeasibleError, stating the least memory
    per device any candidate needed and verified suggestions, when nothing fits.
    """
    from autopar.graph.prepare import prepare_model

    t_start = time.perf_counter()
    config = config if config is not None else TrainingConfig()
    _check_args(model_or_graph, cluster, config)
    fixed = check_fixed(fixed)
    if not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"must be a non-negative integer, got {top_k!r}", field="top_k")
    if time_limit_s is not None and (
        not isinstance(time_limit_s, int | float) or time_limit_s <= 0
    ):
        raise ConfigError(f"must be a positive number, got {time_limit_s!r}", field="time_limit")
    model = prepare_model(model_or_graph, seq_len=config.seq_len, dtype=config.dtype)
    try:
        return _search(
            model, cluster, config, fixed=fixed, top_k=top_k, time_limit_s=time_limit_s,
            progress=progress, model_spec=model_spec, t_start=t_start,
        )  # fmt: skip
    except InfeasibleError as e:
        raise _with_verified_suggestions(e, model, cluster, config, fixed) from None


SIMULATED = 24
"""Best candidates (by the closed form) whose pipeline schedule is simulated op by op."""


def _ideal_s(shape: Shape, costs: tuple[LayerCost, ...], global_batch: int) -> float:
    """Compute and tensor-parallel time per device of a step, no bubble: a shape's floor."""
    per_mb = sum(c.fwd_s + c.bwd_s + c.tp_fwd_s + c.tp_bwd_s for c in costs)
    return per_mb * global_batch / (shape.dp * shape.b * shape.pp)


def _simulate_best(pctx: PricingContext, ranked: list[Priced], top_k: int) -> list[Priced]:
    """Re-price the best candidates by simulating their schedule, and re-rank.

    The closed form (``pricing``) is exact for equal stages; with unequal ones (interleaved
    chunks of 1 and 2 blocks, a first stage that recomputes more) ranks stall inside the
    schedule and only the op-by-op simulation (``pipeline.simulate_schedule``) sees it. The
    difference is the pipeline bubble's, so the breakdown still adds up to the step.
    Candidates are simulated in closed-form order until the next one's closed form (a stall
    only adds time) cannot reach the best ``top_k + 1`` simulated ones, at most ``SIMULATED``.
    """
    done: list[Priced] = []
    n = 0
    for p in ranked[:SIMULATED]:
        kept = sorted(q.step_s for q in done)[: top_k + 1]
        if len(kept) > top_k and p.step_s > kept[-1]:
            break
        done.append(_simulated(pctx, p))
        n += 1
    return sorted(done, key=lambda p: p.step_s) + ranked[n:]


SIMULATED_OPS = 20_000
"""Largest schedule (forwards + backwards) simulated; beyond it the closed form stands."""


def _simulated(pctx: PricingContext, p: Priced) -> Priced:
    if p.shape.pp == 1 or 2 * p.microbatches * p.shape.pp * p.virtual_stages > SIMULATED_OPS:
        return p
    stages, _, tails = stage_details(pctx, p)
    tl = simulate_schedule(
        schedule=p.schedule, num_ranks=p.shape.pp, virtual_stages=p.virtual_stages,
        microbatches=p.microbatches, fwd_s=[s.fwd_s for s in stages],
        bwd_s=[s.bwd_s for s in stages], send_s=[s.send_s for s in stages], tail_s=tails,
        overlap_p2p=False,
    )  # fmt: skip
    extra = tl.makespan_s - p.step_s
    bubble = max(0.0, p.breakdown.pp_bubble + extra)
    return replace(p, step_s=tl.makespan_s, breakdown=replace(p.breakdown, pp_bubble=bubble))


def _unrelieved(p: Priced) -> bool:
    """True when a candidate fits with no memory relief at all (so a leaner layout is moot)."""
    return (
        p.recompute == "none"
        and p.zero != 3
        and p.offload == "none"
        and not p.recompute_layers
        and not p.offload_layers
    )


def _host_rates(cluster: Any, config: TrainingConfig) -> HostRates | None:
    """Each device's share of its host's memory, CPU and NVMe, and its copy rates; None when
    offload is off, or is ``auto`` and the topology names no host profile.

    The CPU step is priced at the fused CPU Adam rate: ``ParallelModel.make_optimizer`` asks
    PyTorch's Adam / AdamW for their fused CPU kernel when the plan offloads.
    """
    if config.offload == "none":
        return None
    try:
        prof = cluster.host_profile
    except (ConfigError, AttributeError) as e:
        if config.offload == "auto":
            return None
        raise ConfigError(
            f"offload={config.offload!r} needs the host's memory and links: {e}",
            field="offload",
        ) from None
    per = max(1, int(cluster.devices_per_host))
    adam = prof.cpu_adam_params_per_s
    # every device of a host offloads at once: each gets its share of what the host has
    return HostRates(
        memory_bytes=float(prof.memory_bytes) / per,
        h2d_bytes_per_s=float(prof.h2d_bytes_per_s),
        d2h_bytes_per_s=float(prof.d2h_bytes_per_s),
        cpu_adam_params_per_s=float(adam) / per,
        nvme_bytes=float(prof.nvme_bytes) / per,
        nvme_bytes_per_s=float(min(prof.nvme_read_bytes_per_s, prof.nvme_write_bytes_per_s)) / per,
    )


def _offload_options(
    config: TrainingConfig, fixed: dict[str, Any], host: HostRates | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(model-state offload modes, per-stage reliefs) the search tries for this setup."""
    mode = config.offload
    if mode == "auto":
        modes: tuple[str, ...] = ("none", "optimizer", "full") if host is not None else ("none",)
    else:
        modes = (mode,)
    # a pinned recompute mode is what runs: no extra blocks recomputed on top of it
    reliefs = () if "recompute" in fixed else ("recompute",)
    if host is not None and mode != "none":
        reliefs += ("offload",)
    return modes, reliefs


def _search(
    model: Any,
    cluster: Any,
    config: TrainingConfig,
    *,
    fixed: dict[str, Any],
    top_k: int,
    time_limit_s: float | None,
    progress: bool,
    model_spec: str | None,
    t_start: float,
) -> Plan:
    """The search on a prepared model (``search`` validates and prepares)."""
    world = int(cluster.num_devices)
    capacity = float(cluster.memory_bytes) * (1.0 - config.memory_headroom)
    max_tp = max(2 * int(cluster.devices_per_host), 1)
    ctx = _Context(
        model=model, cluster=cluster, config=config, fixed=fixed, world=world,
        capacity_bytes=capacity,
    )  # fmt: skip
    if time_limit_s is not None:
        ctx.ilp_time_limit_s = max(0.2, min(10.0, time_limit_s / 10))
    shapes = enumerate_shapes(
        world=world, batch=config.global_batch, num_blocks=model.num_blocks, fixed=fixed,
        max_tp=max_tp,
    )  # fmt: skip
    if not shapes:
        reason = no_shapes_reason(
            world=world, batch=config.global_batch, num_blocks=model.num_blocks, fixed=fixed,
            max_tp=max_tp,
        )  # fmt: skip
        raise ConfigError(
            f"no (dp, tp, pp, micro-batch) layout of {world} devices with global batch "
            f"{config.global_batch} and fixed={fixed or {}}: {reason}",
            field="fixed",
        )
    blocks = [i for i, layer in enumerate(model.layers) if layer.kind == "block"]
    host = _host_rates(cluster, config)
    offload_modes, reliefs = _offload_options(config, fixed, host)
    pctx = PricingContext(
        global_batch=config.global_batch,
        dtype_bytes=config.dtype_bytes,
        optimizer=config.optimizer,
        dtype=config.dtype,
        grad_dtype=config.grad_dtype_name,
        capacity_bytes=capacity,
        blocks=blocks,
        optimizer_line=_optimizer_line(cluster, config),
        p2p_s=ctx.p2p_s,
        overlap_grad_reduce=config.overlaps_grad_reduce,
        pipeline_scatter_gather=config.scatter_gathers_pipeline,
        recompute_options=config.recompute_options,
        fixed=fixed,
        optimizer_state_bytes=float(config.optimizer_state_bytes),
        host=host,
        offload_modes=offload_modes,
        reliefs=reliefs,
    )

    best: dict[tuple, Priced] = {}
    ranked: list[float] = []
    need: list[float] = []
    k = max(1, top_k)

    def keep(p: Priced) -> None:
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
    jobs: list[DPJob] = []
    mode = config.sequence_parallel_mode
    relief_pass = pctx.offload_modes != ("none",) or bool(pctx.reliefs)
    total = len(shapes) * (2 if relief_pass else 1) + 1
    priced: list[tuple[Shape, bool, int, PricingContext, tuple]] = []
    done = searched = 0
    # first pass: every shape without memory relief or offload (makes the bound tight)
    for i, shape in enumerate(shapes):
        for sp in _sp_options(mode, shape.tp, fixed):
            local: list[Priced] = []

            def keep_here(p: Priced, local: list[Priced] = local) -> None:
                local.append(p)
                keep(p)

            for variant in VARIANTS:
                if variant > 0:
                    # the lean choice only matters where the time-optimal one needed memory
                    # relief (recompute, ZeRO-3) or did not fit at all
                    if local and _unrelieved(min(local, key=lambda p: p.step_s)):
                        break
                    if shape.tp == 1 or not ctx.distinct_variant(shape.tp, sp):
                        break
                costs = ctx.shape_costs(shape, sp, variant)
                if costs is None:
                    continue
                pctx_shape = pctx
                tied = ctx.tied_sync_s(shape, costs, sp, variant)
                if tied > 0:
                    pctx_shape = replace(pctx, optimizer_line=(pctx.optimizer_line[0] + tied,
                                                               pctx.optimizer_line[1]))  # fmt: skip
                priced.append((shape, sp, variant, pctx_shape, costs))
                jobs += price_shape(
                    pctx_shape, shape, costs, sequence_parallel=sp, variant=variant,
                    keep=keep_here, need=need, bound=bound, phase="plain",
                )  # fmt: skip
        done = searched = i + 1
        bar.tick(done, total, min(ranked) if ranked else math.inf)
        if time_limit_s is not None and time.perf_counter() - t_start > time_limit_s:
            ctx.stats["stopped_early"] = True
            break
    # second pass: per-stage recompute, activation and model-state offload, pruned by the bound
    if relief_pass and not ctx.stats.get("stopped_early"):
        # most promising first (compute and tp comm per device, no bubble): the bound tightens
        # early and prunes the rest before their relief is worked out
        priced.sort(key=lambda job: _ideal_s(job[0], job[4], config.global_batch))
        last_shape = None
        for shape, sp, variant, pctx_shape, costs in priced:
            jobs += price_shape(
                pctx_shape, shape, costs, sequence_parallel=sp, variant=variant, keep=keep,
                need=need, bound=bound, phase="relief",
            )  # fmt: skip
            if shape != last_shape:
                done += 1
                last_shape = shape
                bar.tick(done, total, min(ranked) if ranked else math.inf)
            if time_limit_s is not None and time.perf_counter() - t_start > time_limit_s:
                ctx.stats["stopped_early"] = True
                break
    # pipeline DP for unequal stages, best lower bound first, while it can reach the top k
    jobs.sort(key=lambda j: j.lower_bound_s)
    for job in jobs:
        if job.lower_bound_s >= bound():
            break
        if time_limit_s is not None and time.perf_counter() - t_start > time_limit_s:
            ctx.stats["stopped_early"] = True
            break
        ctx.count("dp_runs", run_dp(job, keep, need))
    bar.tick(total, total, min(ranked) if ranked else math.inf)

    if not best and not need:
        raise ConfigError(
            f"no plan can be formed with fixed={fixed}: "
            + _unformable_reason(shapes, fixed, model.num_blocks, config.global_batch),
            field="fixed",
        )
    if not best:
        if not need and pctx.host_short and pctx.host is not None:
            raise InfeasibleError(
                f"{model.name} ({model.param_count / 1e9:.2f}B parameters) does not fit on "
                f"{cluster.num_devices} x {cluster.device.name} with batch "
                f"{config.global_batch} in any layout searched",
                needed_bytes=min(pctx.host_short),
                available_bytes=float(pctx.host.memory_bytes),
                memory="host",
            )
        raise _infeasible(model, cluster, config, need, capacity)

    candidates = _simulate_best(pctx, sorted(best.values(), key=lambda p: p.step_s), top_k)
    winner = candidates[0]
    elapsed = time.perf_counter() - t_start
    lower = _lower_bound_s(model, cluster, config)
    stats: dict[str, Any] = {
        "time_s": round(elapsed, 3),
        "shapes": len(shapes),
        "shapes_searched": searched,
        "candidates_priced": len(best),
        "memory_infeasible": len(need),
        "pricing": "graph",
        **ctx.stats,
    }
    if "ilp_time_s" in stats:
        stats["ilp_time_s"] = round(stats["ilp_time_s"], 3)
    if stats.get("stopped_early"):
        stats["lower_bound_s"] = lower
        stats["gap"] = max(0.0, (winner.step_s - lower) / winner.step_s)
        print(
            f"autopar: warning: the search stopped at its time limit after {searched} of "
            f"{len(shapes)} shapes; no plan can take less than {lower:.3f} s/step against "
            f"this plan's {winner.step_s:.3f} s (a better plan is at most "
            f"{winner.step_s / max(lower, 1e-30):.2f}x faster)",
            file=sys.stderr,
        )
    else:
        stats["gap"] = 0.0
    return _build_plan(ctx, winner, candidates, stats, top_k, model_spec=model_spec, pctx=pctx)


def _lower_bound_s(model: Any, cluster: Any, config: TrainingConfig) -> float:
    """No plan beats the model's FLOPs at every device's tensor-core peak."""
    flops = (model.fwd_flops_per_sample + model.bwd_flops_per_sample) * config.global_batch
    peak = cluster.device.peak_flop_per_s(config.dtype) * cluster.num_devices
    return flops / peak if peak > 0 else 0.0


def _optimizer_line(cluster: Any, config: TrainingConfig) -> tuple[float, float]:
    """(intercept_s, s_per_param) of the step after the last backward, per device.

    The update streams weights, gradients and optimizer state through HBM once (a fused
    multi-tensor kernel); gradient clipping first reads the gradients for their norm,
    all-reduces one scalar over every rank and rescales them (one more read and write).
    Memory-bound kernels are linear in the parameters, so two prices give the line.
    """
    from autopar.cost.collectives import collective_time_s
    from autopar.cost.compute import memory_bound_time_s

    state = config.optimizer_state_bytes
    grad = config.grad_bytes
    update_bytes = 2.0 * (state + 2 * grad)  # read and write master/state, weights, grads
    clip_bytes = 3.0 * grad if config.grad_clip is not None else 0.0

    def t(n: float) -> float:
        return memory_bound_time_s(
            bytes_moved=n * (update_bytes + clip_bytes), flops=12.0 * n,
            device=cluster.device, dtype="fp32", kernels=3 if clip_bytes else 1,
        )  # fmt: skip

    t1, t2 = t(1e9), t(2e9)
    slope = (t2 - t1) / 1e9
    intercept = t1 - slope * 1e9
    if config.grad_clip is not None and cluster.num_devices > 1:
        everyone = tuple(range(int(cluster.num_devices)))
        intercept += collective_time_s("all_reduce", 4.0, everyone, cluster)
    return intercept, slope


def _unformable_reason(
    shapes: list[Shape], fixed: dict[str, Any], num_blocks: int, batch: int
) -> str:
    """Which pinned rule left no candidate, named (shapes exist, none could be laid out)."""
    if fixed.get("schedule") == "interleaved_1f1b":
        pps = sorted({s.pp for s in shapes})
        v = fixed.get("virtual_stages", 2)
        if all(pp < 2 for pp in pps):
            return "interleaved_1f1b needs a pipeline (pp >= 2)"
        if all(num_blocks < pp * v for pp in pps):
            return (
                f"interleaved_1f1b needs at least one block per chunk: {num_blocks} blocks < pp "
                f"x chunks = {min(pps) * v} (pp={min(pps)}, chunks={v})"
            )
        counts = sorted({batch // (s.dp * s.b) for s in shapes})
        return (
            f"interleaved_1f1b needs the microbatch count divisible by pp (Megatron's schedule): "
            f"microbatches {counts[:6]} with pp {pps}"
        )
    if "virtual_stages" in fixed:
        return "virtual_stages is only used by the interleaved_1f1b schedule (pin that too)"
    return "the pinned choices leave no schedule that fits the blocks and microbatches"


def _infeasible(
    model: Any, cluster: Any, config: TrainingConfig, need: list[float], capacity: float
) -> InfeasibleError:
    least = (
        min(need)
        if need
        else float(model.param_count) * config.state_bytes_per_param / max(1, cluster.num_devices)
    )
    return InfeasibleError(
        f"{model.name} ({model.param_count / 1e9:.2f}B parameters) does not fit on "
        f"{cluster.num_devices} x {cluster.device.name} with batch {config.global_batch} in any "
        "layout searched",
        needed_bytes=float(least),
        available_bytes=float(capacity),
    )


MAX_HOST_TRIES = 6
"""Host counts tried when checking a "use more hosts" suggestion."""


def _feasible(model: Any, cluster: Any, config: TrainingConfig, fixed: dict[str, Any]) -> bool:
    try:
        _search(model, cluster, config, fixed=fixed, top_k=0, time_limit_s=None,
                progress=False, model_spec=None, t_start=time.perf_counter())  # fmt: skip
    except (InfeasibleError, ConfigError):
        return False
    return True


def _lean(fixed: dict[str, Any]) -> dict[str, Any]:
    """The pins plus the least-memory choice of everything not pinned (a quick fit test)."""
    out = dict(fixed)
    out.setdefault("zero", 3)
    out.setdefault("recompute", "full")
    out.setdefault("micro_batch_size", 1)
    return out


def _with_verified_suggestions(
    error: InfeasibleError, model: Any, cluster: Any, config: TrainingConfig, fixed: dict[str, Any]
) -> InfeasibleError:
    """The same error with only the remedies that were checked to make the model fit: each is
    re-run through the search before it is printed."""
    tries: list[tuple[str, dict[str, Any]]] = []
    if fixed.get("zero", 3) != 3:
        tries.append(("allow ZeRO-3 (shard weights, gradients and optimizer state over dp)",
                      {k: v for k, v in fixed.items() if k != "zero"}))  # fmt: skip
    if fixed.get("recompute", "full") != "full":
        tries.append(("use full activation recompute (keep only each layer's input)",
                      {k: v for k, v in fixed.items() if k != "recompute"}))  # fmt: skip
    if fixed.get("micro_batch_size", 1) != 1 or "microbatches" in fixed:
        tries.append(
            (
                "use micro-batch size 1",
                {**{k: v for k, v in fixed.items() if k != "microbatches"}, "micro_batch_size": 1},
            )
        )
    for key in ("tp", "pp", "dp"):
        if key in fixed:
            tries.append((f"unpin {key}={fixed[key]} so the search can split the model further",
                          {k: v for k, v in fixed.items() if k != key}))  # fmt: skip
    verified = [text for text, pins in tries if _feasible(model, cluster, config, _lean(pins))]
    if config.offload == "none" and getattr(cluster, "has_host_profile", False):
        offloading = replace(config, offload="auto")
        if _feasible(model, cluster, offloading, _lean(fixed)):
            verified.append("allow offload to host memory (--offload auto)")
    pins = {k: v for k, v in fixed.items() if k in ("tp", "pp")}
    hosts = _more_hosts(error, model, cluster, config, pins)
    if hosts is not None:
        verified.append(
            f"use {hosts} hosts ({hosts * cluster.devices_per_host} devices; checked to fit)"
        )
    elif pins:
        hosts = _more_hosts(error, model, cluster, config, {})
        if hosts is not None:
            verified.append(
                f"unpin {', '.join(f'{k}={v}' for k, v in pins.items())} and use {hosts} hosts "
                f"({hosts * cluster.devices_per_host} devices; checked to fit)"
            )
    if not verified:
        more = (
            "hosts with more memory or NVMe"
            if error.memory == "host"
            else "devices with more memory"
        )
        verified.append(
            "no single change checked here makes it fit: a smaller model, a shorter sequence or "
            + more
        )
    return InfeasibleError(
        error.message,
        needed_bytes=error.needed_bytes,
        available_bytes=error.available_bytes,
        suggestions=verified,
        memory=error.memory,
    )


def _more_hosts(
    error: InfeasibleError, model: Any, cluster: Any, config: TrainingConfig, pins: dict[str, Any]
) -> int | None:
    """The fewest hosts (from the memory estimate upwards, a few tries) on which the search
    finds a plan with ``pins``."""
    from autopar.topology.load import load_cluster

    source = getattr(cluster, "file", "") or cluster.name
    factor = error.needed_bytes / max(error.available_bytes, 1.0)
    start = max(cluster.num_hosts + 1, math.ceil(cluster.num_hosts * factor))
    tried = 0
    hosts = start
    while tried < MAX_HOST_TRIES:
        try:
            bigger = load_cluster(source, nodes=hosts)
        except ConfigError:
            return None  # beyond what the topology allows
        if _feasible(model, bigger, config, _lean(pins)):
            return hosts
        tried += 1
        hosts = hosts + max(1, hosts // 4)
    return None


# ---------------------------------------------------------------------------------------------
# plan assembly
# ---------------------------------------------------------------------------------------------
def _prediction(ctx: _Context, p: Priced) -> Prediction:
    cfg = ctx.config
    model = ctx.model
    world = p.shape.pp * p.shape.dp * p.shape.tp
    samples = cfg.global_batch
    tokens = samples * (model.seq_len or 1)
    model_flops = (model.fwd_flops_per_sample + model.bwd_flops_per_sample) * cfg.global_batch
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


def _topology_path(cluster: Any) -> str | None:
    """The topology file when it is not a shipped one (shipped ones are found by name)."""
    from pathlib import Path

    from autopar.topology.load import TOPOLOGY_DIR

    source = getattr(cluster, "file", "")
    if not source:
        return None
    path = Path(source).resolve()
    return None if path.parent == Path(TOPOLOGY_DIR).resolve() else str(path)


def _alternative(p: Priced) -> Alternative:
    return Alternative(
        parallel=p.parallel,
        microbatches=p.microbatches,
        micro_batch_size=p.shape.b,
        schedule=p.schedule,
        zero_stage=p.zero,
        recompute=p.recompute,
        step_time_s=p.step_s,
        memory_gib_per_device=p.peak_bytes / GiB,
        sequence_parallel=p.sequence_parallel,
        virtual_stages=p.virtual_stages,
        breakdown=p.breakdown,
        offload=p.offload,
        recompute_blocks=len(p.recompute_layers),
        offload_blocks=len(p.offload_layers),
    )


def _build_plan(
    ctx: _Context,
    win: Priced,
    candidates: list[Priced],
    stats: dict[str, Any],
    k: int,
    *,
    model_spec: str | None,
    pctx: PricingContext,
) -> Plan:

    model = ctx.model
    shape = win.shape
    names = [layer.name for layer in model.layers]
    size = shape.dp * shape.tp
    owner = np.asarray(win.stages)
    stages = tuple(
        Stage(
            layers=tuple(names[i] for i in members),
            devices=tuple(range(rank * size, (rank + 1) * size)),
        )
        for rank, members in plan_stage_layers(owner, pp=shape.pp, v=win.virtual_stages)
    )
    # placements and per-op layouts from the winner's layer choices, renamed per real layer
    placements: dict[str, tuple[str, ...]] = {}
    layouts: dict[str, tuple[OpPlacement, ...]] = {}
    unknown: dict[str, int] = {}
    indivisible: dict[str, tuple[int, ...]] = {}
    rep = ctx.representative()
    # parameter shapes of each distinct layer (to name weights tp cannot split evenly)
    shapes = {
        sig: {
            n.params[0]: tuple(int(d) for d in n.output.shape)
            for n in layer.graph
            if n.kind == "param" and n.params and n.output is not None
        }
        for sig, layer in rep.items()
    }
    storage = "S(0)" if win.zero == 3 and shape.dp > 1 else "R"
    for layer in model.layers:
        price = ctx.layer_price(layer, shape.tp, shape.b, win.sequence_parallel, win.variant)
        inner_to_real = dict(zip(rep[layer.signature].graph_params, layer.params))
        for inner, tp_text in price.placements.items():
            real = inner_to_real.get(inner)
            if real is None:
                real = inner  # a tied weight: named by its owner, placed by the owner first
            placements.setdefault(real, (storage, tp_text))
            dims = shapes[layer.signature].get(inner, ())
            if (
                shape.tp > 1
                and tp_text == "R"
                and len(dims) >= 2
                and any(d % shape.tp for d in dims)
            ):
                indivisible.setdefault(real, dims)
        if shape.tp > 1 and layer.signature not in layouts:
            layouts[layer.signature] = tuple(
                OpPlacement(op=o.op, inputs=o.inputs, output=o.output, core=o.core, loss=o.loss)
                for o in price.layouts
            )
        for op in price.unsupported_ops:
            unknown[op] = unknown.get(op, 0) + 1
    alternatives = []

    def visible(p: Priced) -> tuple:  # what an Alternative row shows
        return (p.shape, p.schedule, p.zero, p.recompute, p.sequence_parallel)

    seen = {visible(win)}
    for p in candidates:
        if len(alternatives) >= k:
            break
        if visible(p) in seen:
            continue
        seen.add(visible(p))
        alternatives.append(_alternative(p))
    landscape: dict[tuple[int, int, int], Priced] = {}
    for p in candidates:
        key = (p.shape.dp, p.shape.tp, p.shape.pp)
        if key not in landscape or p.step_s < landscape[key].step_s:
            landscape[key] = p
    land = tuple(_alternative(p) for p in sorted(landscape.values(), key=lambda p: p.step_s))
    stats = dict(stats)
    stats["winner_variant"] = "time-optimal" if win.variant == 0 else "memory-lean"
    details = stage_details(pctx, win)
    cfg = ctx.config
    cluster = ctx.cluster
    return Plan(
        model=model.name,
        model_spec=model_spec,
        model_facts=dict(model.facts),
        cluster=str(cluster.name),
        cluster_info=ClusterInfo(
            name=str(cluster.name),
            path=_topology_path(cluster),
            nodes=int(cluster.num_hosts),
            devices_per_host=int(cluster.devices_per_host),
            device=str(cluster.device.name),
        ),
        num_devices=shape.pp * shape.dp * shape.tp,
        global_batch=cfg.global_batch,
        seq_len=model.seq_len,
        dtype=cfg.dtype,
        optimizer=cfg.optimizer,
        stack=Stack(
            name=cfg.stack,
            attention=cfg.attention_kernel,
            sequence_parallel=cfg.sequence_parallel_mode,
            overlap_grad_reduce=cfg.overlaps_grad_reduce,
            grad_dtype=cfg.grad_dtype_name,
            pipeline_scatter_gather=cfg.scatter_gathers_pipeline,
        ),
        parallel=win.parallel,
        mesh=Mesh(shape=(shape.pp, shape.dp, shape.tp), dim_names=("pp", "dp", "tp")),
        layers=tuple(
            LayerSpec(name=layer.name, kind=layer.kind, signature=layer.signature)
            for layer in model.layers
        ),
        stages=stages,
        microbatches=win.microbatches,
        micro_batch_size=shape.b,
        schedule=win.schedule,
        virtual_stages=win.virtual_stages,
        zero_stage=win.zero,
        recompute=win.recompute,
        recompute_layers=tuple(model.layers[i].name for i in win.recompute_layers),
        offload=win.offload,
        offload_device=win.offload_device if win.offload != "none" else "cpu",
        activation_offload_layers=tuple(model.layers[i].name for i in win.offload_layers),
        sequence_parallel=win.sequence_parallel,
        placements=placements,
        layouts=layouts,
        unknown_ops=unknown,
        indivisible_params=indivisible,
        predicted=replace(
            _prediction(ctx, win),
            stages=tuple(details[0]),
            rank_memory=tuple(details[1]),
            rank_tail_s=tuple(details[2]),
        ),  # fmt: skip
        alternatives=tuple(alternatives),
        landscape=land,
        solver=stats,
    )
