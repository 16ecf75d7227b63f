"""simulate_schedule: textbook makespans, the memory model's in-flight counts, hand-derived
unequal stages, and every event checked against an independent longest-path computation."""

from __future__ import annotations

import random

import networkx as nx
import pytest

from autopar.solver.pipeline import inflight_microbatches, schedule_order, simulate_schedule


def run(schedule, s, v, m, f, b, c=0.0, **kw):
    return simulate_schedule(
        schedule=schedule, num_ranks=s, virtual_stages=v, microbatches=m,
        fwd_s=f, bwd_s=b, send_s=c, **kw,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# known makespans
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("s,m", [(1, 1), (1, 5), (2, 1), (4, 2), (4, 4), (4, 8), (3, 7), (8, 32)])
def test_equal_stages_take_m_plus_s_minus_1_slots(schedule, s, m):
    f, b = 1.25, 2.5
    tl = run(schedule, s, 1, m, f, b)
    assert tl.makespan_s == pytest.approx((m + s - 1) * (f + b), rel=1e-12)
    # every rank idles (S - 1) slots of the pipeline
    for r in range(s):
        assert tl.rank_idle_s(r) == pytest.approx((s - 1) * (f + b), rel=1e-12)


@pytest.mark.parametrize("s,v,m", [(2, 2, 4), (4, 2, 8), (4, 3, 4), (4, 4, 12), (8, 2, 16)])
def test_interleaved_bubble_shrinks_by_v(s, v, m):
    f, b = 1.0, 2.0  # a rank's whole forward / backward, cut into v equal chunks
    tl = run("interleaved_1f1b", s, v, m, f / v, b / v)
    assert tl.makespan_s == pytest.approx((m + (s - 1) / v) * (f + b), rel=1e-12)
    plain = run("1f1b", s, 1, m, f, b)
    bubble = tl.makespan_s - m * (f + b)
    assert bubble == pytest.approx((plain.makespan_s - m * (f + b)) / v, rel=1e-12)


def test_unequal_stages_by_hand():
    # S=2, M=2, 1F1B. rank 0: F0 F1 B0 B1 (warm-up 1); rank 1: F0 B0 F1 B1.
    # no sends: r0 F0 0-1, F1 1-2; r1 F0 1-3, B0 3-7, F1 7-9, B1 9-13; r0 B0 7-9, B1 13-15
    tl = run("1f1b", 2, 1, 2, [1.0, 2.0], [2.0, 4.0])
    assert tl.makespan_s == pytest.approx(15.0)
    # asynchronous sends of 0.5: r0 F0 0-1 (send 1-1.5), F1 1-2 (send 2-2.5); r1 F0 1.5-3.5,
    # B0 3.5-7.5 (send 7.5-8), F1 7.5-9.5, B1 9.5-13.5 (send 13.5-14); r0 B0 8-10, B1 14-16
    tl = run("1f1b", 2, 1, 2, [1.0, 2.0], [2.0, 4.0], [0.5, 0.0])
    assert tl.makespan_s == pytest.approx(16.0)
    ops = {(e.rank, e.kind, e.microbatch): (e.start_s, e.end_s) for e in tl.events}
    assert ops[(1, "F", 1)] == pytest.approx((7.5, 9.5))
    assert ops[(0, "B", 0)] == pytest.approx((8.0, 10.0))
    # blocking sends keep the sender busy: r0 F1 starts at 1.5, r1 F1 at 8 (after B0's send)
    tl = run("1f1b", 2, 1, 2, [1.0, 2.0], [2.0, 4.0], [0.5, 0.0], overlap_p2p=False)
    assert tl.makespan_s == pytest.approx(16.5)
    # tails start after each rank's last backward
    tl = run("1f1b", 2, 1, 2, [1.0, 2.0], [2.0, 4.0], [0.5, 0.0], tail_s=[1.0, 0.5])
    assert tl.makespan_s == pytest.approx(17.0)
    assert tl.pipeline_s == pytest.approx(16.0)
    assert tl.rank_end_s == pytest.approx((17.0, 14.0))  # r1: tail 13.5-14 beside its send


# ---------------------------------------------------------------------------------------------
# op orders
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "schedule,s,v,m",
    [("gpipe", 4, 1, 6), ("1f1b", 4, 1, 2), ("1f1b", 4, 1, 9), ("interleaved_1f1b", 4, 2, 8),
     ("interleaved_1f1b", 4, 3, 4), ("interleaved_1f1b", 3, 5, 12), ("interleaved_1f1b", 2, 1, 4)],
)  # fmt: skip
def test_orders_run_every_op_once_and_match_the_memory_model(schedule, s, v, m):
    orders = schedule_order(schedule=schedule, num_ranks=s, virtual_stages=v, microbatches=m)
    flight = inflight_microbatches(
        schedule=schedule, num_stages=s, microbatches=m, virtual_stages=v
    )
    for r, order in enumerate(orders):
        want = {(k, c, i) for k in "FB" for c in range(v) for i in range(m)}
        assert sorted(order) == sorted(want)
        live = peak = 0
        for kind, _, _ in order:
            live += 1 if kind == "F" else -1
            peak = max(peak, live)
        # chunk-microbatches held at the peak, as pricing.py's memory model counts them
        assert peak == pytest.approx(flight[r] * v)


@pytest.mark.parametrize("s,v,m", [(2, 2, 4), (4, 2, 8), (4, 3, 4), (3, 4, 9), (8, 2, 16)])
def test_interleaved_order_is_megatron_cores(s, v, m):
    schedules = pytest.importorskip("megatron.core.pipeline_parallel.schedules")
    table = schedules.get_schedule_table(m, v, s)  # (microbatch, chunk) per virtual index
    orders = schedule_order(
        schedule="interleaved_1f1b", num_ranks=s, virtual_stages=v, microbatches=m
    )
    for r, order in enumerate(orders):
        fwd = [(i, c) for kind, c, i in order if kind == "F"]
        bwd = [(i, v - 1 - c) for kind, c, i in order if kind == "B"]
        assert fwd == list(table) and bwd == list(table)
        warmup = min(2 * (s - r - 1) + (v - 1) * s, m * v)  # megatron's warm-up count
        first_backward = next(k for k, op in enumerate(order) if op[0] == "B")
        assert first_backward == min(warmup + 1, m * v)  # the steady state starts with a forward


# ---------------------------------------------------------------------------------------------
# every event against an independent longest path
# ---------------------------------------------------------------------------------------------
def longest_path_makespan(schedule, s, v, m, f, b, c, tails, overlap):
    """The same model built as a DAG of ops and sends and solved with networkx."""
    g = nx.DiGraph()
    n = s * v
    dur = {}
    for r, order in enumerate(
        schedule_order(schedule=schedule, num_ranks=s, virtual_stages=v, microbatches=m)
    ):
        prev, last_send = None, {True: None, False: None}
        for kind, chunk, i in order:
            st = chunk * s + r
            node = (kind, st, i)
            dur[node] = f[st] if kind == "F" else b[st]
            if prev is not None:
                g.add_edge(prev, node)
            prev = node
            to = st + 1 if kind == "F" else st - 1
            if 0 <= to < n:
                grad = kind == "B"
                snd = ("send", st, i, grad)
                dur[snd] = c[min(st, to)]
                g.add_edge(node, snd)
                if last_send[grad] is not None:
                    g.add_edge(last_send[grad], snd)  # one transfer per direction at a time
                last_send[grad] = snd
                g.add_edge(snd, ("F" if kind == "F" else "B", to, i))
                if not overlap:
                    prev = snd  # the sender waits for its send
            if kind == "B":
                g.add_edge(("F", st, i), node)
        if tails is not None:
            dur[("tail", r)] = tails[r]
            g.add_edge(prev, ("tail", r))
    for u, w in g.edges:
        g.edges[u, w]["w"] = dur[u]
    for node in list(g.nodes):
        g.add_edge(node, "end", w=dur[node])
    return nx.dag_longest_path_length(g, weight="w")


@pytest.mark.parametrize("seed", range(12))
def test_events_obey_dependencies_and_start_as_soon_as_possible(seed):
    rng = random.Random(seed)
    schedule = ["gpipe", "1f1b", "interleaved_1f1b"][seed % 3]
    s = rng.randint(1, 4) if schedule != "interleaved_1f1b" else rng.randint(2, 4)
    v = rng.randint(2, 3) if schedule == "interleaved_1f1b" else 1
    m = s * rng.randint(1, 3) if schedule == "interleaved_1f1b" else rng.randint(1, 7)
    n = s * v
    f = [rng.uniform(0.5, 2.0) for _ in range(n)]
    b = [rng.uniform(1.0, 4.0) for _ in range(n)]
    c = [rng.choice([0.0, rng.uniform(0.0, 1.5)]) for _ in range(n)]
    tails = [rng.uniform(0.0, 2.0) for _ in range(s)] if seed % 2 else None
    overlap = seed % 4 != 3
    tl = run(schedule, s, v, m, f, b, c, tail_s=tails, overlap_p2p=overlap)

    ops = {(e.kind, tl.stage_of(e), e.microbatch): e for e in tl.events if e.kind in "FB"}
    sends = {(tl.stage_of(e), e.microbatch, e.grad): e for e in tl.events if e.kind == "send"}
    assert len(ops) == 2 * n * m
    for (kind, st, i), e in ops.items():
        assert e.end_s - e.start_s == pytest.approx(f[st] if kind == "F" else b[st])
        if kind == "F" and st > 0:
            src = ops[("F", st - 1, i)]
            arrive = sends[(st - 1, i, False)].end_s if c[st - 1] > 0 else src.end_s
            assert e.start_s >= arrive - 1e-12
        if kind == "B":
            assert e.start_s >= ops[("F", st, i)].end_s - 1e-12
            if st < n - 1:
                src = ops[("B", st + 1, i)]
                arrive = sends[(st + 1, i, True)].end_s if c[st] > 0 else src.end_s
                assert e.start_s >= arrive - 1e-12
    for r in range(s):  # a rank computes one op at a time, in schedule order
        mine = [e for e in tl.events if e.rank == r and e.kind in "FB"]
        want = schedule_order(schedule=schedule, num_ranks=s, virtual_stages=v, microbatches=m)[r]
        assert [(e.kind, e.chunk, e.microbatch) for e in mine] == want
        assert all(a.end_s <= z.start_s + 1e-12 for a, z in zip(mine, mine[1:]))
    # nothing waits longer than it must: the makespan is the DAG's longest path
    want = longest_path_makespan(schedule, s, v, m, f, b, c, tails, overlap)
    assert tl.makespan_s == pytest.approx(want, rel=1e-12)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        run("interleaved_1f1b", 4, 2, 6, 1.0, 1.0)
    with pytest.raises(ValueError, match="virtual_stages=1"):
        run("1f1b", 4, 2, 8, 1.0, 1.0)
    with pytest.raises(ValueError, match="needs 8 entries"):
        run("interleaved_1f1b", 4, 2, 8, [1.0] * 4, 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        run("1f1b", 2, 1, 2, [1.0, -1.0], 1.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        run("zb", 2, 1, 2, 1.0, 1.0)
