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

__all__ = ["StagePlan", "solve_stages", "brute_force_stages", "inflight_microbatches"]


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
