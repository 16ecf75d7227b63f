"""Fixtures: a scratch copy of the shipped topologies and profiles that tests may break."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from autopar.cost.profiles import REPO_ROOT


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """tmp/topologies + tmp/cost_models, copies of the repository's files."""
    shutil.copytree(REPO_ROOT / "topologies", tmp_path / "topologies")
    shutil.copytree(REPO_ROOT / "cost_models", tmp_path / "cost_models")
    return tmp_path


@pytest.fixture
def edit_yaml():
    """edit_yaml(path, change): load a YAML file, let ``change`` mutate the data, write it back."""

    def edit(path: Path, change) -> Path:
        data = yaml.safe_load(path.read_text())
        change(data)
        path.write_text(yaml.safe_dump(data))
        return path

    return edit
