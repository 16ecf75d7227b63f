"""Calibration: the fit recovers known alpha/beta; a 2-process gloo run writes a usable profile."""

from __future__ import annotations

import pytest

from autopar.cost.calibrate import Measurement, fit_level, run_calibration, write_calibration
from autopar.cost.collectives import collective_time_s
from autopar.cost.profiles import CalibratedLevel, load_calibration_profile
from autopar.errors import AutoparError, ConfigError
from autopar.topology.load import load_cluster

GiB = 1024**3


def _synthetic(alpha, bw, n=4):
    out = []
    for kind, steps, vol in [("all_reduce", 2 * (n - 1), 2 * (n - 1) / n), ("all_gather", n - 1, (n - 1) / n),
                             ("broadcast", n - 1, 1.0)]:  # fmt: skip
        for b in (1e3, 1e5, 1e7, 1e9):
            out.append(
                Measurement(
                    level="inter_host",
                    kind=kind,
                    group_size=n,
                    nbytes=int(b),
                    seconds=alpha * steps + vol * b / bw,
                )
            )
    return out


def test_fit_recovers_alpha_and_bandwidth():
    lv = fit_level(_synthetic(7e-6, 20e9))
    assert lv.alpha_s == pytest.approx(7e-6, rel=1e-6)
    assert lv.bandwidth_bytes_per_s == pytest.approx(20e9, rel=1e-6)
    assert lv.rel_residual < 1e-9 and lv.points == 12


def test_fit_clamps_negative_latency():
    meas = _synthetic(0.0, 10e9)
    meas[0] = Measurement(
        level="x", kind="all_reduce", group_size=4, nbytes=1000, seconds=meas[0].seconds * 0.2
    )
    lv = fit_level(meas)
    assert lv.alpha_s >= 0.0 and lv.bandwidth_bytes_per_s > 0


def test_fit_needs_growth_with_size():
    flat = [
        Measurement(level="x", kind="all_reduce", group_size=2, nbytes=b, seconds=1e-3)
        for b in (1, 10, 100)
    ]
    with pytest.raises(AutoparError):
        fit_level([flat[0]])
    with pytest.raises(AutoparError):
        fit_level(
            [
                Measurement(level="x", kind="all_reduce", group_size=2, nbytes=b, seconds=1e-3 / b)
                for b in (1, 10, 100)
            ]
        )


def test_written_profile_prices_the_cluster(tmp_path):
    levels = {
        "intra_host": CalibratedLevel(alpha_s=3e-6, bandwidth_bytes_per_s=100e9, points=5),
        "inter_host": CalibratedLevel(alpha_s=10e-6, bandwidth_bytes_per_s=5e9, points=5),
    }
    path = write_calibration(tmp_path / "mine.yaml", levels, backend="nccl", world_size=16, devices_per_host=8,
                             kinds=["all_reduce"], sizes_bytes=[1, 2])  # fmt: skip
    prof = load_calibration_profile(str(path))
    assert prof.level("inter_host").bandwidth_bytes_per_s == pytest.approx(5e9)
    c = load_cluster("dgx-a100", nodes=2, calibration=path)
    t = collective_time_s("all_reduce", GiB, tuple(range(8)), c)
    assert t == pytest.approx(2 * 7 / 8 * GiB / 100e9 + 14 * 3e-6, rel=1e-6)
    t = collective_time_s("all_reduce", GiB, (0, 8), c)
    switch = c.network.switch_latency_s
    assert t == pytest.approx(GiB / 5e9 + 2 * (10e-6 + switch), rel=1e-6)
    assert t > collective_time_s("all_reduce", GiB, (0, 8), load_cluster("dgx-a100", nodes=2))


def test_unknown_calibration_profile():
    with pytest.raises(ConfigError) as exc:
        load_cluster("dgx-a100", calibration="no-such-profile")
    assert exc.value.field == "calibration"


@pytest.mark.distributed
def test_two_process_gloo_calibration_round_trip(tmp_path):
    # devices_per_host=1: the two local processes play two hosts -> the inter_host level
    res = run_calibration(name="gloo-test", output_dir=tmp_path, nprocs=2, devices_per_host=1,
                          sizes_bytes=(4096, 1 << 18, 1 << 21, 1 << 22), iters=3, warmup=1)  # fmt: skip
    assert res.path == tmp_path / "gloo-test.yaml" and res.path.is_file()
    assert set(res.levels) == {"inter_host"}
    kinds = {m.kind for m in res.measurements}
    assert "all_reduce" in kinds and all(m.seconds > 0 for m in res.measurements)
    lv = res.levels["inter_host"]
    assert lv.bandwidth_bytes_per_s > 1e6 and lv.alpha_s >= 0
    c = load_cluster("dgx-a100", nodes=2, calibration=res.path)
    assert c.calibration is not None and c.calibration.level("inter_host") is not None
    assert "calibrated" in c.analyze((0, 8)).bottleneck


def test_run_calibration_validates_arguments(tmp_path):
    with pytest.raises(ConfigError):
        run_calibration(name="x", output_dir=tmp_path, nprocs=1)
    with pytest.raises(ConfigError):
        run_calibration(name="a/b", output_dir=tmp_path)


def test_sizes_up_to():
    from autopar.cost.calibrate import sizes_up_to

    assert sizes_up_to(1 << 20) == (4096, 16384, 65536, 262144, 1048576)
    assert sizes_up_to(5000) == (4096, 5000)
    with pytest.raises(ConfigError):
        sizes_up_to(10)


@pytest.mark.distributed
def test_calibrate_main_measures_the_intra_host_level(tmp_path, capsys):
    from autopar.cost.calibrate import calibrate_main

    out = tmp_path / "here.yaml"
    assert calibrate_main(output=out, max_bytes=4 << 20, repeats=3, nprocs=2) == 0
    prof = load_calibration_profile(str(out))
    lv = prof.level("intra_host")
    assert lv is not None and lv.points >= 8 and prof.level("inter_host") is None
    assert "intra_host" in capsys.readouterr().out
    c = load_cluster("pcie-4090", calibration=out)
    t = collective_time_s("all_reduce", GiB, (0, 1), c)
    assert t == pytest.approx(GiB / lv.bandwidth_bytes_per_s + 2 * lv.alpha_s, rel=1e-9)
