"""Fit the "fit:" numbers of cost_models/*.yaml to published kernel measurements.

    python benchmarks/data/compute/fit_published.py            # every device, prints the fits
    python benchmarks/data/compute/fit_published.py --device h100-sxm5-80gb

Reads ``published_gemm.csv`` and ``published_attention.csv`` beside this file (every row names
its source) and runs the same least-squares fit as ``autopar calibrate --compute``
(:func:`autopar.cost.calibrate.fit_compute`) on them, with no per-kernel overhead (the figures
are kernel-only throughputs). Published TFLOP/s become seconds with the FLOP conventions of their
sources: 2mnk per GEMM, 4 b h s^2 d per attention forward (halved when causal, as the
FlashAttention papers count), 2.5x that for the backward. Causal rows are not fitted; they are
printed as a check of the causal block model. The output is recorded in ``fit_published.txt``.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import replace
from pathlib import Path

from autopar.cost.calibrate import KernelTiming, fit_compute, predict_timing
from autopar.cost.compute import gemm_efficiency
from autopar.cost.profiles import apply_compute_calibration, load_device_profile

HERE = Path(__file__).resolve().parent

#: output tiles a GPU fit may choose (cuBLAS tiles of 64 and more on a side)
GPU_TILES = ((64, 64), (128, 64), (128, 128), (256, 128))
#: what each device's fit may choose, and what is held fixed (the README says why)
SETTINGS: dict[str, dict] = {
    # one sustained A100-SXM GEMM point (the MAMF best shape is a check): tile and k_half are
    # assumptions
    "a100-sxm4-80gb": dict(tiles=((128, 128),), k_halves=(256,), flash="flash2"),
    "h100-sxm5-80gb": dict(tiles=GPU_TILES, k_halves=None, flash="flash3"),
    # RTX 4090: one sequence length for attention, so kv_half is the FA2 value fitted on H100
    "rtx-4090": dict(tiles=GPU_TILES, k_halves=None, flash="flash2", kv_halves=(192,), cap=True),
}  # fmt: skip
#: a MAMF figure is the best over a shape search: the asymptote is that efficiency divided by
#: the model's best quantisation x k factor over large square GEMMs (so no shape beats MAMF)
MAMF_SQUARES = (4096, 8192, 16384)


def _gemm_rows(device: str, use: str = "fit") -> list[KernelTiming]:
    """The device's GEMM rows marked ``use`` (``fit``: fitted; ``check``: only compared)."""
    out = []
    with open(HERE / "published_gemm.csv") as f:
        for r in csv.DictReader(f):
            if r["device"] != device or r["use"] != use:
                continue
            m, n, k = int(r["m"]), int(r["n"]), int(r["k"])
            secs = 2.0 * m * n * k / (float(r["tflops"]) * 1e12)
            out.append(KernelTiming(kind="gemm", dtype=r["dtype"], seconds=secs, m=m, n=n, k=k))
    return out


def _mamf_shapes(device: str) -> set[tuple[int, int, int]]:
    """Shapes of the device's best-over-shapes (MAMF) figures."""
    with open(HERE / "published_gemm.csv") as f:
        return {(int(r["m"]), int(r["n"]), int(r["k"])) for r in csv.DictReader(f)
                if r["device"] == device and "MAMF" in r["source"]}  # fmt: skip


def _attention_rows(device: str, kernel: str) -> tuple[list[KernelTiming], list[KernelTiming]]:
    fit, check = [], []
    with open(HERE / "published_attention.csv") as f:
        for r in csv.DictReader(f):
            if r["device"] != device or r["kernel"] != kernel:
                continue
            b, h, s, d = (int(r[x]) for x in ("batch", "heads", "seq_len", "head_dim"))
            causal = r["causal"] == "true"
            flops = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
            if r["phase"] == "bwd":
                flops *= 2.5
            t = KernelTiming(kind="attention", dtype=r["dtype"], seconds=flops / (float(r["tflops"]) * 1e12),
                             batch_heads=b * h, q_len=s, kv_len=s, head_dim=d, causal=causal,
                             phase=r["phase"])  # fmt: skip
            (check if causal else fit).append(t)
    return fit, check


def _report(device: str, base, fit, rows, checks, calibrated: bool = True) -> None:
    cal = fit.calibration
    # kernel-only figures: no launch/host overhead in the comparison
    fitted = replace(
        apply_compute_calibration(base, cal) if calibrated else base,
        launch_overhead_s=0.0, host_overhead_s=0.0,
    )  # fmt: skip
    for c in fit.capped:
        print(f"  capped at 1 (above the datasheet): {c}")
    for t in rows + checks:
        p = predict_timing(t, fitted)
        tag = "check" if t in checks else "fit  "
        print(f"  {tag} {t.label:<48} published {t.seconds * 1e3:9.4f} ms  model "
              f"{p * 1e3:9.4f} ms  {p / t.seconds - 1:+6.1%}")  # fmt: skip


def _mamf_fraction(dev, row: KernelTiming) -> float:
    """Asymptotic fraction from one best-shape (MAMF) figure: its efficiency over the model's
    largest quantisation x k factor among big square GEMMs."""
    eff = 2.0 * row.m * row.n * row.k / row.seconds / dev.peak_flop_per_s(row.dtype)
    factor = max(
        gemm_efficiency(m=n, n=n, k=n, device=dev, dtype=row.dtype) / dev.gemm_fraction(row.dtype)
        for n in MAMF_SQUARES
    )
    print(f"  MAMF {row.label}: {eff:.3f} of peak / model factor {factor:.3f} = {eff / factor:.3f}")
    return min(1.0, eff / factor)


def fit_device(device: str, *, kernel: str | None = None) -> None:
    """Two stages: the tile and k_half from the 16-bit GEMMs (the training dtypes), then each
    other dtype's fraction from its large GEMMs (m, n >= 4096: quantisation ~1) with the tile
    and k_half held; attention separately (fraction per phase and kv_half)."""
    cfg = SETTINGS[device]
    base = load_device_profile(device)
    flash = kernel or cfg["flash"]
    print(f"== {device}" + (f" ({flash})" if kernel else ""))
    if kernel is None:
        rows = _gemm_rows(device)
        half = [r for r in rows if r.dtype in ("bf16", "fp16")]
        best = _mamf_shapes(device)
        mamf = bool(half) and all((r.m, r.n, r.k) in best for r in half)
        fit = fit_compute(
            half, base=base, fit_overhead=False, tiles=cfg["tiles"],
            k_halves=cfg["k_halves"] or (0, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024),
            cap_at_peak=cfg.get("cap", False),
        )  # fmt: skip
        cal = fit.calibration
        print(f"  gemm_tile {list(cal.gemm_tile)}  gemm_k_half {cal.gemm_k_half:g}")
        shaped = replace(base, gemm_tile=cal.gemm_tile, gemm_k_half=cal.gemm_k_half)
        fractions = dict(cal.gemm_fractions)
        if not mamf:
            _report(device, base, fit, half, [])
        if mamf:
            fractions = {d: _mamf_fraction(shaped, r) for d, r in ((r.dtype, r) for r in half)}
        for dt in sorted({r.dtype for r in rows} - {"bf16", "fp16"}):
            mine = [r for r in rows if r.dtype == dt]
            if len(mine) == 1:
                fractions[dt] = _mamf_fraction(shaped, mine[0])
                continue
            large = [r for r in mine if min(r.m, r.n) >= 4096] or mine
            f2 = fit_compute(large, base=shaped, fit_overhead=False, tiles=(cal.gemm_tile,),
                             k_halves=(cal.gemm_k_half,), cap_at_peak=cfg.get("cap", False))  # fmt: skip
            fractions.update(f2.calibration.gemm_fractions)
            _report(device, shaped, f2, mine, [])
        print("  gemm_peak_fraction " + ", ".join(f"{d}: {f:.3f}" for d, f in fractions.items()))
        checks = _gemm_rows(device, "check")
        if checks:
            final = replace(shaped, gemm_fractions=tuple(fractions.items()))
            _report(device, final, fit, [], checks, calibrated=False)
    if flash:
        att, checks = _attention_rows(device, flash)
        fit = fit_compute(
            att, base=base, fit_overhead=False,
            kv_halves=cfg.get("kv_halves") or (0, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512),
            cap_at_peak=cfg.get("cap", False),
        )  # fmt: skip
        cal = fit.calibration

        def frac(x: float | None) -> str:
            return "not fitted (no rows)" if x is None else f"{x:.3f}"

        print(f"  flash_fwd_peak_fraction {frac(cal.flash_fwd_fraction)}  flash_bwd_peak_fraction "
              f"{frac(cal.flash_bwd_fraction)}  flash_kv_half {cal.flash_kv_half:g}  (RMS "
              f"residual {fit.residuals['attention']:.1%})")  # fmt: skip
        _report(device, base, fit, att, checks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=sorted(SETTINGS), default=None)
    args = ap.parse_args()
    for dev in [args.device] if args.device else sorted(SETTINGS):
        fit_device(dev)
    if args.device in (None, "h100-sxm5-80gb"):
        print("-- FlashAttention-2 kernel on H100 (for flash_kv_half of the FA2 profiles)")
        fit_device("h100-sxm5-80gb", kernel="flash2")


if __name__ == "__main__":
    main()
