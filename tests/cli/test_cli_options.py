"""Freeze the CLI's flag set: one flag per config field, no silent growth (see STYLE.md)."""

from __future__ import annotations

import argparse

from autopar.cli import build_parser

EXPECTED = {
    "plan": {
        "model", "--cluster", "--nodes", "--global-batch", "--seq", "--dtype", "--optimizer",
        "--top", "--json", "--time-limit", "--emit", "--dp", "--tp", "--pp", "--microbatches",
        "--micro-batch-size", "--recompute", "--zero", "--schedule", "--quiet",
    },
    "explain": {"plan", "--emit"},
    "models": set(),
    "calibrate": {"--output", "--max-bytes", "--repeats"},
    "launch": {"plan", "--dry-run", "script"},
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
