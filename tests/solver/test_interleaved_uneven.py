"""Interleaved 1F1B with blocks that do not divide into pp x v equal chunks (Llama 3 405B style).

Llama 3 405B trained 126 blocks on pp = 16 with the interleaved schedule, first and last stage
one block short (arXiv 2407.21783 §3.3.2). The search must offer that layout, emit one Stage per
chunk (chunk c on pipeline rank c mod pp, what the emitter validates and runs), and leave the
divisible case exactly Megatron's equal split.
"""

from __future__ import annotations

import copy

import pytest
import torch

from autopar.config import TrainingConfig
from autopar.emit.mesh import validate_plan
from autopar.models import gpt, llama
from autopar.plan import Plan
from autopar.solver.pricing import chunk_sizes as _chunk_sizes
from autopar.solver.search import search
from autopar.topology.load import load_cluster


def _blocks(layers: tuple[str, ...]) -> list[int]:
    return [int(n.split(".", 1)[1]) for n in layers if n.startswith("layers.")]


def _check_looped_chunks(plan: Plan, model) -> list[int]:
    """Every layer once, in model order, chunk c on rank c mod pp; returns blocks per chunk."""
    pp, v = plan.parallel.pp, plan.virtual_stages
    assert len(plan.stages) == pp * v
    names = [n for st in plan.stages for n in st.layers]
    assert names == [layer.name for layer in plan.layers]  # each layer exactly once, in order
    per_rank = plan.parallel.dp * plan.parallel.tp
    for c, st in enumerate(plan.stages):
        rank = c % pp
        assert st.devices == tuple(range(rank * per_rank, (rank + 1) * per_rank))
        blocks = _blocks(st.layers)
        assert blocks == list(range(blocks[0], blocks[0] + len(blocks)))  # contiguous chunk
    # the emitter's checks, on the model in the dtype the plan was priced for (bf16)
    validate_plan(plan, world_size=plan.num_devices, model=copy.deepcopy(model).to(torch.bfloat16))
    return [len(_blocks(st.layers)) for st in plan.stages]


@pytest.mark.parametrize(
    ("blocks", "pp", "v"),
    [
        (b, pp, v) for b in range(4, 70, 3) for pp in (2, 3, 4, 8, 16) for v in (2, 3, 4, 5)
    ],  # fmt: skip
)
def test_chunk_sizes_differ_by_at_most_one_per_chunk_and_per_rank(blocks, pp, v):
    sizes = _chunk_sizes(blocks, pp, v)
    if blocks < pp * v:
        assert sizes is None  # a chunk would be empty
        return
    assert len(sizes) == pp * v and sum(sizes) == blocks and min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1
    rank_totals = [sum(sizes[r::pp]) for r in range(pp)]
    assert max(rank_totals) - min(rank_totals) <= 1
    if blocks % pp:
        # the ranks that also run the embedding (0) and the head (pp - 1) are short first
        assert rank_totals[0] == min(rank_totals)
        if blocks % pp < pp - 1:
            assert rank_totals[-1] == min(rank_totals)
    if blocks % (pp * v) == 0:
        assert set(sizes) == {blocks // (pp * v)}  # Megatron's equal split


def test_llama3_405b_layout_first_and_last_chunk_one_block_short():
    sizes = _chunk_sizes(126, 16, 4)
    assert sizes[0] == sizes[-1] == 1 and set(sizes[1:-1]) == {2}
    assert [sum(sizes[r::16]) for r in range(16)] == [7] + [8] * 14 + [7]


@pytest.fixture(scope="module")
def llama126():
    return llama(layers=126, hidden=128, heads=4, kv_heads=2, vocab=1000, seq_len=128,
                 ffn_hidden=256)  # fmt: skip


def _pinned(model, **fixed) -> Plan:
    cluster = load_cluster("dgx-a100", nodes=2)  # 16 devices: pp = 16, dp = tp = 1
    cfg = TrainingConfig(global_batch=64, seq_len=128)
    return search(model, cluster, cfg, fixed={"pp": 16, **fixed},
                  progress=False)  # fmt: skip


def test_126_blocks_on_pp16_admit_interleaved_1f1b(llama126):
    plan = _pinned(llama126, schedule="interleaved_1f1b")
    assert plan.schedule == "interleaved_1f1b" and plan.virtual_stages >= 2
    chunk_blocks = _check_looped_chunks(plan, llama126)
    assert max(chunk_blocks) - min(chunk_blocks) <= 1
    assert chunk_blocks == _chunk_sizes(126, 16, plan.virtual_stages)
    assert plan.stages[0].layers[0] == "embed" and plan.stages[-1].layers[-1] == "head"


def test_uneven_interleaving_pinned_v4_is_the_llama3_layout_and_cuts_the_bubble(llama126):
    inter = _pinned(llama126, schedule="interleaved_1f1b", virtual_stages=4)
    chunk_blocks = _check_looped_chunks(inter, llama126)
    assert chunk_blocks[0] == chunk_blocks[-1] == 1 and set(chunk_blocks[1:-1]) == {2}
    plain = _pinned(llama126, schedule="1f1b", microbatches=inter.microbatches)
    assert plain.microbatches == inter.microbatches
    # the interleaved fill/drain is ~1/v of 1F1B's on the same shape
    assert inter.predicted.breakdown.pp_bubble < 0.5 * plain.predicted.breakdown.pp_bubble
    # memory is priced per rank with its own chunks: all four per rank hold activations
    assert inter.predicted.memory.activations > 0


def test_divisible_blocks_keep_megatrons_equal_chunks():
    model = gpt(layers=32, hidden=256, heads=4, vocab=1000, seq_len=128)
    cluster = load_cluster("dgx-a100", nodes=2)
    cfg = TrainingConfig(global_batch=64, seq_len=128)
    plan = search(model, cluster, cfg, progress=False,
                  fixed={"pp": 4, "schedule": "interleaved_1f1b", "virtual_stages": 4})  # fmt: skip
    assert _check_looped_chunks(plan, model) == [2] * 16
    # Megatron's layout, written out: chunk c holds blocks 2c, 2c+1 and sits on rank c mod 4
    for c, st in enumerate(plan.stages):
        assert _blocks(st.layers) == [2 * c, 2 * c + 1]
    assert plan.stages[0].layers[0] == "embed" and plan.stages[-1].layers[-1] == "head"
