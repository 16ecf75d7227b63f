"""The public API refuses arguments of the wrong type with an AutoparError subclass naming the
argument, never a TypeError or AttributeError from deep inside."""

from __future__ import annotations

import pytest

import autopar
from autopar.errors import AutoparError, ConfigError


@pytest.fixture(scope="module")
def small():
    return autopar.models.gpt(layers=2, hidden=64, heads=4, vocab=128, seq_len=16)


@pytest.fixture(scope="module")
def graph(small):
    return autopar.trace(small)


@pytest.fixture(scope="module")
def cluster():
    return autopar.load_cluster("dgx-a100")


def test_search_refuses_a_cluster_name(graph):
    with pytest.raises(ConfigError) as info:
        autopar.search(graph, "dgx-a100")
    assert info.value.field == "cluster" and "load_cluster" in str(info.value)


def test_search_refuses_a_dict_as_config(graph, cluster):
    with pytest.raises(ConfigError) as info:
        autopar.search(graph, cluster, {"global_batch": 8})
    assert info.value.field == "config" and "TrainingConfig" in str(info.value)


@pytest.mark.parametrize("model", ["gpt3-175b", None, 3])
def test_search_refuses_what_is_not_a_model(model, cluster):
    with pytest.raises(ConfigError) as info:
        autopar.search(model, cluster)
    assert info.value.field == "model"


def test_apply_plan_refuses_a_model_name():
    from tests.test_plan import make_plan

    with pytest.raises(ConfigError) as info:
        autopar.apply_plan("model", make_plan())
    assert info.value.field == "model"


def test_apply_plan_refuses_a_plan_path(small):
    with pytest.raises(ConfigError) as info:
        autopar.apply_plan(small, "plan.json")
    assert "Plan.from_json" in str(info.value)


@pytest.mark.parametrize("value", [12, None, {"version": 2}])
def test_plan_from_json_refuses_what_is_not_text_or_a_path(value):
    with pytest.raises(ConfigError):
        autopar.Plan.from_json(value)


@pytest.mark.parametrize("value", [12, None, ["dgx-a100"]])
def test_load_cluster_refuses_what_is_not_a_name_or_path(value):
    with pytest.raises(ConfigError) as info:
        autopar.load_cluster(value)
    assert info.value.field == "name_or_path"


def test_load_cluster_refuses_a_nodes_string():
    with pytest.raises(ConfigError) as info:
        autopar.load_cluster("dgx-a100", nodes="2")
    assert info.value.field == "nodes"


def test_training_config_refuses_a_batch_string():
    with pytest.raises(ConfigError) as info:
        autopar.TrainingConfig(global_batch="8")
    assert info.value.field == "global_batch"


def test_trace_refuses_what_is_not_a_module():
    with pytest.raises(AutoparError):
        autopar.trace("gpt3-175b")


def test_validate_plan_refuses_what_is_not_a_plan():
    from autopar.emit.mesh import validate_plan

    with pytest.raises(ConfigError) as info:
        validate_plan({"version": 2}, world_size=1)
    assert info.value.field == "plan"
