"""Hugging Face models built from a config trace through the same tracer (needs the hf extra)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from autopar.graph import distinct_layers, group_layers, trace  # noqa: E402
from autopar.models import parse_model_spec  # noqa: E402
from autopar.models.hf import hf_model  # noqa: E402


def _tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return hf_model(config, seq_len=32)


def test_tiny_llama_traces_on_meta() -> None:
    model = _tiny_llama()
    graph = trace(model)
    assert graph.param_count == sum(p.numel() for p in model.parameters())
    assert any(n.op == "aten.scaled_dot_product_attention.default" for n in graph.ops())
    # 3 blocks x 7 projections + logits, 2 FLOPs per multiply-add (b=1, s=32)
    h, f, kv, vocab, s = 128, 256, 64, 1000, 32
    per_block = 2 * s * (2 * h * h + 2 * h * kv + 3 * h * f) + 4 * s * s * h
    assert graph.fwd_flops == pytest.approx(3 * per_block + 2 * s * h * vocab, rel=0.02)


def test_hf_blocks_are_grouped_and_repeated() -> None:
    layers = group_layers(trace(_tiny_llama(), detect_batch=False))
    blocks = [lay for lay in layers if lay.name.startswith("layers.")]
    assert [lay.module_path for lay in blocks] == ["model.layers.0", "model.layers.1",
                                                   "model.layers.2"]  # fmt: skip
    assert len(distinct_layers(blocks)) == 1


def test_hf_spec_string() -> None:
    model = parse_model_spec(
        "hf:LlamaConfig:hidden_size=64,intermediate_size=128,num_hidden_layers=2,"
        "num_attention_heads=4,num_key_value_heads=4,vocab_size=100,seq_len=16"
    )
    graph = trace(model)
    assert graph.node("input_ids").outputs[0].shape == (1, 16)
    assert graph.with_batch(3).node("input_ids").outputs[0].shape == (3, 16)
