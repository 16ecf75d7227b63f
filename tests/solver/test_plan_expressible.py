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
