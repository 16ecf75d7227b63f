"""The example path works as written: ``autopar plan ... --json plan.json`` then ``autopar launch
plan.json -- examples/train_gpt.py`` trains on 4 CPU processes.

Goes through the real CLI, the real torchrun (``python -m torch.distributed.run --standalone``,
which picks a free rendezvous port itself), the ``AUTOPAR_PLAN`` hand-off, the model spec the
plan stores, and the example's loop.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.emit.matrix import four_device_cluster

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_gpt.py"
SPEC = "gpt:layers=2,hidden=64,heads=4,vocab=128,seq_len=16"


@pytest.mark.distributed
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: the model cast, fp32 master weights
def test_plan_then_launch_trains_and_the_loss_falls(tmp_path, monkeypatch, dtype):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cluster = four_device_cluster(tmp_path)
    plan_path = tmp_path / "plan.json"
    cli = [sys.executable, "-m", "autopar.cli"]
    subprocess.run(
        [*cli, "plan", SPEC, "--cluster", str(cluster), "--global-batch", "8", "--dtype", dtype,
         "--tp", "2", "--json", str(plan_path), "--quiet"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert json.loads(plan_path.read_text())["model_spec"] == SPEC
    run = subprocess.run(
        [*cli, "launch", str(plan_path), "--", str(EXAMPLE), "--steps", "6", "--lr", "1e-2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    losses = [float(m) for m in re.findall(r"step \d+ loss ([0-9.]+)", run.stdout)]
    assert len(losses) == 6, run.stdout
    assert losses[-1] < 0.8 * losses[0], losses
