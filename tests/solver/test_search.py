"""Outer search: known answers, fixed= pinning, infeasibility, JSON round trip, ILP budget."""

from __future__ import annotations

import pytest

from autopar.config import TrainingConfig
from autopar.errors import ConfigError, InfeasibleError
from autopar.explain import host_mapping, render, why
from autopar.models import gpt
from autopar.plan import Plan
from autopar.solver.search import search
from autopar.topology.load import load_cluster


def _gpt(layers: int, hidden: int, heads: int, *, vocab: int = 51200, seq: int = 2048):
    return gpt(layers=layers, hidden=hidden, heads=heads, vocab=vocab, seq_len=seq)


@pytest.fixture(scope="module")
def gpt13b_plan() -> Plan:
    """GPT ~13B on 4 DGX A100 hosts, full search priced analytically."""
    cluster = load_cluster("dgx-a100", nodes=4)
    cfg = TrainingConfig(global_batch=128, seq_len=2048)
    return search(_gpt(40, 5120, 40), cluster, cfg, progress=False)


def test_tensor_parallel_stays_inside_a_host(gpt13b_plan: Plan) -> None:
    plan = gpt13b_plan
    assert plan.parallel.tp <= 8
    assert plan.parallel.world_size == 32
    # the landscape prices tensor parallelism across hosts, and it loses to tp inside a host
    cross = [a for a in plan.landscape if a.parallel.tp > 8]
    inside = [a for a in plan.landscape if a.parallel.tp <= 8]
    assert inside and min(a.step_time_s for a in inside) == plan.predicted.step_time_s
    for a in cross:
        assert a.step_time_s > plan.predicted.step_time_s
    assert "inside a host" in host_mapping(plan) or plan.parallel.tp == 1


def test_plan_is_complete_and_round_trips_json(gpt13b_plan: Plan) -> None:
    plan = gpt13b_plan
    pred = plan.predicted
    assert pred is not None and pred.step_time_s > 0
    assert pred.tokens_per_s == pytest.approx(128 * 2048 / pred.step_time_s)
    assert 0 < pred.mfu < 1
    assert pred.memory.total <= pred.memory.capacity
    assert pred.memory_gib_per_device * 1024**3 == pytest.approx(pred.memory.total)
    # every layer placed exactly once, stages tile the devices
    names = [n for st in plan.stages for n in st.layers]
    assert names[0] == "embed" and names[-1] == "head" and len(names) == len(set(names)) == 42
    devices = sorted(d for st in plan.stages for d in st.devices)
    assert devices == list(range(32))
    assert plan.microbatches * plan.micro_batch_size * plan.parallel.dp == 128
    # placements: one string per stage mesh axis for every parameter of every layer
    assert "layers.39.mlp.down.weight" in plan.placements
    assert all(len(v) == 2 for v in plan.placements.values())
    assert plan.alternatives and all(
        why(a, pred.step_time_s, pred.breakdown) for a in plan.alternatives
    )
    assert all(a.step_time_s >= pred.step_time_s for a in plan.alternatives)
    again = Plan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict()
    assert render(again) == render(plan)


def test_pipeline_across_hosts_when_the_model_does_not_fit_one() -> None:
    # ~40B parameters: 640 GB of model state; 8 GPUs of a host hold at most 8 x 72 GiB
    cluster = load_cluster("dgx-a100", nodes=4)
    cfg = TrainingConfig(global_batch=64, seq_len=2048)
    plan = search(
        _gpt(48, 8192, 64), cluster, cfg, fixed={"zero": 0},
        progress=False,
    )  # fmt: skip
    assert plan.parallel.pp >= 2
    assert plan.parallel.tp <= 8
    # one Stage per pipeline rank, or per model chunk when interleaved (what the emitter runs)
    assert len(plan.stages) == plan.parallel.pp * plan.virtual_stages
    # the first stage carries the embedding, the last the logits
    assert plan.stages[0].layers[0] == "embed" and plan.stages[-1].layers[-1] == "head"


def test_fixed_configuration_is_respected() -> None:
    cluster = load_cluster("dgx-a100", nodes=1)
    cfg = TrainingConfig(global_batch=32, seq_len=1024)
    fixed = {
        "tp": 2, "pp": 2, "microbatches": 8, "recompute": "full", "zero": 1, "schedule": "1f1b",
    }  # fmt: skip
    plan = search(
        _gpt(8, 1024, 16, seq=1024), cluster, cfg, fixed=fixed,
        progress=False,
    )  # fmt: skip
    assert (plan.parallel.tp, plan.parallel.pp, plan.parallel.dp) == (2, 2, 2)
    assert plan.microbatches == 8 and plan.micro_batch_size == 2
    assert (plan.recompute, plan.zero_stage, plan.schedule) == ("full", 1, "1f1b")
    assert plan.predicted.breakdown.recompute > 0
    assert all(a.parallel.tp == 2 and a.parallel.pp == 2 for a in plan.alternatives)


def test_bad_fixed_key_names_the_allowed_ones() -> None:
    cluster = load_cluster("dgx-a100", nodes=1)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        search(_gpt(2, 256, 4), cluster, TrainingConfig(global_batch=8), fixed={"mbs": 2})


def test_infeasible_states_need_capacity_and_remedies() -> None:
    cluster = load_cluster("dgx-a100", nodes=1)
    cfg = TrainingConfig(global_batch=8, seq_len=2048, offload="none")
    with pytest.raises(InfeasibleError) as info:
        search(_gpt(96, 12288, 96), cluster, cfg, progress=False)
    err = info.value
    assert err.available_bytes == pytest.approx(80 * 1024**3 * 0.9)
    # 175B x 16 bytes over 8 devices is ~325 GiB each even with everything sharded
    assert err.needed_bytes > 300 * 1024**3
    text = str(err)
    assert "GiB per device" in text and "72.0 GiB" in text
    # only remedies checked to work are printed: more hosts, never b=1 (already tried)
    assert "hosts" in text and "checked to fit" in text and "micro-batch size 1" not in text
    # the DGX's 2 TiB of host memory and its NVMe drives hold what the GPUs cannot
    assert "allow offload to host memory (--offload auto)" in err.suggestions
    hosts = int(text.split("use ")[1].split(" hosts")[0])
    bigger = load_cluster("dgx-a100", nodes=hosts)
    assert search(_gpt(96, 12288, 96), bigger, cfg, progress=False).num_devices == 8 * hosts


def test_depth_folding_matches_a_full_trace() -> None:
    from autopar.graph.trace import trace

    model = _gpt(6, 512, 8, vocab=4096, seq=256)
    cluster = load_cluster("dgx-a100", nodes=1)
    cfg = TrainingConfig(global_batch=16, seq_len=256)
    fixed = {"tp": 2, "pp": 2, "recompute": "none", "zero": 0}
    folded = search(model, cluster, cfg, fixed=fixed, progress=False)
    full = search(trace(model, with_loss=True), cluster, cfg, fixed=fixed, progress=False)
    assert folded.predicted.step_time_s == pytest.approx(full.predicted.step_time_s, rel=1e-9)
    assert folded.predicted.memory_gib_per_device == pytest.approx(
        full.predicted.memory_gib_per_device, rel=1e-9
    )
    assert set(folded.placements) == set(full.placements)


def test_ilp_solves_grow_with_distinct_layers_not_depth() -> None:
    """Identical blocks are solved once per (tp, boundary layout, memory level)."""
    cluster = load_cluster("dgx-a100", nodes=1)
    cfg = TrainingConfig(global_batch=16, seq_len=128)
    solves = []
    for layers in (4, 16):
        plan = search(_gpt(layers, 256, 4, vocab=2048, seq=128), cluster, cfg, progress=False)
        assert plan.solver["pricing"] == "graph"
        solves.append(plan.solver["ilp_solves"])
        assert plan.placements and all(len(v) == 2 for v in plan.placements.values())
        assert Plan.from_json(plan.to_json()).to_dict() == plan.to_dict()
    assert solves[0] == solves[1]
