"""Layer grouping: GPT-3 175B has one distinct block; a differing first block, MoE
alternation and pipeline stages are handled."""

from __future__ import annotations

import pytest

from autopar.graph import distinct_layers, group_layers, layer_graph, trace
from autopar.models import build, gpt, moe
from autopar.models.blocks import GeluMLP


@pytest.fixture(scope="module")
def gpt175():
    graph = trace(build("gpt3-175b", layers=4), detect_batch=False)
    return graph, group_layers(graph)


def test_gpt3_175b_blocks_share_one_signature(gpt175) -> None:
    graph, layers = gpt175
    assert [lay.name for lay in layers] == ["embed", "layers.0", "layers.1", "layers.2",
                                             "layers.3", "head"]  # fmt: skip
    blocks = [lay for lay in layers if lay.name.startswith("layers.")]
    groups = distinct_layers(blocks)
    assert len(groups) == 1 and len(next(iter(groups.values()))) == 4
    assert len(distinct_layers(layers)) == 3  # embed, block, head
    block = blocks[0]
    assert block.param_count == 12 * 12288**2 + 13 * 12288
    assert block.inputs == (layers[0].output,)
    assert blocks[1].inputs == (block.output,)


def test_layers_partition_the_graph(gpt175) -> None:
    graph, layers = gpt175
    names = [n for lay in layers for n in lay.nodes]
    assert sorted(names) == sorted(graph.nx_graph.nodes)
    assert sum(lay.param_count for lay in layers) == graph.param_count
    assert sum(lay.fwd_flops for lay in layers) == pytest.approx(graph.fwd_flops)
    assert sum(lay.bwd_flops for lay in layers) == pytest.approx(graph.bwd_flops)
    # the tied embedding lives with its first user (the embedding), read again by the head
    assert "tok_embed.weight" in layers[0].params
    assert "tok_embed.weight" in layers[-1].inputs


def test_layer_graph_is_self_contained(gpt175) -> None:
    graph, layers = gpt175
    sub = layer_graph(graph, layers[2])
    assert sub.param_count == layers[2].param_count
    assert sub.fwd_flops == pytest.approx(layers[2].fwd_flops)
    inputs = [n for n in sub if n.kind == "input"]
    assert [n.name for n in inputs] == [layers[1].output]
    outputs = [n for n in sub if n.kind == "output"]
    assert len(outputs) == 1 and outputs[0].inputs == (layers[2].output,)


def test_differing_first_block_gets_its_own_signature() -> None:
    model = gpt(layers=4, hidden=64, heads=4, vocab=100, seq_len=16)
    model.layers["0"].mlp = GeluMLP(hidden=64, ffn_hidden=128).to("meta")
    layers = group_layers(trace(model, detect_batch=False))
    blocks = [lay for lay in layers if lay.name.startswith("layers.")]
    groups = distinct_layers(blocks)
    assert sorted(len(v) for v in groups.values()) == [1, 3]
    assert groups[blocks[0].signature] == [blocks[0]]


def test_moe_alternation_gives_two_block_kinds() -> None:
    model = moe(layers=4, hidden=64, heads=4, experts=4, vocab=100, seq_len=16)
    layers = group_layers(trace(model, detect_batch=False))
    blocks = [lay for lay in layers if lay.name.startswith("layers.")]
    groups = distinct_layers(blocks)
    assert len(groups) == 2
    assert [lay.name for lay in groups[blocks[1].signature]] == ["layers.1", "layers.3"]


def test_pipeline_stage_without_embedding_or_head() -> None:
    model = gpt(layers=4, hidden=64, heads=4, vocab=100, seq_len=16)
    model.tok_embed = model.pos_embed = None
    model.norm = model.lm_head = None
    del model.layers["0"]
    layers = group_layers(trace(model, detect_batch=False))
    # blocks are named by their real module path (what named_modules() calls them)
    assert [lay.name for lay in layers] == ["layers.1", "layers.2", "layers.3"]
    assert all(lay.kind == "block" for lay in layers)
    assert layers[0].module_path == "layers.1"
    assert len(distinct_layers(layers)) == 1
