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
