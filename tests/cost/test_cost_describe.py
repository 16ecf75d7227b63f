"""describe_cluster: what the cluster is, what the cost model assumes, what it charges."""

from __future__ import annotations

from autopar.cost.describe import describe_cluster
from autopar.topology.load import load_cluster


def test_describe_cluster_adds_compute_figures_and_collective_prices():
    c = load_cluster("hetero-nic", nodes=4)
    text = describe_cluster(c)
    assert text.startswith(c.describe())
    for needle in ("compute model", "large GEMMs: bf16 266.4 TFLOP/s (85% of 312)",
                   "flash attention: forward 64%, backward 56%", "1815 GB/s achieved",
                   "launch 2.3 us, host 5 us", "1 GiB all-reduce", "one host", "full cluster",
                   "2 devices: group 'ib' + 'eth'"):  # fmt: skip
        assert needle in text, needle
    # the tp-split GEMM line shows the quantisation loss the model charges
    assert "2048x1536x12288 230.4" in text


def test_describe_cluster_names_the_compute_calibration(tmp_path):
    (tmp_path / "cal.yaml").write_text(
        "kind: compute_calibration\ndevice: h100-sxm5-80gb\nfitted:\n  gemm_peak_fraction:\n"
        "    bf16: 0.5\n"
    )
    c = load_cluster("dgx-h100", compute_calibration=tmp_path / "cal.yaml")
    text = describe_cluster(c)
    assert "compute calibration" in c.describe() and str(tmp_path / "cal.yaml") in text
    assert "bf16 494.5 TFLOP/s (50% of 989)" in text
