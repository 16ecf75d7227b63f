"""The console script as a user runs it: real subprocesses, real exit codes, real messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = "gpt:layers=2,hidden=256,heads=4,vocab=1000,seq_len=128"


def autopar(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autopar.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def saved_plan(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path]:
    path = tmp_path_factory.mktemp("cli") / "plan.json"
    run = autopar("plan", SMALL, "--cluster", "dgx-a100", "--nodes", "1",
                  "--global-batch", "32", "--top", "3", "--json", str(path))  # fmt: skip
    return run, path


def test_plan_prints_a_complete_plan(saved_plan):
    run, _ = saved_plan
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for needle in ("parallelism  dp=", "mesh", "schedule", "ZeRO", "recompute", "step time",
                   "tokens/s", "TFLOP/s/device", "MFU", "memory/device", "runners-up"):  # fmt: skip
        assert needle in out, needle


def test_json_round_trips_through_explain(saved_plan):
    run, path = saved_plan
    data = json.loads(path.read_text())
    p = data["parallel"]
    assert p["dp"] * p["tp"] * p["pp"] == data["num_devices"] == 8
    again = autopar("explain", str(path))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[:12] == run.stdout.splitlines()[:12]


@pytest.mark.parametrize(
    "fmt, needle",
    [("megatron", "--tensor-model-parallel-size"),
     ("torchtitan", "--parallelism.tensor-parallel-degree")],
)  # fmt: skip
def test_emit_formats(saved_plan, fmt, needle):
    """Exports (autopar.export.export_plan) are a torchrun command line with the framework's own
    flags; torchtitan's TOML job files no longer exist, so no TOML section is printed."""
    _, path = saved_plan
    run = autopar("explain", str(path), "--emit", fmt)
    assert run.returncode == 0, run.stderr
    assert needle in run.stdout
    assert any(line.startswith("torchrun ") for line in run.stdout.splitlines())
    assert "[parallelism]" not in run.stdout


def test_fixed_degrees_are_respected():
    run = autopar("plan", SMALL, "--cluster", "dgx-a100", "--global-batch", "32",
                  "--tp", "2", "--pp", "2", "--quiet")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "dp=2 tp=2 pp=2" in run.stdout


def test_unknown_model_lists_the_zoo():
    run = autopar("plan", "gpt3-176b", "--cluster", "dgx-a100")
    assert run.returncode == 2
    assert "gpt3-175b" in run.stderr and "Traceback" not in run.stderr


def test_unknown_topology_lists_the_shipped_ones():
    run = autopar("plan", SMALL, "--cluster", "dgx-z100")
    assert run.returncode == 2
    assert "dgx-a100" in run.stderr and "Traceback" not in run.stderr


def test_malformed_topology_names_file_and_field(tmp_path):
    bad = tmp_path / "broken.yaml"
    text = (Path(__file__).resolve().parents[2] / "topologies" / "dgx-a100.yaml").read_text()
    bad.write_text(text.replace("devices_per_host: 8", "devices_per_host: -8"))
    run = autopar("plan", SMALL, "--cluster", str(bad))
    assert run.returncode == 2
    assert "broken.yaml" in run.stderr and "devices_per_host" in run.stderr


def test_malformed_plan_file(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"version": 1}')
    run = autopar("explain", str(bad))
    assert run.returncode == 2 and "plan.json" in run.stderr


def test_infeasible_exits_3_with_needed_and_available_memory():
    run = autopar("plan", "gpt3-175b", "--cluster", "pcie-4090", "--nodes", "1", "--quiet")
    assert run.returncode == 3, run.stderr
    assert "GiB per device" in run.stderr and "devices have" in run.stderr
    assert "Traceback" not in run.stderr


def test_models_lists_presets_with_counts():
    run = autopar("models")
    assert run.returncode == 0
    line = next(x for x in run.stdout.splitlines() if x.startswith("gpt3-175b"))
    assert "174.6" in line


def test_launch_dry_run_prints_torchrun_line(saved_plan):
    _, path = saved_plan
    run = autopar("launch", str(path), "--dry-run", "--", "train.py", "--steps", "3")
    assert run.returncode == 0, run.stderr
    assert "torch.distributed.run" in run.stdout and "--nproc-per-node" in run.stdout
    assert "train.py --steps 3" in run.stdout


@pytest.mark.parametrize("model", ["gpt3-125m", SMALL])
def test_seq_rebuilds_zoo_and_family_models_at_that_length(model):
    from autopar.cli import _with_seq_len
    from autopar.models import parse_model_spec

    assert parse_model_spec(_with_seq_len(model, 64)).config.seq_len == 64
    assert parse_model_spec(_with_seq_len(model, None)).config.seq_len != 64
