"""Surfaces that never mislead (issue 14), as a user meets them: real subprocesses, exit codes,
messages. Hand-edited plans, a custom cluster file, time limits, huge batches, infeasible
suggestions, unwritable outputs, broken user code, models without example inputs and layouts
that cannot be formed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = "gpt:layers=2,hidden=256,heads=4,vocab=1000,seq_len=128"
EIGHT_BLOCKS = "gpt:layers=8,hidden=256,heads=4,vocab=1000,seq_len=128"


def autopar(
    *args: str, path: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if path is not None:  # where the user's own modules live
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "autopar.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def clean_exit(run: subprocess.CompletedProcess[str], code: int) -> None:
    assert run.returncode == code, (run.returncode, run.stderr[-2000:])
    assert "Traceback" not in run.stderr, run.stderr


# ---------------------------------------------------------------------------------------------
# a plan made on a custom 2-host x 8 topology file
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pod(tmp_path_factory) -> tuple[Path, Path]:
    """(topology file, plan JSON): dp=8 x tp=2 on a topology that is not a shipped one."""
    d = tmp_path_factory.mktemp("pod")
    text = (REPO / "topologies" / "dgx-a100.yaml").read_text()
    assert "name: dgx-a100" in text and "  default: 1\n" in text
    topo = d / "my-pod.yaml"
    topo.write_text(text.replace("name: dgx-a100", "name: my-pod").replace(
        "  default: 1\n", "  default: 2\n"))  # fmt: skip
    plan = d / "plan.json"
    run = autopar("plan", SMALL, "--cluster", str(topo), "--global-batch", "32", "--tp", "2",
                  "--pp", "1", "--quiet", "--json", str(plan))  # fmt: skip
    clean_exit(run, 0)
    return topo, plan


def test_plan_records_the_cluster_file_it_was_made_on(pod):
    topo, plan = pod
    info = json.loads(plan.read_text())["cluster_info"]
    assert info["name"] == "my-pod" and info["path"] == str(topo.resolve())
    assert (info["nodes"], info["devices_per_host"]) == (2, 8)


def test_launch_prints_one_torchrun_line_per_node(pod):
    _, plan = pod
    run = autopar("launch", str(plan), "--dry-run", "--", "train.py", "--steps", "3")
    clean_exit(run, 0)
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 2, run.stdout
    for rank, line in enumerate(lines):
        assert "--nnodes=2" in line and f"--node-rank={rank}" in line, line
        assert "--nproc-per-node=8" in line and "--rdzv-endpoint=" in line, line
        assert "--standalone" not in line
        assert line.endswith("train.py --steps 3")


def test_launch_override_that_fits_the_plan_is_used(pod):
    _, plan = pod
    run = autopar("launch", str(plan), "--dry-run", "--nnodes", "1", "--", "train.py")
    clean_exit(run, 0)
    (line,) = run.stdout.strip().splitlines()
    assert "--nnodes=1" in line and "--nproc-per-node=16" in line
    assert "priced for 2 host(s) x 8" in run.stderr  # said, not hidden


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--nnodes", "3"], "--nnodes"),
        (["--nnodes", "2", "--nproc-per-node", "4"], "--nnodes"),
        (["--nproc-per-node", "5"], "--nproc-per-node"),
        (["--node-rank", "2"], "--node-rank"),
    ],
)
def test_launch_overrides_inconsistent_with_the_plan_are_refused(pod, flags, named):
    _, plan = pod
    run = autopar("launch", str(plan), "--dry-run", *flags, "--", "train.py")
    clean_exit(run, 2)
    assert f"field '{named}'" in run.stderr
    assert "torch.distributed.run" not in run.stdout


# ---------------------------------------------------------------------------------------------
# hand-edited, inconsistent plans: explain, --emit and launch all refuse them, naming the field
# ---------------------------------------------------------------------------------------------
def _tp4(d: dict) -> None:  # tp 2 -> 4: dp x tp x pp = 8 x 4 x 1 = 32 on 16 devices
    d["parallel"]["tp"] = 4


def _tp4_mesh_too(d: dict) -> None:  # the mesh edited to agree: still 32 ranks for 16 devices
    d["parallel"]["tp"] = 4
    d["mesh"]["shape"][d["mesh"]["dim_names"].index("tp")] = 4


def _seven_devices(d: dict) -> None:
    d["num_devices"] = 7


def _tp_two(d: dict) -> None:
    d["parallel"]["tp"] = "two"


INCONSISTENT = {
    "tp4": (_tp4, "parallel.tp"),
    "tp4_mesh_too": (_tp4_mesh_too, "num_devices"),
    "num_devices_7": (_seven_devices, "num_devices"),
    "tp_two": (_tp_two, "parallel.tp"),
    "json_list": (None, "<root>"),
}
COMMANDS = {
    "explain": ("explain", "{plan}"),
    "emit megatron": ("explain", "{plan}", "--emit", "megatron"),
    "emit torchtitan": ("explain", "{plan}", "--emit", "torchtitan"),
    "launch": ("launch", "{plan}", "--dry-run", "--", "train.py"),
}


@pytest.mark.parametrize("case", sorted(INCONSISTENT))
def test_inconsistent_plan_is_refused_by_explain_emit_and_launch(pod, tmp_path, case):
    _, good = pod
    edit, field = INCONSISTENT[case]
    data = json.loads(good.read_text())
    bad = tmp_path / f"{case}.json"
    if edit is None:
        bad.write_text(json.dumps([data]))
    else:
        edit(data)
        bad.write_text(json.dumps(data))
    for name, argv in COMMANDS.items():
        run = autopar(*(a.format(plan=bad) for a in argv))
        clean_exit(run, 2)
        assert f"field '{field}'" in run.stderr, (name, run.stderr)
        assert str(bad) in run.stderr, (name, run.stderr)
        assert run.stdout == "", (name, run.stdout[:500])


def test_the_unedited_plan_passes_the_same_commands(pod):
    _, good = pod
    for name, argv in COMMANDS.items():
        run = autopar(*(a.format(plan=good) for a in argv))
        clean_exit(run, 0)
        assert run.stdout, name


# ---------------------------------------------------------------------------------------------
# time limits, huge batches, infeasible suggestions, unwritable --json
# ---------------------------------------------------------------------------------------------
def test_time_limit_warns_and_shows_the_gap():
    run = autopar("plan", "gpt3-175b", "--cluster", "dgx-a100", "--nodes", "128",
                  "--global-batch", "1536", "--time-limit", "0.01", "--quiet")  # fmt: skip
    clean_exit(run, 0)
    assert "warning" in run.stderr and "time limit" in run.stderr
    step = next(line for line in run.stdout.splitlines() if "step time" in line)
    assert "time limit" in step and re.search(r"at most \d+\.\d+x faster", step), step
    assert "stopped_early=True" in run.stdout and "gap=" in run.stdout


def test_a_huge_global_batch_returns_promptly():
    """Candidate enumeration is O(number of divisors): 10^12 sequences does not hang."""
    run = autopar("plan", SMALL, "--cluster", "dgx-a100", "--global-batch", "1000000000000",
                  "--quiet", timeout=120)  # fmt: skip
    assert run.returncode in (0, 2, 3), run.stderr
    assert "Traceback" not in run.stderr


def _follow(suggestion: str, flags: list[str]) -> list[str]:
    """The command-line flags after doing what an infeasible message's suggestion says."""

    def drop(flag: str) -> None:
        if flag in flags:
            i = flags.index(flag)
            del flags[i : i + 2]

    flags = list(flags)
    for key, _ in re.findall(r"unpin (\w+)=(\d+)", suggestion):
        drop(f"--{key}")
    if m := re.search(r"use (\d+) hosts", suggestion):
        drop("--nodes")
        flags += ["--nodes", m.group(1)]
    if "ZeRO-3" in suggestion:
        drop("--zero")
    if "full activation recompute" in suggestion:
        drop("--recompute")
    if "micro-batch size 1" in suggestion:
        drop("--microbatches")
        drop("--micro-batch-size")
        flags += ["--micro-batch-size", "1"]
    assert flags, suggestion
    return flags


def test_following_an_infeasible_suggestion_gives_a_plan():
    """Every printed remedy was re-run by the search before it was printed: following the first
    one gives a plan. (The issue's example, llama3-70b --tp 1 --pp 1 on one DGX A100, fits since
    CPU offload is searched; GPT-3 175B on one 4090 box does not.)"""
    flags = ["--cluster", "pcie-4090", "--nodes", "1"]
    run = autopar("plan", "gpt3-175b", *flags, "--quiet")
    clean_exit(run, 3)
    assert "To make it fit: " in run.stderr, run.stderr
    first = run.stderr.split("To make it fit: ", 1)[1].split(";")[0].strip()
    assert "no single change" not in first, run.stderr
    again = autopar("plan", "gpt3-175b", *_follow(first, flags), "--quiet")
    clean_exit(again, 0)
    assert "parallelism  dp=" in again.stdout


@pytest.mark.parametrize("where", ["missing_dir", "a_directory"])
def test_unwritable_json_is_refused_before_the_search(tmp_path, where):
    target = tmp_path / "no" / "such" / "plan.json" if where == "missing_dir" else tmp_path
    # a big model without --quiet: the error must come before tracing or any progress output
    run = autopar("plan", "gpt3-175b", "--cluster", "dgx-a100", "--nodes", "16",
                  "--json", str(target))  # fmt: skip
    clean_exit(run, 2)
    assert "--json" in run.stderr and str(target) in run.stderr
    assert run.stderr.strip().count("\n") == 0, run.stderr  # one line: nothing ran before it
    assert run.stdout == ""


# ---------------------------------------------------------------------------------------------
# the user's own code
# ---------------------------------------------------------------------------------------------
USER_CODE = '''
import torch
from torch import nn


def raises():
    raise ValueError("my factory is broken")


def needs(hidden):
    return nn.Linear(hidden, hidden)


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x):
        raise RuntimeError("forward exploded")

    def example_inputs(self, batch_size=1):
        return (torch.randn(batch_size, 8),)


def exploding():
    return Exploding()


class Features(nn.Module):
    """Float features in, no example_inputs method."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def features():
    return Features()


def feature_batch():
    return torch.randn(3, 64)


class Tokens(nn.Module):
    """Token ids in, no example_inputs method."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1000, 64)
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(2))
        self.head = nn.Linear(64, 1000)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.head(h)


def tokens():
    return Tokens()
'''


@pytest.fixture(scope="module")
def user_code(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("user_code")
    (d / "my_models.py").write_text(textwrap.dedent(USER_CODE))
    (d / "my_broken.py").write_text("def model(:\n    pass\n")
    return d


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("my_models:raises", ["ValueError: my factory is broken",
                              'my_models.py:7 in raises: raise ValueError("my factory is broken")']),
        ("my_models:needs", ["needs argument(s) hidden"]),
        ("my_broken:model", ["SyntaxError", "my_broken.py:1: def model(:"]),
        ("my_models:exploding", ["RuntimeError: forward exploded",
                                 'in forward: raise RuntimeError("forward exploded")']),
    ],
)  # fmt: skip
def test_user_code_errors_exit_2_with_the_spec_and_the_users_line(user_code, spec, needles):
    run = autopar("plan", spec, "--cluster", "dgx-a100", "--global-batch", "8", "--quiet",
                  path=user_code)  # fmt: skip
    clean_exit(run, 2)
    assert f"model '{spec}'" in run.stderr, run.stderr
    for needle in needles:
        assert needle in run.stderr, (needle, run.stderr)


def test_a_model_torch_cannot_allocate_is_exit_2():
    spec = "gpt:layers=2,hidden=99999999744,heads=12"
    run = autopar("plan", spec, "--cluster", "dgx-a100", "--quiet")
    clean_exit(run, 2)
    assert "hidden=99999999744" in run.stderr and "overflow" in run.stderr


def test_a_model_without_example_inputs_is_told_about_the_flag(user_code):
    run = autopar("plan", "my_models:features", "--cluster", "dgx-a100", "--quiet",
                  path=user_code)  # fmt: skip
    clean_exit(run, 2)
    assert "--example-inputs" in run.stderr and "pass example_inputs=" not in run.stderr


def test_example_inputs_flag_plans_a_feature_model_in_samples(user_code):
    run = autopar("plan", "my_models:features", "--example-inputs", "my_models:feature_batch",
                  "--cluster", "dgx-a100", "--global-batch", "64", "--quiet",
                  path=user_code)  # fmt: skip
    clean_exit(run, 0)
    assert "samples/s" in run.stdout and "tokens/s" not in run.stdout
    assert "x seq" not in run.stdout.splitlines()[1]


def test_a_token_model_without_example_inputs_takes_ids_of_seq_length(user_code):
    run = autopar("plan", "my_models:tokens", "--seq", "32", "--cluster", "dgx-a100",
                  "--global-batch", "64", "--quiet", path=user_code)  # fmt: skip
    clean_exit(run, 0)
    assert "batch 64 x seq 32" in run.stdout and "tokens/s" in run.stdout


VIT = "vit:layers=2,hidden=64,heads=4,image_size=32,patch_size=8,classes=10"


@pytest.mark.parametrize("spec", ["mlp:layers=2,hidden=256", VIT])
def test_non_token_zoo_models_report_samples_not_tokens(spec):
    run = autopar("plan", spec, "--cluster", "dgx-a100", "--global-batch", "64", "--quiet")
    clean_exit(run, 0)
    assert "samples/s" in run.stdout and "tokens/s" not in run.stdout
    assert "x seq" not in run.stdout.splitlines()[1]
    assert "samples per data-parallel rank" in run.stdout


# ---------------------------------------------------------------------------------------------
# layouts that cannot be formed name the rule they break
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, rule",
    [
        (["--tp", "3"], "tp=3 does not divide the 8 devices"),
        (["--pp", "8", "--global-batch", "4"], "fewer microbatches than stages"),
        (["--pp", "4", "--schedule", "interleaved_1f1b", "--global-batch", "6"],
         "microbatch count divisible by pp"),
    ],
)  # fmt: skip
def test_no_layout_names_the_rule(flags, rule):
    run = autopar("plan", EIGHT_BLOCKS, "--cluster", "dgx-a100", *flags, "--quiet")
    clean_exit(run, 2)
    assert rule in run.stderr, run.stderr


def test_pinned_microbatches_below_pp_names_the_rule():
    run = autopar("plan", EIGHT_BLOCKS, "--cluster", "dgx-a100", "--pp", "4",
                  "--microbatches", "2", "--quiet")  # fmt: skip
    clean_exit(run, 2)
    assert "fewer microbatches than stages" in run.stderr, run.stderr
