"""Plans from the search, applied to models written the way users write them, train exactly
like one process (issue: never train silently wrong).

Models (``tests/emit/matrix.py``): the zoo GPT with tied embeddings, the zoo Llama (GQA,
rotary tables passed to every block), a hand-written GPT with other names and a ModuleList, a
nanoGPT-style model with one fused qkv Linear and tied embeddings, HF Llama and HF GPT-2 built
from small configs. Cells: the plan the search returns for a 4-device box with the cell's
choices pinned. Tensor-parallel cells squeeze device memory (``memory_headroom``) to below what
the search's fastest plan with replicated weights needs, so the plan it returns splits weights
over tp (asserted): the case the emitter must get right, and the case users hit on small GPUs.
"""

from __future__ import annotations

import pytest

from tests.emit.harness import run_distributed
from tests.emit.matrix import GLOBAL_BATCH, MODELS, SEQ, build, cell_worker, four_device_cluster

CELLS = {
    "tp2-dp2": {"tp": 2, "dp": 2, "pp": 1, "recompute": "none"},
    "tp2-pp2-1f1b": {"tp": 2, "pp": 2, "schedule": "1f1b", "recompute": "none"},
    "tp2-pp2-interleaved": {
        "tp": 2,
        "pp": 2,
        "schedule": "interleaved_1f1b",
        "recompute": "none",
    },  # fmt: skip
    "dp2-pp2-zero3": {"dp": 2, "pp": 2, "zero": 3},
    "tp2-selective": {"tp": 2, "dp": 2, "pp": 1, "recompute": "selective"},
    "tp2-full": {"tp": 2, "dp": 2, "pp": 1, "recompute": "full"},
}
SQUEEZE = 0.85
"""Capacity as a fraction of what the fastest plan with replicated weights needs."""


def _search(model_name: str, fixed: dict, cluster, headroom: float):
    from autopar.config import TrainingConfig
    from autopar.solver.search import search

    config = TrainingConfig(
        global_batch=GLOBAL_BATCH, seq_len=SEQ, dtype="fp32", optimizer="adamw",
        memory_headroom=headroom, offload="none",  # offload cells: tests/emit/test_offload.py
    )  # fmt: skip
    return search(build(model_name, "meta"), cluster, config, fixed=fixed, progress=False)


def _plan_for(model_name: str, cell: str, cluster):
    fixed = dict(CELLS[cell])
    plan = _search(model_name, fixed, cluster, 0.1)
    if fixed.get("tp", 1) > 1:
        # squeeze memory below the fastest plan's need: the search must split weights on tp
        need = plan.predicted.memory.total
        capacity = float(cluster.memory_bytes)
        pins = {**fixed, "zero": 0, "micro_batch_size": plan.micro_batch_size,
                "schedule": plan.schedule}  # fmt: skip
        plan = _search(model_name, pins, cluster, 1 - SQUEEZE * need / capacity)
        splits = [f for f, pl in plan.placements.items() if pl[-1].startswith("S")]
        assert splits, f"{cell}/{model_name}: the squeezed plan splits no weight on tp"
    return plan


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    from autopar.topology.load import load_cluster

    cluster = load_cluster(four_device_cluster(tmp_path_factory.mktemp("cluster")))
    return {
        (cell, model): _plan_for(model, cell, cluster).to_dict()
        for cell in CELLS
        for model in MODELS
    }


@pytest.mark.distributed
@pytest.mark.parametrize("cell", list(CELLS))
def test_searched_plans_train_like_one_process(cell, plans, tmp_path):
    pytest.importorskip("transformers")
    cases = [(cell, model, plans[(cell, model)]) for model in MODELS]
    run_distributed(cell_worker, world=4, tmp_path=tmp_path, args=(cases,), timeout_s=180)
