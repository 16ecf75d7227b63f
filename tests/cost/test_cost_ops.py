"""Op -> kernels (autopar.cost.ops): the terms one traced op is priced with.

Each test fails if its term is removed: the weight-gradient accumulation into the fp32
gradient (per microbatch, for ops that read a parameter and for embedding tables), and only
for weights (an activation x activation matmul accumulates nothing).
"""

from __future__ import annotations

import pytest

from autopar.cost.compute import gemm_time_s, memory_bound_time_s
from autopar.cost.ops import GRAD_ACCUM_BYTES, grad_accumulation_time_s, op_time_s
from autopar.cost.profiles import load_device_profile
from autopar.graph.opgraph import OpNode, TensorMeta


@pytest.fixture(scope="module")
def a100():
    return load_device_profile("a100-sxm4-80gb")


M, K, N = 2048, 12288, 6144  # a tensor-parallel share of an MLP up-projection, one sequence


def _mm(params: tuple[str, ...]) -> OpNode:
    """``mm(x[M, K], w[K, N])``: x needs a gradient; w is a parameter when ``params`` names it."""
    flops = 2.0 * M * N * K
    return OpNode(
        name="mm", kind="op", op="aten.mm.default", inputs=("x", "w"),
        input_metas=(TensorMeta((M, K), "bfloat16", 0), TensorMeta((K, N), "bfloat16")),
        outputs=(TensorMeta((M, N), "bfloat16", 0),), fwd_flops=flops, bwd_flops=2 * flops,
        params=params,
    )  # fmt: skip


def _price(node: OpNode, dev, phase: str) -> float:
    return op_time_s(node, input_shapes=[m.shape for m in node.input_metas],
                     output_shapes=[m.shape for m in node.outputs], divisor=1, phase=phase,
                     device=dev, dtype="bf16")  # fmt: skip


def test_weight_gradient_is_accumulated_into_fp32_every_microbatch(a100):
    d_w = gemm_time_s(m=K, n=N, k=M, device=a100, dtype="bf16")
    d_x = gemm_time_s(m=M, n=K, k=N, device=a100, dtype="bf16")
    # the epilogue reads and writes the fp32 accumulator instead of writing bf16: 6 more bytes
    extra = K * N * (GRAD_ACCUM_BYTES - 2) / a100.achieved_memory_bandwidth_bytes_per_s
    assert grad_accumulation_time_s(K * N, device=a100, dtype="bf16") == pytest.approx(extra)
    assert _price(_mm(("mlp.up.weight",)), a100, "bwd") == pytest.approx(d_w + d_x + extra)
    # about a fifth of the weight-gradient GEMM at 2048 tokens: not a rounding error
    assert 0.15 < extra / d_w < 0.3


def test_activation_matmuls_and_forward_accumulate_nothing(a100):
    d_w = gemm_time_s(m=K, n=N, k=M, device=a100, dtype="bf16")
    d_x = gemm_time_s(m=M, n=K, k=N, device=a100, dtype="bf16")
    assert _price(_mm(()), a100, "bwd") == pytest.approx(d_w + d_x)
    assert _price(_mm(("w",)), a100, "fwd") == _price(_mm(()), a100, "fwd")
    assert grad_accumulation_time_s(0, device=a100, dtype="bf16") == 0.0
    # fp32 training: the accumulator is the gradient's own dtype, only its read is extra
    fp32 = grad_accumulation_time_s(K * N, device=a100, dtype="fp32")
    assert fp32 == pytest.approx(K * N * 4 / a100.achieved_memory_bandwidth_bytes_per_s)


def test_embedding_table_gradient_is_accumulated(a100):
    v, h, tokens = 51200, 1536, 2048
    node = OpNode(
        name="emb", kind="op", op="aten.embedding.default", inputs=("table", "ids"),
        input_metas=(TensorMeta((v, h), "bfloat16"), TensorMeta((1, tokens), "int64", 0)),
        outputs=(TensorMeta((1, tokens, h), "bfloat16", 0),), params=("tok_embed.weight",),
    )  # fmt: skip
    out = tokens * h * 2
    scatter = memory_bound_time_s(bytes_moved=2.0 * out + v * h * 2, device=a100, dtype="bf16")
    accum = grad_accumulation_time_s(v * h, device=a100, dtype="bf16")
    assert accum > 0
    assert _price(node, a100, "bwd") == pytest.approx(scatter + accum)
