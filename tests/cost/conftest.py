"""Fixtures for cost tests: small hand-written topologies that isolate one effect."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


@pytest.fixture
def make_topology(tmp_path: Path):
    """make_topology(host_group_overrides, network=..., nodes_max=...) -> path of a 1-group file.

    Profiles resolve from the repository's cost_models/ (there is none beside tmp_path).
    """

    def make(name: str = "custom", *, fabric=None, nics=None, network=None, dph: int = 8) -> Path:
        doc = {
            "name": name,
            "hosts": {"default": 2, "max": 64},
            "host_groups": [
                {
                    "name": "g",
                    "device": "a100-sxm4-80gb",
                    "devices_per_host": dph,
                    "fabric": fabric or {"kind": "nvswitch", "link": "nvlink3-nvswitch"},
                    "nics": nics or {"count": 8, "link": "ib-hdr-200"},
                }
            ],
            "network": network
            or {"kind": "fat_tree", "hosts_per_leaf": 0, "oversubscription": 1.0},
        }
        path = tmp_path / "topologies" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(doc))
        return path

    return make
