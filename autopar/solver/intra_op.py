r"""Intra-operator sharding as an integer program, solved with OR-Tools CP-SAT.

Input is a frozen ``IntraOpProblem`` of plain numbers (built by ``autopar.sharding.problem``);
nothing here knows about torch, graphs or clusters, so it is tested on hand-made arrays.

Data
----
Nodes ``i = 1..N``, node ``i`` has ``K_i`` strategies, a cost vector ``c_i`` (seconds) and a
memory vector ``m_i`` (bytes per device). ``follows[i] = j`` ties node ``i`` to node ``j``
(``K_i = K_j``): strategy ``s`` of ``i`` is used exactly when ``s`` of ``j`` is (Alpa's s_follow).
Edges ``e = (u, v)`` carry a resharding cost matrix ``R_e`` of shape ``K_u x K_v`` (seconds).

Reduction (``_reduce``)
-----------------------
Each node is mapped to the root ``r(i)`` of its follow chain; a *group* ``g`` is one root with its
followers. ``C_g = sum_{i in g} c_i`` and ``M_g = sum_{i in g} m_i``. An edge inside one group
contributes its diagonal to ``C_g``; edges between the same two groups are summed into one
matrix ``R_{gh}``. For CP-SAT all costs are scaled to integers: ``round(seconds * scale)`` with
``scale`` = 1e9 (nanoseconds) unless that would overflow the solver's 64-bit sums.

Exact presolve: variable elimination (``_eliminate``)
------------------------------------------------------
Without a memory row, a group ``g`` outside every shared cost whose only interactions are with
one or two other groups is eliminated exactly (bucket elimination): with one neighbour ``h``,
``C_h[t] += min_s (C_g[s] + R_gh[s,t])``; with two, ``a`` and ``b`` get a new pair matrix
``R_ab[p,q] += min_s (C_g[s] + R_ga[s,p] + R_gb[s,q])``. The argmins are kept and the eliminated
choices are read back in reverse order once the rest is solved. Parameter layouts (one
consumer each) and chains of ops vanish this way; CP-SAT sees only the genuinely coupled core.

The remaining core is then tried with general min-sum variable elimination
(``_variable_elimination``) over its factors (node vectors, pair matrices, one table per shared
cost), eliminating greedily by table size: exact, and done in milliseconds when no intermediate
table exceeds ``elimination_table_limit`` entries (4M by default; transformer blocks stay far
below). With a memory row, or when a table would be larger, the core goes to CP-SAT.

Variables
---------
* ``x[g, s] in {0,1}``: group ``g`` runs strategy ``s``.
* ``z[t] in {0,1}``: shared cost ``t`` is paid.
* ``y[e, s, t] in {0,1}``: edge ``e = (g, h)`` sees strategies ``(s, t)``  (the standard
  linearisation of the product ``x[g,s] * x[h,t]``).

Objective (``add_objective``)
-----------------------------
    minimise  sum_g sum_s C_g[s] x[g,s]  +  sum_e sum_{s,t} R_e[s,t] y[e,s,t]  +  sum_t S_t z[t]

Constraints, one method each
----------------------------
* one-hot (``add_one_hot``):           sum_s x[g,s] = 1                          for every g
* edge marginals (``add_edge_marginals``): sum_t y[e,s,t] = x[g,s]   and
                                         sum_s y[e,s,t] = x[h,t]                  for every e
* memory row (``add_memory_row``):      sum_g sum_s M_g[s] x[g,s] <= budget     (if a budget)
* shared triggers (``add_shared_triggers``): x[g,s] <= z[t]   for every member (g, s) of t

A *shared* cost ``t`` (price ``S_t``) is a collective paid once when any of its member strategies
is chosen: consumers of one tensor add their partial gradients locally and share one all-reduce.
``z[t] in {0,1}`` is pushed to 1 by any member and to 0 by the objective, so it is exactly the
OR of its members. A term whose members all lie in one
group is just a node cost and is folded in.

The marginals make ``y`` the exact product of two one-hot vectors, so the model is exact, and its
LP relaxation is the usual tight one. Edge matrices that are separable (``R[s,t] = a[s] + b[t]``)
are folded into the node costs and get no ``y`` at all; all-zero ones are dropped.

Search: ``max_time_in_seconds``, ``random_seed`` fixed and ``num_workers = 1`` so a given problem
always yields the same plan; ``linearization_level = 2`` (the LP of the marginals prunes well
here: 4x fewer branches than the default on a GPT block). The result carries CP-SAT's status (``optimal`` or ``feasible``) and
the relative gap ``(objective - bound) / objective``.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from autopar.errors import AutoparError, InfeasibleError

__all__ = ["IntraOpProblem", "IntraOpSolution", "solve_intra_op", "evaluate", "brute_force"]

MAX_SCALED_TOTAL = 2**52
"""Keep every scaled sum well inside int64 (and exact in float64) for CP-SAT."""


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class IntraOpProblem:
    """The ILP's data: plain arrays, one entry per node; see the module docstring."""

    names: tuple[str, ...]
    """Node names (graph node names), for reports only."""
    node_costs: tuple[np.ndarray, ...]
    """Seconds per strategy: compute + the strategy's own collectives (weighted)."""
    memory_bytes: tuple[np.ndarray, ...]
    """Bytes per device per strategy (weights, saved activations)."""
    follows: tuple[int, ...]
    """-1, or the index of the node whose strategy index this node shares."""
    edges: tuple[tuple[int, int], ...] = ()
    edge_costs: tuple[np.ndarray, ...] = ()
    """Seconds, ``K_u x K_v`` per edge."""
    shared_costs: tuple[float, ...] = ()
    """Seconds of collectives paid once if *any* member strategy is chosen (several consumers
    of one tensor reduce their partial gradients with one all-reduce)."""
    shared_members: tuple[tuple[tuple[int, tuple[int, ...]], ...], ...] = ()
    """Per shared cost: (node, strategy indices) pairs that trigger it."""
    memory_budget_bytes: float | None = None
    strategy_names: tuple[tuple[str, ...], ...] = ()
    unsupported_ops: tuple[str, ...] = ()
    """Ops no rule knew: replicated and reported, never priced at zero."""

    def __post_init__(self) -> None:
        n = len(self.names)
        if not (len(self.node_costs) == len(self.memory_bytes) == len(self.follows) == n):
            raise ValueError("names, node_costs, memory_bytes and follows differ in length")
        if len(self.edges) != len(self.edge_costs):
            raise ValueError("edges and edge_costs differ in length")
        for i, j in enumerate(self.follows):
            if j >= 0 and len(self.node_costs[i]) != len(self.node_costs[j]):
                raise ValueError(
                    f"node {self.names[i]} follows {self.names[j]} with a different count"
                )
        for (u, v), m in zip(self.edges, self.edge_costs):
            if m.shape != (len(self.node_costs[u]), len(self.node_costs[v])):
                raise ValueError(f"edge ({u}, {v}) matrix has shape {m.shape}")
        if len(self.shared_costs) != len(self.shared_members):
            raise ValueError("shared_costs and shared_members differ in length")

    @property
    def num_strategies(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.node_costs)

    def root(self, i: int) -> int:
        seen = 0
        while self.follows[i] >= 0:
            i = self.follows[i]
            seen += 1
            if seen > len(self.names):
                raise ValueError("follow links form a cycle")
        return i


@dataclass(frozen=True, slots=True, kw_only=True)
class IntraOpSolution:
    """What CP-SAT chose and how sure it is."""

    choice: tuple[int, ...]
    """Strategy index per node (followers carry their root's index)."""
    objective_s: float
    """The problem's objective at ``choice``, recomputed exactly in float seconds."""
    status: Literal["optimal", "feasible"]
    gap: float
    """Relative gap between the objective and CP-SAT's lower bound (0 when optimal)."""
    solve_time_s: float
    num_groups: int
    """Decision variables after merging followers (one-hot groups)."""
    num_edge_vars: int = 0
    stats: dict[str, float] = field(default_factory=dict)


def evaluate(problem: IntraOpProblem, choice: tuple[int, ...] | list[int]) -> float:
    """Objective in seconds of a full assignment (followers must equal their roots)."""
    total = 0.0
    for i, c in enumerate(problem.node_costs):
        total += float(c[choice[i]])
    for (u, v), m in zip(problem.edges, problem.edge_costs):
        total += float(m[choice[u], choice[v]])
    for cost, members in zip(problem.shared_costs, problem.shared_members):
        if any(choice[i] in ss for i, ss in members):
            total += cost
    return total


def memory_of(problem: IntraOpProblem, choice: tuple[int, ...] | list[int]) -> float:
    return float(sum(m[choice[i]] for i, m in enumerate(problem.memory_bytes)))


def brute_force(problem: IntraOpProblem) -> tuple[float, tuple[int, ...]]:
    """Exhaustive optimum over the roots (tests only: exponential)."""
    roots = [i for i in range(len(problem.names)) if problem.follows[i] < 0]
    best = (float("inf"), ())
    for combo in itertools.product(*(range(len(problem.node_costs[r])) for r in roots)):
        pick = dict(zip(roots, combo))
        choice = tuple(pick[problem.root(i)] for i in range(len(problem.names)))
        if (
            problem.memory_budget_bytes is not None
            and memory_of(problem, choice) > problem.memory_budget_bytes
        ):
            continue
        val = evaluate(problem, choice)
        if val < best[0] - 1e-15:
            best = (val, choice)
    return best


@dataclass(slots=True)
class _Reduced:
    roots: list[int]
    group_of: list[int]
    costs: list[np.ndarray]
    memory: list[np.ndarray]
    pair_costs: dict[tuple[int, int], np.ndarray]
    shared: list[tuple[float, dict[int, frozenset[int]]]]


def _reduce(problem: IntraOpProblem) -> _Reduced:
    """Merge followers into their roots and edges into per-group-pair matrices."""
    n = len(problem.names)
    root_of = [problem.root(i) for i in range(n)]
    roots = sorted(set(root_of))
    gidx = {r: g for g, r in enumerate(roots)}
    group_of = [gidx[root_of[i]] for i in range(n)]
    costs = [np.zeros(len(problem.node_costs[r])) for r in roots]
    memory = [np.zeros(len(problem.node_costs[r])) for r in roots]
    for i in range(n):
        costs[group_of[i]] += problem.node_costs[i]
        memory[group_of[i]] += problem.memory_bytes[i]
    pairs: dict[tuple[int, int], np.ndarray] = {}
    for (u, v), m in zip(problem.edges, problem.edge_costs):
        gu, gv = group_of[u], group_of[v]
        if gu == gv:
            costs[gu] += np.diag(m)
            continue
        if gu > gv:
            gu, gv, m = gv, gu, m.T
        if (gu, gv) in pairs:
            pairs[(gu, gv)] = pairs[(gu, gv)] + m
        else:
            pairs[(gu, gv)] = np.array(m, dtype=float)
    # fold separable matrices R[s,t] = a[s] + b[t] into the node costs
    for key in list(pairs):
        m = pairs[key]
        a = m[:, 0] - m[0, 0]
        b = m[0, :]
        if np.allclose(m, a[:, None] + b[None, :], rtol=0, atol=1e-15):
            costs[key[0]] += a
            costs[key[1]] += b
            del pairs[key]
    shared: list[tuple[float, dict[int, frozenset[int]]]] = []
    for cost, members in zip(problem.shared_costs, problem.shared_members):
        by_group: dict[int, set[int]] = {}
        for i, ss in members:
            by_group.setdefault(group_of[i], set()).update(ss)
        if len(by_group) == 1:  # one decision triggers it: an ordinary node cost
            ((g, ss),) = by_group.items()
            for s in ss:
                costs[g][s] += cost
        elif by_group:
            shared.append((cost, {g: frozenset(ss) for g, ss in by_group.items()}))
    return _Reduced(roots, group_of, costs, memory, pairs, shared)


@dataclass(slots=True)
class _Elimination:
    kind: Literal["free", "leaf", "chain"]
    g: int
    a: int = -1
    b: int = -1
    arg: np.ndarray | None = None


def _pair(red: _Reduced, g: int, h: int) -> np.ndarray:
    """Matrix of the pair oriented as (g rows, h columns)."""
    return red.pair_costs[(g, h)] if g < h else red.pair_costs[(h, g)].T


def _add_pair(red: _Reduced, g: int, h: int, m: np.ndarray) -> None:
    if g > h:
        g, h, m = h, g, m.T
    if (g, h) in red.pair_costs:
        red.pair_costs[(g, h)] = red.pair_costs[(g, h)] + m
    else:
        red.pair_costs[(g, h)] = m


def _eliminate(
    red: _Reduced, *, max_table: int = 2_000_000
) -> tuple[list[int], list[_Elimination]]:
    """Bucket-eliminate groups of degree <= 2 (see the module docstring); returns the core."""
    alive = set(range(len(red.costs)))
    locked = {g for _, members in red.shared for g in members}
    adj: dict[int, set[int]] = {g: set() for g in alive}
    for g, h in red.pair_costs:
        adj[g].add(h)
        adj[h].add(g)
    records: list[_Elimination] = []
    changed = True
    while changed:
        changed = False
        for g in sorted(alive):
            if g in locked or len(adj[g]) > 2:
                continue
            cg = red.costs[g]
            nb = sorted(adj[g])
            if not nb:
                records.append(_Elimination("free", g, arg=np.array(int(np.argmin(cg)))))
            elif len(nb) == 1:
                (h,) = nb
                tot = cg[:, None] + _pair(red, g, h)
                records.append(_Elimination("leaf", g, h, arg=np.argmin(tot, axis=0)))
                red.costs[h] = red.costs[h] + tot.min(axis=0)
                del red.pair_costs[(min(g, h), max(g, h))]
                adj[h].discard(g)
            else:
                a, b = nb
                if len(cg) * len(red.costs[a]) * len(red.costs[b]) > max_table:
                    continue
                tot = (
                    cg[:, None, None] + _pair(red, g, a)[:, :, None] + _pair(red, g, b)[:, None, :]
                )
                records.append(_Elimination("chain", g, a, b, arg=np.argmin(tot, axis=0)))
                del red.pair_costs[(min(g, a), max(g, a))]
                del red.pair_costs[(min(g, b), max(g, b))]
                adj[a].discard(g)
                adj[b].discard(g)
                _add_pair(red, a, b, tot.min(axis=0))
                adj[a].add(b)
                adj[b].add(a)
            alive.discard(g)
            adj[g] = set()
            changed = True
    return sorted(alive), records


def _back_substitute(gchoice: dict[int, int], records: list[_Elimination]) -> None:
    for r in reversed(records):
        assert r.arg is not None
        if r.kind == "free":
            gchoice[r.g] = int(r.arg)
        elif r.kind == "leaf":
            gchoice[r.g] = int(r.arg[gchoice[r.a]])
        else:
            gchoice[r.g] = int(r.arg[gchoice[r.a], gchoice[r.b]])


def _core(red: _Reduced, alive: list[int]) -> _Reduced:
    """The sub-problem on the groups that survived elimination, re-indexed 0..len(alive)-1."""
    pos = {g: i for i, g in enumerate(alive)}
    return _Reduced(
        roots=[red.roots[g] for g in alive],
        group_of=[],
        costs=[red.costs[g] for g in alive],
        memory=[red.memory[g] for g in alive],
        pair_costs={(pos[g], pos[h]): m for (g, h), m in red.pair_costs.items()},
        shared=[(c, {pos[g]: ss for g, ss in members.items()}) for c, members in red.shared],
    )


class _CpSatModel:
    """Builds the CP-SAT model family by family (each method is one block of the docstring)."""

    def __init__(self, red: _Reduced, scale: float) -> None:
        from ortools.sat.python import cp_model

        self.cp = cp_model
        self.model = cp_model.CpModel()
        self.red = red
        self.scale = scale
        self.x: list[list] = []
        self.y: dict[tuple[int, int], list[list]] = {}
        self.z: list = []

    def _int(self, seconds: np.ndarray) -> list[int]:
        return [int(round(float(v) * self.scale)) for v in seconds]

    def add_variables(self) -> None:
        for g, c in enumerate(self.red.costs):
            self.x.append([self.model.NewBoolVar(f"x{g}_{s}") for s in range(len(c))])
        for (g, h), m in self.red.pair_costs.items():
            self.y[(g, h)] = [
                [self.model.NewBoolVar(f"y{g}_{h}_{s}_{t}") for t in range(m.shape[1])]
                for s in range(m.shape[0])
            ]

    def add_shared_triggers(self) -> None:
        for t, (_, members) in enumerate(self.red.shared):
            z = self.model.NewBoolVar(f"z{t}")
            self.z.append(z)
            for g, ss in members.items():
                for s in ss:
                    self.model.AddImplication(self.x[g][s], z)

    def add_one_hot(self) -> None:
        for xs in self.x:
            self.model.AddExactlyOne(xs)

    def add_edge_marginals(self) -> None:
        for (g, h), ys in self.y.items():
            for s, row in enumerate(ys):
                self.model.Add(sum(row) == self.x[g][s])
            for t in range(len(ys[0])):
                self.model.Add(sum(ys[s][t] for s in range(len(ys))) == self.x[h][t])

    def add_memory_row(self, budget_bytes: float | None) -> None:
        if budget_bytes is None:
            return
        unit = max(1.0, max((float(m.max()) for m in self.red.memory), default=1.0) / 1e9)
        terms = []
        for g, m in enumerate(self.red.memory):
            for s, v in enumerate(m):
                coef = int(np.ceil(float(v) / unit))
                if coef:
                    terms.append(coef * self.x[g][s])
        self.model.Add(sum(terms) <= int(np.floor(budget_bytes / unit)))

    def add_objective(self) -> None:
        terms = []
        for g, c in enumerate(self.red.costs):
            for s, v in enumerate(self._int(c - c.min())):
                if v:
                    terms.append(v * self.x[g][s])
        for key, m in self.red.pair_costs.items():
            ys = self.y[key]
            ints = np.rint(m * self.scale).astype(np.int64)
            for s in range(m.shape[0]):
                for t in range(m.shape[1]):
                    if ints[s, t]:
                        terms.append(int(ints[s, t]) * ys[s][t])
        for z, (cost, _) in zip(self.z, self.red.shared):
            v = int(round(cost * self.scale))
            if v:
                terms.append(v * z)
        self.model.Minimize(sum(terms))


def _scale_for(red: _Reduced) -> float:
    worst = sum(float(np.abs(c).max()) for c in red.costs if len(c))
    worst += sum(float(np.abs(m).max()) for m in red.pair_costs.values())
    worst += sum(abs(c) for c, _ in red.shared)
    scale = 1e9
    if worst * scale > MAX_SCALED_TOTAL:
        scale = MAX_SCALED_TOTAL / max(worst, 1e-30)
    return scale


def solve_intra_op(
    problem: IntraOpProblem,
    *,
    time_limit_s: float = 10.0,
    seed: int = 0,
    elimination_table_limit: int = 4_000_000,
) -> IntraOpSolution:
    """Optimal (or best-found within ``time_limit_s``) strategy per node.

    Raises InfeasibleError when the memory row cannot be met by any assignment, AutoparError
    when the time limit passes before any solution is found.
    """
    t0 = time.perf_counter()
    red = _reduce(problem)
    if problem.memory_budget_bytes is not None:
        need = sum(float(m.min()) for m in red.memory)
        if need > problem.memory_budget_bytes:
            raise InfeasibleError(
                "no sharding of this layer fits the memory budget",
                needed_bytes=need,
                available_bytes=problem.memory_budget_bytes,
                suggestions=("use a larger tensor-parallel degree", "recompute activations"),
            )
    records: list[_Elimination] = []
    alive = list(range(len(red.costs)))
    if problem.memory_budget_bytes is None:
        alive, records = _eliminate(red)
    core = _core(red, alive)
    gchoice: dict[int, int] = {}
    status: Literal["optimal", "feasible"] = "optimal"
    gap = 0.0
    n_y = 0
    stats: dict[str, float] = {"eliminated": float(len(records)), "core_groups": float(len(alive))}
    picks = None
    if alive and problem.memory_budget_bytes is None:
        picks = _variable_elimination(core, max_table=elimination_table_limit)
    if picks is not None:
        gchoice.update(zip(alive, picks))
        stats["exact_elimination"] = 1.0
    elif alive:
        picks, status, gap, n_y, more = _solve_core(
            core, problem.memory_budget_bytes, time_limit_s=time_limit_s, seed=seed
        )
        gchoice.update(zip(alive, picks))
        stats.update(more)
    _back_substitute(gchoice, records)
    return _finish(
        problem, red, [gchoice[g] for g in range(len(red.costs))], status, gap, t0, n_y, stats
    )


def _variable_elimination(core: _Reduced, *, max_table: int) -> list[int] | None:
    """Exact min-sum variable elimination over the core's factors, or None if too large.

    Factors are the node cost vectors, the pair matrices and one table per shared cost over
    its member groups. Groups are eliminated greedily by the size of the table they create;
    each elimination keeps an argmin table, read back in reverse order.
    """
    n = len(core.costs)
    sizes = [len(c) for c in core.costs]
    factors: list[tuple[tuple[int, ...], np.ndarray]] = [
        ((g,), c) for g, c in enumerate(core.costs)
    ]
    factors += [((g, h), m) for (g, h), m in core.pair_costs.items()]
    for cost, members in core.shared:
        vs = tuple(sorted(members))
        cells = 1
        for v in vs:
            cells *= sizes[v]
        if cells > max_table:  # one all-reduce shared by very many consumers (an RNN's weights)
            return None
        none = np.ones([sizes[v] for v in vs])
        for k, v in enumerate(vs):
            hit = np.zeros(sizes[v])
            hit[list(members[v])] = 1.0
            view = [1] * len(vs)
            view[k] = sizes[v]
            none = none * (1.0 - hit.reshape(view))
        factors.append((vs, cost * (1.0 - none)))

    def expand(vs: tuple[int, ...], table: np.ndarray, scope: tuple[int, ...]) -> np.ndarray:
        return table.reshape([sizes[v] if v in vs else 1 for v in scope])

    trail: list[tuple[int, tuple[int, ...], np.ndarray]] = []
    left = set(range(n))
    while left:
        best = None
        for v in left:
            scope = set()
            for vs, _ in factors:
                if v in vs:
                    scope.update(vs)
            size = 1
            for u in scope:
                size *= sizes[u]
            if best is None or size < best[0]:
                best = (size, v, tuple(sorted(scope | {v})))
        size, v, scope = best
        if size > max_table:
            return None
        mine = [f for f in factors if v in f[0]]
        factors = [f for f in factors if v not in f[0]]
        total = np.zeros([sizes[u] for u in scope])
        for vs, table in mine:
            total = total + expand(vs, table, scope)
        axis = scope.index(v)
        rest = tuple(u for u in scope if u != v)
        trail.append((v, rest, np.argmin(total, axis=axis)))
        factors.append((rest, total.min(axis=axis)))
        left.discard(v)
    choice: dict[int, int] = {}
    for v, rest, arg in reversed(trail):
        choice[v] = int(arg[tuple(choice[u] for u in rest)]) if rest else int(arg)
    return [choice[g] for g in range(n)]


def _solve_core(
    core: _Reduced, budget: float | None, *, time_limit_s: float, seed: int
) -> tuple[list[int], Literal["optimal", "feasible"], float, int, dict[str, float]]:
    if not core.pair_costs and not core.shared and budget is None:
        return [int(np.argmin(c)) for c in core.costs], "optimal", 0.0, 0, {}
    m = _CpSatModel(core, _scale_for(core))
    m.add_variables()
    m.add_one_hot()
    m.add_edge_marginals()
    m.add_shared_triggers()
    m.add_memory_row(budget)
    m.add_objective()
    solver = m.cp.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.random_seed = int(seed)
    solver.parameters.num_workers = 1
    solver.parameters.linearization_level = 2
    code = solver.Solve(m.model)
    if code == m.cp.INFEASIBLE:
        raise InfeasibleError(
            "no sharding of this layer fits the memory budget",
            needed_bytes=sum(float(x.min()) for x in core.memory),
            available_bytes=float(budget or 0.0),
        )
    if code not in (m.cp.OPTIMAL, m.cp.FEASIBLE):
        raise AutoparError(
            f"intra-op solver found no solution within {time_limit_s:.1f} s "
            f"(status {solver.StatusName(code)}); raise time_limit_s"
        )
    picks = [next(s for s, v in enumerate(xs) if solver.BooleanValue(v)) for xs in m.x]
    obj = solver.ObjectiveValue()
    bound = solver.BestObjectiveBound()
    optimal = code == m.cp.OPTIMAL
    gap = 0.0 if optimal else max(0.0, (obj - bound) / obj) if obj > 0 else 0.0
    n_y = sum(len(ys) * len(ys[0]) for ys in m.y.values())
    return (
        picks,
        "optimal" if optimal else "feasible",
        gap,
        n_y,
        {"wall_time_s": solver.WallTime(), "branches": float(solver.NumBranches())},
    )


def _finish(
    problem: IntraOpProblem,
    red: _Reduced,
    gchoice: list[int],
    status: Literal["optimal", "feasible"],
    gap: float,
    t0: float,
    n_y: int,
    stats: dict[str, float] | None = None,
) -> IntraOpSolution:
    choice = tuple(gchoice[red.group_of[i]] for i in range(len(problem.names)))
    return IntraOpSolution(
        choice=choice,
        objective_s=evaluate(problem, choice),
        status=status,
        gap=gap,
        solve_time_s=time.perf_counter() - t0,
        num_groups=len(red.roots),
        num_edge_vars=n_y,
        stats=stats or {},
    )
