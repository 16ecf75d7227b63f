"""A searched plan must be one the emitter can apply as priced.

A Plan carries parameter placements only. If the ILP leaves a block's weight matrix whole on
the tp axis, it has split that op's activations over tp instead, which the emitter cannot
reproduce from placements (it would run the op replicated, at a cost never priced).
"""

from __future__ import annotations

import pytest

from autopar.config import TrainingConfig
from autopar.models import gpt
from autopar.solver.search import search
from autopar.topology.load import load_cluster


@pytest.mark.parametrize("tp", [2, 4])
def test_every_block_matrix_is_split_on_tp(tp):
    model = gpt(layers=4, hidden=1024, heads=16, vocab=8000, seq_len=512)
    cluster = load_cluster("dgx-a100", nodes=2)
    plan = search(model, cluster, TrainingConfig(global_batch=256), fixed={"tp": tp, "pp": 1},
                  progress=False)  # fmt: skip
    tp_axis = plan.stage_dim_names.index("tp")
    matrices = [k for k in plan.placements if k.startswith("layers.") and k.endswith(".weight")
                and "norm" not in k]  # fmt: skip
    assert matrices
    for fqn in matrices:
        assert plan.placements[fqn][tp_axis].startswith("S("), (fqn, plan.placements[fqn])


def test_ilp_plans_that_split_activations_on_tp_are_set_aside():
    """With this shape the ILP prefers attention weights whole on tp (its activations split
    over tp instead); that result must not reach the plan."""
    model = gpt(layers=4, hidden=3072, heads=32, vocab=51200, seq_len=2048)
    plan = search(model, load_cluster("dgx-a100", nodes=8), TrainingConfig(global_batch=512),
                  fixed={"tp": 2, "pp": 1, "recompute": "full"}, progress=False)  # fmt: skip
    assert plan.solver.get("ilp_tp_as_data_parallel", 0) > 0
    for name in ("attn.q", "attn.k", "attn.v", "mlp.up"):
        assert plan.placements[f"layers.0.{name}.weight"][1] == "S(0)", name
    for name in ("attn.o", "mlp.down"):
        assert plan.placements[f"layers.0.{name}.weight"][1] == "S(1)", name
