"""``autopar launch plan.json -- examples/train_gpt.py`` trains end to end on 4 CPU processes.

This goes through the real torchrun (``python -m torch.distributed.run --standalone``, which
picks a free rendezvous port itself), the ``AUTOPAR_PLAN`` hand-off and the example's loop.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from autopar.emit.launch import launch
from tests.emit.workers import make_plan, megatron_tp

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_gpt.py"
SPEC = "gpt:layers=2,hidden=64,heads=4,vocab=128,seq_len=16,tie_embeddings=False"


@pytest.mark.distributed
def test_launch_runs_the_example_and_the_loss_falls(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = make_plan(
        layers=2, pp=2, tp=2, stage_layers=[["embed", "layers.0"], ["layers.1", "head"]],
        schedule="1f1b", microbatches=2, recompute="selective", tp_placements=megatron_tp(2),
    )  # fmt: skip
    path = tmp_path / "plan.json"
    replace(plan, model=SPEC).to_json(path)
    code = launch(path, [str(EXAMPLE), "--steps", "6", "--lr", "1e-2"])
    out = capfd.readouterr().out
    assert code == 0, out
    losses = [float(m) for m in re.findall(r"step \d+ loss ([0-9.]+)", out)]
    assert len(losses) == 6, out
    assert losses[-1] < 0.8 * losses[0], losses
