"""Plans that offload (issue: the memory frontier) train exactly like one process.

* ``full``: the search with ``offload="full"`` (FSDP2's CPU offload under ZeRO-3) on dp x pp.
* ``optimizer`` + per-block relief: the search with ``offload="optimizer"`` (host optimizer
  state and step, ``emit.offload.MasterWeightOptimizer``) on tp x pp, then one block of the first
  stage fully recomputed and one block of the last stage with its saved activations in host
  memory (``recompute_layers`` / ``activation_offload_layers``, what the search's per-stage
  relief writes), so every offload path runs in one step.

Same comparison as the emitter matrix (``tests/emit/matrix.py``): 3 AdamW steps on 4 gloo ranks
against one process, relative error <= 1e-5.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.emit.harness import run_distributed
from tests.emit.matrix import GLOBAL_BATCH, SEQ, build, cell_worker, four_device_cluster

MODELS = ("zoo-gpt", "renamed", "hf-llama")


def _search(model_name: str, fixed: dict, offload: str, cluster):
    from autopar.config import TrainingConfig
    from autopar.solver.search import search

    config = TrainingConfig(
        global_batch=GLOBAL_BATCH, seq_len=SEQ, dtype="fp32", optimizer="adamw", offload=offload
    )
    return search(build(model_name, "meta"), cluster, config, fixed=fixed, progress=False)


def _with_relief(plan):
    """First block of the first stage recomputed, first block of the last stage offloaded."""
    kinds = plan.layer_kinds
    first = [n for n in plan.stages[0].layers if kinds[n] == "block"]
    last = [n for n in plan.stages[-1].layers if kinds[n] == "block"]
    return dataclasses.replace(
        plan, recompute_layers=(first[0],), activation_offload_layers=(last[0],)
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from autopar.topology.load import load_cluster

    return load_cluster(four_device_cluster(tmp_path_factory.mktemp("cluster")))


@pytest.mark.distributed
def test_full_offload_trains_like_one_process(cluster, tmp_path):
    pytest.importorskip("transformers")
    cases = []
    for model in MODELS:
        plan = _search(model, {"dp": 2, "pp": 2}, "full", cluster)
        assert plan.offload == "full" and plan.zero_stage == 3
        cases.append(("full", model, plan.to_dict()))
    run_distributed(cell_worker, world=4, tmp_path=tmp_path, args=(cases,), timeout_s=240)


@pytest.mark.distributed
def test_optimizer_and_activation_offload_train_like_one_process(cluster, tmp_path):
    pytest.importorskip("transformers")
    cases = []
    for model in MODELS:
        plan = _search(model, {"tp": 2, "pp": 2, "recompute": "none"}, "optimizer", cluster)
        assert plan.offload == "optimizer"
        plan = _with_relief(plan)
        plan.validate()
        cases.append(("optimizer+relief", model, plan.to_dict()))
    run_distributed(cell_worker, world=4, tmp_path=tmp_path, args=(cases,), timeout_s=240)


def test_nvme_optimizer_state_is_refused_before_any_collective(cluster):
    from autopar.emit.offload import check_offload
    from autopar.errors import ConfigError

    plan = _search("zoo-gpt", {"dp": 2, "pp": 2}, "optimizer", cluster)
    nvme = dataclasses.replace(plan, offload_device="nvme")
    with pytest.raises(ConfigError, match="NVMe"):
        check_offload(nvme, has_process_group=True)
    check_offload(plan, has_process_group=True)  # the CPU version is applied
