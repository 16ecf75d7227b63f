"""Pinned choices that cannot be formed are reported as such, not as a memory shortfall."""

from __future__ import annotations

import pytest

from autopar.config import TrainingConfig
from autopar.errors import ConfigError, InfeasibleError
from autopar.models import gpt
from autopar.solver.search import search
from autopar.topology.load import load_cluster


def test_impossible_interleaving_is_a_config_error_not_infeasible():
    model = gpt(layers=6, hidden=256, heads=4, vocab=1000, seq_len=128)
    cluster = load_cluster("dgx-a100", nodes=1)
    with pytest.raises(
        ConfigError, match="interleaved_1f1b needs at least one block per chunk"
    ) as info:
        search(model, cluster, TrainingConfig(global_batch=64),
               fixed={"pp": 4, "schedule": "interleaved_1f1b"}, progress=False)  # fmt: skip
    assert not isinstance(info.value, InfeasibleError)


def test_too_big_is_infeasible_with_memory_figures():
    model = gpt(layers=96, hidden=12288, heads=96, vocab=51200, seq_len=2048)
    cluster = load_cluster("dgx-a100", nodes=1)
    with pytest.raises(InfeasibleError) as info:
        search(model, cluster, TrainingConfig(global_batch=64, offload="none"), progress=False)
    err = info.value
    assert err.needed_bytes > err.available_bytes > 0
    assert any("hosts" in s for s in err.suggestions)


@pytest.mark.parametrize(
    ("batch", "b", "expected"),
    [
        (32, 1, "leaves 2 microbatch(es) per data-parallel replica with pp=4"),  # 32/16 = 2 < 4
        (48, 2, "do not divide the per-replica batch evenly"),  # 48/16 = 3, not a multiple of 2
    ],
)
def test_pinned_micro_batch_names_the_rule_it_breaks(batch, b, expected):
    from autopar.solver.candidates import enumerate_shapes, no_shapes_reason

    fixed = {"dp": 16, "tp": 1, "pp": 4, "micro_batch_size": b}
    kw = dict(world=64, batch=batch, num_blocks=32, fixed=fixed, max_tp=8)
    assert enumerate_shapes(**kw) == []
    assert expected in no_shapes_reason(**kw)


def test_pinned_chunks_per_device_mean_the_interleaved_schedule():
    from autopar.solver.candidates import check_fixed

    with pytest.raises(ConfigError, match="needs the interleaved_1f1b schedule") as info:
        check_fixed({"schedule": "1f1b", "virtual_stages": 3})
    assert info.value.field == "fixed.virtual_stages"
    model = gpt(layers=12, hidden=256, heads=4, vocab=1000, seq_len=128)
    cluster = load_cluster("dgx-a100", nodes=1)
    plan = search(model, cluster, TrainingConfig(global_batch=64),
                  fixed={"virtual_stages": 3}, progress=False)  # fmt: skip
    assert plan.parallel.pp > 1  # chunks per device need a pipeline
    assert plan.schedule == "interleaved_1f1b" and plan.virtual_stages == 3
