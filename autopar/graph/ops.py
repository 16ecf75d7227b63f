"""One op-family table: what each aten op is, shared by sharding rules, memory and pricing.

Families are decided by the aten op alone (never by module or parameter names):

* ``matmul``: tensor-core GEMMs (``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``matmul``, ``linear``);
* ``attention``: fused scaled-dot-product attention (kept as one node by the tracer);
* ``softmax``: softmax / log-softmax along a dim;
* ``norm``: layer / RMS norm;
* ``embedding``: table lookups (``embedding``, ``index_select``, ``gather``);
* ``conv``: convolutions;
* ``view``: metadata-only ops (no kernel, no memory traffic);
* ``creation``: ops with no tensor inputs (``arange``, ``zeros``, ``full``...);
* ``reduction``: sums, means, maxima;
* ``elementwise``: everything pointwise (memory-bound).

Unknown ops return None: the caller replicates them and reports them by name.
"""

from __future__ import annotations

__all__ = [
    "base_name",
    "family",
    "MATMUL_OPS",
    "ATTENTION_OPS",
    "SOFTMAX_OPS",
    "VIEW_OPS",
    "LOOKUP_OPS",
    "COPY_OPS",
    "is_copy_or_view",
]


def base_name(op: str) -> str:
    """``"aten.mm.default"`` -> ``"mm"``; ``"_operator.getitem"`` -> ``"getitem"``."""
    parts = op.split(".")
    if parts[0] in ("aten", "prims", "torch", "ops") and len(parts) >= 2:
        return parts[1] if parts[0] != "ops" else parts[2]
    return parts[-1]


MATMUL_OPS = frozenset({"mm", "bmm", "addmm", "baddbmm", "matmul", "linear"})
ATTENTION_OPS = frozenset(
    {
        "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
        "_flash_attention_forward", "_efficient_attention_forward",
    }
)  # fmt: skip
SOFTMAX_OPS = frozenset({"_softmax", "softmax", "_log_softmax", "log_softmax"})
NORM_OPS = frozenset({"native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm"})
LOOKUP_OPS = frozenset({"embedding", "index_select", "gather"})
CONV_OPS = frozenset({"convolution", "conv2d", "conv1d", "conv3d"})
VIEW_OPS = frozenset(
    {
        "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze",
        "squeeze", "slice", "select", "alias", "split", "split_with_sizes", "detach",
        "as_strided", "unbind", "chunk", "narrow", "view_as", "expand_as", "getitem",
        "flatten", "unflatten", "_reshape_alias",
    }
)  # fmt: skip
"""Pure views: their output is their first input's storage (no kernel, nothing stored twice)."""
CREATION_OPS = frozenset(
    {
        "arange",
        "zeros",
        "ones",
        "full",
        "empty",
        "scalar_tensor",
        "empty_strided",
        "empty_permuted",
        "randn",
        "rand",
    }
)
REDUCTION_OPS = frozenset({"sum", "mean", "amax", "amin", "max", "min", "var", "var_mean"})

_FAMILIES = (
    ("matmul", MATMUL_OPS),
    ("attention", ATTENTION_OPS),
    ("softmax", SOFTMAX_OPS),
    ("norm", NORM_OPS),
    ("embedding", LOOKUP_OPS),
    ("conv", CONV_OPS),
    ("view", VIEW_OPS),
    ("creation", CREATION_OPS),
    ("reduction", REDUCTION_OPS),
)


COPY_OPS = frozenset({"clone", "contiguous", "_to_copy", "copy", "lift_fresh_copy"})
"""Ops that copy a tensor unchanged (a trace at another batch size may add or drop one)."""


def is_copy_or_view(op: str) -> bool:
    """Does the op leave values unchanged (a view, or a plain copy)?"""
    name = base_name(op)
    return name in VIEW_OPS or name in COPY_OPS


def family(op: str) -> str:
    """The family of an aten op name (``"aten.bmm.default"`` -> ``"matmul"``); anything else is
    ``"elementwise"`` (priced as a memory-bound kernel)."""
    name = base_name(op)
    for fam, names in _FAMILIES:
        if name in names:
            return fam
    return "elementwise"
