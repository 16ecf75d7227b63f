"""Stage-construction DP: hand-derived optima and agreement with brute force."""

from __future__ import annotations

import numpy as np
import pytest

from autopar.solver.pipeline import brute_force_stages, inflight_microbatches, solve_stages


def _range_costs(per_layer: np.ndarray, overhead: float = 0.0) -> np.ndarray:
    """latency[i, j, m] = overhead + Σ per_layer[i..j, m] (a stage's layers run back to back)."""
    num_layers, num_meshes = per_layer.shape
    csum = np.vstack([np.zeros((1, num_meshes)), np.cumsum(per_layer, axis=0)])
    out = np.full((num_layers, num_layers, num_meshes), np.inf)
    for i in range(num_layers):
        for j in range(i, num_layers):
            out[i, j] = overhead + csum[j + 1] - csum[i]
    return out


def test_equal_layers_split_evenly() -> None:
    # 8 identical layers, 4 stages, 1 device each: 2 layers per stage, t = 2, total = 4·2 + 7·2.
    lat = _range_costs(np.ones((8, 1)))
    plan = solve_stages(
        latency_s=lat, mesh_devices=[1], total_devices=4, num_stages=4, w_sum=1, w_max=7
    )
    assert plan is not None
    assert plan.starts == (0, 2, 4, 6) and plan.ends == (1, 3, 5, 7)
    assert plan.total_s == pytest.approx(8 + 7 * 2)


def test_heavy_first_and_last_layers_get_smaller_stages() -> None:
    # embedding 3 + 6 blocks of 1 + logits 3 = 12; 3 stages -> best max stage is 4:
    # [embed, b0], [b1..b4], [b5, head]
    per = np.array([3, 1, 1, 1, 1, 1, 1, 3], dtype=float)[:, None]
    lat = _range_costs(per)
    plan = solve_stages(
        latency_s=lat, mesh_devices=[1], total_devices=3, num_stages=3, w_sum=1, w_max=15
    )
    assert plan is not None
    assert plan.starts == (0, 2, 6)
    assert plan.max_stage_s == pytest.approx(4)
    assert plan.total_s == pytest.approx(12 + 15 * 4)


def test_p2p_cost_is_paid_by_all_but_the_last_stage() -> None:
    lat = _range_costs(np.ones((4, 1)))
    p2p = np.full((4, 1), 0.5)
    plan = solve_stages(
        latency_s=lat, mesh_devices=[1], total_devices=2, num_stages=2, w_sum=1, w_max=1, p2p_s=p2p
    )
    assert plan is not None
    # [0,1] + send, [2,3]: latencies 2.5 and 2; or 3 layers on the last stage: 1.5 / 3
    assert plan.stage_latency_s == (2.5, 2.0)
    assert plan.total_s == pytest.approx(4.5 + 2.5)


def test_memory_forces_unbalanced_split_and_infeasible_returns_none() -> None:
    lat = _range_costs(np.ones((6, 1)))
    act = _range_costs(np.ones((6, 1)))  # one byte per layer per in-flight microbatch
    inflight = inflight_microbatches(schedule="1f1b", num_stages=2, microbatches=8)
    assert list(inflight) == [2, 1]
    # capacity 4: the first stage (2 microbatches in flight) holds at most 2 layers
    plan = solve_stages(
        latency_s=lat, mesh_devices=[1], total_devices=2, num_stages=2, w_sum=1, w_max=7,
        act_bytes=act, inflight=inflight, capacity_bytes=4,
    )  # fmt: skip
    assert plan is not None and plan.ends[0] == 1
    none = solve_stages(
        latency_s=lat, mesh_devices=[1], total_devices=2, num_stages=2, w_sum=1, w_max=7,
        act_bytes=act, inflight=inflight, capacity_bytes=2,
    )  # fmt: skip
    assert none is None


def test_submesh_choice_uses_exactly_all_devices() -> None:
    # a fast 2-device mesh and a slow 1-device mesh; 3 devices, 2 stages -> one of each
    per = np.stack([np.full(4, 2.0), np.full(4, 1.0)], axis=1)
    lat = _range_costs(per)
    plan = solve_stages(
        latency_s=lat, mesh_devices=[1, 2], total_devices=3, num_stages=2, w_sum=1, w_max=3
    )
    assert plan is not None
    assert sorted(plan.submeshes) == [0, 1]
    ref = brute_force_stages(
        latency_s=lat, mesh_devices=[1, 2], total_devices=3, num_stages=2, w_sum=1, w_max=3
    )
    assert plan.total_s == pytest.approx(ref)


@pytest.mark.parametrize("seed", range(25))
def test_agrees_with_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_layers = int(rng.integers(2, 8))
    num_meshes = int(rng.integers(1, 3))
    mesh_devices = [1, 2][:num_meshes]
    num_stages = int(rng.integers(1, min(num_layers, 4) + 1))
    total = int(rng.integers(num_stages, num_stages * max(mesh_devices) + 1))
    per = rng.uniform(0.1, 3.0, size=(num_layers, num_meshes))
    lat = _range_costs(per, overhead=float(rng.uniform(0, 0.5)))
    # make some ranges unusable, as an ILP that found nothing would
    lat[rng.uniform(size=lat.shape) < 0.1] = np.inf
    kwargs = dict(
        latency_s=lat,
        mesh_devices=mesh_devices,
        total_devices=total,
        num_stages=num_stages,
        w_sum=float(rng.choice([1.0, 0.5])),
        w_max=float(rng.integers(0, 10)),
        p2p_s=rng.uniform(0, 0.3, size=(num_layers, num_meshes)),
        state_bytes=_range_costs(rng.uniform(0, 2, size=(num_layers, num_meshes))),
        act_bytes=_range_costs(rng.uniform(0, 1, size=(num_layers, num_meshes))),
        inflight=inflight_microbatches(schedule="1f1b", num_stages=num_stages, microbatches=4),
        capacity_bytes=float(rng.uniform(3, 12)),
    )
    ref = brute_force_stages(**kwargs)
    plan = solve_stages(**kwargs)
    if not np.isfinite(ref):
        assert plan is None
    else:
        assert plan is not None
        assert plan.total_s == pytest.approx(ref, rel=1e-9)
        assert plan.starts[0] == 0 and plan.ends[-1] == num_layers - 1
        assert sum(mesh_devices[m] for m in plan.submeshes) == total


def test_inflight_by_schedule() -> None:
    assert list(inflight_microbatches(schedule="gpipe", num_stages=3, microbatches=5)) == [5, 5, 5]
    assert list(inflight_microbatches(schedule="1f1b", num_stages=4, microbatches=2)) == [
        2,
        2,
        2,
        1,
    ]
    inter = inflight_microbatches(
        schedule="interleaved_1f1b", num_stages=4, microbatches=64, virtual_stages=2
    )
    assert inter[0] == pytest.approx(4 * (1 + 3 / 8))
    with pytest.raises(ValueError, match="allowed"):
        inflight_microbatches(schedule="zigzag", num_stages=2, microbatches=2)


def test_large_homogeneous_problem_is_fast() -> None:
    import time

    per = np.ones((98, 1))
    per[0] = per[-1] = 2.5
    lat = _range_costs(per)
    t0 = time.perf_counter()
    plan = solve_stages(
        latency_s=lat, mesh_devices=[8], total_devices=64, num_stages=8, w_sum=1, w_max=63
    )
    assert time.perf_counter() - t0 < 2.0
    assert plan is not None and plan.num_stages == 8
    # 101 units of work over 8 stages: the slowest stage cannot be below ceil-ish 101/8
    assert plan.max_stage_s >= 101 / 8
    assert plan.max_stage_s <= 14
