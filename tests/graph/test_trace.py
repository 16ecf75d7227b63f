"""Tracer: FLOPs against the analytic transformer count, parameters and module paths, batch
re-sizing against a real trace, and errors that say what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autopar.errors import ConfigError, TraceError
from autopar.graph import trace
from autopar.models import build, gpt, llama


def _analytic_gpt_fwd_flops(*, b: int, s: int, h: int, layers: int, vocab: int) -> float:
    """Megatron/Narayanan et al. (2104.04473): 24bsh^2 + 4bs^2h per layer, 2bshV logits."""
    return layers * (24 * b * s * h * h + 4 * b * s * s * h) + 2 * b * s * h * vocab


@pytest.fixture(scope="module")
def gpt175_4l():
    """Four GPT-3 175B blocks (the 96-layer trace lives in benchmarks/trace.py)."""
    return trace(build("gpt3-175b", layers=4))


def test_gpt_forward_flops_match_analytic_count(gpt175_4l) -> None:
    expected = _analytic_gpt_fwd_flops(b=1, s=2048, h=12288, layers=4, vocab=50257)
    assert gpt175_4l.fwd_flops == pytest.approx(expected, rel=0.02)


def test_gpt_flops_at_other_shapes() -> None:
    model = gpt(layers=3, hidden=256, heads=8, vocab=1000, seq_len=128)
    graph = trace(model, model.example_inputs(4))
    expected = _analytic_gpt_fwd_flops(b=4, s=128, h=256, layers=3, vocab=1000)
    assert graph.fwd_flops == pytest.approx(expected, rel=0.02)
    assert graph.batch_size == 4


def test_tracing_175b_widths_allocates_no_weights(gpt175_4l) -> None:
    """Four 175B blocks + embeddings hold 7.9B fp32 parameters (29 GiB): only fake tensors."""
    import resource

    assert gpt175_4l.param_count * 4 > 29 * 2**30
    peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    assert peak_bytes < 4 * 2**30


def test_backward_is_about_twice_forward(gpt175_4l) -> None:
    ratio = gpt175_4l.bwd_flops / gpt175_4l.fwd_flops
    assert 2.0 <= ratio < 2.2  # matmuls 2x, fused attention backward 2.5x


def test_attention_stays_fused(gpt175_4l) -> None:
    sdpa = [n for n in gpt175_4l.ops() if n.op == "aten.scaled_dot_product_attention.default"]
    assert len(sdpa) == 4
    assert all(n.module_path.endswith(".attn") for n in sdpa)
    # no [b, heads, s, s] score tensor from a math decomposition
    assert not any(n.output and n.output.shape[-2:] == (2048, 2048) for n in gpt175_4l.ops())


def test_parameters_fqns_and_module_paths(gpt175_4l) -> None:
    model = build("gpt3-175b", layers=4)
    assert gpt175_4l.param_count == sum(p.numel() for p in model.parameters())
    assert "layers.3.mlp.down.weight" in gpt175_4l.params()
    q_mm = [n for n in gpt175_4l.ops() if n.op == "aten.addmm.default"
            and n.module_path == "layers.2.attn.q"]  # fmt: skip
    assert len(q_mm) == 1
    assert set(q_mm[0].params) == {"layers.2.attn.q.weight", "layers.2.attn.q.bias"}
    # tied embedding: the logits matmul reads the one shared tensor under both names
    logits = [n for n in gpt175_4l.ops() if n.module_path == "lm_head" and n.fwd_flops > 0]
    assert {"tok_embed.weight", "lm_head.weight"} <= set(logits[0].params)


def test_edges_carry_tensors(gpt175_4l) -> None:
    g = gpt175_4l.nx_graph
    for _u, v, data in g.edges(data=True):
        consumer = gpt175_4l.node(v)
        assert data["tensor"] == consumer.input_metas[data["index"]]
    assert len(gpt175_4l) == sum(1 for n in gpt175_4l if n.kind == "op")


def test_batch_dims_are_labelled(gpt175_4l) -> None:
    tokens = gpt175_4l.node("tokens")
    assert tokens.kind == "input" and tokens.outputs[0].batch_dim == 0
    assert all(n.outputs[0].batch_dim is None for n in gpt175_4l if n.kind == "param")
    flat = [n for n in gpt175_4l.ops() if n.op == "aten.addmm.default"]
    assert all(n.output.batch_dim == 0 for n in flat)  # [b*s, h]: dim 0 scales with batch


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_with_batch_equals_a_real_trace(family: str) -> None:
    if family == "gpt":
        model = gpt(layers=2, hidden=64, heads=4, vocab=100, seq_len=32)
    else:
        model = llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=100, seq_len=32)
    small = trace(model, model.example_inputs(1))
    real = trace(model, model.example_inputs(5))
    resized = small.with_batch(5)
    assert resized.batch_size == 5 and small.batch_size == 1
    assert [n.name for n in resized] == [n.name for n in real]
    for a in resized:
        b = real.node(a.name)
        assert (a.outputs, a.input_metas, a.args) == (b.outputs, b.input_metas, b.args), a.name
        assert a.fwd_flops == pytest.approx(b.fwd_flops) and a.bwd_flops == pytest.approx(
            b.bwd_flops
        )
    assert small.with_batch(1) is small


def test_with_batch_rejects_bad_sizes_and_unknown_dims() -> None:
    model = gpt(layers=1, hidden=32, heads=2, vocab=50, seq_len=8)
    graph = trace(model)
    with pytest.raises(ConfigError):
        graph.with_batch(0)
    undetected = trace(model, detect_batch=False)
    with pytest.raises(TraceError, match="detect_batch"):
        undetected.with_batch(4)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Branchy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if y.sum() > 0:  # data-dependent control flow
            return y
        return -y


def test_data_dependent_control_flow_names_module_and_fix() -> None:
    with pytest.raises(TraceError) as info:
        trace(_DataDependent(), (torch.randn(2, 4),))
    assert info.value.module == "inner"
    assert "data-dependent" in str(info.value) and "torch.where" in str(info.value)


class _NonZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x > 0]


def test_data_dependent_shape_names_op() -> None:
    with pytest.raises(TraceError) as info:
        trace(_NonZero(), (torch.randn(3, 4),))
    assert info.value.op is not None and "fixed-size" in str(info.value)


def test_custom_op_without_fake_kernel_names_op() -> None:
    lib = torch.library.Library("autopar_test_nofake", "FRAGMENT")  # noqa: F841 - keeps it alive
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CPU")

    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.autopar_test_nofake.twice(x)

    with pytest.raises(TraceError) as info:
        trace(M(), (torch.randn(2, 3),))
    assert "autopar_test_nofake" in str(info.value)
    assert "register_fake" in str(info.value)


def test_custom_op_with_fake_kernel_is_kept_as_a_node() -> None:
    @torch.library.custom_op("autopar_test::scale2", mutates_args=())
    def scale2(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @scale2.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return scale2(self.lin(x))

    graph = trace(M(), (torch.randn(2, 8),))
    custom = [n for n in graph.ops() if "autopar_test" in n.op]
    assert len(custom) == 1 and custom[0].output.shape == (2, 8)
    assert any("autopar_test" in op for op in graph.metadata["ops_without_flop_formula"])


def test_model_without_example_inputs_needs_them() -> None:
    with pytest.raises(TraceError, match="example_inputs"):
        trace(nn.Linear(3, 3))
    with pytest.raises(TraceError):
        trace("not a model")  # type: ignore[arg-type]


def test_plain_sequential_with_keyword_inputs() -> None:
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6))

        def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
            return self.body(x) * scale

    graph = trace(KW().to("meta"), {"x": torch.randn(3, 6, device="meta")})
    assert graph.batch_size == 3
    mms = [n for n in graph.ops() if n.fwd_flops > 0]
    assert [n.module_path for n in mms] == ["body.0", "body.2"]
    assert graph.fwd_flops == 2 * 3 * 6 * 12 * 2
    # the first matmul's input (data) needs no gradient: backward = weight grad only
    assert mms[0].bwd_flops == mms[0].fwd_flops and mms[1].bwd_flops == 2 * mms[1].fwd_flops
