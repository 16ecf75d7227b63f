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


# -- Plan.validate: types, ranges and consistency, each error naming the field ----------------
def _set(path: str | tuple[str, ...], value):
    """An edit of the plan's JSON form at a dotted path (``parallel.tp``, ``stages.0.devices``),
    or a tuple of keys when a key has dots of its own."""

    def edit(d: dict) -> None:
        *head, last = path if isinstance(path, tuple) else path.split(".")
        node = d
        for key in head:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        elif value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return edit


_DELETE = object()


def _interleaved(d: dict) -> None:
    """pp=2 x v=2 chunks, one layer each, 3 microbatches: not divisible by pp."""
    d.update(schedule="interleaved_1f1b", virtual_stages=2, microbatches=3, global_batch=12)
    d["stages"] = [
        {"layers": [name], "devices": [0, 1, 2, 3] if i % 2 == 0 else [4, 5, 6, 7]}
        for i, name in enumerate(["embed", "layers.0", "layers.1", "head"])
    ]


def _tp4_mesh_too(d: dict) -> None:
    d["parallel"]["tp"] = 4
    d["mesh"]["shape"] = [2, 2, 4]


BAD_PLANS = {
    "tp is a word": (_set("parallel.tp", "two"), "parallel.tp", "expected an integer"),
    "tp disagrees with the mesh": (_set("parallel.tp", 4), "parallel.tp", "degree 2"),
    "degrees exceed the devices": (_tp4_mesh_too, "num_devices", "2 x 4 x 2 = 16"),
    "seven devices": (_set("num_devices", 7), "num_devices", "7 devices"),
    "a mesh axis twice": (_set("mesh.dim_names", ["pp", "dp", "dp"]), "mesh.dim_names", "repeat"),
    "zero devices": (_set("num_devices", 0), "num_devices", ">= 1"),
    "bool zero stage": (_set("zero_stage", True), "zero_stage", "expected an integer"),
    "unknown schedule": (_set("schedule", "zb"), "schedule", "zb"),
    "unknown dtype": (_set("dtype", "bf8"), "dtype", "bf8"),
    "zero sequence": (_set("seq_len", 0), "seq_len", ">= 1"),
    "stages missing": (_set("stages", _DELETE), "stages", "missing"),
    "stages not a list": (_set("stages", "all"), "stages", "expected a list"),
    "stage on the wrong ranks": (_set("stages.0.devices", [0, 2, 4, 6]), "stages[0].devices",
                                 "ranks (0, 1, 2, 3)"),
    "a layer in no stage": (_set("stages.1.layers", ["head"]), "stages", "layers.1"),
    "a layer twice": (_set("stages.1.layers", ["layers.0", "layers.1", "head"]),
                      "stages[1].layers", "stage 0 and stage 1"),
    "layers out of order": (_set("stages.0.layers", ["layers.0", "embed"]), "stages[0].layers",
                            "out of model order"),
    "unknown layer kind": (_set("layers.1.kind", "decoder"), "layers[1].kind", "decoder"),
    "batch does not add up": (_set("global_batch", 17), "global_batch", "2 x 4 x 2 = 16"),
    "fewer microbatches than stages": (
        lambda d: d.update(microbatches=1, micro_batch_size=8), "microbatches", "pp=2"),
    "interleaved microbatches not divisible": (_interleaved, "microbatches", "divisible by pp"),
    "virtual stages without interleaving": (
        lambda d: (_interleaved(d), d.update(schedule="1f1b")), "schedule", "interleaved"),
    "uneven sequence split": (
        lambda d: d.update(seq_len=127, sequence_parallel=True), "sequence_parallel", "127"),
    "one placement for two axes": (_set(("placements", "layers.0.attn.q.weight"), ["S(0)"]),
                                   "placements[layers.0.attn.q.weight]", "2 stage mesh axes"),
    "placement does not parse": (_set(("placements", "layers.0.attn.q.weight"), ["R", "Shard(0)"]),
                                 "placements[layers.0.attn.q.weight]", "Shard(0)"),
    "partial parameter": (_set(("placements", "layers.0.attn.q.weight"), ["R", "P"]),
                          "placements[layers.0.attn.q.weight]", "partial"),
    "op layout does not parse": (_set("layouts.b.0.inputs", ["R", "S"]), "layouts[b][0].inputs[1]",
                                 "'S'"),
    "step time not a number": (_set("predicted.step_time_s", float("nan")),
                               "predicted.step_time_s", "finite"),
    "negative compute": (_set("predicted.breakdown.compute", -1.0), "predicted.breakdown.compute",
                         ">= 0"),
    "compute as text": (_set("predicted.breakdown.compute", "1.0"), "predicted.breakdown.compute",
                        "expected a number"),
    "runner-up with tp 0": (_set("alternatives.0.parallel.tp", 0), "alternatives[0].parallel.tp",
                            ">= 1"),
    "cluster of another size": (_set("cluster_info.nodes", 2), "cluster_info.nodes", "16"),
    "unknown attention kernel": (_set("stack.attention", "sparse"), "stack.attention", "sparse"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_inconsistent_plans_are_refused_naming_the_field(case):
    edit, field, text = BAD_PLANS[case]
    d = json.loads(make_plan().to_json())
    edit(d)
    with pytest.raises(ConfigError) as info:
        Plan.from_json(json.dumps(d))
    assert info.value.field == field, str(info.value)
    assert text in str(info.value)
    assert info.value.file == "<plan>"


def test_the_reference_plan_is_valid_and_rounding_is_not_an_error():
    plan = make_plan()
    plan.validate()
    d = plan.to_dict()
    d["predicted"]["breakdown"]["pp_bubble"] = -1e-12  # difference of two nearly equal times
    Plan.from_dict(d).validate()


def test_validate_checks_a_plan_built_in_python():
    from dataclasses import replace

    plan = replace(make_plan(), parallel=Parallel(dp=2, tp="two", pp=2))  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        plan.validate()
    assert info.value.field == "parallel.tp"
    plan = replace(make_plan(), num_devices=7)
    with pytest.raises(ConfigError, match="7 devices"):
        plan.validate()


def test_a_refused_plan_file_names_the_file(tmp_path):
    d = make_plan().to_dict()
    d["num_devices"] = 7
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as info:
        Plan.from_json(path)
    assert info.value.file == str(path) and info.value.field == "num_devices"


@pytest.mark.parametrize("value", [12, None, 1.5, ["plan.json"]])
def test_from_json_refuses_what_is_not_text_or_a_path(value):
    with pytest.raises(ConfigError, match="JSON string or a file path"):
        Plan.from_json(value)


def test_keys_a_newer_version_adds_are_ignored():
    d = make_plan().to_dict()
    d["a_later_optional_field"] = {"x": 1}
    d["parallel"]["cp"] = 1
    assert Plan.from_dict(d) == make_plan()
