"""A plan produced by ``autopar.search`` for a 4-device cluster is applied and trains.

The cluster is the shipped PCIe 4090 box cut down to 4 devices per host (a topology file
written to tmp_path), the model the zoo GPT the other emitter tests use. The plan is whatever
the search picks; the test derives from the plan itself which parameters must end up sharded,
checks loss, gradients and weights against single-process training for two steps, then trains
four more AdamW steps on learnable data and requires the loss to fall.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.emit.harness import run_distributed
from tests.emit.workers import GLOBAL_BATCH, SEQ, VOCAB, searched_plan_worker

REPO = Path(__file__).resolve().parents[2]


def _four_device_cluster(tmp_path: Path) -> Path:
    text = (REPO / "topologies" / "pcie-4090.yaml").read_text()
    text, n = re.subn(r"devices_per_host:\s*8", "devices_per_host: 4", text)
    assert n == 1, "pcie-4090.yaml no longer has one 'devices_per_host: 8' line"
    text = re.sub(r"^name:.*$", "name: pcie-4090-x4", text, count=1, flags=re.M)
    path = tmp_path / "pcie-4090-x4.yaml"
    path.write_text(text)
    return path


@pytest.mark.distributed
def test_plan_from_search_for_4_devices_trains_like_one_process(tmp_path):
    from autopar.config import TrainingConfig
    from autopar.models import gpt
    from autopar.solver.search import search
    from autopar.topology.load import load_cluster

    cluster = load_cluster(_four_device_cluster(tmp_path))
    assert cluster.num_devices == 4
    model = gpt(layers=2, hidden=64, heads=4, vocab=VOCAB, seq_len=SEQ, tie_embeddings=False)
    config = TrainingConfig(global_batch=GLOBAL_BATCH, seq_len=SEQ, dtype="fp32", optimizer="adamw")
    plan = search(model, cluster, config, progress=False)
    assert plan.num_devices == 4 and plan.parallel.world_size == 4
    run_distributed(searched_plan_worker, world=4, tmp_path=tmp_path, args=(plan.to_dict(), 2))
