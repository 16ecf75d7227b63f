"""Memory per device: model state, activations saved for backward, pipeline microbatches in flight.

* **Model state** (ZeRO, arXiv 1910.02054): mixed-precision Adam keeps 2 (16-bit weight) + 2
  (16-bit gradient) + 12 (fp32 master weight, momentum, variance) = 16 bytes per parameter;
  SGD keeps less (see ``autopar.config.OPTIMIZER_STATE_BYTES``). ZeRO-1 shards the optimizer
  state over the data-parallel group, ZeRO-2 also the gradients, ZeRO-3 also the weights.
* **Saved activations per op**: what autograd keeps for backward, by op family (a matmul keeps
  its activation inputs, softmax its output, dropout a 1-byte mask, a norm its input and
  statistics, GELU/SiLU their input...). Weights are model state, not activations: an input
  counts as an activation when its ``TensorMeta.batch_dim`` is set. Tensors saved by several
  ops (and views of them) are counted once by :func:`graph_saved_activation_bytes`. On a GPT
  layer these rules reproduce Korthikanti et al.'s 34·s·b·h + 5·a·s²·b bytes (tests pin it).
* **Per-layer formulas** of Korthikanti et al. (arXiv 2205.05198, Table 2) for checks and for
  quick estimates: none / tensor / tensor+sequence parallel, selective and full recompute.
* **Microbatches in flight** per pipeline stage for GPipe, 1F1B and interleaved 1F1B.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from autopar.config import DTYPE_BYTES, OPTIMIZER_STATE_BYTES
from autopar.errors import ConfigError

if TYPE_CHECKING:
    from autopar.graph.opgraph import OpGraph, OpNode

__all__ = [
    "ModelStateBytes",
    "model_state_breakdown",
    "model_state_bytes",
    "SavedTensor",
    "saved_tensors",
    "saved_activation_bytes",
    "graph_saved_activation_bytes",
    "transformer_layer_activation_bytes",
    "in_flight_microbatches",
    "ZERO_STAGES",
]

ZERO_STAGES = (0, 1, 2, 3)
RecomputeKind = Literal["none", "selective", "full"]


# --------------------------------------------------------------------------------------------
# model state
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class ModelStateBytes:
    """Bytes per device of weights, gradients and optimizer state (master weights included)."""

    weights: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def model_state_breakdown(
    *,
    num_params: float,
    dtype: str = "bf16",
    optimizer: str = "adam",
    zero_stage: int = 0,
    dp: int = 1,
    grad_dtype: str | None = None,
) -> ModelStateBytes:
    """Model state of ``num_params`` parameters held by one device (already divided by tp/pp),
    with ZeRO ``zero_stage`` sharding over a data-parallel group of ``dp`` devices; gradients
    in ``grad_dtype`` (default ``dtype``)."""
    grad_dtype = dtype if grad_dtype is None else grad_dtype
    for name, value in (("dtype", dtype), ("grad_dtype", grad_dtype)):
        if value not in DTYPE_BYTES:
            raise ConfigError(f"unknown {name} {value!r}", field=name, allowed=tuple(DTYPE_BYTES))
    mixed = dtype != "fp32"
    if (optimizer, mixed) not in OPTIMIZER_STATE_BYTES:
        allowed = sorted({o for o, _ in OPTIMIZER_STATE_BYTES})
        raise ConfigError(f"unknown optimizer {optimizer!r}", field="optimizer", allowed=allowed)
    if zero_stage not in ZERO_STAGES:
        raise ConfigError(
            f"unknown ZeRO stage {zero_stage!r}", field="zero_stage", allowed=ZERO_STAGES
        )
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise ConfigError(f"dp must be a positive integer, got {dp!r}", field="dp")
    if num_params < 0:
        raise ConfigError(f"num_params must be >= 0, got {num_params!r}", field="num_params")
    w = num_params * DTYPE_BYTES[dtype]
    g = num_params * DTYPE_BYTES[grad_dtype]
    o = num_params * OPTIMIZER_STATE_BYTES[(optimizer, mixed)]
    if zero_stage >= 1:
        o /= dp
    if zero_stage >= 2:
        g /= dp
    if zero_stage >= 3:
        w /= dp
    return ModelStateBytes(weights=w, grads=g, optimizer=o)


def model_state_bytes(
    *,
    num_params: float,
    dtype: str = "bf16",
    optimizer: str = "adam",
    zero_stage: int = 0,
    dp: int = 1,
) -> float:
    """Total of :func:`model_state_breakdown` (16 bytes/param for mixed-precision Adam, no ZeRO)."""
    return model_state_breakdown(
        num_params=num_params, dtype=dtype, optimizer=optimizer, zero_stage=zero_stage, dp=dp
    ).total


# --------------------------------------------------------------------------------------------
# saved activations per op
# --------------------------------------------------------------------------------------------
_MATMUL = frozenset({
    "mm", "bmm", "addmm", "matmul", "linear", "baddbmm", "addbmm", "einsum", "mv", "addmv",
    "dot", "_scaled_mm", "conv1d", "conv2d", "conv3d", "convolution", "_convolution",
})  # fmt: skip
_SOFTMAX = frozenset({"_softmax", "softmax", "log_softmax", "_log_softmax", "_safe_softmax"})
_DROPOUT = frozenset({"native_dropout", "dropout", "feature_dropout", "alpha_dropout"})
_NORM = frozenset({
    "native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm", "native_group_norm",
    "group_norm", "native_batch_norm", "_native_batch_norm_legit", "batch_norm",
    "_native_batch_norm_legit_no_training", "_fused_layer_norm",
})  # fmt: skip
_SAVE_INPUT = frozenset({"gelu", "silu", "mish", "softplus", "elu", "leaky_relu", "erf", "pow",
                         "log", "sin", "cos", "abs", "hardswish", "clamp", "clamp_min"})  # fmt: skip
_SAVE_OUTPUT = frozenset({"relu", "sigmoid", "tanh", "exp", "rsqrt", "sqrt", "reciprocal"})
_BINARY = frozenset({"mul", "div", "maximum", "minimum", "atan2"})
_ATTENTION = frozenset({
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
    "_efficient_attention_forward", "_scaled_dot_product_fused_attention_overrideable",
})  # fmt: skip
_MASKED = frozenset({"where", "masked_fill", "index_select", "gather", "embedding", "index"})
_LOSS = frozenset({"nll_loss_forward", "nll_loss", "nll_loss2d_forward", "cross_entropy_loss"})
#: ops whose backward needs nothing from the forward but shapes (views, adds, copies, creation)
_FREE = frozenset({
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze",
    "squeeze", "contiguous", "clone", "detach", "alias", "lift_fresh_copy", "_to_copy", "to",
    "add", "sub", "neg", "cat", "stack", "split", "split_with_sizes", "chunk", "slice", "select",
    "unbind", "narrow", "sum", "mean", "getitem", "zeros", "ones", "full", "arange", "empty",
    "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_empty",
    "new_full", "fill", "copy", "scalar_tensor", "sym_size", "expand_as", "view_as", "flatten",
    "unflatten", "_reshape_alias", "as_strided", "repeat", "tril", "triu", "rand", "randn",
    "bernoulli", "detach_", "unsafe_split", "_assert_tensor_metadata", "_log_softmax_backward_data",
    "pad", "constant_pad_nd", "roll", "flip", "one_hot", "eq", "ne", "lt", "le", "gt", "ge",
    "logical_not", "argmax", "max", "amax",
})  # fmt: skip
#: view-like ops: their output aliases their first input's storage
_VIEWS = frozenset({
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze",
    "squeeze", "alias", "detach", "slice", "select", "narrow", "expand_as", "view_as",
    "_reshape_alias", "as_strided", "unflatten", "flatten", "split", "split_with_sizes",
    "chunk", "unbind", "unsafe_split", "getitem",
})  # fmt: skip


@dataclass(frozen=True, slots=True)
class SavedTensor:
    """One tensor backward keeps: ``key`` identifies its storage (producer name or own output)."""

    key: str
    nbytes: float


def _base(op: str) -> str:
    parts = op.split(".")
    if len(parts) >= 2 and parts[0] in ("aten", "prims", "_ops", "torch"):
        return parts[1]
    return parts[0]


def _is_activation(node: OpNode, i: int) -> bool:
    meta = node.input_metas[i]
    if meta.batch_dim is not None:
        return True
    # Without batch information on any tensor of the node, treat inputs as activations unless
    # the node reads parameters (then its batch-free inputs are the weights).
    has_batch_info = any(m.batch_dim is not None for m in (*node.input_metas, *node.outputs))
    return not has_batch_info and not node.params


def _inputs(
    node: OpNode, idx: Iterable[int] | None = None, *, activations_only: bool = True
) -> list[SavedTensor]:
    out = []
    idx = range(len(node.input_metas)) if idx is None else idx
    for i in idx:
        if i >= len(node.input_metas):
            continue
        if activations_only and not _is_activation(node, i):
            continue
        key = node.inputs[i] if i < len(node.inputs) else f"{node.name}:in{i}"
        out.append(SavedTensor(key, float(node.input_metas[i].nbytes)))
    return out


def _outputs(node: OpNode, idx: Iterable[int]) -> list[SavedTensor]:
    return [
        SavedTensor(node.name if i == 0 else f"{node.name}:{i}", float(node.outputs[i].nbytes))
        for i in idx
        if i < len(node.outputs)
    ]


def saved_tensors(node: OpNode) -> tuple[SavedTensor, ...]:
    """Tensors ``node`` keeps alive for backward, with a storage key for de-duplication.

    Unknown ops keep all their activation inputs: an unknown thing is never priced at zero.
    """
    if node.kind != "op":
        return ()
    base = _base(node.op)
    if base.endswith("_") and base[:-1] in _FREE | _SAVE_INPUT | _SAVE_OUTPUT | _BINARY:
        base = base[:-1]  # in-place variants save what their out-of-place op saves
    if base in _FREE:
        return ()
    if base in _MATMUL:
        return tuple(_inputs(node))
    if base in _SOFTMAX or base in _SAVE_OUTPUT:
        return tuple(_outputs(node, [0]))
    if base in _DROPOUT:
        if len(node.outputs) >= 2:  # native_dropout -> (output, bool mask)
            return tuple(_outputs(node, [1]))
        out = node.outputs[0] if node.outputs else None
        return (SavedTensor(f"{node.name}:mask", float(out.numel if out else 0)),)
    if base in _NORM:
        return tuple(_inputs(node, [0]) + _outputs(node, range(1, len(node.outputs))))
    if base in _SAVE_INPUT:
        return tuple(_inputs(node, [0]))
    if base in _BINARY:
        tensor_inputs = len(node.input_metas)
        return tuple(_inputs(node)) if tensor_inputs >= 2 else ()
    if base in _ATTENTION:
        # q, k, v, the output and the log-sum-exp statistics; no s^2 matrix (fused kernel)
        return tuple(
            _inputs(node, range(min(3, len(node.input_metas))))
            + _outputs(node, range(min(2, len(node.outputs))))
        )
    if base in _MASKED:
        # the index / condition / mask operand, not the data
        return tuple(
            s
            for i, s in enumerate(_inputs(node, activations_only=False))
            if not node.input_metas[i].dtype.startswith(("float", "bfloat", "complex"))
        )
    if base in _LOSS:
        return tuple(_inputs(node, range(1, len(node.input_metas)), activations_only=False))
    return tuple(_inputs(node))


def saved_activation_bytes(node: OpNode) -> float:
    """Bytes ``node`` keeps for backward (see :func:`saved_tensors`); not de-duplicated across
    ops: sum over a graph with :func:`graph_saved_activation_bytes` instead."""
    return sum(s.nbytes for s in saved_tensors(node))


def graph_saved_activation_bytes(graph: OpGraph) -> float:
    """Bytes a (layer) graph keeps for backward, each storage counted once (views resolved)."""
    root: dict[str, str] = {}
    for node in graph:
        if node.kind == "op" and _base(node.op) in _VIEWS and node.inputs:
            root[node.name] = root.get(node.inputs[0], node.inputs[0])
    seen: dict[str, float] = {}
    for node in graph:
        for s in saved_tensors(node):
            key = root.get(s.key, s.key)
            seen[key] = max(seen.get(key, 0.0), s.nbytes)
    return sum(seen.values())


# --------------------------------------------------------------------------------------------
# Korthikanti per-layer formulas
# --------------------------------------------------------------------------------------------
def transformer_layer_activation_bytes(
    *,
    seq_len: int,
    micro_batch: int,
    hidden: int,
    heads: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute: RecomputeKind = "none",
) -> float:
    """Activation bytes of one GPT layer in 16-bit training (Korthikanti et al. 2205.05198).

    none: s·b·h·(34 + 5·a·s/h); tensor parallel: s·b·h·(10 + 24/t + 5·a·s/(h·t)); with sequence
    parallelism: s·b·h/t·(34 + 5·a·s/h); selective recompute drops the 5·a·s/h attention term;
    full recompute keeps only the layer input, 2·s·b·h (÷ t with sequence parallelism).
    """
    for name, v in (("seq_len", seq_len), ("micro_batch", micro_batch), ("hidden", hidden),
                    ("heads", heads), ("tp", tp)):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}", field=name)
    if recompute not in ("none", "selective", "full"):
        raise ConfigError(
            f"unknown recompute {recompute!r}",
            field="recompute",
            allowed=("none", "selective", "full"),
        )
    s, b, h, a, t = seq_len, micro_batch, hidden, heads, tp
    sbh = s * b * h
    attn = 0.0 if recompute == "selective" else 5.0 * a * s / h
    if recompute == "full":
        return 2.0 * sbh / (t if sequence_parallel else 1)
    if sequence_parallel:
        return sbh / t * (34.0 + attn)
    return sbh * (10.0 + 24.0 / t + attn / t)


# --------------------------------------------------------------------------------------------
# pipeline microbatches in flight
# --------------------------------------------------------------------------------------------
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def in_flight_microbatches(
    schedule: str, pp: int, stage: int, microbatches: int, virtual_stages: int = 1
) -> float:
    """Peak number of microbatches whose activations stage ``stage`` holds at once, in units of
    one microbatch through all of the stage's layers.

    GPipe runs every forward first: all ``microbatches``. 1F1B (PipeDream-Flush): stage i warms
    up with ``pp - i`` forwards before its first backward. Interleaved 1F1B with ``v`` chunks per
    device (Megatron-LM): ``2·(pp - i - 1) + (v - 1)·pp + 1`` chunk-microbatches of 1/v of the
    layers, which is ``pp·(1 + (pp-1)/(pp·v))`` for the first stage (Korthikanti et al.).
    """
    if schedule == "interleaved":
        schedule = "interleaved_1f1b"
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}", field="schedule", allowed=SCHEDULES)
    for name, v in (("pp", pp), ("microbatches", microbatches), ("virtual_stages", virtual_stages)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}", field=name)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < pp:
        raise ConfigError(f"stage must be in 0..{pp - 1}, got {stage!r}", field="stage")
    if schedule == "gpipe":
        return float(microbatches)
    if schedule == "1f1b" or virtual_stages == 1:
        return float(min(pp - stage, microbatches))
    v = virtual_stages
    chunks = 2 * (pp - stage - 1) + (v - 1) * pp + 1
    return min(chunks, microbatches * v) / v
