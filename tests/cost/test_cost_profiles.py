"""Shipped profiles load, convert units once, and carry a source for every number."""

from __future__ import annotations

import re

import pytest

from autopar.cost.profiles import PROFILE_DIR, list_profiles, load_device_profile, load_link_profile

GiB = 1024**3


def test_shipped_profiles_load():
    devices = list_profiles("device")
    links = list_profiles("link")
    assert {"a100-sxm4-80gb", "h100-sxm5-80gb", "rtx-4090"} <= set(devices)
    assert {
        "nvlink3-nvswitch",
        "nvlink4-nvswitch",
        "pcie4-x16",
        "ib-hdr-200",
        "ib-ndr-400",
        "eth-100g",
    } <= set(links)
    for d in devices:
        load_device_profile(d)
    for lk in links:
        load_link_profile(lk)


def test_units_are_converted_once_to_si():
    a = load_device_profile("a100-sxm4-80gb")
    assert a.memory_bytes == 80 * GiB
    assert a.memory_bandwidth_bytes_per_s == 2039e9
    assert a.kernel_overhead_s == pytest.approx(3e-6)
    hdr = load_link_profile("ib-hdr-200")
    assert hdr.bandwidth_bytes_per_s == 25e9 and hdr.latency_s == pytest.approx(1e-6)
    # first principles apart from achieved corrections
    assert hdr.effective_bandwidth_bytes_per_s == pytest.approx(22e9)


_HAND_WRITTEN = [
    p for p in sorted(PROFILE_DIR.glob("*.yaml")) if "kind: calibration" not in p.read_text()
]


@pytest.mark.parametrize("path", _HAND_WRITTEN, ids=lambda p: p.name)
def test_every_number_has_a_source_comment(path):
    """Calibration files are excluded: written by autopar calibrate, provenance in the header."""
    text = path.read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z0-9_]+:\s*-?[0-9.]+\s*(#.*)?$", line):
            assert "#" in line, f"{path.name}:{i + 1} has a number without a source: {line!r}"
