"""The CP-SAT model against exhaustive enumeration, plus the solver's contract details."""

from __future__ import annotations

import numpy as np
import pytest

from autopar.errors import InfeasibleError
from autopar.solver.intra_op import IntraOpProblem, brute_force, evaluate, solve_intra_op


def _random_problem(rng: np.random.Generator, *, budget: bool) -> IntraOpProblem:
    n = int(rng.integers(2, 9))
    ks = [int(rng.integers(1, 5)) for _ in range(n)]
    follows = [-1] * n
    for i in range(1, n):  # some nodes follow an earlier node with the same count
        if rng.random() < 0.25:
            j = int(rng.integers(0, i))
            follows[i] = j
            ks[i] = ks[j]
    costs = tuple(rng.random(k) * 1e-3 for k in ks)
    mem = tuple(rng.integers(1, 100, size=k).astype(float) * 1e6 for k in ks)
    edges, mats = [], []
    for v in range(1, n):
        for u in range(v):
            if rng.random() < 0.45:
                edges.append((u, v))
                mats.append(rng.random((ks[u], ks[v])) * 2e-3)
    shared_costs, shared_members = [], []
    for _ in range(int(rng.integers(0, 3))):  # collectives shared by several consumers
        members = []
        for i in rng.choice(n, size=min(n, 2), replace=False):
            ss = tuple(int(s) for s in range(ks[i]) if rng.random() < 0.5)
            if ss:
                members.append((int(i), ss))
        shared_costs.append(float(rng.random() * 2e-3))
        shared_members.append(tuple(members))
    mem_budget = None
    if budget:
        lo = sum(float(m.min()) for m in mem)
        hi = sum(float(m.max()) for m in mem)
        mem_budget = lo + 0.4 * (hi - lo)
    return IntraOpProblem(
        names=tuple(f"n{i}" for i in range(n)),
        node_costs=costs,
        memory_bytes=mem,
        follows=tuple(follows),
        edges=tuple(edges),
        edge_costs=tuple(mats),
        shared_costs=tuple(shared_costs),
        shared_members=tuple(shared_members),
        memory_budget_bytes=mem_budget,
    )


@pytest.mark.parametrize("seed", range(40))
def test_ilp_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    prob = _random_problem(rng, budget=seed % 2 == 1)
    best, _ = brute_force(prob)
    if best == float("inf"):  # tied followers can make the budget unreachable
        with pytest.raises(InfeasibleError):
            solve_intra_op(prob, time_limit_s=10)
        return
    # elimination_table_limit=0 sends the core to CP-SAT (it is otherwise solved by elimination)
    sol = solve_intra_op(prob, time_limit_s=10, elimination_table_limit=0)
    fast = solve_intra_op(prob, time_limit_s=10)
    assert fast.objective_s == pytest.approx(best, abs=1e-12)
    assert sol.status == "optimal" and sol.gap == 0.0
    # integer scaling to nanoseconds: equal up to rounding of each term
    terms = len(prob.names) + len(prob.edges) + len(prob.shared_costs)
    assert sol.objective_s == pytest.approx(best, abs=1e-9 * terms)
    assert sol.objective_s == pytest.approx(evaluate(prob, sol.choice))
    for i, j in enumerate(prob.follows):
        if j >= 0:
            assert sol.choice[i] == sol.choice[j]
    if prob.memory_budget_bytes is not None:
        used = sum(float(m[sol.choice[i]]) for i, m in enumerate(prob.memory_bytes))
        assert used <= prob.memory_budget_bytes


def test_edge_cost_changes_the_answer() -> None:
    # two nodes that each prefer strategy 0 alone, but disagreeing is expensive
    prob = IntraOpProblem(
        names=("a", "b"),
        node_costs=(np.array([0.0, 1.0]), np.array([1.0, 0.0])),
        memory_bytes=(np.zeros(2), np.zeros(2)),
        follows=(-1, -1),
        edges=((0, 1),),
        edge_costs=(np.array([[0.0, 5.0], [5.0, 0.0]]),),
    )
    sol = solve_intra_op(prob)
    assert sol.objective_s == pytest.approx(1.0)
    assert sol.choice[0] == sol.choice[1]


def test_shared_cost_paid_once() -> None:
    # two consumers each trigger the same all-reduce in strategy 1: paid once, not twice
    prob = IntraOpProblem(
        names=("a", "b"),
        node_costs=(np.array([3.0, 0.0]), np.array([3.0, 0.0])),
        memory_bytes=(np.zeros(2), np.zeros(2)),
        follows=(-1, -1),
        shared_costs=(4.0,),
        shared_members=(((0, (1,)), (1, (1,))),),
    )
    sol = solve_intra_op(prob)
    assert sol.choice == (1, 1)
    assert sol.objective_s == pytest.approx(4.0)
    assert evaluate(prob, (1, 0)) == pytest.approx(7.0)


def test_memory_budget_infeasible_raises_with_numbers() -> None:
    prob = IntraOpProblem(
        names=("a",),
        node_costs=(np.array([0.0, 1.0]),),
        memory_bytes=(np.array([10e9, 8e9]),),
        follows=(-1,),
        memory_budget_bytes=4e9,
    )
    with pytest.raises(InfeasibleError) as err:
        solve_intra_op(prob)
    assert err.value.needed_bytes == pytest.approx(8e9)
    assert err.value.available_bytes == pytest.approx(4e9)


def test_deterministic() -> None:
    rng = np.random.default_rng(7)
    prob = _random_problem(rng, budget=False)
    a = solve_intra_op(prob)
    b = solve_intra_op(prob)
    assert a.choice == b.choice


def test_follower_count_mismatch_rejected() -> None:
    with pytest.raises(ValueError):
        IntraOpProblem(
            names=("a", "b"),
            node_costs=(np.zeros(2), np.zeros(3)),
            memory_bytes=(np.zeros(2), np.zeros(3)),
            follows=(-1, 0),
        )
