"""`autopar calibrate --compute`: the fit recovers known parameters, the written profile loads and
prices clusters, and a CPU calibration predicts kernels it was not fitted on."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from autopar.cost import calibrate
from autopar.cost.calibrate import (
    ComputeGrid,
    KernelTiming,
    fit_compute,
    predict_timing,
    time_kernels,
    write_compute_calibration,
)
from autopar.cost.compute import gemm_time_s
from autopar.cost.profiles import load_compute_calibration, load_device_profile
from autopar.errors import ConfigError
from autopar.topology.load import load_cluster


def _synthetic(dev) -> list[KernelTiming]:
    """Timings the model itself predicts for ``dev``: the fit must give ``dev`` back."""
    rows = []
    for m, n, k in [(8192, 8192, 8192), (2048, 1536, 12288), (1024, 1024, 1024),
                    (4096, 4096, 128), (512, 8192, 8192), (3000, 5000, 700)]:  # fmt: skip
        for dt in ("bf16", "fp32"):
            rows.append(KernelTiming(kind="gemm", dtype=dt, seconds=0.0, m=m, n=n, k=k))
    for bh, s in [(16, 4096), (256, 512), (64, 2048)]:
        for phase in ("fwd", "bwd"):
            for causal in (False, True):
                rows.append(KernelTiming(kind="attention", dtype="bf16", seconds=0.0,
                                         batch_heads=bh, q_len=s, kv_len=s, head_dim=128,
                                         causal=causal, phase=phase))  # fmt: skip
    for op, kind in (("add", "elementwise"), ("softmax", "softmax"), ("layer_norm", "norm")):
        for n in (1 << 26, 1 << 28):
            rows.append(KernelTiming(kind="memory", dtype="bf16", seconds=0.0, op=op,
                                     memory_kind=kind, numel=n, bytes_moved=4.0 * n))  # fmt: skip
    rows = [replace(t, seconds=predict_timing(t, dev)) for t in rows]
    rows.append(KernelTiming(kind="launch", dtype="bf16", seconds=dev.host_overhead_s))
    return rows


def test_fit_recovers_the_parameters_that_made_the_timings():
    a100 = load_device_profile("a100-sxm4-80gb")
    truth = replace(
        a100, gemm_tile=(256, 128), gemm_fractions=(("bf16", 0.8), ("fp16", 0.8), ("tf32", 0.7),
                                                    ("fp32", 0.85)),
        gemm_k_half=192.0, flash_fwd_fraction=0.6, flash_bwd_fraction=0.45, flash_kv_half=96.0,
        memory_efficiency=0.8, memory_kind_fractions=(("softmax", 0.5), ("norm", 0.65)),
        launch_overhead_s=4e-6, host_overhead_s=7e-6,
    )  # fmt: skip
    fit = fit_compute(_synthetic(truth), base=a100)
    cal = fit.calibration
    assert cal.gemm_tile == (256, 128) and cal.gemm_k_half == 192.0 and cal.flash_kv_half == 96.0
    assert dict(cal.gemm_fractions) == pytest.approx({"bf16": 0.8, "fp32": 0.85}, rel=1e-6)
    assert cal.flash_fwd_fraction == pytest.approx(0.6, rel=1e-6)
    assert cal.flash_bwd_fraction == pytest.approx(0.45, rel=1e-6)
    assert cal.memory_efficiency == pytest.approx(0.8, rel=1e-6)
    assert dict(cal.memory_kind_fractions) == pytest.approx(
        {"softmax": 0.5, "norm": 0.65}, rel=1e-6
    )
    assert cal.launch_overhead_s == pytest.approx(4e-6, rel=1e-4)
    assert cal.host_overhead_s == pytest.approx(7e-6)
    assert max(fit.residuals.values()) < 1e-6


def test_fit_survives_one_disturbed_timing():
    a100 = load_device_profile("a100-sxm4-80gb")
    rows = _synthetic(a100)
    rows[0] = replace(rows[0], seconds=rows[0].seconds * 1.6)  # a burst of background load
    cal = fit_compute(rows, base=a100).calibration
    assert dict(cal.gemm_fractions)["bf16"] == pytest.approx(a100.gemm_fraction("bf16"), rel=0.02)


def test_rates_above_the_datasheet_are_refused():
    a100 = load_device_profile("a100-sxm4-80gb")
    rows = [replace(t, seconds=t.seconds / 2) for t in _synthetic(a100) if t.kind == "gemm"]
    with pytest.raises(ConfigError) as exc:
        fit_compute(rows, base=a100, fit_overhead=False)
    assert "datasheet" in str(exc.value)
    capped = fit_compute(rows, base=a100, fit_overhead=False, cap_at_peak=True)
    assert dict(capped.calibration.gemm_fractions)["bf16"] == 1.0 and capped.capped


def test_written_calibration_prices_the_cluster(tmp_path):
    a100 = load_device_profile("a100-sxm4-80gb")
    truth = replace(a100, gemm_fractions=(("bf16", 0.6), *a100.gemm_fractions[1:]),
                    launch_overhead_s=6e-6)  # fmt: skip
    rows = _synthetic(truth)
    fit = fit_compute(rows, base=a100, name="mine", sm_count=108)
    path = write_compute_calibration(tmp_path / "mine.yaml", fit, rows, torch_device="cuda:0",
                                     command="test")  # fmt: skip
    cal = load_compute_calibration(str(path))
    assert cal.device == "a100-sxm4-80gb" and cal.sm_count == 108
    assert dict(cal.gemm_fractions)["bf16"] == pytest.approx(0.6, rel=1e-3)
    text = path.read_text()
    assert "measurements:" in text and "torch_version" in text and "measured_at" in text
    c = load_cluster("dgx-a100", compute_calibration=path)
    assert c.device.gemm_fraction("bf16") == pytest.approx(0.6, rel=1e-3)
    assert c.device.compute_calibration == str(path)
    t = gemm_time_s(m=8192, n=8192, k=8192, device=c.device, dtype="bf16")
    assert t > 1.4 * gemm_time_s(m=8192, n=8192, k=8192, device=a100, dtype="bf16")


def test_topology_host_group_names_its_compute_calibration(tmp_path, make_topology):
    (tmp_path / "cost_models").mkdir()
    (tmp_path / "cost_models" / "box-cal.yaml").write_text(
        "kind: compute_calibration\ndevice: a100-sxm4-80gb\nfitted:\n  host_overhead_us: 9\n"
    )
    path = make_topology("box")
    import yaml

    doc = yaml.safe_load(path.read_text())
    doc["host_groups"][0]["compute_calibration"] = "box-cal"
    path.write_text(yaml.safe_dump(doc))
    assert load_cluster(path).device.host_overhead_s == pytest.approx(9e-6)
    # the argument overrides the file's key; an unknown name lists the known ones
    doc["host_groups"][0]["compute_calibration"] = "no-such"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as exc:
        load_cluster(path)
    assert exc.value.field == "host_groups[0].compute_calibration"
    assert "box-cal" in exc.value.allowed
    assert load_cluster(path, compute_calibration="box-cal").device.host_overhead_s == 9e-6


# -- a real CPU calibration ------------------------------------------------------------------
#: fitted on (fit) and checked against (held out): different shapes, same kernels. Held-out
#: attention sequences stay >= 768 so PyTorch's CPU kernel keeps its 256 x 512 blocks.
FIT = ComputeGrid(
    gemm=((1, 512, 512, 512), (1, 1024, 1024, 256), (1, 256, 1024, 1024), (1, 1024, 1024, 64),
          (4, 256, 512, 256)),
    attention=((8, 1024, 64, False), (8, 1024, 64, True), (16, 512, 64, False)),
    memory=(("add", 8 << 20), ("add", 12 << 20), ("gelu", 4 << 20), ("gelu", 8 << 20),
            ("layer_norm", 2 << 20), ("layer_norm", 4 << 20), ("softmax", 4 << 20),
            ("softmax", 8 << 20)),
    gemm_dtypes=("fp32",), attention_dtype="fp32", memory_dtype="fp32",
)  # fmt: skip
HELD_OUT = ComputeGrid(
    gemm=((1, 768, 768, 768), (1, 512, 1024, 512), (1, 1024, 512, 128)),
    attention=((4, 1536, 64, True), (12, 768, 64, False)),
    memory=(("add", 10 << 20), ("gelu", 6 << 20), ("layer_norm", 3 << 20), ("softmax", 6 << 20)),
    gemm_dtypes=("fp32",), attention_dtype="fp32", memory_dtype="fp32",
)  # fmt: skip


def _union(a: ComputeGrid, b: ComputeGrid) -> ComputeGrid:
    return replace(a, gemm=a.gemm + b.gemm, attention=a.attention + b.attention,
                   memory=a.memory + b.memory)  # fmt: skip


@pytest.mark.timing  # measures this CPU: run alone, after the parallel run
def test_cpu_calibration_predicts_held_out_kernels(tmp_path):
    """Fit on one grid, write and reload the profile, predict the other grid: within 15 %.

    "Within 15 %" is the **median** relative error of the held-out kernels of each kind (GEMM,
    attention, memory-bound): a wrong fraction, tile or missing term shifts every kernel of its
    kind and fails it. The **aggregate** (total predicted against total measured time) must stay
    within 25 %. Neither bound is asserted per kernel, deliberately: this shared 2-core machine
    has periods where a kernel runs much slower than before, which no filter in
    ``time_kernels`` can see (the same held-out GELU measured 3.65 ms and 5.14 ms in two
    consecutive idle runs; CI once saw +45.9 % on it with every other memory kernel within 2 %),
    and such a kernel carries a third of its kind's total time.

    Timing: one thread; both grids in one round-robin session (``time_kernels``), so load hits
    fit and held-out kernels alike; 9 repeats per kernel, repeats disturbed by preemption or
    page faults timed again, the median kept. The fit never sees the held-out timings.
    """
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timings = time_kernels(_union(FIT, HELD_OUT), device="cpu", repeats=9, min_time_s=0.015)
    finally:
        torch.set_num_threads(threads)
    held_labels = set(_labels(HELD_OUT))
    fit_rows = [t for t in timings if t.label not in held_labels]
    test_rows = [t for t in timings if t.label in held_labels and t.kind != "launch"]
    assert len(test_rows) == 3 + 4 + 4
    fit = fit_compute(fit_rows, base=load_device_profile("cpu-host"), sm_count=1)
    path = write_compute_calibration(tmp_path / "cpu.yaml", fit, fit_rows, torch_device="cpu",
                                     command="pytest", threads=1)  # fmt: skip
    dev = load_device_profile("cpu-host", compute_calibration=path)
    by_kind: dict[str, list[tuple[float, float]]] = {}
    report = []
    for t in test_rows:
        pred = predict_timing(t, dev)
        by_kind.setdefault(t.kind, []).append((pred, t.seconds))
        report.append(
            f"{t.label}: measured {t.seconds * 1e3:.3f} ms, model {pred / t.seconds - 1:+.1%}"
        )
    print("\n".join(report))
    assert set(by_kind) == {"gemm", "attention", "memory"}
    for kind, pairs in by_kind.items():
        total = sum(p for p, _ in pairs) / sum(m for _, m in pairs) - 1.0
        median = float(np.median([abs(p / m - 1.0) for p, m in pairs]))
        assert abs(total) <= 0.25, (kind, f"aggregate {total:+.1%}", report)
        assert median <= 0.15, (kind, f"median {median:.1%}", report)


def _labels(grid: ComputeGrid) -> list[str]:
    out = [KernelTiming(kind="gemm", dtype=dt, seconds=0.0, m=m, n=n, k=k, batch=b).label
           for dt in grid.gemm_dtypes for b, m, n, k in grid.gemm]  # fmt: skip
    for bh, s, d, c in grid.attention:
        for phase in ("fwd", "bwd"):
            out.append(KernelTiming(kind="attention", dtype=grid.attention_dtype, seconds=0.0,
                                    batch_heads=bh, q_len=s, kv_len=s, head_dim=d, causal=c,
                                    phase=phase).label)  # fmt: skip
    for op, n in grid.memory:
        n_eff = (n // 1024) * 1024
        out.append(KernelTiming(kind="memory", dtype=grid.memory_dtype, seconds=0.0, op=op,
                                numel=n_eff).label)  # fmt: skip
    return out


def test_calibrate_compute_main_writes_a_loadable_profile(tmp_path, monkeypatch, capsys):
    tiny = ComputeGrid(
        gemm=((1, 384, 384, 384), (1, 512, 512, 64), (1, 256, 768, 384)),
        attention=((4, 512, 32, False), (2, 768, 32, False)),
        memory=(("add", 1 << 21), ("add", 1 << 22), ("gelu", 1 << 21), ("layer_norm", 1 << 21),
                ("softmax", 1 << 21)),
        gemm_dtypes=("fp32",), attention_dtype="fp32", memory_dtype="fp32",
    )  # fmt: skip
    monkeypatch.setattr(calibrate, "CPU_GRID", tiny)
    out = tmp_path / "here.yaml"
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is timed more steadily
    try:
        assert calibrate.calibrate_compute_main(out, "cpu", 2) == 0
    finally:
        torch.set_num_threads(threads)
    assert "large GEMM fp32" in capsys.readouterr().out
    cal = load_compute_calibration(str(out))
    assert cal.device == "cpu-host" and cal.sm_count == 1 and cal.gemm_fractions
    with pytest.raises(ConfigError):
        calibrate.calibrate_compute_main(tmp_path / "x.txt", "cpu", 2)
