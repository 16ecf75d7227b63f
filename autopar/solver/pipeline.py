"""Pipeline stage construction: split a layer sequence into contiguous stages on sub-meshes.

A pure function over numpy cost arrays (Alpa's stage-construction DP, OSDI'22 §5.2), so it is
tested against brute force without a model, a cluster or a solver.

Problem
-------
Layers ``0..L-1`` run in order. A *stage* holds a contiguous range ``[i, j]`` of layers on a
sub-mesh ``m`` (one of ``M`` shapes with ``n_m`` devices). A plan is ``S`` stages that cover the
layers in order and use exactly ``D`` devices. With ``B`` microbatches, a synchronous pipeline
(GPipe / 1F1B) takes

    T = w_sum · Σ_s t_s  +  w_max · max_s t_s                                   (1)

where ``t_s`` is stage s's latency for one microbatch (forward + backward, plus the
point-to-point send of its output when it is not the last stage). Alpa's choice is
``w_sum = 1, w_max = B - 1``: the first microbatch crosses every stage once, the remaining
``B - 1`` leave at the pace of the slowest. The interleaved schedule with ``v`` model chunks
shrinks the fill/drain part to ``1/v``: ``w_sum = 1/v, w_max = B - 1/v``.

Inputs (all per stage *candidate*, i.e. layer range × sub-mesh)
---------------------------------------------------------------
* ``latency_s[i, j, m]``   t for layers i..j (inclusive) on sub-mesh m; ``inf`` = not allowed.
* ``p2p_s[j, m]``          added to a stage ending at layer j when another stage follows
                           (activation out + gradient back on the links between stages).
* ``state_bytes[i, j, m]`` memory per device that does not depend on the schedule
                           (weights, grads, optimizer state, buffers).
* ``act_bytes[i, j, m]``   activations one microbatch leaves on each device of the stage.
* ``inflight[s]``          microbatches whose activations stage position s holds at its peak
                           (GPipe: B everywhere; 1F1B: min(S - s, B); interleaved: more).
* ``capacity_bytes``       usable memory per device.

A candidate stage at position s is feasible iff
``state_bytes + inflight[s] · act_bytes <= capacity_bytes``; infeasible candidates are left out
of the DP (never priced with a sentinel).

Table and transitions
---------------------
For a bound ``t_max`` on the slowest stage, let ``G[s, i, d]`` be the least ``Σ t`` of stages
``s..S-1`` covering layers ``i..L-1`` on exactly ``d`` devices::

    G[S, L, 0] = 0;  G[S, i, d] = inf otherwise
    G[s, i, d] = min over j >= i, m with n_m <= d, and lat_s(i, j, m) <= t_max, feasible_s(i, j, m):
                     lat_s(i, j, m) + G[s + 1, j + 1, d - n_m]
    lat_s(i, j, m) = latency_s[i, j, m] + (p2p_s[j, m] if s < S - 1 else 0)

``F(t_max) = G[0, 0, D]``, and the answer is ``min over t_max of w_sum·F(t_max) + w_max·t*``
with ``t*`` the actual slowest stage of the arg-min. ``t_max`` runs over the distinct stage
latencies in increasing order, starting at the smallest bound that admits any plan (found by
bisection, F is finite iff t_max >= that bound); the loop stops once
``w_max · t_max + w_sum · F(inf) >= best`` since no larger bound can win (Alpa's pruning).
The inner minimisation over ``j`` is a vectorised numpy min over an ``L × L`` matrix, so one
DP costs ``O(S · |devices states| · M)`` numpy reductions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "StagePlan",
    "solve_stages",
    "brute_force_stages",
    "inflight_microbatches",
    "Event",
    "Timeline",
    "schedule_order",
    "simulate_schedule",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class StagePlan:
    """The DP's answer: stage boundaries, sub-meshes and the pipeline time of eq. (1)."""

    starts: tuple[int, ...]
    """First layer of each stage (``starts[0] == 0``)."""
    ends: tuple[int, ...]
    """Last layer of each stage, inclusive (``ends[-1] == L - 1``)."""
    submeshes: tuple[int, ...]
    """Sub-mesh index of each stage."""
    stage_latency_s: tuple[float, ...]
    """t_s of each stage, p2p included."""
    total_s: float
    """w_sum · Σ t_s + w_max · max t_s."""

    @property
    def max_stage_s(self) -> float:
        return max(self.stage_latency_s)

    @property
    def num_stages(self) -> int:
        return len(self.starts)


def inflight_microbatches(
    *, schedule: str, num_stages: int, microbatches: int, virtual_stages: int = 1
) -> np.ndarray:
    """Microbatches whose activations stage position s holds at its peak, per position.

    GPipe runs all forwards before any backward: every stage holds all B microbatches. 1F1B
    (PipeDream-flush) warms up with ``S - s`` forwards on stage s, so it holds ``min(S - s, B)``.
    Interleaved 1F1B with v chunks per device (Megatron-LM's schedule) warms up with
    ``2·(S - s - 1) + (v - 1)·S + 1`` chunk-microbatches of 1/v of the stage's layers, which is
    ``S · (1 + (S - 1)/(S · v))`` microbatch-equivalents on the first stage (Korthikanti et al.). The return value multiplies a stage's activation bytes
    of *one* microbatch for all of its layers (all v chunks of a device). Chunks of unequal size
    (blocks not divisible by S · v; they differ by at most one block) are counted at the device's
    mean chunk, i.e. the same multiplier on the device's own total.
    """
    s = np.arange(num_stages, dtype=float)
    if schedule == "gpipe":
        return np.full(num_stages, float(microbatches))
    if schedule == "1f1b":
        return np.minimum(num_stages - s, microbatches)
    if schedule == "interleaved_1f1b":
        v = max(1, virtual_stages)
        chunks = 2 * (num_stages - s - 1) + (v - 1) * num_stages + 1
        return np.minimum(chunks, microbatches * v) / v
    raise ValueError(f"unknown schedule {schedule!r} (allowed: gpipe, 1f1b, interleaved_1f1b)")


def _check(latency_s: np.ndarray, mesh_devices: Sequence[int]) -> tuple[int, int]:
    if latency_s.ndim != 3 or latency_s.shape[0] != latency_s.shape[1]:
        raise ValueError(f"latency_s must be [L, L, M], got shape {latency_s.shape}")
    if latency_s.shape[2] != len(mesh_devices):
        raise ValueError("latency_s's last axis must match mesh_devices")
    return latency_s.shape[0], latency_s.shape[2]


def solve_stages(
    *,
    latency_s: np.ndarray,
    mesh_devices: Sequence[int],
    total_devices: int,
    num_stages: int,
    w_sum: float = 1.0,
    w_max: float = 0.0,
    p2p_s: np.ndarray | None = None,
    state_bytes: np.ndarray | None = None,
    act_bytes: np.ndarray | None = None,
    inflight: Sequence[float] | None = None,
    capacity_bytes: float = np.inf,
) -> StagePlan | None:
    """Optimal contiguous split into ``num_stages`` stages (eq. 1); None if nothing fits.

    See the module docstring for the table, transitions and pruning. All arrays are indexed
    ``[first layer, last layer (inclusive), sub-mesh]``; entries with ``last < first`` are ignored.
    """
    latency_s = np.asarray(latency_s, dtype=float)
    num_layers, num_meshes = _check(latency_s, mesh_devices)
    if num_stages < 1 or num_stages > num_layers:
        return None
    devices = [int(n) for n in mesh_devices]
    lat = _position_latency(latency_s, p2p_s, num_stages)
    feasible = _feasibility(latency_s, state_bytes, act_bytes, inflight, capacity_bytes, num_stages)
    lat = np.where(feasible, lat, np.inf)  # [S, L, L, M]

    values = np.unique(lat[np.isfinite(lat)])
    if values.size == 0:
        return None
    dev_states = _device_states(devices, total_devices, num_stages)
    f_inf, _ = _dp(lat, np.inf, devices, total_devices, dev_states)
    if not np.isfinite(f_inf):
        return None

    # smallest bound that admits a plan: F(t) is finite iff t >= that bound (monotone)
    lo, hi = 0, values.size - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if np.isfinite(_dp(lat, values[mid], devices, total_devices, dev_states)[0]):
            hi = mid
        else:
            lo = mid + 1

    best_total, best_choice = np.inf, None
    bounds = values[lo:] if w_max > 0.0 else np.array([np.inf])  # no max term: F(inf) wins
    for t_max in bounds:
        if w_max > 0.0 and w_max * t_max + w_sum * f_inf >= best_total:
            break
        f, choice = _dp(lat, t_max, devices, total_devices, dev_states)
        if not np.isfinite(f):
            continue
        plan = _reconstruct(choice, lat, num_stages, devices, total_devices, num_layers)
        total = w_sum * f + w_max * max(plan[3])
        if total < best_total - 1e-15 * max(1.0, abs(total)):
            best_total, best_choice = total, plan
    if best_choice is None:
        return None
    starts, ends, meshes, lats = best_choice
    return StagePlan(
        starts=starts, ends=ends, submeshes=meshes, stage_latency_s=lats, total_s=float(best_total)
    )


def _position_latency(
    latency_s: np.ndarray, p2p_s: np.ndarray | None, num_stages: int
) -> np.ndarray:
    num_layers = latency_s.shape[0]
    i, j = np.meshgrid(np.arange(num_layers), np.arange(num_layers), indexing="ij")
    base = np.where((j >= i)[:, :, None], latency_s, np.inf)
    out = np.broadcast_to(base, (num_stages, *base.shape)).copy()
    if p2p_s is not None and num_stages > 1:
        p2p = np.asarray(p2p_s, dtype=float).reshape(num_layers, -1)
        out[:-1] += p2p[None, None, :, :]  # stage ending at j (axis 2) sends to the next stage
    return out


def _feasibility(
    latency_s: np.ndarray,
    state_bytes: np.ndarray | None,
    act_bytes: np.ndarray | None,
    inflight: Sequence[float] | None,
    capacity_bytes: float,
    num_stages: int,
) -> np.ndarray:
    shape = (num_stages, *latency_s.shape)
    if not np.isfinite(capacity_bytes) or (state_bytes is None and act_bytes is None):
        return np.ones(shape, dtype=bool)
    state = np.zeros(latency_s.shape) if state_bytes is None else np.asarray(state_bytes, float)
    act = np.zeros(latency_s.shape) if act_bytes is None else np.asarray(act_bytes, float)
    flight = np.ones(num_stages) if inflight is None else np.asarray(inflight, dtype=float)
    if flight.shape != (num_stages,):
        raise ValueError(f"inflight must have one entry per stage ({num_stages})")
    need = state[None] + flight[:, None, None, None] * act[None]
    return need <= capacity_bytes


def _device_states(devices: list[int], total: int, num_stages: int) -> list[set[int]]:
    """Device counts reachable by stages s..S-1 (``states[s]``) that can also complete D."""
    suffix: list[set[int]] = [set() for _ in range(num_stages + 1)]
    suffix[num_stages] = {0}
    for s in range(num_stages - 1, -1, -1):
        suffix[s] = {d + n for d in suffix[s + 1] for n in devices if d + n <= total}
    # keep only counts a prefix of s stages can complement
    prefix: list[set[int]] = [set() for _ in range(num_stages + 1)]
    prefix[0] = {0}
    for s in range(1, num_stages + 1):
        prefix[s] = {d + n for d in prefix[s - 1] for n in devices if d + n <= total}
    return [{d for d in suffix[s] if total - d in prefix[s]} for s in range(num_stages + 1)]


def _dp(
    lat: np.ndarray, t_max: float, devices: list[int], total: int, dev_states: list[set[int]]
) -> tuple[float, dict]:
    """One pass of the table for a slowest-stage bound; returns F and the arg-min choices."""
    num_stages, num_layers = lat.shape[0], lat.shape[1]
    allowed = np.where(lat <= t_max, lat, np.inf)
    nxt: dict[int, np.ndarray] = {0: np.full(num_layers + 1, np.inf)}
    nxt[0][num_layers] = 0.0
    choice: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for s in range(num_stages - 1, -1, -1):
        cur: dict[int, np.ndarray] = {}
        for d in dev_states[s]:
            best = np.full(num_layers + 1, np.inf)
            best_j = np.full(num_layers + 1, -1)
            best_m = np.full(num_layers + 1, -1)
            for m, n in enumerate(devices):
                rest = nxt.get(d - n)
                if rest is None:
                    continue
                cand = allowed[s, :, :, m] + rest[None, 1:]  # [i, j]
                j = np.argmin(cand, axis=1)
                val = cand[np.arange(num_layers), j]
                better = val < best[:num_layers]
                best[:num_layers] = np.where(better, val, best[:num_layers])
                best_j[:num_layers] = np.where(better, j, best_j[:num_layers])
                best_m[:num_layers] = np.where(better, m, best_m[:num_layers])
            cur[d] = best
            choice[(s, d)] = (best, best_j, best_m)
        nxt = cur
    f = nxt.get(total)
    return (float(f[0]) if f is not None else np.inf), choice


def _reconstruct(
    choice: dict, lat: np.ndarray, num_stages: int, devices: list[int], total: int, num_layers: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[float, ...]]:
    starts, ends, meshes, lats = [], [], [], []
    i, d = 0, total
    for s in range(num_stages):
        _, best_j, best_m = choice[(s, d)]
        j, m = int(best_j[i]), int(best_m[i])
        starts.append(i)
        ends.append(j)
        meshes.append(m)
        lats.append(float(lat[s, i, j, m]))
        i, d = j + 1, d - devices[m]
    if i != num_layers or d != 0:  # pragma: no cover - the table guarantees a full cover
        raise RuntimeError("stage DP reconstruction did not cover all layers")
    return tuple(starts), tuple(ends), tuple(meshes), tuple(lats)


def brute_force_stages(
    *,
    latency_s: np.ndarray,
    mesh_devices: Sequence[int],
    total_devices: int,
    num_stages: int,
    w_sum: float = 1.0,
    w_max: float = 0.0,
    p2p_s: np.ndarray | None = None,
    state_bytes: np.ndarray | None = None,
    act_bytes: np.ndarray | None = None,
    inflight: Sequence[float] | None = None,
    capacity_bytes: float = np.inf,
) -> float:
    """Eq. (1) minimised by enumerating every split and sub-mesh assignment (tests only)."""
    from itertools import combinations, product

    latency_s = np.asarray(latency_s, dtype=float)
    num_layers, _ = _check(latency_s, mesh_devices)
    if num_stages > num_layers:
        return np.inf
    lat = _position_latency(latency_s, p2p_s, num_stages)
    feasible = _feasibility(latency_s, state_bytes, act_bytes, inflight, capacity_bytes, num_stages)
    best = np.inf
    for cuts in combinations(range(1, num_layers), num_stages - 1):
        bounds = (0, *cuts, num_layers)
        for meshes in product(range(len(mesh_devices)), repeat=num_stages):
            if sum(mesh_devices[m] for m in meshes) != total_devices:
                continue
            ts = []
            for s, m in enumerate(meshes):
                i, j = bounds[s], bounds[s + 1] - 1
                if not feasible[s, i, j, m] or not np.isfinite(lat[s, i, j, m]):
                    break
                ts.append(lat[s, i, j, m])
            else:
                best = min(best, w_sum * sum(ts) + w_max * max(ts))
    return float(best)


# ---------------------------------------------------------------------------------------------
# schedule simulation: the timeline of one training step's pipeline
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One interval of a simulated pipeline step on one pipeline rank."""

    rank: int
    """Pipeline rank the interval belongs to (for a send: the sender)."""
    chunk: int
    """Model chunk on that rank (global stage ``chunk · num_ranks + rank``); -1 for a tail."""
    microbatch: int
    """-1 for a tail."""
    kind: str
    """``"F"`` forward, ``"B"`` backward, ``"send"`` point-to-point transfer, ``"tail"`` the
    rank's work after its last backward (exposed gradient sync and optimizer step)."""
    start_s: float
    end_s: float
    to_rank: int = -1
    """For a send: the receiving pipeline rank."""
    grad: bool = False
    """For a send: True for a gradient going back, False for an activation going forward."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeline:
    """What ``simulate_schedule`` returns: every interval of the step, and when it ends."""

    schedule: str
    num_ranks: int
    virtual_stages: int
    microbatches: int
    events: tuple[Event, ...]
    """F / B / send / tail intervals, ordered by rank then start time."""
    makespan_s: float
    """End of the last interval: the step time the schedule model predicts (tails included
    when given)."""
    pipeline_s: float
    """End of the last forward, backward or send (the step without the tails)."""
    rank_end_s: tuple[float, ...]
    """Per rank, the end of its last interval (its tail included)."""
    rank_busy_s: tuple[float, ...]
    """Per rank, seconds of forward and backward compute (sends and tails excluded)."""

    def stage_of(self, event: Event) -> int:
        """Global stage of an F / B / send event (chunk c of rank r is stage ``c · S + r``)."""
        return event.chunk * self.num_ranks + event.rank

    def rank_idle_s(self, rank: int) -> float:
        """Bubble of one rank: the time of the pipeline (``pipeline_s``) it computes nothing."""
        return self.pipeline_s - self.rank_busy_s[rank]


SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def schedule_order(
    *, schedule: str, num_ranks: int, virtual_stages: int, microbatches: int
) -> list[list[tuple[str, int, int]]]:
    """Per pipeline rank, its ops in execution order as ``(kind, chunk, microbatch)``.

    * ``gpipe``: all M forwards, then all M backwards (microbatch order).
    * ``1f1b`` (PipeDream-flush): rank s warms up with ``min(S - s - 1, M)`` forwards, then
      alternates one forward and one backward, then cools down with the remaining backwards.
    * ``interleaved_1f1b`` (megatron-core's ``forward_backward_pipelining_with_interleaving``
      with its default ``microbatch_group_size_per_vp_stage = S``, which needs M divisible by
      S): the rank's ``M·v`` chunk-microbatches are taken in groups of S microbatches per chunk
      (virtual index k: chunk ``(k mod S·v) // S``, reversed for backwards, microbatch
      ``(k // S·v)·S + k mod S``; megatron's ``get_schedule_table``); rank s warms up with
      ``min(2·(S - s - 1) + (v - 1)·S, M·v)`` forwards, then alternates one forward and one
      backward, then cools down.
    """
    s_count, v, m = num_ranks, virtual_stages, microbatches
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} (allowed: {', '.join(SCHEDULES)})")
    if s_count < 1 or m < 1 or v < 1:
        raise ValueError(
            f"num_ranks, microbatches and virtual_stages must be >= 1 (got {s_count}, {m}, {v})"
        )
    if schedule != "interleaved_1f1b" and v != 1:
        raise ValueError(f"{schedule} runs one chunk per rank (virtual_stages=1), got {v}")
    if schedule == "interleaved_1f1b" and m % s_count:
        raise ValueError(
            f"interleaved_1f1b needs microbatches divisible by the pipeline ranks "
            f"(Megatron-LM), got {m} microbatches on {s_count} ranks"
        )
    orders: list[list[tuple[str, int, int]]] = []
    for s in range(s_count):
        if schedule == "gpipe":
            orders.append([("F", 0, i) for i in range(m)] + [("B", 0, i) for i in range(m)])
            continue
        if schedule == "1f1b":
            fwd = [("F", 0, i) for i in range(m)]
            bwd = [("B", 0, i) for i in range(m)]
            warmup = min(s_count - s - 1, m)
        else:
            group = s_count * v

            def op(kind: str, k: int, group: int = group) -> tuple[str, int, int]:
                chunk = (k % group) // s_count
                if kind == "B":
                    chunk = v - 1 - chunk
                return (kind, chunk, (k // group) * s_count + k % s_count)

            total = m * v
            fwd = [op("F", k) for k in range(total)]
            bwd = [op("B", k) for k in range(total)]
            warmup = min(2 * (s_count - s - 1) + (v - 1) * s_count, total)
        steady = len(fwd) - warmup
        order = fwd[:warmup]
        for i in range(steady):
            order += [fwd[warmup + i], bwd[i]]
        order += bwd[steady:]
        orders.append(order)
    return orders


def simulate_schedule(
    *,
    schedule: str,
    num_ranks: int,
    virtual_stages: int,
    microbatches: int,
    fwd_s: Sequence[float] | float,
    bwd_s: Sequence[float] | float,
    send_s: Sequence[float] | float,
    tail_s: Sequence[float] | None = None,
    overlap_p2p: bool = True,
) -> Timeline:
    """Simulate one step of a pipeline schedule op by op; the timeline and its makespan.

    ``fwd_s``, ``bwd_s`` and ``send_s`` give, per global stage g (``num_ranks · virtual_stages``
    of them; chunk c of rank r is stage ``c · num_ranks + r``), one microbatch's forward,
    backward, and the transfer of stage g's output to stage g + 1 (the gradient coming back
    over that boundary costs the same; the last stage's entry is unused). A scalar applies to
    every stage. ``tail_s`` (per rank, optional) is the work after a rank's last backward: the
    exposed gradient synchronisation and the optimizer step.

    Each rank runs its ops in ``schedule_order``. An op starts as soon as its rank is free and
    its inputs have arrived: the forward of stage g needs the forward of g - 1 plus that
    boundary's send; the backward of g needs its own forward and the backward of g + 1 plus the
    send. Sends are asynchronous (``overlap_p2p``, as torch.distributed.pipelining's isend and
    Megatron-LM's overlapped p2p): they occupy the link out of the sender, one transfer per
    direction at a time, not the sender's compute. With ``overlap_p2p=False`` the sender also
    waits for its send to finish. Pure Python, no torch.

    With equal stages and no sends, 1F1B / GPipe take exactly ``(M + S - 1)·(f + b)`` and the
    interleaved schedule ``(M + (S - 1)/v)·(f + b)`` (f, b: a rank's whole forward / backward).
    """
    orders = schedule_order(
        schedule=schedule, num_ranks=num_ranks, virtual_stages=virtual_stages,
        microbatches=microbatches,
    )  # fmt: skip
    n_stages = num_ranks * virtual_stages
    fwd = _per_stage(fwd_s, n_stages, "fwd_s")
    bwd = _per_stage(bwd_s, n_stages, "bwd_s")
    send = _per_stage(send_s, n_stages, "send_s")
    tails = None if tail_s is None else _per_stage(tail_s, num_ranks, "tail_s")
    m = microbatches
    f_end = [[-1.0] * m for _ in range(n_stages)]
    f_arrive = [[0.0 if g == 0 else -1.0] * m for g in range(n_stages)]
    b_arrive = [[-1.0] * m for _ in range(n_stages)]
    rank_free = [0.0] * num_ranks
    link_free = {(r, d): 0.0 for r in range(num_ranks) for d in (True, False)}
    busy = [0.0] * num_ranks
    nxt = [0] * num_ranks
    events: list[Event] = []
    remaining = sum(len(o) for o in orders)

    def transfer(
        r: int, chunk: int, mb: int, g_to: int, t: float, cost: float, grad: bool
    ) -> float:
        start = max(t, link_free[(r, grad)])
        end = start + cost
        link_free[(r, grad)] = end
        if cost > 0.0:
            events.append(
                Event(
                    rank=r,
                    chunk=chunk,
                    microbatch=mb,
                    kind="send",
                    start_s=start,
                    end_s=end,
                    to_rank=g_to % num_ranks,
                    grad=grad,
                )  # fmt: skip
            )
        if not overlap_p2p:
            rank_free[r] = max(rank_free[r], end)
        return end

    while remaining:
        progressed = False
        for r in range(num_ranks):
            order = orders[r]
            while nxt[r] < len(order):
                kind, chunk, mb = order[nxt[r]]
                g = chunk * num_ranks + r
                if kind == "F":
                    ready = f_arrive[g][mb]
                else:  # its own forward, and the gradient from the next stage (none on the last)
                    grad = b_arrive[g][mb] if g < n_stages - 1 else 0.0
                    ready = -1.0 if min(grad, f_end[g][mb]) < 0.0 else max(grad, f_end[g][mb])
                if ready < 0.0:
                    break
                start = max(rank_free[r], ready)
                end = start + (fwd[g] if kind == "F" else bwd[g])
                events.append(Event(rank=r, chunk=chunk, microbatch=mb, kind=kind, start_s=start,
                                    end_s=end))  # fmt: skip
                rank_free[r] = end
                busy[r] += end - start
                if kind == "F":
                    f_end[g][mb] = end
                    if g < n_stages - 1:
                        f_arrive[g + 1][mb] = transfer(r, chunk, mb, g + 1, end, send[g], False)
                elif g > 0:
                    b_arrive[g - 1][mb] = transfer(r, chunk, mb, g - 1, end, send[g - 1], True)
                nxt[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # pragma: no cover - every order above is deadlock-free
            raise RuntimeError(f"{schedule} order deadlocks: ranks stuck at ops {nxt}")
    pipeline_s = max(e.end_s for e in events)
    rank_end = [max(e.end_s for e in events if e.rank == r) for r in range(num_ranks)]
    if tails is not None:
        for r in range(num_ranks):
            if tails[r] > 0.0:  # after the rank's last op, a backward (and its send if blocking)
                start = rank_free[r]
                events.append(Event(rank=r, chunk=-1, microbatch=-1, kind="tail", start_s=start,
                                    end_s=start + tails[r]))  # fmt: skip
                rank_end[r] = max(rank_end[r], start + tails[r])
    events.sort(key=lambda e: (e.rank, e.start_s, e.kind == "send"))
    return Timeline(
        schedule=schedule,
        num_ranks=num_ranks,
        virtual_stages=virtual_stages,
        microbatches=microbatches,
        events=tuple(events),
        makespan_s=max(rank_end),
        pipeline_s=pipeline_s,
        rank_end_s=tuple(rank_end),
        rank_busy_s=tuple(busy),
    )


def _per_stage(values: Sequence[float] | float, n: int, name: str) -> list[float]:
    if isinstance(values, int | float | np.floating | np.integer):
        out = [float(values)] * n
    else:
        out = [float(x) for x in values]
    if len(out) != n:
        raise ValueError(f"{name} needs {n} entries (one per stage / rank), got {len(out)}")
    if any(not np.isfinite(x) or x < 0.0 for x in out):
        raise ValueError(f"{name} must be finite and >= 0, got {out}")
    return out
