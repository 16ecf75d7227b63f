"""Hugging Face models built from configs trace on meta through the same tracer (hf extra).

Five families that exercise different transformers code paths: Llama / Mistral / Qwen2 (RoPE
buffers, grouped-query attention, transformers' mask creation), GPT-2 (fused ``c_attn`` Conv1D,
tied embeddings, learned positions) and BERT (bidirectional encoder, masked-LM head).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from autopar.errors import ConfigError  # noqa: E402
from autopar.graph import OpGraph, distinct_layers, group_layers, trace  # noqa: E402
from autopar.models import parse_model_spec  # noqa: E402
from autopar.models.hf import config_fields, hf_model  # noqa: E402

SDPA = "aten.scaled_dot_product_attention.default"
H, FFN, HEADS, KV_HEADS, LAYERS, VOCAB, SEQ = 64, 128, 4, 2, 2, 256, 24

_DECODER = dict(
    vocab_size=VOCAB, hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS,
    num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
)  # fmt: skip

CONFIGS = {
    # name: (config, model class, block container, causal, grouped-query)
    "llama": (lambda: transformers.LlamaConfig(**_DECODER), "LlamaForCausalLM", "model.layers",
              True, True),
    "mistral": (lambda: transformers.MistralConfig(**_DECODER), "MistralForCausalLM",
                "model.layers", True, True),
    "qwen2": (lambda: transformers.Qwen2Config(**_DECODER), "Qwen2ForCausalLM", "model.layers",
              True, True),
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=H, n_inner=FFN,
                                             n_layer=LAYERS, n_head=HEADS, n_positions=64,
                                             bos_token_id=0, eos_token_id=0),
             "GPT2LMHeadModel", "transformer.h", True, False),
    "bert": (lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=H,
                                             intermediate_size=FFN, num_hidden_layers=LAYERS,
                                             num_attention_heads=HEADS, max_position_embeddings=64),
             "BertForMaskedLM", "bert.encoder.layer", False, False),
}  # fmt: skip
NAMES = sorted(CONFIGS)


def _model(name: str, **kwargs) -> nn.Module:
    return hf_model(CONFIGS[name][0](), seq_len=SEQ, **kwargs)


@pytest.fixture(scope="module")
def traced() -> dict[str, tuple[nn.Module, OpGraph]]:
    """Each family built on meta and traced once at batch 1 (with batch-dim detection)."""
    out = {}
    for name in NAMES:
        model = _model(name)
        out[name] = (model, trace(model))
    return out


def _matmul_params(model: nn.Module) -> int:
    """Parameters a token multiplies by: 2-D weights, minus embedding tables only looked up
    (a tied input embedding that is also the LM head counts)."""
    out_w = model.get_output_embeddings().weight
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(
        p.numel()
        for p in model.parameters()
        if p.dim() == 2 and (id(p) not in lookups or p is out_w)
    )


@pytest.mark.parametrize("name", NAMES)
def test_builds_the_right_head_on_meta(name: str, traced) -> None:
    model, graph = traced[name]
    assert type(model).__name__ == CONFIGS[name][1]
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache is False
    assert graph.param_count == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_attention_is_one_fused_node_per_layer(name: str, traced) -> None:
    _, graph = traced[name]
    _, _, container, causal, gqa = CONFIGS[name]
    sdpa = [n for n in graph.ops() if n.op == SDPA]
    assert len(sdpa) == LAYERS
    assert all(n.module_path.startswith(f"{container}.") for n in sdpa)
    for n in sdpa:
        # no mask tensor: causal models use is_causal, the encoder attends to everything
        assert len(n.inputs) == 3, n.inputs
        assert (n.args[5] if len(n.args) > 5 else False) is causal  # is_causal (default False)
        if gqa:  # K/V keep their 2 heads: SDPA broadcasts them, nothing repeats them
            assert n.input_metas[1].shape[1] == KV_HEADS
            assert dict(n.kwargs)["enable_gqa"] is True
    # neither a math decomposition of attention nor a materialised mask: no [.., s, s] tensor
    assert not any(t.shape[-2:] == (SEQ, SEQ) for n in graph.ops() for t in n.outputs)


@pytest.mark.parametrize("name", NAMES)
def test_batch_dims_are_detected(name: str, traced) -> None:
    _, graph = traced[name]
    assert graph.metadata["batch_dims_known"]
    assert graph.node("input_ids").outputs[0].batch_dim == 0
    assert all(n.output.batch_dim == 0 for n in graph.ops() if n.op == SDPA)
    logits = graph.node("output").input_metas[0]
    assert logits.shape == (1, SEQ, VOCAB) and logits.batch_dim == 0
    assert graph.with_batch(3).node("output").input_metas[0].shape == (3, SEQ, VOCAB)


@pytest.mark.parametrize("name", NAMES)
def test_flops_match_the_matmul_count_and_6nt(name: str, traced) -> None:
    model, graph = traced[name]
    tokens = SEQ  # batch 1
    n = _matmul_params(model)
    attention = LAYERS * 2 * 2 * SEQ * SEQ * H  # scores and weighted sum, 2 FLOPs per MAC
    assert graph.fwd_flops == pytest.approx(2 * n * tokens + attention, rel=0.02)
    # the rule of thumb: training step = 6 x parameters x tokens (+ attention)
    assert (graph.fwd_flops + graph.bwd_flops) / (6 * n * tokens) == pytest.approx(1.0, abs=0.25)


def test_llama_flops_by_hand(traced) -> None:
    _, graph = traced["llama"]
    kv = KV_HEADS * H // HEADS
    per_block = 2 * SEQ * (2 * H * H + 2 * H * kv + 3 * H * FFN) + 4 * SEQ * SEQ * H
    assert graph.fwd_flops == pytest.approx(LAYERS * per_block + 2 * SEQ * H * VOCAB, rel=0.02)


@pytest.mark.parametrize("name", NAMES)
def test_layers_are_embed_blocks_head_and_blocks_repeat(name: str, traced) -> None:
    _, graph = traced[name]
    container = CONFIGS[name][2]
    layers = group_layers(graph)
    blocks = [lay for lay in layers if lay.module_path]
    assert [lay.module_path for lay in blocks] == [f"{container}.{i}" for i in range(LAYERS)]
    assert [layers[0].name, layers[-1].name] == ["embed", "head"]
    assert len(layers) == LAYERS + 2
    assert len(distinct_layers(blocks)) == 1


@pytest.mark.parametrize("name", NAMES)
def test_traces_with_example_inputs_at_any_batch(name: str) -> None:
    model = _model(name)
    graph = trace(model, model.example_inputs(batch_size=3))
    assert graph.batch_size == 3 and graph.metadata["batch_dims_known"]
    assert graph.node("input_ids").outputs[0].shape == (3, SEQ)
    resized = trace(model).with_batch(3)
    assert resized.fwd_flops == pytest.approx(graph.fwd_flops)


def test_tied_gpt2_embedding_is_one_parameter(traced) -> None:
    _, graph = traced["gpt2"]
    wte = graph.node("transformer.wte.weight")
    assert set(wte.params) == {"transformer.wte.weight", "lm_head.weight"}
    c_attn = [n for n in graph.ops() if n.module_path == "transformer.h.0.attn.c_attn"]
    assert [n.output.shape for n in c_attn if n.fwd_flops] == [(SEQ, 3 * H)]  # fused q|k|v


def test_eager_runs_still_honour_packed_sequences() -> None:
    """The "not packed" answer is for fake tensors only: real packed position_ids still get
    their block-diagonal mask."""
    torch.manual_seed(0)
    model = _model("llama", device="cpu")
    ids = torch.randint(0, VOCAB, (1, 8))
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        split = model(input_ids=ids, position_ids=packed).logits
        second = model(input_ids=ids[:, 4:]).logits
    assert torch.allclose(split[:, 4:], second, atol=1e-5)
    assert not torch.allclose(whole[:, 4:], second, atol=1e-3)


def test_hf_spec_string() -> None:
    model = parse_model_spec(
        "hf:LlamaConfig:hidden_size=64,intermediate_size=128,num_hidden_layers=2,"
        "num_attention_heads=4,num_key_value_heads=4,vocab_size=100,seq_len=16"
    )
    graph = trace(model)
    assert graph.node("input_ids").outputs[0].shape == (1, 16)
    assert graph.with_batch(3).node("input_ids").outputs[0].shape == (3, 16)


def test_spec_typo_names_the_key_and_close_matches() -> None:
    with pytest.raises(ConfigError) as info:
        parse_model_spec("hf:LlamaConfig:hidden_sise=256")
    assert info.value.field == "hidden_sise"
    assert "did you mean 'hidden_size'" in str(info.value)
    assert "hidden_size" in info.value.allowed


def test_spec_accepts_aliases_legacy_keys_and_autopar_keys() -> None:
    gpt2 = parse_model_spec(
        "hf:GPT2Config:hidden_size=32,num_hidden_layers=1,num_attention_heads=2,vocab_size=50,"
        "bos_token_id=0,eos_token_id=0,seq_len=8,dtype=bf16"
    )  # attribute_map aliases of n_embd / n_layer / n_head, zoo dtype spelling
    assert gpt2.config.n_embd == 32 and gpt2.config.n_layer == 1
    assert gpt2.lm_head.weight.dtype == torch.bfloat16
    llama = parse_model_spec(
        "hf:LlamaConfig:hidden_size=32,intermediate_size=64,num_hidden_layers=1,"
        "num_attention_heads=2,vocab_size=50,rope_theta=500000.0,head=base"
    )
    assert llama.config.rope_parameters["rope_theta"] == 500000.0
    assert type(llama).__name__ == "LlamaModel"
    assert "rope_theta" not in config_fields(transformers.GPT2Config)  # GPT-2 has no RoPE
    eager = parse_model_spec(
        "hf:LlamaConfig:hidden_size=32,intermediate_size=64,num_hidden_layers=1,"
        "num_attention_heads=2,vocab_size=50,seq_len=8,attn_implementation=eager"
    )
    assert eager.config._attn_implementation == "eager"  # an explicit choice is kept


def test_bad_class_and_head_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="LlamaConfig"):
        parse_model_spec("hf:LLamaConfig:hidden_size=32")
    with pytest.raises(ConfigError) as info:
        hf_model("LlamaConfig", head="masked_lm", num_hidden_layers=1)
    assert info.value.field == "head" and "causal_lm" in info.value.allowed
    with pytest.raises(ConfigError, match="seq_len"):
        hf_model("LlamaConfig", seq_len=0, num_hidden_layers=1)
