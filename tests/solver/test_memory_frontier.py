"""The memory frontier in the search: per-stage recompute, activation and model-state offload,
host memory and NVMe checked, and the optimizer's state as a real choice."""

from __future__ import annotations

import dataclasses

import pytest

from autopar.config import TrainingConfig
from autopar.errors import ConfigError, InfeasibleError
from autopar.models import build
from autopar.solver.search import search
from autopar.topology.load import load_cluster


@pytest.fixture(scope="module")
def gpt13b():
    return build("gpt3-13b", device="meta")


def _blocks_per_rank(plan, names) -> list[int]:
    pp = plan.parallel.pp
    return [
        sum(n in names for i, st in enumerate(plan.stages) if i % pp == r for n in st.layers)
        for r in range(pp)
    ]


def test_first_stage_recomputes_more_than_last_and_beats_uniform_recompute(gpt13b):
    """1F1B keeps pp microbatches in flight on rank 0 and one on the last rank: squeezed so the
    plain plan does not fit, the search recomputes blocks where memory is short, most on rank 0,
    none on the last, and that beats recomputing every block (the all-or-nothing choice)."""
    cluster = load_cluster("dgx-a100", nodes=1)
    fixed = {"tp": 2, "pp": 4, "schedule": "1f1b", "micro_batch_size": 4, "zero": 0}
    cfg = TrainingConfig(
        global_batch=64, offload="none", memory_headroom=0.35, sequence_parallel="off"
    )
    plan = search(gpt13b, cluster, cfg, fixed=fixed, progress=False)
    counts = _blocks_per_rank(plan, set(plan.recompute_layers))
    assert plan.recompute != "full" and sum(counts) > 0, (plan.recompute, counts)
    assert counts[0] > counts[-1] and counts == sorted(counts, reverse=True), counts
    # every rank within capacity after relief, as priced per rank
    for mem in plan.predicted.rank_memory:
        assert mem.total <= mem.capacity * (1 + 1e-9)
    uniform = search(gpt13b, cluster, cfg, fixed={**fixed, "recompute": "full"}, progress=False)
    assert plan.predicted.step_time_s < uniform.predicted.step_time_s
    try:
        sel = search(gpt13b, cluster, cfg, fixed={**fixed, "recompute": "selective"},
                     progress=False)  # fmt: skip
        assert plan.predicted.step_time_s <= sel.predicted.step_time_s
    except InfeasibleError:
        pass  # selective recompute alone does not fit: per-stage relief is the only way


def test_pinned_recompute_is_not_topped_up_per_stage(gpt13b):
    """``--recompute none`` means no block is recomputed: the search balances the stages
    instead (the pipeline DP), never adds per-stage recompute on top of a pinned mode."""
    cluster = load_cluster("dgx-a100", nodes=1)
    fixed = {"tp": 2, "pp": 4, "schedule": "1f1b", "micro_batch_size": 4, "zero": 0,
             "recompute": "none"}  # fmt: skip
    cfg = TrainingConfig(
        global_batch=64, offload="none", memory_headroom=0.35, sequence_parallel="off"
    )
    plan = search(gpt13b, cluster, cfg, fixed=fixed, progress=False)
    assert plan.recompute == "none" and not plan.recompute_layers
    sizes = [len(st.layers) for st in plan.stages]
    assert sizes[0] < sizes[-1], sizes  # the first stage holds fewer blocks instead


def test_70b_on_one_4090_box_plans_with_offload_and_is_infeasible_without():
    model = build("llama3-70b", device="meta")
    cluster = load_cluster("pcie-4090", nodes=1)
    plan = search(model, cluster, TrainingConfig(global_batch=64), progress=False)
    assert plan.offload in ("optimizer", "full")
    mem = plan.predicted.memory
    assert 0 < mem.host <= mem.host_capacity
    assert plan.predicted.breakdown.offload > 0
    assert mem.total <= mem.capacity * (1 + 1e-9)
    with pytest.raises(InfeasibleError):
        search(model, cluster, TrainingConfig(global_batch=64, offload="none"), progress=False)


def test_13b_on_one_24gb_gpu_plans_with_offload(gpt13b):
    cluster = load_cluster("workstation-4090", nodes=1)
    plan = search(gpt13b, cluster, TrainingConfig(global_batch=16), progress=False)
    assert plan.num_devices == 1 and plan.offload != "none"
    with pytest.raises(InfeasibleError):
        search(gpt13b, cluster, TrainingConfig(global_batch=16, offload="none"), progress=False)


def test_offload_is_kept_only_where_it_pays(gpt13b):
    """On a DGX the 13B fits without offload: ``auto`` must not offload (it only adds time),
    and a pinned optimizer offload is slower than that plan."""
    cluster = load_cluster("dgx-a100", nodes=1)
    auto = search(gpt13b, cluster, TrainingConfig(global_batch=64), progress=False)
    assert auto.offload == "none" and not auto.activation_offload_layers
    pinned = search(gpt13b, cluster, TrainingConfig(global_batch=64, offload="optimizer"),
                    progress=False)  # fmt: skip
    assert pinned.offload == "optimizer"
    assert pinned.predicted.step_time_s > auto.predicted.step_time_s
    assert pinned.predicted.memory.host > 0


def _with_host(cluster, **changes):
    """The cluster with its host profile changed (``host=None``: without a host profile)."""
    groups: dict[str, object] = {}
    hosts = []
    for h in cluster.hosts:
        g = h.group
        if g.name not in groups:
            host = changes.get("host", g.host)
            if host is not None and changes:
                host = dataclasses.replace(g.host, **changes)
            groups[g.name] = dataclasses.replace(g, host=host)
        hosts.append(dataclasses.replace(h, group=groups[g.name]))
    return dataclasses.replace(cluster, hosts=tuple(hosts))


def test_host_memory_is_checked(gpt13b):
    """A host too small for the offloaded state, without NVMe: the 13B on one GPU is infeasible;
    with the NVMe drive the optimizer state goes there."""
    cluster = load_cluster("workstation-4090", nodes=1)
    GiB = 1024**3
    small = _with_host(cluster, memory_bytes=16 * GiB, nvme_bytes=0.0,
                       nvme_read_bytes_per_s=0.0, nvme_write_bytes_per_s=0.0)  # fmt: skip
    with pytest.raises(InfeasibleError):
        search(gpt13b, small, TrainingConfig(global_batch=16), progress=False)
    with_nvme = _with_host(cluster, memory_bytes=64 * GiB)
    plan = search(gpt13b, with_nvme, TrainingConfig(global_batch=16), progress=False)
    assert plan.offload_device == "nvme"
    assert plan.predicted.memory.host <= 64 * GiB


def test_explicit_offload_needs_a_host_profile(gpt13b):
    cluster = load_cluster("dgx-a100", nodes=1)
    no_host = _with_host(cluster, host=None)
    auto = search(gpt13b, no_host, TrainingConfig(global_batch=64), progress=False)
    assert auto.offload == "none"  # auto without a host profile: no offload, no error
    with pytest.raises(ConfigError, match="offload"):
        search(gpt13b, no_host, TrainingConfig(global_batch=64, offload="full"), progress=False)


def test_a_smaller_optimizer_state_fits_where_adam_does_not():
    """The optimizer is a real choice: with 12 bytes of Adam state per parameter a 1.3B model
    replicated on 24 GB devices with 30% kept free does not fit without offload; a stateless
    optimizer (fp32 master copy only) does."""
    model = build("gpt3-1.3b", device="meta")
    cluster = load_cluster("pcie-4090", nodes=1)
    fixed = {"zero": 0, "tp": 1, "pp": 1}
    with pytest.raises(InfeasibleError):
        search(model, cluster, TrainingConfig(global_batch=32, offload="none", memory_headroom=0.3),
               fixed=fixed,
               progress=False)  # fmt: skip
    plan = search(model, cluster, TrainingConfig(global_batch=32, offload="none",
                  memory_headroom=0.3, optimizer="stateless"), fixed=fixed, progress=False)  # fmt: skip
    mem = plan.predicted.memory
    assert mem.optimizer == pytest.approx(2 * mem.weights, rel=1e-6)  # fp32 copy of bf16
