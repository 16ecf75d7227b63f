"""Model zoo: published parameter counts, the spec parser, and the module contract the emitter
relies on (names, pipeline-stage skipping, determinism on CPU)."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from autopar.errors import ConfigError
from autopar.models import (
    PRESETS,
    build,
    gpt,
    list_models,
    llama,
    moe,
    param_count,
    parse_model_spec,
)


@pytest.mark.parametrize(
    ("name", "overrides", "published"),
    [
        ("gpt3-175b", {}, 175.0e9),
        ("gpt3-175b", {"vocab": 51200}, 174.6e9),  # Megatron-LM's padded vocabulary
        ("llama3-8b", {}, 8.03e9),
        ("llama3-70b", {}, 70.6e9),
        ("llama3-405b", {}, 405.9e9),
        ("vit-h-14", {}, 632e6),
    ],
)
def test_parameter_counts_match_published(name: str, overrides: dict, published: float) -> None:
    count = param_count(build(name, **overrides))
    assert abs(count - published) / published < 0.01, f"{name}: {count / 1e9:.3f}B"


def test_bert_large_count_matches_rounded_paper_figure() -> None:
    # The paper rounds to 340M; the model (with MLM head, without the NSP pooler) has 335M.
    count = param_count(build("bert-large"))
    assert 334e6 < count < 337e6


def test_meta_build_allocates_nothing() -> None:
    model = build("gpt3-175b")
    assert all(p.device.type == "meta" for p in model.parameters())


def test_list_models_covers_every_preset_with_counts() -> None:
    rows = {r.name: r for r in list_models()}
    assert set(rows) == set(PRESETS)
    assert rows["gpt3-175b"].params > rows["gpt3-13b"].params > 0
    assert rows["llama3-8b"].published_params == pytest.approx(8.03e9)


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        build("gpt5-1t")
    assert "gpt3-175b" in str(info.value) and "llama3-70b" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_model_spec("gpt5-1t")
    assert "llama3-405b" in str(info.value)


def test_spec_family_with_fields() -> None:
    model = parse_model_spec("gpt:layers=3,hidden=64,heads=4,vocab=100,seq_len=32")
    cfg = model.config
    assert (cfg.layers, cfg.hidden, cfg.heads, cfg.vocab, cfg.seq_len) == (3, 64, 4, 100, 32)
    assert len(model.layers) == 3


def test_spec_preset_with_overrides() -> None:
    model = parse_model_spec("gpt3-175b:layers=2")
    assert model.config.hidden == 12288 and len(model.layers) == 2


def test_spec_yaml_files(tmp_path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("family: llama\nlayers: 2\nhidden: 64\nheads: 4\nkv_heads: 2\nvocab: 50\n")
    assert parse_model_spec(str(path)).config.kv_heads == 2
    path.write_text("preset: llama3-8b\nlayers: 1\n")
    assert parse_model_spec(str(path)).config.hidden == 4096
    path.write_text("family: gpt\nlayers: 2\nhidden: 64\nheads: 4\nwidth: 3\n")
    with pytest.raises(ConfigError) as info:
        parse_model_spec(str(path))
    assert info.value.field == "width" and str(path) in str(info.value)
    assert "hidden" in info.value.allowed


def test_spec_user_factory(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            def tiny():
                return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
            def not_a_model():
                return 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = parse_model_spec("my_models:tiny")
    assert next(model.parameters()).device.type == "meta"
    with pytest.raises(ConfigError, match="expected a torch.nn.Module"):
        parse_model_spec("my_models:not_a_model")
    with pytest.raises(ConfigError, match="cannot import"):
        parse_model_spec("no_such_pkg_xyz:factory")


@pytest.mark.parametrize(
    "spec",
    [
        "gpt:layers=0,hidden=64,heads=4",
        "gpt:layers=2,hidden=65,heads=4",
        "gpt:layers",
        "gpt:depth=2",
    ],
)
def test_bad_specs_raise_config_error(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_model_spec(spec)


def test_missing_required_field_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        parse_model_spec("gpt:layers=2,hidden=64")
    assert info.value.field == "heads"


def _tiny_gpt(**kw):
    return gpt(layers=2, hidden=64, heads=4, vocab=128, seq_len=16, device="cpu", **kw)


def test_emitter_contract_names_and_determinism() -> None:
    torch.manual_seed(0)
    a = _tiny_gpt(tie_embeddings=False)
    torch.manual_seed(0)
    b = _tiny_gpt(tie_embeddings=False)
    names = dict(a.named_parameters())
    for key in ("tok_embed.weight", "pos_embed.weight", "layers.0.attn_norm.weight",
                "layers.1.attn.q.weight", "layers.1.attn.k.bias", "layers.1.attn.v.weight",
                "layers.1.attn.o.weight", "layers.0.mlp_norm.bias", "layers.0.mlp.up.weight",
                "layers.0.mlp.down.weight", "norm.weight", "lm_head.weight"):  # fmt: skip
        assert key in names, key
    (tokens,) = a.example_inputs(batch_size=3)
    assert tokens.shape == (3, 16) and tokens.device.type == "cpu"
    a.eval(), b.eval()  # dropout off: the same seed gives the same function
    torch.testing.assert_close(a(tokens), b(tokens))
    assert a(tokens).shape == (3, 16, 128)


def test_tied_embeddings_share_one_tensor() -> None:
    model = _tiny_gpt()
    assert model.lm_head.weight is model.tok_embed.weight
    untied = _tiny_gpt(tie_embeddings=False)
    assert param_count(untied) - param_count(model) == 128 * 64


def test_pipeline_stages_compose_to_the_full_model() -> None:
    """Deleting parts (torchtitan pattern) must give stages whose composition is the model."""
    torch.manual_seed(0)
    full = llama(layers=4, hidden=64, heads=4, kv_heads=2, vocab=100, seq_len=8, device="cpu")
    (tokens,) = full.example_inputs(2)
    expected = full(tokens)
    import copy

    first, second = copy.deepcopy(full), copy.deepcopy(full)
    first.norm = first.lm_head = None
    del first.layers["2"], first.layers["3"]
    second.tok_embed = None
    del second.layers["0"], second.layers["1"]
    hidden = first(tokens)
    assert hidden.shape == (2, 8, 64)
    assert second.example_inputs(2)[0].shape == (2, 8, 64)
    torch.testing.assert_close(second(hidden), expected)


def test_attention_views_use_local_head_count() -> None:
    """A column-sharded q/k/v (half the heads on this rank) must run unchanged."""
    torch.manual_seed(0)
    model = _tiny_gpt()
    attn = model.layers["0"].attn
    for lin in (attn.q, attn.k, attn.v):
        lin.weight = torch.nn.Parameter(lin.weight[:32].clone())
        lin.bias = torch.nn.Parameter(lin.bias[:32].clone())
    attn.o.weight = torch.nn.Parameter(attn.o.weight[:, :32].clone())
    out = attn(torch.randn(2, 16, 64))
    assert out.shape == (2, 16, 64)


def test_gqa_matches_explicit_repeat() -> None:
    torch.manual_seed(0)
    model = llama(layers=1, hidden=64, heads=8, kv_heads=2, vocab=10, seq_len=8, device="cpu")
    attn = model.layers["0"].attn
    x = torch.randn(1, 8, 64)
    q = attn.q(x).view(1, 8, 8, 8).transpose(1, 2)
    k = attn.k(x).view(1, 8, 2, 8).transpose(1, 2).repeat_interleave(4, dim=1)
    v = attn.v(x).view(1, 8, 2, 8).transpose(1, 2).repeat_interleave(4, dim=1)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, 8, 64)
    torch.testing.assert_close(attn(x), attn.o(ref))


def test_moe_dispatch_matches_per_token_reference() -> None:
    """With enough capacity, GShard top-2 dispatch equals summing each token's two experts."""
    torch.manual_seed(0)
    model = moe(layers=2, hidden=32, heads=4, experts=4, vocab=50, seq_len=8,
                capacity_factor=4.0, device="cpu")  # fmt: skip
    layer = model.layers["1"].mlp
    x = torch.randn(2, 8, 32)
    flat = x.reshape(-1, 32)
    probs = torch.softmax(layer.router(flat), dim=-1)
    top_p, top_i = probs.topk(2, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    ref = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(2):
            e = top_i[t, j]
            h = F.gelu(flat[t] @ layer.experts.up[e], approximate="tanh") @ layer.experts.down[e]
            ref[t] += top_p[t, j] * h
    torch.testing.assert_close(layer(x).reshape(-1, 32), ref, atol=1e-5, rtol=1e-4)


def test_moe_capacity_drops_overflow_tokens() -> None:
    torch.manual_seed(0)
    model = moe(layers=2, hidden=16, heads=2, experts=2, top_k=1, vocab=20, seq_len=8,
                capacity_factor=0.25, device="cpu")  # fmt: skip
    layer = model.layers["1"].mlp
    assert layer.capacity(16) == 2
    out = layer(torch.randn(2, 8, 16))
    dropped = (out.reshape(-1, 16).abs().sum(-1) == 0).sum().item()
    assert dropped >= 16 - 2 * 2  # at most capacity x experts tokens are processed


@pytest.mark.parametrize("name", ["bert-large", "vit-h-14", "mlp-small", "moe-1.3b-8e"])
def test_every_family_runs_forward_on_cpu(name: str) -> None:
    small = {"bert-large": dict(layers=1, hidden=32, heads=2, vocab=50, seq_len=8),
             "vit-h-14": dict(layers=1, hidden=32, heads=2, image_size=28),
             "mlp-small": dict(layers=2, hidden=16),
             "moe-1.3b-8e": dict(layers=2, hidden=32, heads=2, vocab=50, seq_len=8)}[name]  # fmt: skip
    model = build(name, device="cpu", **small)
    out = model(*model.example_inputs(2))
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_dtype_in_spec() -> None:
    model = parse_model_spec("gpt:layers=1,hidden=32,heads=2,vocab=10,dtype=bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        parse_model_spec("gpt:layers=1,hidden=32,heads=2,dtype=fp12")
