"""Plan: JSON round-trip, versioning, placement parsing, DTensor conversion."""

from __future__ import annotations

import json

import pytest

from autopar.errors import ConfigError
from autopar.plan import (
    Alternative,
    ClusterInfo,
    LayerSpec,
    MemoryBreakdown,
    Mesh,
    OpPlacement,
    Parallel,
    Plan,
    Prediction,
    Stack,
    Stage,
    TimeBreakdown,
    parse_placement,
)


def make_plan() -> Plan:
    return Plan(
        model="gpt-test",
        cluster="dgx-a100",
        num_devices=8,
        global_batch=16,
        seq_len=128,
        dtype="bf16",
        parallel=Parallel(dp=2, tp=2, pp=2),
        mesh=Mesh(shape=(2, 2, 2), dim_names=("pp", "dp", "tp")),
        stages=(
            Stage(layers=("embed", "layers.0"), devices=(0, 1, 2, 3)),
            Stage(layers=("layers.1", "head"), devices=(4, 5, 6, 7)),
        ),
        layers=(
            LayerSpec(name="embed", kind="embed", signature="e"),
            LayerSpec(name="layers.0", kind="block", signature="b"),
            LayerSpec(name="layers.1", kind="block", signature="b"),
            LayerSpec(name="head", kind="head", signature="h"),
        ),
        model_spec="gpt:layers=2,hidden=64,heads=4",
        model_facts={"layers": 2, "hidden": 64},
        cluster_info=ClusterInfo(name="dgx-a100", nodes=1, devices_per_host=8, device="a100"),
        stack=Stack(name="megatron-core", attention="flash", sequence_parallel="on"),
        layouts={
            "b": (
                OpPlacement(op="aten.mm.default", inputs=("R", "S(1)"), output="S(1)"),
                OpPlacement(op="aten._softmax.default", inputs=("S(1)",), output="S(1)", core=True),
            )
        },
        unknown_ops={"aten.lstm.input": 2},
        microbatches=4,
        micro_batch_size=2,
        schedule="1f1b",
        zero_stage=1,
        recompute="selective",
        placements={
            "layers.0.attn.q.weight": ("R", "S(0)"),
            "layers.0.attn.o.weight": ("R", "S(1)"),
        },
        predicted=Prediction(
            step_time_s=1.5,
            tokens_per_s=1365.3,
            tflops_per_device=100.0,
            mfu=0.32,
            memory_gib_per_device=20.0,
            breakdown=TimeBreakdown(compute=1.0, tp_comm=0.2, pp_bubble=0.3),
            memory=MemoryBreakdown(weights=1e9, activations=2e9, capacity=72e9),
        ),
        alternatives=(
            Alternative(
                parallel=Parallel(dp=4, tp=2, pp=1),
                microbatches=2,
                micro_batch_size=2,
                schedule="1f1b",
                zero_stage=0,
                recompute="none",
                step_time_s=1.8,
                memory_gib_per_device=60.0,
            ),
        ),
        solver={"time_s": 0.5, "candidates": 12, "ilp_status": "OPTIMAL"},
    )


def test_json_round_trip_is_lossless(tmp_path):
    plan = make_plan()
    path = tmp_path / "plan.json"
    plan.to_json(path)
    assert Plan.from_json(path) == plan
    assert Plan.from_json(plan.to_json()) == plan


def test_json_has_the_keys_other_tools_rely_on():
    d = json.loads(make_plan().to_json())
    assert d["parallel"] == {"dp": 2, "tp": 2, "pp": 2}
    assert d["mesh"]["shape"] == [2, 2, 2] and d["mesh"]["dim_names"] == ["pp", "dp", "tp"]
    assert d["stages"][1] == {"layers": ["layers.1", "head"], "devices": [4, 5, 6, 7]}
    for key in ("microbatches", "schedule", "zero_stage", "recompute", "placements", "version"):
        assert key in d
    pred = d["predicted"]
    for key in ("step_time_s", "tokens_per_s", "tflops_per_device", "mfu", "memory_gib_per_device"):
        assert key in pred
    assert set(pred["breakdown"]) >= {"compute", "tp_comm", "dp_comm", "pp_bubble", "pp_comm"}


def test_version_1_plans_are_refused_with_what_to_do():
    d = make_plan().to_dict()
    d["version"] = 1
    with pytest.raises(ConfigError, match="re-run"):
        Plan.from_dict(d)


def test_a_json_list_is_a_config_error_not_a_crash():
    with pytest.raises(ConfigError, match="JSON object"):
        Plan.from_json("[1, 2]")


def test_wrong_version_is_refused_with_the_supported_one():
    d = make_plan().to_dict()
    d["version"] = 99
    with pytest.raises(ConfigError, match="version.*allowed: 2"):
        Plan.from_dict(d)


def test_malformed_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json"):
        Plan.from_json(path)


def test_mesh_axes_must_be_ordered():
    with pytest.raises(ConfigError, match="dim_names"):
        Mesh(shape=(2, 2), dim_names=("tp", "dp"))


@pytest.mark.parametrize(
    "text, parsed",
    [("R", ("R", None)), ("P", ("P", None)), ("S(0)", ("S", 0)), ("S(12)", ("S", 12))],
)
def test_parse_placement(text, parsed):
    assert parse_placement(text) == parsed


@pytest.mark.parametrize("text", ["S", "S(-1)", "Shard(0)", "", "r"])
def test_parse_placement_rejects(text):
    with pytest.raises(ConfigError):
        parse_placement(text)


def test_sharding_specs_are_real_dtensor_placements():
    from torch.distributed.tensor import Replicate, Shard

    specs = make_plan().sharding_specs()
    assert specs["mesh_shape"] == (2, 2) and specs["dim_names"] == ("dp", "tp")
    assert specs["placements"]["layers.0.attn.q.weight"] == (Replicate(), Shard(0))
    assert specs["placements"]["layers.0.attn.o.weight"] == (Replicate(), Shard(1))
