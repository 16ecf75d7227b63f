"""What one traced op costs on one device: the op mapped onto the kernels it runs.

The op family (``graph.ops.family``) decides the kernels, the local shapes (the op's tensors
as one device holds them under a sharding strategy) decide their sizes; ``cost.compute`` prices
each kernel. Forward and backward are priced separately:

* ``matmul``: forward one GEMM ``C[m,n] = A[m,k] B[k,n]`` (batched for ``bmm``); backward the
  input gradient ``dA = dC B^T`` (``m x k``, summing over ``n``) and the weight gradient
  ``dB = A^T dC`` (``k x n``, summing over ``m``), each only if that operand needs a gradient
  (the tracer's backward FLOPs say how many). A tensor-parallel split that shrinks ``n`` or ``k``
  costs what the smaller GEMMs achieve, not a share of the big one's rate.
* **Gradient accumulation**: when ``B`` is a parameter (the op reads one), every microbatch's
  weight gradient is accumulated into the step's fp32 gradient: the weight-gradient GEMM writes
  its output with ``beta = 1`` into the fp32 accumulator (Megatron-LM's
  ``--gradient-accumulation-fusion``, on by default since 2022 and in Megatron-Core: the
  ``fused_weight_gradient_mlp_cuda`` wgrad kernels; Megatron-LM casts gradients to fp32 for bf16,
  ``arguments.py``: "bfloat16 requires gradient accumulation and all-reduce to be done in
  fp32"). Its epilogue then reads and writes 4 + 4 bytes per output element instead of writing
  ``item`` bytes: :data:`GRAD_ACCUM_BYTES` - ``item`` more, priced as memory traffic after the
  GEMM's main loop (the epilogue of a tile follows its k loop). Per element of ``dB`` the GEMM
  does ``2m`` FLOPs, so with 2048 tokens per microbatch the epilogue adds about a fifth to the
  weight-gradient GEMM on an A100: small microbatches cost more than their FLOPs. (Megatron-LM
  2021 and PyTorch's ``AccumulateGrad`` run it as a separate kernel that also re-reads the 16-bit
  gradient: ``item`` bytes more than priced here.) An embedding table's gradient is accumulated
  the same way.
* ``attention``: FlashAttention forward / backward, or the unfused kernels when the stack says
  ``unfused`` (``TrainingConfig.attention``).
* ``conv``: the implicit GEMM (``N·H_out·W_out x C_out x C_in·k_h·k_w``), three of them backward.
* ``view``: nothing. Every other op is a memory-bound kernel over the bytes it reads and writes
  (backward: about twice, it reads the saved input and the output gradient and writes the input
  gradient); an embedding lookup reads only its rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autopar.cost.compute import ITEM_BYTES, attention_time_s, gemm_time_s, memory_bound_time_s
from autopar.cost.profiles import DTYPE_ALIASES
from autopar.graph.ops import base_name, family

__all__ = ["op_time_s", "ATTENTION_KERNELS", "GRAD_ACCUM_BYTES", "grad_accumulation_time_s"]

ATTENTION_KERNELS = ("flash", "unfused")
#: bytes per weight-gradient element the fused fp32 accumulation moves (read and write of the
#: fp32 accumulator), instead of writing the gradient in the training dtype (module docstring)
GRAD_ACCUM_BYTES = 8
_ITEM = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
_KIND = {"norm": "norm", "softmax": "softmax", "reduction": "norm"}


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _matmul_dims(name: str, ins: Sequence[Sequence[int]], out: Sequence[int]) -> tuple[int, ...]:
    """(batch, m, n, k) of a matmul-family op from its local input and output shapes."""
    if name in ("addmm", "baddbmm"):
        ins = ins[1:]
    if name == "linear":
        a, w = ins[0], ins[1]
        return 1, _numel(a[:-1]), int(w[0]), int(a[-1])
    a, b = ins[0], ins[1]
    k = int(a[-1])
    n = int(out[-1]) if out else int(b[-1])
    if name in ("bmm", "baddbmm") or (len(a) > 2 and len(b) > 2):
        return _numel(out[:-2]), int(out[-2]), n, k
    return 1, _numel(a[:-1]), n, k


def op_time_s(
    node: Any,
    *,
    input_shapes: Sequence[Sequence[int]],
    output_shapes: Sequence[Sequence[int]],
    divisor: int,
    phase: str,
    device: Any,
    dtype: str,
    attention: str = "flash",
) -> float:
    """Seconds of ``node`` in ``phase`` (``"fwd"`` / ``"bwd"``) on one device.

    ``input_shapes`` / ``output_shapes`` are the op's tensors as this device holds them;
    ``divisor`` the share of the op's work one device does (for ops priced by FLOPs alone).
    """
    fam = family(node.op)
    name = base_name(node.op)
    if fam == "view":
        return 0.0
    if phase == "bwd" and node.bwd_flops == 0 and fam in ("matmul", "conv"):
        return 0.0
    if fam == "matmul" and len(input_shapes) >= 2 and output_shapes:
        batch, m, n, k = _matmul_dims(name, input_shapes, output_shapes[0])
        if phase == "fwd":
            return gemm_time_s(m=m, n=n, k=k, batch=batch, device=device, dtype=dtype)
        grads = round(node.bwd_flops / node.fwd_flops) if node.fwd_flops else 0
        t = gemm_time_s(m=k, n=n, k=m, batch=batch, device=device, dtype=dtype)  # dB
        if grads >= 2:
            t += gemm_time_s(m=m, n=k, k=n, batch=batch, device=device, dtype=dtype)  # dA
        if node.params:  # dB is a weight gradient: accumulated into the fp32 gradient
            t += grad_accumulation_time_s(batch * k * n, device=device, dtype=dtype)
        return t
    if fam == "attention" and len(input_shapes) >= 3 and len(input_shapes[0]) >= 3:
        q, kk = input_shapes[0], input_shapes[1]
        causal = bool(_arg(node, 5, False))
        dropout = float(_arg(node, 4, 0.0) or 0.0) > 0.0
        return attention_time_s(
            batch_heads=_numel(q[:-2]), q_len=int(q[-2]), kv_len=int(kk[-2]),
            head_dim=int(q[-1]), causal=causal, device=device, dtype=dtype, phase=phase,
            kernel=attention if attention in ATTENTION_KERNELS else "flash", dropout=dropout,
        )  # fmt: skip
    if fam == "conv" and len(input_shapes) >= 2 and output_shapes:
        w = input_shapes[1]
        out = output_shapes[0]
        m = int(out[0]) * _numel(out[2:])
        n, k = int(out[1]), _numel(w[1:])
        if phase == "fwd":
            return gemm_time_s(m=m, n=n, k=k, device=device, dtype=dtype)
        return gemm_time_s(m=m, n=k, k=n, device=device, dtype=dtype) + gemm_time_s(
            m=k, n=n, k=m, device=device, dtype=dtype
        )
    item_in = [_ITEM.get(m.dtype, m.itemsize) for m in node.input_metas]
    item_out = [_ITEM.get(m.dtype, m.itemsize) for m in node.outputs]
    out_bytes = sum(_numel(s) * i for s, i in zip(output_shapes, item_out))
    if fam == "embedding":
        # a lookup reads only the rows it returns (and the indices), writes its output
        idx = sum(_numel(s) * i for s, i in zip(input_shapes[1:], item_in[1:]))
        nbytes = 2.0 * out_bytes + idx
        if phase == "bwd":  # scatter-add into a zeroed table shard, then accumulated
            table = _numel(input_shapes[0]) if input_shapes else 0
            nbytes = 2.0 * out_bytes + table * item_in[0]
            accum = grad_accumulation_time_s(table, device=device, dtype=dtype)
            return accum + memory_bound_time_s(
                bytes_moved=nbytes, device=device, dtype=dtype, kind="elementwise"
            )
    else:
        in_bytes = sum(_numel(s) * i for s, i in zip(input_shapes, item_in))
        nbytes = float(in_bytes + out_bytes)
        if phase == "bwd":
            nbytes *= 2.0
    flops = (node.fwd_flops if phase == "fwd" else node.bwd_flops) / max(1, divisor)
    if nbytes <= 0 and flops <= 0:
        return 0.0
    return memory_bound_time_s(
        bytes_moved=nbytes,
        flops=flops,
        device=device,
        dtype=dtype,
        kind=_KIND.get(fam, "elementwise"),
    )


def grad_accumulation_time_s(numel: float, *, device: Any, dtype: str) -> float:
    """Extra time of accumulating a weight gradient of ``numel`` elements into the fp32
    gradient inside the weight-gradient GEMM's epilogue: ``GRAD_ACCUM_BYTES - item`` bytes per
    element more than writing it in ``dtype``, at streaming bandwidth, no kernel of its own."""
    extra = GRAD_ACCUM_BYTES - ITEM_BYTES.get(DTYPE_ALIASES.get(dtype, dtype), 4)
    if numel <= 0 or extra <= 0:
        return 0.0
    return memory_bound_time_s(
        bytes_moved=float(numel) * extra, device=device, dtype=dtype, kernels=0
    )


def _arg(node: Any, pos: int, default: object) -> object:
    if len(node.args) > pos:
        return node.args[pos]
    key = {4: "dropout_p", 5: "is_causal"}.get(pos)
    return dict(node.kwargs).get(key, default) if key else default
