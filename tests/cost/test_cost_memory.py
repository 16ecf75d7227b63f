"""Memory model: 16 bytes/param Adam, ZeRO, Korthikanti's per-layer formula, pipelines."""

from __future__ import annotations

import networkx as nx
import pytest

from autopar.cost.memory import (
    graph_saved_activation_bytes,
    in_flight_microbatches,
    model_state_breakdown,
    model_state_bytes,
    saved_activation_bytes,
    transformer_layer_activation_bytes,
)
from autopar.errors import ConfigError
from autopar.graph.opgraph import OpGraph, OpNode, TensorMeta


# -- model state ---------------------------------------------------------------------------
def test_mixed_precision_adam_is_16_bytes_per_param():
    assert model_state_bytes(num_params=1e9) == 16e9
    b = model_state_breakdown(num_params=1e9)
    assert (b.weights, b.grads, b.optimizer) == (2e9, 2e9, 12e9)


def test_sgd_keeps_less():
    assert model_state_bytes(num_params=1e9, optimizer="sgd") < model_state_bytes(num_params=1e9)
    assert model_state_bytes(num_params=1e9, optimizer="sgd") == 8e9  # weight, grad, fp32 master
    assert model_state_bytes(num_params=1e9, dtype="fp32", optimizer="adam") == 16e9  # 4+4+8


def test_zero_stages_shard_over_dp():
    p, dp = 1e9, 8
    z = [model_state_bytes(num_params=p, zero_stage=s, dp=dp) for s in (0, 1, 2, 3)]
    assert z == [16e9, 4e9 + 12e9 / dp, 2e9 + 14e9 / dp, 16e9 / dp]


@pytest.mark.parametrize(
    "kw", [dict(zero_stage=4), dict(optimizer="no-such-optimizer"), dict(dtype="fp8"), dict(dp=0)]
)
def test_bad_model_state_inputs(kw):
    with pytest.raises(ConfigError):
        model_state_bytes(num_params=1.0, **kw)


# -- Korthikanti formula -------------------------------------------------------------------
S, B, H, A = 2048, 1, 12288, 96  # GPT-3 175B layer


def test_formula_no_parallelism():
    got = transformer_layer_activation_bytes(seq_len=S, micro_batch=B, hidden=H, heads=A)
    assert got == 34 * S * B * H + 5 * A * S * S * B


def test_formula_tensor_and_sequence_parallel():
    t = 8
    tp = transformer_layer_activation_bytes(seq_len=S, micro_batch=B, hidden=H, heads=A, tp=t)
    assert tp == pytest.approx(S * B * H * (10 + 24 / t + 5 * A * S / (H * t)))
    sp = transformer_layer_activation_bytes(
        seq_len=S, micro_batch=B, hidden=H, heads=A, tp=t, sequence_parallel=True
    )
    assert sp == pytest.approx((34 * S * B * H + 5 * A * S * S * B) / t)
    sel = transformer_layer_activation_bytes(
        seq_len=S,
        micro_batch=B,
        hidden=H,
        heads=A,
        tp=t,
        sequence_parallel=True,
        recompute="selective",
    )
    assert sel == pytest.approx(34 * S * B * H / t)
    full = transformer_layer_activation_bytes(
        seq_len=S, micro_batch=B, hidden=H, heads=A, recompute="full"
    )
    assert full == 2 * S * B * H
    assert sel < sp < tp


# -- per-op rules on a hand-built GPT layer ------------------------------------------------
class _Builder:
    """Builds an OpGraph op by op; weights have batch_dim None, activations batch_dim set."""

    def __init__(self):
        self.g = nx.DiGraph()
        self.rank = 0

    def add(self, name, kind, op, inputs=(), outputs=(), params=()):
        metas = tuple(
            self.g.nodes[i]["op"].outputs[0] if "/" not in i else self._out(i) for i in inputs
        )
        srcs = tuple(i.split("/")[0] for i in inputs)
        node = OpNode(
            name=name,
            kind=kind,
            op=op,
            inputs=srcs,
            input_metas=metas,
            outputs=tuple(outputs),
            params=params,
        )
        self.g.add_node(name, op=node, rank=self.rank)
        self.rank += 1
        for idx, s in enumerate(srcs):
            self.g.add_edge(s, name, tensor=metas[idx], index=idx)
        return name

    def _out(self, ref):
        name, i = ref.split("/")
        return self.g.nodes[name]["op"].outputs[int(i)]

    def graph(self):
        return OpGraph(self.g, name="gpt-layer")


def _act(*shape, dtype="bfloat16", batch_dim=1):
    return TensorMeta(tuple(shape), dtype, batch_dim)


def _w(*shape):
    return TensorMeta(tuple(shape), "bfloat16", None)


def gpt_layer(s, b, h, a):
    """Unfused GPT layer as aten ops (Megatron order), separate q/k/v projections."""
    d = h // a
    g = _Builder()
    x = g.add("x", "input", "placeholder", outputs=[_act(s, b, h)])
    for p, shp in [("wq", (h, h)), ("wk", (h, h)), ("wv", (h, h)), ("wo", (h, h)), ("w1", (4 * h, h)), ("w2", (h, 4 * h)),
                   ("ln1_w", (h,)), ("ln2_w", (h,))]:  # fmt: skip
        g.add(p, "param", "placeholder", outputs=[_w(*shp)], params=(p,))
    stats = _act(s, b, 1, dtype="float32")
    g.add(
        "ln1", "op", "aten.native_layer_norm.default", [x, "ln1_w"], [_act(s, b, h), stats, stats]
    )
    ln1v = g.add("ln1v", "op", "aten.view.default", ["ln1/0"], [_act(s * b, h, batch_dim=0)])
    heads = {}
    for nm in ("q", "k", "v"):
        t = g.add(f"t_{nm}", "op", "aten.t.default", [f"w{nm}"], [_w(h, h)])
        mm = g.add(f"mm_{nm}", "op", "aten.mm.default", [ln1v, t], [_act(s * b, h, batch_dim=0)])
        heads[nm] = g.add(
            f"{nm}h", "op", "aten.view.default", [mm], [_act(b * a, s, d, batch_dim=0)]
        )
    kt = g.add("kt", "op", "aten.transpose.int", [heads["k"]], [_act(b * a, d, s, batch_dim=0)])
    sc = g.add(
        "scores", "op", "aten.bmm.default", [heads["q"], kt], [_act(b * a, s, s, batch_dim=0)]
    )
    scs = g.add("scaled", "op", "aten.mul.Tensor", [sc], [_act(b * a, s, s, batch_dim=0)])
    sm = g.add("softmax", "op", "aten._softmax.default", [scs], [_act(b * a, s, s, batch_dim=0)])
    g.add("attn_drop", "op", "aten.native_dropout.default", [sm],
               [_act(b * a, s, s, batch_dim=0), _act(b * a, s, s, dtype="bool", batch_dim=0)])  # fmt: skip
    ctx = g.add(
        "ctx",
        "op",
        "aten.bmm.default",
        ["attn_drop/0", heads["v"]],
        [_act(b * a, s, d, batch_dim=0)],
    )
    ctxv = g.add("ctxv", "op", "aten.view.default", [ctx], [_act(s * b, h, batch_dim=0)])
    to = g.add("t_o", "op", "aten.t.default", ["wo"], [_w(h, h)])
    o = g.add("mm_o", "op", "aten.mm.default", [ctxv, to], [_act(s * b, h, batch_dim=0)])
    g.add("o_drop", "op", "aten.native_dropout.default", [o],
               [_act(s * b, h, batch_dim=0), _act(s * b, h, dtype="bool", batch_dim=0)])  # fmt: skip
    r1 = g.add("res1", "op", "aten.add.Tensor", [x, "o_drop/0"], [_act(s, b, h)])
    g.add(
        "ln2", "op", "aten.native_layer_norm.default", [r1, "ln2_w"], [_act(s, b, h), stats, stats]
    )
    ln2v = g.add("ln2v", "op", "aten.view.default", ["ln2/0"], [_act(s * b, h, batch_dim=0)])
    t1 = g.add("t_1", "op", "aten.t.default", ["w1"], [_w(h, 4 * h)])
    h1 = g.add("mm_1", "op", "aten.mm.default", [ln2v, t1], [_act(s * b, 4 * h, batch_dim=0)])
    ge = g.add("gelu", "op", "aten.gelu.default", [h1], [_act(s * b, 4 * h, batch_dim=0)])
    t2 = g.add("t_2", "op", "aten.t.default", ["w2"], [_w(4 * h, h)])
    h2 = g.add("mm_2", "op", "aten.mm.default", [ge, t2], [_act(s * b, h, batch_dim=0)])
    g.add("mlp_drop", "op", "aten.native_dropout.default", [h2],
               [_act(s * b, h, batch_dim=0), _act(s * b, h, dtype="bool", batch_dim=0)])  # fmt: skip
    g.add("res2", "op", "aten.add.Tensor", [r1, "mlp_drop/0"], [_act(s, b, h)])
    return g.graph()


def test_per_op_rules_reproduce_korthikanti_on_a_gpt_layer():
    s, b, h, a = 512, 2, 1024, 16
    graph = gpt_layer(s, b, h, a)
    got = graph_saved_activation_bytes(graph)
    want = transformer_layer_activation_bytes(seq_len=s, micro_batch=b, hidden=h, heads=a)
    assert want == 34 * s * b * h + 5 * a * s * s * b
    # the norms also keep their fp32 mean / rstd (2 x 4 bytes per token each): 16·s·b extra
    assert got == pytest.approx(want + 2 * 2 * 4 * s * b, rel=1e-12)


def test_shared_inputs_are_counted_once_in_a_graph_but_per_op_individually():
    s, b, h, a = 64, 1, 128, 4
    graph = gpt_layer(s, b, h, a)
    per_op = sum(saved_activation_bytes(n) for n in graph)
    assert per_op > graph_saved_activation_bytes(graph)  # q, k, v each keep the same LN output


def test_op_families():
    act = _act(8, 4, 16)
    w = _w(16, 16)

    def op(name, inputs, outputs):
        return OpNode(name="n", kind="op", op=f"aten.{name}.default", inputs=tuple(f"i{j}" for j in range(len(inputs))),
                      input_metas=tuple(inputs), outputs=tuple(outputs))  # fmt: skip

    nb = act.nbytes
    assert saved_activation_bytes(op("mm", [act, w], [act])) == nb  # activation, not the weight
    assert saved_activation_bytes(op("_softmax", [act], [act])) == nb
    assert (
        saved_activation_bytes(op("native_dropout", [act], [act, _act(8, 4, 16, dtype="bool")]))
        == nb / 2
    )
    assert saved_activation_bytes(op("gelu", [act], [act])) == nb
    assert saved_activation_bytes(op("relu", [act], [act])) == nb
    assert saved_activation_bytes(op("view", [act], [act])) == 0
    assert saved_activation_bytes(op("add", [act, act], [act])) == 0
    assert saved_activation_bytes(op("mul", [act, act], [act])) == 2 * nb  # both operands
    assert saved_activation_bytes(op("mul", [act], [act])) == 0  # times a scalar
    assert saved_activation_bytes(op("some_custom_op", [act], [act])) == nb  # unknown: never zero
    sdpa = op(
        "_scaled_dot_product_flash_attention", [act, act, act], [act, _act(8, 4, dtype="float32")]
    )
    assert saved_activation_bytes(sdpa) == 4 * nb + 8 * 4 * 4  # q, k, v, out, logsumexp; no s^2


# -- pipelines -----------------------------------------------------------------------------
def test_in_flight_microbatches():
    assert in_flight_microbatches("gpipe", 4, 0, 16) == 16
    assert [in_flight_microbatches("1f1b", 4, s, 16) for s in range(4)] == [4, 3, 2, 1]
    assert in_flight_microbatches("1f1b", 8, 0, 3) == 3  # fewer microbatches than stages
    p, v = 8, 4
    assert in_flight_microbatches("interleaved_1f1b", p, 0, 64, v) == pytest.approx(
        p * (1 + (p - 1) / (p * v))
    )
    assert in_flight_microbatches("interleaved_1f1b", p, 0, 64, 1) == p


@pytest.mark.parametrize(
    "args", [("zb", 4, 0, 8, 1), ("1f1b", 4, 4, 8, 1), ("1f1b", 0, 0, 8, 1), ("gpipe", 4, 0, 0, 1)]
)
def test_bad_pipeline_inputs(args):
    with pytest.raises(ConfigError):
        in_flight_microbatches(*args)
