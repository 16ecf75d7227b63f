"""Megatron-LM's pipeline scatter/gather (SC21 §4.1): a send of an activation replicated over
tensor parallelism goes as 1/tp per rank and is all-gathered over tp on arrival. Priced only
when the stack does it and the boundary is replicated (no sequence parallelism)."""

from __future__ import annotations

import pytest

from autopar.config import TrainingConfig
from autopar.cost.collectives import collective_time_s
from autopar.errors import ConfigError
from autopar.explain import render
from autopar.export import export_plan
from autopar.models import gpt
from autopar.plan import Plan
from autopar.solver.search import search
from autopar.topology.load import load_cluster

PIN = {"dp": 1, "tp": 8, "pp": 2, "microbatches": 8, "recompute": "none", "zero": 0}


@pytest.fixture(scope="module")
def plans() -> dict[tuple[bool, str], Plan]:
    model = gpt(layers=4, hidden=2048, heads=16, vocab=32000, seq_len=2048)
    cluster = load_cluster("dgx-a100", nodes=2)  # the two stages on two hosts: sends over IB
    out = {}
    for sg in (False, True):
        for sp in ("off", "on"):
            cfg = TrainingConfig(global_batch=8, sequence_parallel=sp, pipeline_scatter_gather=sg)
            out[(sg, sp)] = search(model, cluster, cfg, fixed=PIN, progress=False)
    return out


def test_split_sends_cost_a_tp_th_of_the_send_plus_an_all_gather(plans) -> None:
    whole, split = plans[(False, "off")], plans[(True, "off")]
    assert split.predicted.breakdown.pp_comm < 0.5 * whole.predicted.breakdown.pp_comm
    # the same compute, only the sends differ
    assert split.predicted.breakdown.compute == pytest.approx(whole.predicted.breakdown.compute)
    # one boundary: the whole hidden state [b, s, h] in bf16 per tp rank without SP
    cluster = load_cluster("dgx-a100", nodes=2)
    nbytes = 1 * 2048 * 2048 * 2
    send = collective_time_s("p2p", nbytes, (0, 8), cluster)
    sg = collective_time_s("p2p", nbytes / 8, (0, 8), cluster) + collective_time_s(
        "all_gather", nbytes, tuple(range(8, 16)), cluster
    )
    assert sg < send
    ratio = split.predicted.breakdown.pp_comm / whole.predicted.breakdown.pp_comm
    assert ratio == pytest.approx(sg / send, rel=0.02)


def test_sequence_parallel_sends_are_already_split(plans) -> None:
    off, on = plans[(False, "on")], plans[(True, "on")]
    assert on.sequence_parallel and off.sequence_parallel
    assert on.predicted.breakdown.pp_comm == pytest.approx(off.predicted.breakdown.pp_comm)


def test_the_stack_sets_it_an_explicit_field_wins_and_the_plan_shows_it(plans) -> None:
    assert TrainingConfig(stack="megatron-2021").scatter_gathers_pipeline
    assert not TrainingConfig(stack="megatron-core").scatter_gathers_pipeline
    assert not TrainingConfig().scatter_gathers_pipeline
    assert not TrainingConfig(
        stack="megatron-2021", pipeline_scatter_gather=False
    ).scatter_gathers_pipeline
    with pytest.raises(ConfigError) as exc:
        TrainingConfig(pipeline_scatter_gather="on")  # type: ignore[arg-type]
    assert exc.value.field == "pipeline_scatter_gather"
    plan = plans[(True, "off")]
    assert Plan.from_json(plan.to_json()).stack.pipeline_scatter_gather
    assert "scatter/gather" in render(plan).splitlines()[1]
    assert "scatter/gather" not in render(plans[(False, "off")]).splitlines()[1]
    # Megatron-Core has no such send: the emitted command says the sends will be slower
    assert "scatter/gather" in export_plan(plan, "megatron")
