"""Plan text rendering (exports to torchtitan / Megatron-LM are tests/test_export.py)."""

from __future__ import annotations

from autopar.explain import render
from autopar.plan import (
    Alternative,
    ClusterInfo,
    LayerSpec,
    MemoryBreakdown,
    Mesh,
    Parallel,
    Plan,
    Prediction,
    Stage,
    TimeBreakdown,
)

GiB = 1024**3


def _layers_of(stages) -> tuple[LayerSpec, ...]:
    names = [n for st in stages for n in st.layers]
    return tuple(
        LayerSpec(name=n, kind=n if n in ("embed", "head") else "block", signature=n[:5])
        for n in names
    )


def _plan(**over) -> Plan:
    blocks = [f"layers.{i}" for i in range(8)]
    fields = dict(
        model="gpt-test",
        cluster="dgx-a100 x2",
        num_devices=16,
        global_batch=64,
        seq_len=2048,
        dtype="bf16",
        parallel=Parallel(dp=2, tp=4, pp=2),
        mesh=Mesh(shape=(2, 2, 4), dim_names=("pp", "dp", "tp")),
        stages=(
            Stage(layers=("embed", *blocks[:3]), devices=tuple(range(8))),
            Stage(layers=(*blocks[3:], "head"), devices=tuple(range(8, 16))),
        ),
        microbatches=16,
        micro_batch_size=2,
        schedule="1f1b",
        zero_stage=1,
        recompute="selective",
        sequence_parallel=True,
        placements={"layers.0.attn.q.weight": ("R", "S(0)")},
        predicted=Prediction(
            step_time_s=1.25,
            tokens_per_s=64 * 2048 / 1.25,
            tflops_per_device=150.0,
            mfu=150 / 312,
            memory_gib_per_device=40.0,
            breakdown=TimeBreakdown(compute=1.0, tp_comm=0.1, pp_bubble=0.1, dp_comm=0.05),
            memory=MemoryBreakdown(
                weights=10 * GiB,
                grads=10 * GiB,
                optimizer=5 * GiB,
                activations=15 * GiB,
                capacity=72 * GiB,
            ),
        ),  # fmt: skip
        alternatives=(
            Alternative(
                parallel=Parallel(dp=1, tp=8, pp=2),
                microbatches=32,
                micro_batch_size=2,
                schedule="1f1b",
                zero_stage=0,
                recompute="none",
                step_time_s=1.5,
                memory_gib_per_device=50.0,
                breakdown=TimeBreakdown(compute=1.0, tp_comm=0.35, pp_bubble=0.1, dp_comm=0.05),
            ),
        ),  # fmt: skip
        landscape=(
            Alternative(
                parallel=Parallel(dp=2, tp=4, pp=2),
                microbatches=16,
                micro_batch_size=2,
                schedule="1f1b",
                zero_stage=1,
                recompute="selective",
                step_time_s=1.25,
                memory_gib_per_device=40.0,
            ),
        ),  # fmt: skip
        solver={"time_s": 0.5, "candidates_priced": 42},
    )
    fields.update(over)
    fields.setdefault("layers", _layers_of(fields["stages"]))
    fields.setdefault(
        "cluster_info", ClusterInfo(name="dgx-a100", nodes=2, devices_per_host=8, device="a100")
    )
    return Plan(**fields)


def test_render_names_every_section() -> None:
    text = render(_plan())
    for needle in (
        "dgx-a100 x2",
        "dp=2 tp=4 pp=2",
        "tp=4 inside a host",
        "embed, layers.0-2",
        "layers.3-7, head",
        "ranks 0-7",
        "1f1b",
        "stage 1",
        "selective",
        "sequence parallel: on",
        "1.250 s",
        "MFU              48.1%",
        "40.0 GiB of 72.0 GiB",
        "pipeline bubble",
        "activations",
        "runners-up",
        "most on tensor-parallel comm",
        "best per (dp, tp, pp)",
        "candidates_priced=42",
    ):
        assert needle in text, needle


def test_render_survives_json_round_trip() -> None:
    plan = _plan()
    again = Plan.from_json(plan.to_json())
    assert render(again) == render(plan)


def _interleaved_plan(chunk_sizes: list[int]) -> Plan:
    """pp=2, one stage per chunk, chunk c on pipeline rank c % 2 (the emitter's layout)."""
    stages, k = [], 0
    for c, size in enumerate(chunk_sizes):
        layers = [f"layers.{i}" for i in range(k, k + size)]
        k += size
        if c == 0:
            layers.insert(0, "embed")
        if c == len(chunk_sizes) - 1:
            layers.append("head")
        devices = tuple(range(8)) if c % 2 == 0 else tuple(range(8, 16))
        stages.append(Stage(layers=tuple(layers), devices=devices))
    return _plan(
        stages=tuple(stages), schedule="interleaved_1f1b", virtual_stages=len(chunk_sizes) // 2
    )


def test_render_groups_interleaved_chunks_per_rank_group() -> None:
    text = render(_interleaved_plan([1, 2, 2, 1]))
    assert "stages (2 x 2 chunks):" in text
    assert "ranks 0-7              2 chunks of 1/2 blocks: embed, layers.0 | layers.3-4" in text
    assert "ranks 8-15             2 chunks of 1/2 blocks: layers.1-2 | layers.5, head" in text
