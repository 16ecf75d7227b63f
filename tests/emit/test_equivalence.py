"""Each plan, run on 4 gloo processes, trains exactly like one process on the whole batch.

Every test compares the loss of two steps, the gathered gradients of the first step and the
weights after two SGD-with-momentum steps against single-process training of the same model on
the same global batch (fp32, relative error <= 1e-5 in the L2 norm per parameter), and checks
structure that only exists if the parallelism ran: DTensor parameters sharded on the planned
axis and dim, stage modules holding only their blocks, the data-parallel API used. A plan
whose data parallelism silently did nothing fails the gradient check (each rank would see only
its own quarter of the batch); one whose tensor parallelism did nothing fails the DTensor check.
"""

from __future__ import annotations

import pytest

from tests.emit.harness import run_distributed
from tests.emit.workers import equivalence_worker, make_plan, megatron_tp

pytestmark = pytest.mark.distributed


def _run(tmp_path, plan, layers, expect):
    run_distributed(
        equivalence_worker, world=4, tmp_path=tmp_path, args=(plan.to_dict(), layers, expect)
    )


def test_dp4_replicate_with_full_recompute_and_accumulation(tmp_path):
    plan = make_plan(layers=2, dp=4, microbatches=2, recompute="full")
    _run(tmp_path, plan, 2, {"dp_api": "replicate"})


def test_tp4_megatron_split_with_selective_recompute(tmp_path):
    # norm.* sharded on tp is not a Megatron choice: it exercises the generic
    # distribute_module path for a module that is neither Linear nor Embedding.
    tp = {**megatron_tp(2), "norm.weight": "S(0)", "norm.bias": "S(0)"}
    plan = make_plan(layers=2, tp=4, recompute="selective", tp_placements=tp)
    expect = {
        "sharded": {
            "norm.weight": ("tp", 0),
            "tok_embed.weight": ("tp", 0),
            "layers.0.attn.q.weight": ("tp", 0),
            "layers.0.attn.q.bias": ("tp", 0),
            "layers.1.attn.o.weight": ("tp", 1),
            "layers.1.mlp.up.weight": ("tp", 0),
            "layers.1.mlp.down.weight": ("tp", 1),
            "lm_head.weight": ("tp", 0),
        }
    }
    _run(tmp_path, plan, 2, expect)


def test_tp2_dp2_fsdp_zero2_on_tp_dtensors_with_sequence_parallel(tmp_path):
    plan = make_plan(
        layers=2, tp=2, dp=2, zero_stage=2, tp_placements=megatron_tp(2), sequence_parallel=True
    )
    expect = {
        "dp_api": "fully_shard(reshard_after_forward=False)",
        "sharded": {
            "layers.0.attn.q.weight": ("tp", 0),
            "layers.0.mlp.down.weight": ("tp", 1),
            "layers.0.mlp.up.bias": ("dp", 0),
            "layers.1.attn_norm.weight": ("dp", 0),
        },
        "replicated_dtensor": ["layers.0.attn_norm.weight", "norm.weight"],
        "block_seq_len": 16 // 2,
    }
    _run(tmp_path, plan, 2, expect)


def test_pp2_tp2_gpipe_with_sequence_parallel(tmp_path):
    stages = [["embed", "layers.0"], ["layers.1", "head"]]
    plan = make_plan(
        layers=2,
        pp=2,
        tp=2,
        stage_layers=stages,
        schedule="gpipe",
        microbatches=2,
        tp_placements=megatron_tp(2),
        sequence_parallel=True,
    )
    expect = {
        "stage_blocks": {0: [0], 1: [1]},
        "sharded": {"layers.0.attn.k.weight": ("tp", 0), "layers.1.attn.o.weight": ("tp", 1)},
        "block_seq_len": 16 // 2,
    }
    _run(tmp_path, plan, 2, expect)


def test_pp2_dp2_zero3_1f1b(tmp_path):
    stages = [["embed", "layers.0"], ["layers.1", "head"]]
    plan = make_plan(
        layers=2, pp=2, dp=2, stage_layers=stages, schedule="1f1b", microbatches=2, zero_stage=3
    )
    expect = {
        "stage_blocks": {0: [0], 1: [1]},
        "dp_api": "fully_shard(reshard_after_forward=True)",
        "sharded": {
            "tok_embed.weight": ("dp", 0),
            "layers.0.mlp.up.weight": ("dp", 0),
            "layers.1.attn.q.weight": ("dp", 0),
            "lm_head.weight": ("dp", 0),
        },
    }
    _run(tmp_path, plan, 2, expect)


def test_pp4_1f1b(tmp_path):
    stages = [["embed", "layers.0"], ["layers.1"], ["layers.2"], ["layers.3", "head"]]
    plan = make_plan(layers=4, pp=4, stage_layers=stages, schedule="1f1b", microbatches=4)
    _run(tmp_path, plan, 4, {"stage_blocks": {0: [0], 1: [1], 2: [2], 3: [3]}})


def test_pp2_dp2_interleaved_1f1b_two_virtual_stages(tmp_path):
    # uneven chunks (1, 2, 2, 1 blocks), as the search emits when blocks % (pp x v) != 0
    stages = [["embed", "layers.0"], ["layers.1", "layers.2"], ["layers.3", "layers.4"],
              ["layers.5", "head"]]  # fmt: skip
    plan = make_plan(
        layers=6,
        pp=2,
        dp=2,
        virtual_stages=2,
        stage_layers=stages,
        schedule="interleaved_1f1b",
        microbatches=2,
        zero_stage=3,
    )
    # pipeline rank 0 runs stages 0 and 2, rank 1 runs stages 1 and 3 (looped placement)
    _run(tmp_path, plan, 6, {"stage_blocks": {0: [0, 3, 4], 1: [1, 2, 5]}})
