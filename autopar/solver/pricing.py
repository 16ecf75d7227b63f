"""Pricing one candidate: per-layer costs -> step time and peak memory of a pipeline layout.

Inputs are the per-layer ``LayerCost``s of one shape (``cost.layer``, from the traced graph as
the intra-op ILP placed it); everything here is numpy over layers, so thousands of candidates
are priced in milliseconds.

Per layer and microbatch: forward and backward compute, exposed tensor-parallel communication,
what recompute re-runs (full: the forward and its tp collectives; selective: the attention core
found by its ops), activation bytes kept, gradient synchronisation and ZeRO-3 gathers. A
stage's latency is the sum over its layers plus the point-to-point send of its output
(activation forward, gradient backward; with ``pipeline_scatter_gather`` a send replicated over
tp goes as 1/tp per rank plus an all-gather over the receiving tp group, Megatron-LM 2021-22).
The pipeline takes ``Σ t_s + (M - 1) · max t_s`` (GPipe / 1F1B) or
``(1/v) Σ t_s + (M - 1/v) · max t_s`` (interleaved; ``t_s`` sums all chunks rank s holds).
Gradient synchronisation over dp runs once per step; with overlap it hides behind the last
microbatch's backward on each stage (DDP buckets / FSDP reduce-scatter), without it is all
exposed. Gradients left partial over tp are all-reduced once per step too (before the
optimizer). ZeRO-3 gathers weights for every use and reduce-scatters gradients per microbatch,
prefetched behind compute: each layer costs ``max(compute, gathers)``. The optimizer update
streams weights, gradients and optimizer state through HBM once.

Memory per device on the most loaded stage: weights, gradients and optimizer state (divided by
dp from ZeRO stage 3, 2 and 1 respectively), activations of the microbatches in flight for the
schedule (``pipeline.inflight_microbatches``) and transients (a recomputed layer's full
activations; ZeRO-3's gathered weights). A candidate over capacity is dropped, and counted.

Memory relief is priced only where a candidate does not fit, as the emitter applies it:
per-stage full recompute of as few blocks as each over-capacity rank needs (the first 1F1B
rank, with the most microbatches in flight, needs the most); per-stage activation offload
(``save_on_cpu``: copies on the compute stream, exposed); model-state offload, ``optimizer``
(ZeRO-Offload: state and an fp32 master copy in host memory, gradients out and weights back
around a CPU step after backward, all exposed) or ``full`` (FSDP2's CPU offload: ZeRO-3 whose
gathers and reduce-scatters also cross PCIe, prefetched like ZeRO-3's). Host memory is checked
per device (its share of the host); optimizer state that the host cannot hold goes to NVMe.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autopar.config import DTYPE_BYTES
from autopar.cost.layer import LayerCost
from autopar.cost.memory import model_state_breakdown
from autopar.plan import MemoryBreakdown, Parallel, TimeBreakdown
from autopar.solver.candidates import RECOMPUTE, ZERO_STAGES, Shape
from autopar.solver.pipeline import inflight_microbatches, solve_stages

__all__ = [
    "stage_details",
    "Priced",
    "PricingContext",
    "DPJob",
    "price_shape",
    "run_dp",
    "chunk_sizes",
    "plan_stage_layers",
    "TIME_TERMS",
]

TIME_TERMS = ("compute", "recompute", "tp_comm", "pp_bubble", "pp_comm", "dp_comm")


@dataclass(slots=True)
class Priced:
    """One fully priced candidate."""

    shape: Shape
    microbatches: int
    schedule: str
    virtual_stages: int
    zero: int
    recompute: str
    sequence_parallel: bool
    variant: int
    """Which memory level of the ILP's layer choices (0: time-optimal)."""
    stages: np.ndarray
    """Pipeline rank of every layer (several chunks per rank when interleaved)."""
    step_s: float
    breakdown: TimeBreakdown
    memory: MemoryBreakdown
    peak_bytes: float
    costs: tuple[LayerCost, ...] = field(repr=False, default=())
    offload: str = "none"
    """Model-state offload: ``none``, ``optimizer`` or ``full``."""
    offload_device: str = "cpu"
    """Where offloaded optimizer state lives: ``cpu`` or ``nvme`` (when host memory is short)."""
    recompute_layers: tuple[int, ...] = ()
    """Layer indices of the blocks fully recomputed on top of ``recompute`` (per-stage relief:
    only on the ranks over capacity)."""
    offload_layers: tuple[int, ...] = ()
    """Layer indices of the blocks whose saved activations go to host memory."""
    host_bytes: float = 0.0
    """Host memory one device uses (most loaded rank)."""
    offload_s: float = 0.0
    """Exposed host<->device transfers and CPU optimizer time per step."""
    offload_hidden_s: float = 0.0
    ranks: RankArrays | None = field(default=None, repr=False)
    """Per pipeline rank memory and tail, as priced (for the plan's per-rank figures)."""

    @property
    def parallel(self) -> Parallel:
        return Parallel(dp=self.shape.dp, tp=self.shape.tp, pp=self.shape.pp)

    def key(self) -> tuple:
        s = self.shape
        return (s.pp, s.dp, s.tp, s.b, self.schedule, self.virtual_stages, self.zero,
                self.recompute, self.sequence_parallel, self.offload, self.recompute_layers,
                self.offload_layers)  # fmt: skip


@dataclass(slots=True, kw_only=True)
class PricingContext:
    """What pricing a candidate needs besides its layer costs."""

    global_batch: int
    dtype_bytes: int
    optimizer: str
    optimizer_state_bytes: float
    dtype: str
    grad_dtype: str
    capacity_bytes: float
    blocks: list[int]
    """Indices of the block layers (pipeline stages cut between blocks)."""
    optimizer_line: tuple[float, float]
    """(intercept_s, s_per_param) of the optimizer step."""
    p2p_s: Callable[[Shape, float, bool], float]
    """Seconds to send one stage boundary's activation (all dp x tp pairs at once); the flag
    asks for the scatter/gather send of a tp-replicated activation."""
    overlap_grad_reduce: bool = True
    pipeline_scatter_gather: bool = False
    """Sends replicated over tp (no sequence parallelism) split over tp (Megatron-LM 2021-22)."""
    recompute_options: tuple[str, ...] = RECOMPUTE
    """Recompute kinds searched when none is pinned (the stack's: ``TrainingConfig``)."""
    fixed: dict[str, Any] = field(default_factory=dict)
    host: HostRates | None = None
    """Host memory and links per device; None when offload is not searched."""
    offload_modes: tuple[str, ...] = ("none",)
    """Model-state offload modes to try (``none`` first; ``optimizer``, ``full``)."""
    host_short: list[float] = field(default_factory=list)
    """Host bytes per device of candidates that fit the device but not the host (shared by
    ``replace``d copies: the search reads it when nothing fits)."""
    reliefs: tuple[str, ...] = ()
    """Per-stage memory relief to try when a candidate does not fit: ``recompute`` (fully
    recompute only as many blocks as the stage needs) and ``offload`` (move that many blocks'
    saved activations to host memory)."""

    @property
    def grad_bytes(self) -> int:
        """Bytes per gradient element (``grad_dtype``)."""
        return DTYPE_BYTES[self.grad_dtype]


@dataclass(frozen=True, slots=True)
class RankArrays:
    """Per pipeline rank bytes (after any relief) and seconds after the pipeline flush."""

    weights: np.ndarray
    grads: np.ndarray
    optimizer: np.ndarray
    activations: np.ndarray
    other: np.ndarray
    host: np.ndarray
    tail: np.ndarray


@dataclass(frozen=True, slots=True, kw_only=True)
class HostRates:
    """What one device may use of its host (its share when every device of the host does)."""

    memory_bytes: float
    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    cpu_adam_params_per_s: float
    nvme_bytes: float
    nvme_bytes_per_s: float


# ---------------------------------------------------------------------------------------------
# per-layer arrays
# ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Base:
    fwd: np.ndarray
    bwd: np.ndarray
    tp_fwd: np.ndarray
    tp_bwd: np.ndarray
    tp_sync: np.ndarray
    core_fwd: np.ndarray
    grad_sync: np.ndarray
    gather: np.ndarray
    reduce: np.ndarray
    params: np.ndarray
    act: np.ndarray
    core_act: np.ndarray
    inp: np.ndarray
    p2p: np.ndarray


def _base(
    ctx: PricingContext, shape: Shape, costs: tuple[LayerCost, ...], sequence_parallel: bool
) -> _Base:
    # without sequence parallelism the hidden state crossing a boundary is replicated over tp
    split = ctx.pipeline_scatter_gather and not sequence_parallel

    def arr(attr: str) -> np.ndarray:
        return np.fromiter((getattr(c, attr) for c in costs), dtype=float, count=len(costs))

    return _Base(
        fwd=arr("fwd_s"),
        bwd=arr("bwd_s"),
        tp_fwd=arr("tp_fwd_s"),
        tp_bwd=arr("tp_bwd_s"),
        tp_sync=arr("tp_grad_sync_s"),
        core_fwd=arr("core_fwd_s"),
        grad_sync=arr("grad_sync_s"),
        gather=arr("zero3_gather_s"),
        reduce=arr("zero3_reduce_s"),
        params=arr("params_per_device"),
        act=arr("act_bytes"),
        core_act=arr("core_act_bytes"),
        inp=arr("input_bytes"),
        p2p=np.fromiter(
            (2.0 * ctx.p2p_s(shape, c.output_bytes, split) for c in costs),
            dtype=float,
            count=len(costs),
        ),
    )


@dataclass(slots=True)
class _Vectors:
    """Per-layer arrays for one (shape, recompute, zero, offload) combination."""

    lat: np.ndarray
    hidden_zero3: np.ndarray
    exposed_zero3: np.ndarray
    compute: np.ndarray
    recompute: np.ndarray
    tp: np.ndarray
    bwd_window: np.ndarray
    grad_sync: np.ndarray
    tp_sync: np.ndarray
    saved: np.ndarray
    transient: np.ndarray
    weights: np.ndarray
    grads: np.ndarray
    optimizer: np.ndarray
    params: np.ndarray
    p2p: np.ndarray
    host: np.ndarray
    """Bytes of model state per layer kept in host memory (offload)."""
    fwd_part: np.ndarray
    """The forward's share of ``lat``: compute, tp comm and the ZeRO-3 gather the prefetch does
    not hide (the schedule simulation's forward op)."""
    to_full: np.ndarray
    """Extra seconds per microbatch to recompute the layer in full (per-stage relief)."""
    full_saved: np.ndarray
    """What the layer keeps when fully recomputed (its input), and its transient then."""
    full_transient: np.ndarray
    offload_hidden: np.ndarray
    offload_exposed: np.ndarray
    """Host<->device copies of ``full`` offload not hidden behind compute, per microbatch."""
    """Host<->device copies per layer hidden behind compute (full offload)."""


def _vectors(
    ctx: PricingContext,
    b: _Base,
    dp: int,
    recompute: str,
    zero: int,
    offload: str = "none",
    microbatches: int = 1,
) -> _Vectors:
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
    # ZeRO-2 shards gradients only without accumulation: over several microbatches the full
    # gradients accumulate before the one reduce-scatter (FSDP2's no-sync, what the emitter
    # runs; Megatron's distributed optimizer), so it holds ZeRO-1's gradient memory
    state_zero = 1 if zero == 2 and microbatches > 1 else zero
    state = model_state_breakdown(
        num_params=1.0,
        dtype=ctx.dtype,
        optimizer=ctx.optimizer,
        zero_stage=state_zero,
        dp=dp,
        grad_dtype=ctx.grad_dtype,
    )
    w_pp, g_pp, o_pp, host_pp = state.weights, state.grads, state.optimizer, 0.0
    gather, reduce = b.gather, b.reduce
    copies_hidden = np.zeros_like(base)
    copies_exposed = np.zeros_like(base)
    fwd_exposed = np.zeros_like(base)
    if offload == "optimizer":
        host_pp, o_pp = o_pp, 0.0
    elif offload == "full":
        # FSDP2's CPU offload: the weight shard comes from host memory before every use, the
        # gradient shard goes back after every reduce-scatter
        host_pp, w_pp, g_pp, o_pp = w_pp + g_pp + o_pp, 0.0, 0.0, 0.0
        h = ctx.host
        assert h is not None
        w_shard = b.params * ctx.dtype_bytes / max(1, dp)
        gather = gather + w_shard / h.h2d_bytes_per_s
        reduce = reduce + b.params * ctx.grad_bytes / max(1, dp) / h.d2h_bytes_per_s
    if zero == 3 and (dp > 1 or offload == "full"):
        # forward: the next layer's weights are prefetched behind this layer's compute;
        # backward (recompute + gradients): gathered on demand and reduce-scattered, exposed
        fwd = b.fwd + b.tp_fwd
        fwd_exposed = np.maximum(0.0, gather - fwd)
        lat = base + fwd_exposed + gather + reduce
        hidden = np.minimum(gather, fwd)
        trans = trans + b.params * ctx.dtype_bytes  # one layer's gathered weights at a time
        sync = np.zeros_like(base)
        if offload == "full":
            copies_hidden = np.minimum(gather - b.gather, fwd)
            plain = (
                np.maximum(0.0, b.gather - fwd) + b.gather + b.reduce
                if dp > 1
                else np.zeros_like(base)
            )
            copies_exposed = lat - base - plain
    else:
        lat, hidden, sync = base, np.zeros_like(base), b.grad_sync
    if recompute == "none":
        to_full = b.fwd + b.tp_fwd
    elif recompute == "selective":
        to_full = np.maximum(0.0, b.fwd + b.tp_fwd - b.core_fwd)
    else:
        to_full = np.zeros_like(base)
    return _Vectors(
        lat=lat,
        hidden_zero3=hidden,
        exposed_zero3=lat - base - copies_exposed,
        compute=compute,
        recompute=rec,
        tp=tp,
        bwd_window=b.bwd + b.tp_bwd,
        grad_sync=sync,
        tp_sync=b.tp_sync,
        saved=saved,
        transient=trans,
        weights=b.params * w_pp,
        grads=b.params * g_pp,
        optimizer=b.params * o_pp,
        params=b.params,
        p2p=b.p2p,
        host=b.params * host_pp,
        fwd_part=b.fwd + b.tp_fwd + fwd_exposed,
        to_full=to_full,
        full_saved=b.inp,
        full_transient=b.act,
        offload_hidden=copies_hidden,
        offload_exposed=copies_exposed,
    )


@functools.lru_cache(maxsize=65536)
def _inflight(schedule: str, pp: int, m: int, v: int) -> Any:
    return inflight_microbatches(schedule=schedule, num_stages=pp, microbatches=m, virtual_stages=v)


def _relieve(
    ctx: PricingContext,
    vec: _Vectors,
    *,
    owner: np.ndarray,
    flight: np.ndarray,
    totals: np.ndarray,
    other: np.ndarray,
    relief: str,
    pp: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Per-stage memory relief for the ranks over capacity, fewest blocks first.

    Returns (the relieved blocks' layer indices, extra seconds per microbatch per rank, new
    device bytes per rank, activation bytes sent to host per rank), or None when a rank cannot
    fit. A rank with more microbatches in flight (the first in 1F1B) needs more relief than the
    last.
    ``recompute``: a block fully recomputed keeps only its input (its full activations are a
    transient while it is recomputed). ``offload``: a block's saved activations are copied to
    host memory as the forward goes and back for the backward, on the compute stream
    (``torch.autograd.graph.save_on_cpu``, what the emitter runs): the copies are exposed.
    """
    cap = ctx.capacity_bytes
    blocks = np.asarray(ctx.blocks, dtype=np.int64)
    # all ranks at once first: relieving every block of a rank is the most it can save
    ob = owner[blocks]
    if relief == "recompute":
        most = flight * np.bincount(ob, vec.saved[blocks] - vec.full_saved[blocks], pp)
        peak_t = np.zeros(pp)
        np.maximum.at(peak_t, ob, vec.full_transient[blocks])
        grow = np.maximum(other, peak_t) - other
    else:
        most = flight * np.bincount(ob, vec.saved[blocks], pp)
        peak_t = np.zeros(pp)
        np.maximum.at(peak_t, ob, vec.saved[blocks])
        grow = peak_t
    over_cap = totals > cap * (1 + 1e-9)
    if (totals - cap + grow > most + 1e-6)[over_cap].any():
        return None
    picked: list[int] = []
    extra = np.zeros(pp)
    totals = totals.copy()
    host_act = np.zeros(pp)
    for r in np.nonzero(over_cap)[0]:
        mine = blocks[ob == r]
        if len(mine) == 0:
            return None
        if relief == "recompute":
            save = flight[r] * (vec.saved[mine] - vec.full_saved[mine])
            peak_t = float(np.max(vec.full_transient[mine]))
            new_other = max(float(other[r]), peak_t)
        else:
            save = flight[r] * vec.saved[mine]
            new_other = float(other[r]) + float(np.max(vec.saved[mine]))  # a copy in flight
        order = np.argsort(-save)
        cum = np.cumsum(save[order])
        over = float(totals[r]) - cap + (new_other - float(other[r]))
        n = int(np.searchsorted(cum, over - 1e-6)) + 1
        if n > len(mine) or float(cum[min(n, len(cum)) - 1]) < over - 1e-6:
            return None
        chosen = mine[order[:n]]
        picked += [int(i) for i in chosen]
        totals[r] = float(totals[r]) - float(cum[n - 1]) + (new_other - float(other[r]))
        if relief == "recompute":
            extra[r] = float(vec.to_full[chosen].sum())
        else:
            host = ctx.host
            if host is None:
                return None
            moved = float(vec.saved[chosen].sum())
            host_act[r] = float(flight[r]) * moved
            # save_on_cpu copies on the compute stream: out in forward, back in backward
            extra[r] = moved / host.d2h_bytes_per_s + moved / host.h2d_bytes_per_s
    return tuple(sorted(picked)), extra, totals, host_act


def _offload_floor(
    ctx: PricingContext, vec: _Vectors, shape: Shape, offload: str, zero_class: int
) -> float:
    """A floor of the CPU optimizer step an offload mode adds after the pipeline (the mean
    rank's, which the slowest rank's is not below)."""
    if offload == "none" or ctx.host is None:
        return 0.0
    sharded = shape.dp if (zero_class == 3 or offload == "full" or shape.dp > 1) else 1
    params = float(vec.params.sum()) / shape.pp / sharded
    return params / ctx.host.cpu_adam_params_per_s


def _pipeline_s(vec: _Vectors, owner: np.ndarray, pp: int, m: int, v: int) -> float:
    """The pipeline part of a layout's step time (a lower bound of the step)."""
    bnd = np.nonzero(owner[:-1] != owner[1:])[0]
    lat = np.bincount(owner, vec.lat, pp) + np.bincount(owner[bnd], vec.p2p[bnd], pp)
    return float(lat.sum()) / v + (m - 1.0 / v) * float(lat.max())


def _evaluate(
    ctx: PricingContext,
    shape: Shape,
    vec: _Vectors,
    *,
    owner: np.ndarray,
    microbatches: int,
    schedule: str,
    virtual: int,
    zero: int,
    recompute: str,
    sequence_parallel: bool,
    variant: int,
    costs: tuple[LayerCost, ...],
    need: list[float],
    offload: str = "none",
    relief: str = "none",
    bound: float = math.inf,
) -> Priced | None:
    """Step time and peak memory of one assignment of layers to pipeline ranks (module doc)."""
    pp = shape.pp
    m = microbatches
    v = virtual if schedule == "interleaved_1f1b" else 1
    flight = _inflight(schedule, pp, m, v)
    w = np.bincount(owner, vec.weights, pp)
    g = np.bincount(owner, vec.grads, pp)
    o = np.bincount(owner, vec.optimizer, pp)
    a = flight * np.bincount(owner, vec.saved, pp)
    other = np.zeros(pp)
    np.maximum.at(other, owner, vec.transient)
    totals = w + g + o + a + other
    cap = ctx.capacity_bytes * (1 + 1e-9)
    relieved_layers: tuple[int, ...] = ()
    extra = np.zeros(pp)
    host_act = np.zeros(pp)
    bnd = np.nonzero(owner[:-1] != owner[1:])[0]  # a stage boundary follows these layers
    p2p_dev = np.bincount(owner[bnd], vec.p2p[bnd], pp)
    lat_dev = np.bincount(owner, vec.lat, pp) + p2p_dev
    w_sum, w_max = 1.0 / v, m - 1.0 / v
    if bound < math.inf and w_sum * float(lat_dev.sum()) + w_max * float(lat_dev.max()) >= bound:
        return None  # relief and offload only add time: it cannot reach the best ones
    if relief != "none":
        if not (totals > cap).any():
            return None  # nothing to relieve: the plain candidate is the same plan
        if float((w + g + o).max()) > cap:
            need.append(float(totals.max()))
            return None  # the model state alone does not fit: activations cannot help
        relieved = _relieve(ctx, vec, owner=owner, flight=flight, totals=totals, other=other,
                            relief=relief, pp=pp)  # fmt: skip
        if relieved is None:
            need.append(float(totals.max()))
            return None
        relieved_layers, extra, totals, host_act = relieved
    worst = int(np.argmax(totals))
    peak = float(totals[worst])
    if peak > cap:
        need.append(peak)
        return None
    # host memory: offloaded model state, offloaded activations (per device of a host)
    host_state = np.bincount(owner, vec.host, pp)
    host_need = host_state + host_act
    offload_device = "cpu"
    nvme_s = 0.0
    if offload != "none" or relief == "offload":
        h = ctx.host
        if h is None:
            return None
        if float(host_need.max()) > h.memory_bytes:
            if offload == "none" or h.nvme_bytes <= 0:
                ctx.host_short.append(float(host_need.max()))
                return None
            # the optimizer state moves on to NVMe (ZeRO-Infinity) when the host cannot hold it
            opt_bytes = np.bincount(owner, vec.params, pp) * (
                ctx.optimizer_state_bytes / (shape.dp if zero >= 1 else 1)
            )
            rest = host_need - opt_bytes
            if float(rest.max()) > h.memory_bytes or float(opt_bytes.max()) > h.nvme_bytes:
                ctx.host_short.append(float(rest.max()))
                return None
            offload_device = "nvme"
            host_need = rest
            nvme_s = float(2.0 * opt_bytes.max() / h.nvme_bytes_per_s)  # read and write back
    lat_dev = lat_dev + extra
    slow = int(np.argmax(lat_dev))
    pipeline_s = w_sum * float(lat_dev.sum()) + w_max * float(lat_dev[slow])
    sync = np.bincount(owner, vec.grad_sync, pp)
    window = np.bincount(owner, vec.bwd_window, pp)
    params_dev = np.bincount(owner, vec.params, pp) / (shape.dp if zero >= 1 else 1)
    offload_tail = np.zeros(pp)
    if offload == "optimizer":
        h = ctx.host
        assert h is not None
        # ZeRO-Offload as the emitter runs it (emit.offload.MasterWeightOptimizer): after
        # backward the gradients go to the host, the CPU updates, the new weights come back
        grads_dev = params_dev * ctx.grad_bytes
        offload_tail = (
            params_dev / h.cpu_adam_params_per_s
            + grads_dev / h.d2h_bytes_per_s
            + grads_dev / h.h2d_bytes_per_s
        )
    elif offload == "full":
        h = ctx.host
        assert h is not None
        offload_tail = params_dev / h.cpu_adam_params_per_s  # weights stay on the host
    if ctx.overlap_grad_reduce:
        exposed_sync = np.maximum(0.0, sync - window)
    else:
        exposed_sync = sync
    tp_sync = np.bincount(owner, vec.tp_sync, pp)
    intercept, slope = ctx.optimizer_line
    if offload == "none":
        opt = np.where(params_dev > 0, intercept + slope * params_dev, 0.0)
    else:
        opt = offload_tail + nvme_s
    tail = exposed_sync + tp_sync + opt
    last = int(np.argmax(tail))
    step = pipeline_s + float(tail[last])
    on_slow = owner == slow
    busy = m * float(lat_dev[slow])
    # the fill/drain is the other ranks' work; its point-to-point part is pipeline p2p too
    p2p_fill = w_sum * float(p2p_dev.sum() - p2p_dev[slow])
    relief_rec = m * float(extra[slow]) if relief == "recompute" else 0.0
    relief_off = m * float(extra[slow]) if relief == "offload" else 0.0
    offload_s = (
        relief_off
        + (float(opt[last]) if offload != "none" else 0.0)
        + m * float(vec.offload_exposed[on_slow].sum())
    )
    breakdown = TimeBreakdown(
        compute=m * float(vec.compute[on_slow].sum())
        + (float(opt[last]) if offload == "none" else 0.0),
        recompute=m * float(vec.recompute[on_slow].sum()) + relief_rec,
        tp_comm=m * float(vec.tp[on_slow].sum()) + float(tp_sync[last]),
        pp_comm=m * float(p2p_dev[slow]) + p2p_fill,
        pp_bubble=max(0.0, float(pipeline_s - busy - p2p_fill)),
        dp_comm=m * float(vec.exposed_zero3[on_slow].sum()) + float(exposed_sync[last]),
        overlapped_comm=m * float(vec.hidden_zero3[on_slow].sum())
        + float(sync[last] - exposed_sync[last]),
        offload=offload_s,
    )
    memory = MemoryBreakdown(
        weights=float(w[worst]),
        grads=float(g[worst]),
        optimizer=float(o[worst]),
        activations=float(totals[worst] - w[worst] - g[worst] - o[worst] - other[worst])
        if relief != "none"
        else float(a[worst]),
        other=float(other[worst]),
        capacity=float(ctx.capacity_bytes),
        host=float(host_need.max()),
        host_capacity=float(ctx.host.memory_bytes) if ctx.host is not None else 0.0,
    )
    return Priced(
        shape=shape,
        microbatches=m,
        schedule=schedule,
        virtual_stages=v,
        zero=zero,
        recompute=recompute,
        sequence_parallel=sequence_parallel,
        variant=variant,
        stages=owner,
        step_s=float(step),
        breakdown=breakdown,
        memory=memory,
        peak_bytes=peak,
        costs=costs,
        offload=offload,
        offload_device=offload_device,
        recompute_layers=relieved_layers if relief == "recompute" else (),
        offload_layers=relieved_layers if relief == "offload" else (),
        host_bytes=float(host_need.max()),
        offload_s=offload_s,
        offload_hidden_s=m * float(vec.offload_hidden[on_slow].sum()),
        ranks=RankArrays(
            weights=w,
            grads=g,
            optimizer=o,
            activations=totals - w - g - o - other,
            other=other,
            host=host_need,
            tail=tail,
        ),  # fmt: skip
    )


# ---------------------------------------------------------------------------------------------
# layouts of layers onto pipeline ranks
# ---------------------------------------------------------------------------------------------
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


def _virtual_options(num_blocks: int, pp: int) -> list[int]:
    """Chunks per rank worth pricing: those that cut a rank's blocks into equal chunks (what
    Megatron-LM's ``--num-layers-per-virtual-pipeline-stage`` allows), for either rank size
    when the blocks do not divide over pp (Llama 3 405B: 126 blocks over 16 ranks, v = 4).
    Other counts only make chunks unequal, which stalls the schedule (``simulate_schedule``)."""
    lo, hi = num_blocks // pp, -(-num_blocks // pp)
    return sorted({v for n in {lo, hi} for v in range(2, n + 1) if n % v == 0})


def _ends_inward(n: int) -> list[int]:
    """0, n-1, 1, n-2, ...: the order in which ranks give up a block."""
    return list(dict.fromkeys(k for pair in zip(range(n), range(n - 1, -1, -1)) for k in pair))


def chunk_sizes(num_blocks: int, pp: int, v: int) -> list[int] | None:
    """Blocks in each of the ``pp·v`` interleaved chunks (chunk c on rank c mod pp).

    Two levels, so that both chunks and ranks stay within one block of each other: rank totals
    are ``⌊blocks / pp⌋`` or one more, the short ranks taken from the ends inwards (rank 0 runs
    the embedding, rank pp-1 the logits head); each rank's total is then cut into v chunks that
    differ by at most one, its short chunks first on the first half of the ranks and last on the
    second half, so the embedding's and the head's chunks are the short ones. Llama 3: 126
    blocks, pp = 16, v = 4 gives chunk 0 and chunk 63 one block each and every other chunk two
    (arXiv 2407.21783 §3.3.2). None when a chunk would be empty.
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


@functools.lru_cache(maxsize=4096)
def _interleaved_owner_cached(
    num_layers: int, blocks: tuple[int, ...], pp: int, v: int
) -> np.ndarray | None:
    out = _interleaved_owner(num_layers, list(blocks), pp, v)
    if out is not None:
        out.setflags(write=False)
    return out


def _interleaved_owner(num_layers: int, blocks: list[int], pp: int, v: int) -> np.ndarray | None:
    """Interleaved layout: ``pp·v`` contiguous chunks (``chunk_sizes``), chunk c on rank c mod pp."""
    if pp < 2 or v < 2:
        return None
    sizes = chunk_sizes(len(blocks), pp, v)
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


def plan_stage_layers(owner: np.ndarray, *, pp: int, v: int) -> list[tuple[int, np.ndarray]]:
    """(pipeline rank, layer indices) of every Plan stage, in stage order.

    One stage per rank, or, interleaved, one per chunk: the maximal runs of consecutive layers
    on one rank, chunk c on rank c mod pp (``pp · v`` stages, what the emitter expects).
    """
    if v <= 1:
        return [(s, np.nonzero(owner == s)[0]) for s in range(pp)]
    cuts = np.nonzero(owner[:-1] != owner[1:])[0] + 1
    runs = np.split(np.arange(len(owner)), cuts)
    ranks = [int(owner[r[0]]) for r in runs]
    if len(runs) != pp * v or any(r != c % pp for c, r in enumerate(ranks)):
        raise RuntimeError(f"interleaved layout is not pp x v = {pp} x {v} looped chunks: {ranks}")
    return list(zip(ranks, runs))


# ---------------------------------------------------------------------------------------------
# all options of one shape
# ---------------------------------------------------------------------------------------------
def _options(fixed: dict[str, Any], key: str, default: Iterable[Any]) -> list[Any]:
    return [fixed[key]] if key in fixed else list(default)


@dataclass(slots=True)
class DPJob:
    """A 1F1B candidate whose unequal split (pipeline DP) may beat the uniform one."""

    lower_bound_s: float
    shape: Shape
    vectors: list[tuple[int, _Vectors]]
    """(zero stage, vectors) to try in order; the first that fits is kept."""
    microbatches: int
    schedule: str
    recompute: str
    sequence_parallel: bool
    variant: int
    costs: tuple[LayerCost, ...]
    context: PricingContext
    offload: str = "none"


def price_shape(
    ctx: PricingContext,
    shape: Shape,
    costs: tuple[LayerCost, ...],
    *,
    sequence_parallel: bool,
    variant: int,
    keep: Callable[[Priced], None],
    need: list[float],
    bound: Callable[[], float] = lambda: math.inf,
    phase: str = "all",
) -> list[DPJob]:
    """Price the uniform / interleaved layouts of every option of one shape; return DP jobs.

    ZeRO 0, 1 and 2 take the same time here, so the lowest stage that fits is kept (and ZeRO-3
    separately). GPipe has 1F1B's bubble and more memory, so it is priced only when pinned.
    Memory relief is tried only where the plain candidate does not fit: per-stage recompute or
    activation offload for the stages over capacity, then model-state offload (``optimizer``,
    ``full``) for the whole option.

    ``phase``: ``all``; ``plain`` (no relief, and the first offload mode only: a first pass that
    makes the search's bound tight); ``relief`` (only what ``plain`` left out, each pruned against ``bound``, which
    is cheap once the bound is tight: relief and offload only add time).
    """
    fixed = ctx.fixed
    m = ctx.global_batch // (shape.dp * shape.b)
    n = len(costs)
    blocks = ctx.blocks
    pp = shape.pp
    base = _base(ctx, shape, costs, sequence_parallel)
    if fixed.get("virtual_stages", 1) > 1:  # chunks per device pinned: interleaved 1F1B
        if pp == 1:
            return []  # model chunks per device need a pipeline
        searched: tuple[str, ...] = ("interleaved_1f1b",)
    else:
        searched = ("1f1b", "interleaved_1f1b") if pp > 1 else ("1f1b",)
    schedules = _options(fixed, "schedule", searched)
    if pp == 1:
        schedules = [s for s in schedules if s != "interleaved_1f1b"] or ["1f1b"]
    zeros = _options(fixed, "zero", ZERO_STAGES)
    uniform = _uniform_owner(n, blocks, pp) if blocks else np.zeros(n, dtype=np.int64)
    jobs: list[DPJob] = []

    def layouts_of(schedule: str) -> list[tuple[int, np.ndarray | None]]:
        if schedule == "interleaved_1f1b":
            if m % pp:
                return []  # Megatron's interleaved schedule needs M divisible by pp
            vs = _options(fixed, "virtual_stages", _virtual_options(len(blocks), pp))
            return [(v, _interleaved_owner_cached(n, tuple(blocks), pp, v)) for v in vs]
        return [(1, uniform)]

    first = ctx.offload_modes[0]  # "none" unless the user pinned an offload mode
    modes = (first,) if phase == "plain" else ctx.offload_modes
    reliefs = () if phase == "plain" else ctx.reliefs
    for recompute in _options(fixed, "recompute", ctx.recompute_options):
        fits_any = False
        for offload in modes:
            usable = [z for z in zeros if z == 0] or zeros[:1] if shape.dp == 1 else zeros
            if offload == "full":
                usable = [z for z in zeros if z == 3]  # FSDP's CPU offload shards the weights
            for zero_class in (0, 3):
                tries = [z for z in usable if (z == 3) == (zero_class == 3)]
                if not tries:
                    continue
                vecs = [(z, _vectors(ctx, base, shape.dp, recompute, z, offload, m)) for z in tries]
                floor = _offload_floor(ctx, vecs[0][1], shape, offload, zero_class)
                lean = vecs[-1][1]
                lean_state = lean.weights + lean.grads + lean.optimizer
                fits = False
                for schedule in schedules:
                    for v, owner in layouts_of(schedule):
                        if owner is None:
                            continue
                        state = float(np.bincount(owner, lean_state, pp).max())
                        if state > ctx.capacity_bytes * (1 + 1e-9):
                            need.append(state)
                            continue  # the model state alone does not fit: nothing will
                        if (phase == "relief" or offload != first) and _pipeline_s(
                            vecs[0][1], owner, pp, m, v
                        ) + floor >= bound():
                            continue  # relief and offload only add time: cannot reach the best
                        for relief in ("none", *reliefs):
                            if relief != "none" and recompute == "full":
                                break
                            if phase == "relief" and (offload, relief) == (first, "none"):
                                continue  # priced in the plain pass
                            done = False
                            for zero, vec in vecs:
                                priced = _evaluate(
                                    ctx, shape, vec, owner=owner, microbatches=m,
                                    schedule=schedule, virtual=v, zero=zero,
                                    recompute=recompute, sequence_parallel=sequence_parallel,
                                    variant=variant, costs=costs, need=need, offload=offload,
                                    relief=relief,
                                    bound=bound() if (relief, offload) != ("none", "none")
                                    else math.inf,
                                )  # fmt: skip
                                if priced is not None:
                                    keep(priced)
                                    done = fits = True
                                    break
                            if done and relief == "none":
                                break  # it fits as it is: relief could only slow it down
                    if (
                        schedule != "interleaved_1f1b"
                        and pp > 1
                        and not (phase == "relief" and offload == first)
                    ):
                        lat = vecs[0][1].lat
                        total = float(lat.sum())
                        lb = total + (m - 1) * max(total / pp, float(lat.max())) + floor
                        last = vecs[-1][1]
                        mem_lb = float((last.weights + last.grads + last.optimizer).sum()) / pp
                        if mem_lb > ctx.capacity_bytes:
                            need.append(mem_lb)
                            continue
                        jobs.append(
                            DPJob(
                                lower_bound_s=lb,
                                shape=shape,
                                vectors=vecs,
                                microbatches=m,
                                schedule=schedule,
                                recompute=recompute,
                                sequence_parallel=sequence_parallel,
                                variant=variant,
                                costs=costs,
                                context=ctx,
                                offload=offload,
                            )  # fmt: skip
                        )
                fits_any = fits_any or fits
            if fits_any and offload == "none" and phase == "all":
                break  # this recompute fits without offloading model state: offload only slows
    return jobs


def run_dp(job: DPJob, keep: Callable[[Priced], None], need: list[float]) -> int:
    """Price the pipeline DP's unequal split of a job; returns the DP runs made."""
    ctx = job.context
    runs = 0
    for zero, vec in job.vectors:
        runs += 1
        owner = _dp_owner(vec, job.shape.pp, job.microbatches, job.schedule, ctx.capacity_bytes)
        if owner is None:
            continue
        priced = _evaluate(
            ctx, job.shape, vec, owner=owner, microbatches=job.microbatches,
            schedule=job.schedule, virtual=1, zero=zero, recompute=job.recompute,
            sequence_parallel=job.sequence_parallel, variant=job.variant, costs=job.costs,
            need=need, offload=job.offload,
        )  # fmt: skip
        if priced is not None:
            keep(priced)
            return runs
    return runs


def stage_details(ctx: PricingContext, p: Priced) -> tuple[list, list, list]:
    """Per plan stage (chunk) ``StageCost``, per rank ``MemoryBreakdown`` and tail seconds of a
    priced candidate: what the report draws and the schedule model is fed with."""
    from autopar.plan import StageCost

    shape = p.shape
    vec = _vectors(
        ctx,
        _base(ctx, shape, p.costs, p.sequence_parallel),
        shape.dp,
        p.recompute,
        p.zero,
        p.offload,
        p.microbatches,
    )
    owner = np.asarray(p.stages)
    pp = shape.pp
    fwd_part = vec.fwd_part.copy()
    bwd_part = vec.lat - fwd_part
    # per-stage relief, where the pricer put it
    rec = list(p.recompute_layers)
    bwd_part[rec] += vec.to_full[rec]
    if p.offload_layers and ctx.host is not None:
        off = list(p.offload_layers)
        fwd_part[off] += vec.saved[off] / ctx.host.d2h_bytes_per_s
        bwd_part[off] += vec.saved[off] / ctx.host.h2d_bytes_per_s
    stages = []
    for _, members in plan_stage_layers(owner, pp=pp, v=p.virtual_stages):
        last = int(members[-1])
        boundary = last + 1 < len(owner)
        stages.append(
            StageCost(
                fwd_s=float(fwd_part[members].sum()),
                bwd_s=float(bwd_part[members].sum()),
                send_s=float(vec.p2p[last] / 2.0) if boundary else 0.0,
            )
        )
    r = p.ranks
    assert r is not None, "a priced candidate carries its per-rank arrays"
    host_cap = float(ctx.host.memory_bytes) if ctx.host is not None else 0.0
    memory = [
        MemoryBreakdown(
            weights=float(r.weights[i]),
            grads=float(r.grads[i]),
            optimizer=float(r.optimizer[i]),
            activations=float(r.activations[i]),
            other=float(r.other[i]),
            capacity=float(ctx.capacity_bytes),
            host=float(r.host[i]),
            host_capacity=host_cap,
        )  # fmt: skip
        for i in range(pp)
    ]
    tail = [float(x) for x in r.tail]
    return stages, memory, tail
