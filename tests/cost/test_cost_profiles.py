"""Shipped profiles load, convert units once, and carry a source for every number."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from autopar.cost.profiles import (
    PROFILE_DIR,
    ComputeCalibration,
    apply_compute_calibration,
    list_profiles,
    load_compute_calibration,
    load_device_profile,
    load_link_profile,
)
from autopar.errors import ConfigError

GiB = 1024**3


def test_shipped_profiles_load():
    devices = list_profiles("device")
    links = list_profiles("link")
    assert {"a100-sxm4-80gb", "h100-sxm5-80gb", "rtx-4090", "cpu-host"} <= set(devices)
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
    assert a.launch_overhead_s == pytest.approx(2.3e-6) and a.host_overhead_s == pytest.approx(5e-6)
    assert a.sm_count == 108 and a.gemm_tile == (128, 128) and a.host_overlap
    assert a.gemm_fraction("bfloat16") == pytest.approx(0.854)
    assert a.achieved_memory_bandwidth_bytes_per_s == pytest.approx(2039e9 * 0.89)
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


# -- device profile validation: every error names file, field and what is allowed ----------
def _broken(tmp_path, change):
    shutil.copy(PROFILE_DIR / "a100-sxm4-80gb.yaml", tmp_path / "gpu.yaml")
    data = yaml.safe_load((tmp_path / "gpu.yaml").read_text())
    change(data)
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_device_profile("gpu", search_dirs=(tmp_path,))
    err = exc.value
    assert err.file is not None and err.file.endswith("gpu.yaml")
    return err


def test_every_peak_dtype_needs_a_gemm_fraction(tmp_path):
    err = _broken(tmp_path, lambda d: d["achieved"]["gemm_peak_fraction"].pop("tf32"))
    assert err.field == "achieved.gemm_peak_fraction" and "tf32" in str(err)


def test_fractions_are_at_most_one(tmp_path):
    err = _broken(tmp_path, lambda d: d["achieved"].update(flash_fwd_peak_fraction=1.3))
    assert err.field == "achieved.flash_fwd_peak_fraction"


def test_tiles_are_two_positive_integers(tmp_path):
    err = _broken(tmp_path, lambda d: d["kernels"].update(gemm_tile=[128]))
    assert err.field == "kernels.gemm_tile"


def test_unknown_memory_kind_lists_the_kinds(tmp_path):
    err = _broken(tmp_path, lambda d: d["achieved"].update(memory_kind_fraction={"scan": 0.5}))
    assert err.field == "achieved.memory_kind_fraction.scan"
    assert err.allowed and "softmax" in err.allowed


def test_misspelt_achieved_key_is_rejected(tmp_path):
    err = _broken(tmp_path, lambda d: d["achieved"].update(gemm_k_halve=3))
    assert err.field == "achieved.gemm_k_halve" and "gemm_k_half" in err.allowed


# -- compute calibration ---------------------------------------------------------------------
def test_compute_calibration_replaces_the_achieved_corrections():
    a = load_device_profile("a100-sxm4-80gb")
    cal = ComputeCalibration(name="x", device="a100-sxm4-80gb", gemm_fractions=(("bf16", 0.7),),
                             flash_bwd_fraction=0.5, launch_overhead_s=4e-6, sm_count=100)  # fmt: skip
    b = apply_compute_calibration(a, cal)
    assert b.gemm_fraction("bf16") == 0.7 and b.gemm_fraction("fp32") == a.gemm_fraction("fp32")
    assert b.flash_bwd_fraction == 0.5 and b.flash_fwd_fraction == a.flash_fwd_fraction
    assert b.launch_overhead_s == 4e-6 and b.sm_count == 100 and b.compute_calibration == "x"
    assert b.peak_flops == a.peak_flops  # the datasheet is untouched


def test_compute_calibration_of_another_device_is_refused():
    a = load_device_profile("a100-sxm4-80gb")
    with pytest.raises(ConfigError) as exc:
        apply_compute_calibration(a, ComputeCalibration(name="x", device="rtx-4090"))
    assert exc.value.field == "device" and exc.value.allowed == ("a100-sxm4-80gb",)


def test_compute_calibration_file_is_validated(tmp_path):
    (tmp_path / "cal.yaml").write_text(
        "kind: compute_calibration\ndevice: a100-sxm4-80gb\nfitted:\n  gemm_peak_fraction:\n"
        "    bf16: 1.5\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_compute_calibration(str(tmp_path / "cal.yaml"))
    assert exc.value.field == "fitted.gemm_peak_fraction.bf16"
    (tmp_path / "cal.yaml").write_text(
        "kind: compute_calibration\ndevice: a100-sxm4-80gb\nfitted:\n  launch_overhead_us: 3\n"
    )
    prof = load_device_profile("a100-sxm4-80gb", compute_calibration=tmp_path / "cal.yaml")
    assert prof.launch_overhead_s == pytest.approx(3e-6)
