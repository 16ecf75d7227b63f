"""Freeze the CLI's flag set: one flag per config field, no silent growth (see STYLE.md)."""

from __future__ import annotations

import argparse

from autopar.cli import build_parser

EXPECTED = {
    "plan": {
        "model", "--cluster", "--nodes", "--global-batch", "--seq", "--example-inputs", "--dtype",
        "--optimizer", "--stack", "--attention", "--sequence-parallel", "--overlap-grad-reduce",
        "--grad-dtype", "--pipeline-scatter-gather",
        "--top", "--json", "--time-limit", "--emit", "--dp", "--tp", "--pp", "--microbatches",
        "--micro-batch-size", "--recompute", "--zero", "--schedule", "--virtual-stages", "--quiet",
        "--offload",
        "--report",
    },
    "explain": {"plan", "--emit", "--report"},
    "models": set(),
    "calibrate": {"--output", "--compute", "--device", "--max-bytes", "--repeats"},
    "launch": {"plan", "--dry-run", "--nnodes", "--nproc-per-node", "--node-rank", "script"},
}  # fmt: skip


def _options(parser: argparse.ArgumentParser) -> set[str]:
    names = set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        names.add(action.option_strings[0] if action.option_strings else action.dest)
    return names


def test_no_new_cli_options():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"plan", "explain", "models", "topology", "calibrate", "launch"}
    for command, expected in EXPECTED.items():
        assert _options(sub.choices[command]) == expected, command
