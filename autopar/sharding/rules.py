"""Sharding strategy rules: for each aten op, which ways of splitting it over a mesh are valid.

Every supported op is described once, by an einsum-like *dims* record (``OpDims``): a label per
dim of each input and output tensor. Splitting a label over a mesh axis then says everything:

* each tensor holding the label is ``Shard(position)`` on that axis, the others ``Replicate``;
* an output that lacks a split label is ``Partial`` when the label is a linear reduction (the
  ``k`` of a matmul, the vocabulary of an embedding, a summed dim), else ``Replicate``;
* per-device compute is divided by the axis size;
* backward: an input that lacks the label gets a partial gradient on every device, so it needs
  an all-reduce on that axis; for a parameter (or a view of one) that is the data-parallel
  gradient synchronisation, paid once per step (phase ``grad_sync``), for an activation it is
  paid every microbatch (phase ``bwd``, Megatron's ``f`` operator).

Non-linear reductions (softmax and norm dims, max, the head dim of attention, spatial dims of a
convolution) are simply not splittable. Rules describe collectives; ``cost/`` prices them.

Trivial ops (elementwise, views, norms, softmax, reductions) are marked ``follow=True``: the
problem builder gives them no decision of their own, they take their primary operand's sharding
(Alpa's s_follow) and fall back to ``Replicate`` on an axis where that sharding is invalid.

Why not reuse DTensor's registered strategies (``sharding_propagator.op_strategy_funcs``)? They
need a (fake) process group initialised as global state inside the planner process, import all of
torch.distributed on the planning path, enumerate only forward input/output specs (no compute
divisor, no backward or gradient-sync traffic) and are private API that changes between
releases. One label description per op family gives all three, in ~40 lines per family, and is
pinned against DTensor's own propagation (mm, bmm, add, gelu, softmax, t on a fake 4-rank
mesh) in ``tests/sharding/test_dtensor_agreement.py``.

Adding an op family: write ``_family(node) -> OpDims`` (labels per tensor dim, which labels may
split, which are linear reductions, whether it follows its operand), register its base aten
names in ``_build_rules``, and add a case to the DTensor agreement test when DTensor knows it.
An op without a rule is replicated, priced at full size and listed in ``unsupported_ops``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from autopar.graph.opgraph import OpNode, TensorMeta
from autopar.sharding.placements import (
    PARTIAL,
    REPLICATE,
    Partial,
    Shard,
    Spec,
    local_numel_fraction,
)

__all__ = [
    "Collective",
    "Strategy",
    "OpDims",
    "base_name",
    "op_dims",
    "enumerate_strategies",
    "follow_strategy",
    "replicate_strategy",
    "reshard",
    "tensor_strategies",
    "RULES",
]

Phase = Literal["fwd", "bwd", "grad_sync"]
CollectiveKind = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all"]


@dataclass(frozen=True, slots=True)
class Collective:
    """One collective a strategy or a resharding implies (described, not priced)."""

    kind: CollectiveKind
    nbytes: float
    """Full buffer per device, the cost model's convention (all-gather: gathered size;
    reduce-scatter: unreduced input; all-to-all: the local buffer)."""
    axis: int
    """Mesh axis index the collective runs over (all groups of that axis at once)."""
    phase: Phase
    """``fwd``/``bwd`` are paid every microbatch; ``grad_sync`` once per step."""
    operand: int = -1
    """For a partial-gradient all-reduce: the input whose gradient it sums. Several consumers
    of one tensor add their partial gradients locally first and share a single all-reduce."""


@dataclass(frozen=True, slots=True)
class Strategy:
    """One way to run an op on the mesh."""

    name: str
    """Short human form, e.g. ``"m@dp,n@tp"`` (label split over axis) or ``"R"``."""
    input_specs: tuple[Spec, ...]
    """One spec per tensor input, in ``OpNode.inputs`` order."""
    output_specs: tuple[Spec, ...]
    """One spec per output."""
    compute_divisor: int
    """The op's FLOPs and bytes are divided by this on each device."""
    collectives: tuple[Collective, ...] = ()
    """Communication the strategy itself implies (backward partial gradients, grad sync)."""


@dataclass(frozen=True, slots=True)
class OpDims:
    """Einsum-like description of an op: a label per tensor dim (None: never split)."""

    inputs: tuple[tuple[str | None, ...], ...]
    outputs: tuple[tuple[str | None, ...], ...]
    splittable: frozenset[str]
    reductions: frozenset[str] = frozenset()
    """Splittable labels absent from the outputs whose split leaves a Partial (linear) result."""
    partial_input: int | None = None
    """Index of the input the op is linear in (a Partial there passes through as Partial)."""
    follow: bool = False
    """Trivial op: follows its primary operand instead of being a decision."""
    primary: int = 0
    """Which input a follower follows."""
    bias_inputs: frozenset[int] = frozenset()
    """Inputs added onto the output (a bias): Partial, i.e. held by one rank, under a reduction split."""
    moves_bytes: bool = True
    """False for pure views (no memory traffic, no compute)."""
    exchange: tuple[str, int] | None = None
    """MoE dispatch/combine: splitting this label routes every token to the device that owns its
    expert row, an all-to-all (forward and backward) of the local bytes of tensor ``[1]``
    (an index into inputs + outputs)."""
    uneven: frozenset[int] = frozenset()
    """Tensors (index into inputs + outputs) allowed an uneven split (a trailing sentinel row)."""
    row_stats: frozenset[str] = frozenset()
    """Normalised labels that may still be split, at the price of all-reducing per-row statistics
    (a softmax over a split vocabulary: the row maximum and the sum of exponentials forward, one
    sum backward; Megatron's vocabulary-parallel cross-entropy)."""


# -- the registry ------------------------------------------------------------------------------
def base_name(op: str) -> str:
    """``"aten.mm.default"`` -> ``"mm"``; ``"_operator.getitem"`` -> ``"getitem"``."""
    parts = op.split(".")
    if parts[0] in ("aten", "prims", "torch", "ops") and len(parts) >= 2:
        return parts[1] if parts[0] != "ops" else parts[2]
    return parts[-1]


def _labels(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(n))


def _arg(node: OpNode, pos: int, default: object = None) -> object:
    return node.args[pos] if len(node.args) > pos else default


def _kwarg(node: OpNode, key: str, default: object = None) -> object:
    return dict(node.kwargs).get(key, default)


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _out_shape(node: OpNode, i: int = 0) -> tuple[int, ...]:
    return node.outputs[i].shape if len(node.outputs) > i else ()


def _broadcast_labels(
    shape: tuple[int, ...], out_labels: tuple[str | None, ...], out_shape: tuple[int, ...]
) -> tuple[str | None, ...]:
    """Right-aligned broadcasting: a dim keeps the output's label when sizes agree."""
    off = len(out_shape) - len(shape)
    res: list[str | None] = []
    for i, n in enumerate(shape):
        j = i + off
        res.append(out_labels[j] if 0 <= j < len(out_shape) and out_shape[j] == n else None)
    return tuple(res)


def _extra_outputs(node: OpNode, known: dict[tuple[int, ...], tuple[str | None, ...]]):
    """Labels for secondary outputs (statistics, masks) matched by shape, else unlabelled."""
    return tuple(known.get(t.shape, (None,) * len(t.shape)) for t in node.outputs)


def _elementwise(node: OpNode) -> OpDims:
    out = _out_shape(node)
    labels = _labels("d", len(out))
    ins = tuple(_broadcast_labels(m.shape, labels, out) for m in node.input_metas)
    name = base_name(node.op)
    linear = name in _LINEAR_UNARY or (name in ("mul", "div") and len(ins) >= 1)
    primary = _primary_full(node, out)
    return OpDims(
        inputs=ins,
        outputs=_extra_outputs(node, {out: labels}),
        splittable=frozenset(labels),
        partial_input=primary if linear and (name not in ("div",) or primary == 0) else None,
        follow=True,
        primary=primary,
        moves_bytes=name not in _METADATA_ONLY,
    )


def _primary_full(node: OpNode, out: tuple[int, ...]) -> int:
    """First input with the output's full shape (the operand a follower tracks)."""
    for i, m in enumerate(node.input_metas):
        if m.shape == out:
            return i
    best = max(range(len(node.input_metas)), key=lambda i: node.input_metas[i].numel, default=0)
    return best


def _matmul_like(a: tuple[int, ...], b: tuple[int, ...], out: tuple[int, ...]):
    """Labels for ``a[..., m, k] @ b[..., k, n] -> out[..., m, n]`` with broadcast batch dims."""
    nb = len(out) - 2
    batch = _labels("b", nb)
    out_l = (*batch, "m", "n")
    a_l = (*_broadcast_labels(a[:-2], batch, out[:-2]), "m", "k") if len(a) >= 2 else ("k",)
    b_l = (*_broadcast_labels(b[:-2], batch, out[:-2]), "k", "n") if len(b) >= 2 else ("k",)
    return a_l, b_l, out_l, frozenset((*batch, "m", "n", "k"))


def _mm(node: OpNode) -> OpDims | None:
    a, b = (m.shape for m in node.input_metas[:2])
    out = _out_shape(node)
    if len(a) < 2 or len(b) < 2 or len(out) < 2:
        return None  # vector products: leave to the replicate fallback
    a_l, b_l, out_l, split = _matmul_like(a, b, out)
    return OpDims(
        inputs=(a_l, b_l), outputs=(out_l,), splittable=split, reductions=frozenset({"k"})
    )


def _addmm(node: OpNode) -> OpDims:
    """addmm / baddbmm(bias, a, b): bias broadcast onto the product's output."""
    bias, a, b = (m.shape for m in node.input_metas[:3])
    out = _out_shape(node)
    a_l, b_l, out_l, split = _matmul_like(a, b, out)
    return OpDims(
        inputs=(_broadcast_labels(bias, out_l, out), a_l, b_l),
        outputs=(out_l,),
        splittable=split,
        reductions=frozenset({"k"}),
        bias_inputs=frozenset({0}),  # under a k-split the bias is added once, by one rank
    )


def _linear(node: OpNode) -> OpDims:
    x = node.input_metas[0].shape
    batch = _labels("b", len(x) - 1)
    ins = [(*batch, "k"), ("n", "k")]
    if len(node.input_metas) > 2:
        ins.append(("n",))
    return OpDims(
        inputs=tuple(ins),
        outputs=((*batch, "n"),),
        splittable=frozenset((*batch, "n", "k")),
        reductions=frozenset({"k"}),
        bias_inputs=frozenset({2}),
    )


def _embedding(node: OpNode) -> OpDims:
    """embedding(weight[V, H], idx[...]) -> [..., H]; a vocab split leaves a Partial (Megatron)."""
    idx = node.input_metas[1].shape
    batch = _labels("b", len(idx))
    return OpDims(
        inputs=(("v", "h"), batch),
        outputs=((*batch, "h"),),
        splittable=frozenset((*batch, "v", "h")),
        reductions=frozenset({"v"}),
    )


def _sdpa(node: OpNode) -> OpDims:
    """Attention q[b,h,sq,e], k/v[b,h,sk,e] -> out[b,h,sq,e]: split batch, heads or (not causal)
    queries."""
    metas = node.input_metas
    q = metas[0].shape
    lead = _labels("b", len(q) - 3)
    q_l = (*lead, "h", "sq", "e")
    # grouped-query attention: query head i reads key/value head i // (Hq / Hkv), so a split of
    # the query heads into contiguous groups matches the same split of the key/value heads
    kv = metas[1].shape[-3] if len(metas) > 1 and len(metas[1].shape) >= 3 else None
    kv_h = "h" if kv is not None and kv > 0 and q[-3] % kv == 0 else None
    k_l = (*lead, kv_h, "sk", "e")
    v_l = (*lead, kv_h, "sk", "ev")
    ins: list[tuple[str | None, ...]] = [q_l, k_l, v_l][: min(3, len(metas))]
    out = _out_shape(node)
    full = (*q[:-1], metas[2].shape[-1] if len(metas) > 2 else q[-1])
    mask_full = (*q[:-1], metas[1].shape[-2] if len(metas) > 1 else q[-2])
    for m in metas[3:]:  # attention mask / bias
        ins.append(_broadcast_labels(m.shape, (*lead, "h", "sq", "sk"), mask_full))
    out_labels = (*lead, "h", "sq", "ev")
    known = {full: out_labels, tuple(q[:-1]): (*lead, "h", "sq")}
    if out != full:
        known[out] = (None,) * len(out)
    causal = bool(_arg(node, 5, _kwarg(node, "is_causal", False)))
    # a causal mask is relative to each query's position: a device holding a slice of the
    # queries would need the offset of its slice, which the kernel does not take
    queries = () if causal else ("sq",)
    return OpDims(
        inputs=tuple(ins),
        outputs=_extra_outputs(node, known),
        splittable=frozenset((*lead, "h", *queries)),
    )


def _conv(node: OpNode) -> OpDims:
    """convolution(x[n,c,*sp], w[o,c/g,*k], bias[o]): split batch, out- or in-channels."""
    x = node.input_metas[0].shape
    sp = len(x) - 2
    groups = _arg(node, 8, 1)
    transposed = bool(_arg(node, 6, False))
    x_l = ("n", "c", *(None,) * sp)
    w_l = ("c", "o", *(None,) * sp) if transposed else ("o", "c", *(None,) * sp)
    ins = [x_l, w_l] + ([("o",)] if len(node.input_metas) > 2 else [])
    split = {"n", "o"}
    reds: set[str] = set()
    if groups in (1, None) and len(node.input_metas) <= 2:
        split.add("c")
        reds.add("c")
    return OpDims(
        inputs=tuple(ins),
        outputs=(("n", "o", *(None,) * sp),),
        splittable=frozenset(split),
        reductions=frozenset(reds),
    )


def _norm(node: OpNode, n_norm: int) -> OpDims:
    """Layer/RMS norm over the last ``n_norm`` dims: those dims are never split."""
    x = node.input_metas[0].shape
    labels = _labels("d", len(x))
    keep = labels[: len(x) - n_norm]
    ins = [labels[: len(x)]]
    for m in node.input_metas[1:]:
        ins.append(_broadcast_labels(m.shape, labels, x))
    stat = (*keep, *(None,) * n_norm)
    known = {tuple(x): labels}
    for t in node.outputs[1:]:
        if len(t.shape) == len(x):
            known.setdefault(t.shape, stat)
        elif len(t.shape) == len(keep):
            known.setdefault(t.shape, keep)
    return OpDims(
        inputs=tuple(ins),
        outputs=_extra_outputs(node, known),
        splittable=frozenset(keep),
        follow=True,
    )


def _layer_norm(node: OpNode) -> OpDims:
    shape = _arg(node, 1, None)
    n = len(shape) if isinstance(shape, (list, tuple)) else 1
    return _norm(node, n)


def _rms_norm(node: OpNode) -> OpDims:
    return _layer_norm(node)


def _softmax(node: OpNode) -> OpDims:
    """Softmax never splits its dim inside the model (DTensor would gather it); the training
    loss's log-softmax may, vocabulary-parallel, as ``loss_parallel`` runs it."""
    from autopar.graph.trace import LOSS_PATH

    x = node.input_metas[0].shape
    d = _norm_dim(int(_arg(node, 1, -1)), len(x))
    labels = _labels("d", len(x))
    vocab_parallel = node.module_path == LOSS_PATH
    return OpDims(
        inputs=(labels,),
        outputs=_extra_outputs(node, {tuple(x): labels}),
        splittable=frozenset(labels) if vocab_parallel else frozenset(labels) - {labels[d]},
        follow=True,
        row_stats=frozenset({labels[d]}) if vocab_parallel else frozenset(),
    )


def _gather(node: OpNode) -> OpDims:
    """gather(x, dim, index) -> out shaped like index. Splitting x's ``dim`` (a vocabulary) is
    a masked local gather whose results sum to the answer (Partial), as in Megatron's
    vocabulary-parallel cross-entropy; other dims split alike on x, index and out."""
    from autopar.graph.trace import LOSS_PATH

    x = node.input_metas[0].shape
    idx = node.input_metas[1].shape
    d = _norm_dim(int(_arg(node, 1, 0)), len(x))
    labels = _labels("d", len(x))
    # the masked gather is how loss_parallel runs the loss; inside the model DTensor would
    # gather the table instead, so there the gathered dim is never split
    vocab = "v" if node.module_path == LOSS_PATH else None
    x_l = tuple(vocab if i == d else labels[i] for i in range(len(x)))
    i_l = tuple(None if i == d or idx[i] != x[i] else labels[i] for i in range(len(idx)))
    return OpDims(
        inputs=(x_l, i_l),
        outputs=(i_l,),
        splittable=frozenset(lab for lab in x_l if lab is not None),
        reductions=frozenset({"v"}) if vocab else frozenset(),
    )


def _reduction(node: OpNode, *, linear: bool) -> OpDims:
    """sum/mean (linear: a split reduced dim leaves a Partial) and amax/max/var (not)."""
    x = node.input_metas[0].shape
    labels = _labels("d", len(x))
    dims = _arg(node, 1, None)
    if dims is None or dims == [] or dims == ():
        red = set(range(len(x)))
    elif isinstance(dims, int):
        red = {_norm_dim(dims, len(x))}
    else:
        red = {_norm_dim(int(d), len(x)) for d in dims}
    keepdim = bool(_arg(node, 2, _kwarg(node, "keepdim", False)))
    if base_name(node.op) in ("sum", "mean") and len(node.args) <= 1:
        keepdim = False
    if keepdim:
        out = tuple(None if i in red else labels[i] for i in range(len(x)))
    else:
        out = tuple(labels[i] for i in range(len(x)) if i not in red)
    red_l = {labels[i] for i in red}
    split = frozenset(labels) if linear else frozenset(labels) - red_l
    return OpDims(
        inputs=(labels,),
        outputs=tuple(
            out if len(t.shape) == len(out) else (None,) * len(t.shape) for t in node.outputs
        ),
        splittable=split,
        reductions=frozenset(red_l) if linear else frozenset(),
        partial_input=0 if linear else None,
        follow=True,
    )


def _view_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of dims with equal products, e.g. (b, s, h) -> (b*s, h): [([0,1],[0]), ([2],[1])]."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        gi, gj = [], []
        pi = pj = 1
        while True:
            if i < len(src) and (pi <= pj or j >= len(dst)) and (not gi or pi < pj or not gj):
                gi.append(i)
                pi *= src[i]
                i += 1
            elif j < len(dst):
                gj.append(j)
                pj *= dst[j]
                j += 1
            else:
                break
            if gi and gj and pi == pj:
                # absorb trailing size-1 dims so they never open a new group
                while i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
                    gi.append(i)
                    i += 1
                while j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
                    gj.append(j)
                    j += 1
                break
        if not gi and not gj:
            break
        groups.append((gi, gj))
    return groups


def _view(node: OpNode) -> OpDims:
    """view/reshape: a sharded dim survives when it leads its group of merged/split dims."""
    src = node.input_metas[0].shape
    dst = _out_shape(node)
    in_l: list[str | None] = [None] * len(src)
    out_l: list[str | None] = [None] * len(dst)
    split: set[str] = set()
    for g, (gi, gj) in enumerate(_view_groups(tuple(src), tuple(dst))):
        gi = [i for i in gi if src[i] != 1]
        gj = [j for j in gj if dst[j] != 1]
        if gi and gj:
            lab = f"g{g}"
            in_l[gi[0]] = lab
            out_l[gj[0]] = lab
            split.add(lab)
    return OpDims(
        inputs=(tuple(in_l),),
        outputs=(tuple(out_l),),
        splittable=frozenset(split),
        partial_input=0,
        follow=True,
        moves_bytes=False,
    )


def _permute_like(node: OpNode, perm: list[int]) -> OpDims:
    x = node.input_metas[0].shape
    labels = _labels("d", len(x))
    return OpDims(
        inputs=(labels,),
        outputs=(tuple(labels[p] for p in perm),),
        splittable=frozenset(labels),
        partial_input=0,
        follow=True,
        moves_bytes=False,
    )


def _transpose(node: OpNode) -> OpDims:
    n = len(node.input_metas[0].shape)
    perm = list(range(n))
    if base_name(node.op) in ("t", "numpy_T") or n < 2:
        perm = perm[::-1]
    else:
        a, b = (_norm_dim(int(_arg(node, k, 0)), n) for k in (1, 2))
        perm[a], perm[b] = perm[b], perm[a]
    return _permute_like(node, perm)


def _permute(node: OpNode) -> OpDims:
    n = len(node.input_metas[0].shape)
    return _permute_like(node, [_norm_dim(int(d), n) for d in _arg(node, 1, range(n))])


def _same_rank_map(node: OpNode) -> OpDims:
    """unsqueeze / squeeze / expand: match dims right-aligned by size, then left-over by order."""
    x = node.input_metas[0].shape
    out = _out_shape(node)
    labels = _labels("d", len(x))
    out_l: list[str | None] = [None] * len(out)
    in_l: list[str | None] = [None] * len(x)
    j = 0
    for i, n in enumerate(x):
        if n == 1:
            continue
        while j < len(out) and out[j] != n:
            j += 1
        if j < len(out):
            in_l[i] = labels[i]
            out_l[j] = labels[i]
            j += 1
    return OpDims(
        inputs=(tuple(in_l),),
        outputs=(tuple(out_l),),
        splittable=frozenset(x for x in in_l if x),
        partial_input=0,
        follow=True,
        moves_bytes=False,
    )


def _along_dim(node: OpNode, dim_pos: int, *, keeps_dim: bool, views: bool) -> OpDims:
    """slice / select / split / chunk / narrow / unbind: the cut dim is never split."""
    x = node.input_metas[0].shape
    d = _norm_dim(int(_arg(node, dim_pos, _kwarg(node, "dim", 0)) or 0), len(x))
    labels = _labels("d", len(x))
    # a prefix slice dropping a sentinel tail keeps a split of the cut dim (uneven input)
    prefix = base_name(node.op) == "slice" and (_arg(node, 2, 0) in (0, None))
    out = tuple(None if i == d and not prefix else labels[i] for i in range(len(x)))
    if not keeps_dim:
        out = tuple(lab for i, lab in enumerate(labels) if i != d)
    return OpDims(
        inputs=(labels,),
        outputs=tuple(
            out if len(t.shape) == len(out) else (None,) * len(t.shape) for t in node.outputs
        ),
        splittable=frozenset(labels) - (set() if prefix else {labels[d]}),
        partial_input=0,
        follow=True,
        moves_bytes=not views,
        uneven=frozenset({0}) if prefix else frozenset(),
    )


def _cat(node: OpNode) -> OpDims:
    """cat along d: d is never split, unless all but one input are a sliver along d (a sentinel
    row appended to a sharded buffer keeps the buffer's split, unevenly)."""
    out = _out_shape(node)
    labels = _labels("d", len(out))
    d = _norm_dim(int(_arg(node, 1, _kwarg(node, "dim", 0)) or 0), len(out))
    primary = _primary_full(node, ())
    sizes = [m.shape[d] if len(m.shape) > d else 0 for m in node.input_metas]
    sliver = len(sizes) > 1 and sum(sizes) - sizes[primary] <= sizes[primary] // 64
    in_l = tuple(
        labels if (i == primary and sliver) else labels[:d] + (None,) + labels[d + 1 :]
        for i in range(len(node.input_metas))
    )
    return OpDims(
        inputs=tuple(il[: len(m.shape)] for il, m in zip(in_l, node.input_metas)),
        outputs=(tuple(None if i == d and not sliver else labels[i] for i in range(len(out))),),
        splittable=frozenset(labels) - (set() if sliver else {labels[d]}),
        follow=True,
        primary=primary,
        uneven=frozenset({len(node.input_metas)}) if sliver else frozenset(),
    )


def _dispatch(node: OpNode) -> OpDims:
    """MoE dispatch ``index_put(buf[N, ...], [slot[T]], tokens[T, ...], accumulate)``.

    Splitting ``x`` over an axis means tokens arrive split over it and the buffer leaves split by
    expert rows over it: an all-to-all sends each token to its expert's device. Feature dims
    split freely. Other layouts replicate (the gather is priced by the edges).
    """
    buf, slot, tok = (m.shape for m in node.input_metas[:3])
    feat = _labels("f", len(buf) - 1)
    return OpDims(
        inputs=(("x", *feat), ("x",), ("x", *feat[: len(tok) - 1])),
        outputs=(("x", *feat),),
        splittable=frozenset(("x", *feat)),
        exchange=("x", 2),
        uneven=frozenset({0, 3}),
    )


def _combine(node: OpNode) -> OpDims | None:
    """MoE combine ``index_select(buf[N, ...], 0, slot[T])``: the reverse all-to-all."""
    buf = node.input_metas[0].shape
    if int(_arg(node, 1, 0) or 0) != 0:
        return None
    feat = _labels("f", len(buf) - 1)
    return OpDims(
        inputs=(("x", *feat), ("x",)),
        outputs=(("x", *feat),),
        splittable=frozenset(("x", *feat)),
        exchange=("x", 2),
        uneven=frozenset({0}),
    )


def _topk(node: OpNode) -> OpDims:
    x = node.input_metas[0].shape
    d = _norm_dim(int(_arg(node, 2, _kwarg(node, "dim", -1))), len(x))
    labels = _labels("d", len(x))
    out = tuple(None if i == d else labels[i] for i in range(len(x)))
    return OpDims(
        inputs=(labels,),
        outputs=tuple(out for _ in node.outputs),
        splittable=frozenset(labels) - {labels[d]},
        follow=True,
    )


def _scan(node: OpNode) -> OpDims:
    """cumsum / cumprod along a dim: that dim is never split."""
    x = node.input_metas[0].shape
    d = _norm_dim(int(_arg(node, 1, _kwarg(node, "dim", 0))), len(x))
    labels = _labels("d", len(x))
    return OpDims(
        inputs=(labels,),
        outputs=(labels,),
        splittable=frozenset(labels) - {labels[d]},
        follow=True,
    )


def _repeat(node: OpNode) -> OpDims:
    """repeat: dims repeated more than once lose their split."""
    x = node.input_metas[0].shape
    out = _out_shape(node)
    reps = list(_arg(node, 1, ()))
    off = len(out) - len(x)
    labels = _labels("d", len(x))
    out_l: list[str | None] = [None] * len(out)
    keep = set()
    for i in range(len(x)):
        if off + i < len(reps) and reps[off + i] == 1:
            out_l[off + i] = labels[i]
            keep.add(labels[i])
    return OpDims(
        inputs=(labels,),
        outputs=(tuple(out_l),),
        splittable=frozenset(keep),
        follow=True,
    )


def _getitem(node: OpNode) -> OpDims:
    x = node.input_metas[0].shape if node.input_metas else _out_shape(node)
    labels = _labels("d", len(x))
    return OpDims(
        inputs=(labels,),
        outputs=(labels,),
        splittable=frozenset(labels),
        partial_input=0,
        follow=True,
        moves_bytes=False,
    )


def _creation(node: OpNode) -> OpDims:
    """arange / zeros / full...: no tensor inputs, computed identically on every device."""
    return OpDims(
        inputs=(),
        outputs=tuple((None,) * len(t.shape) for t in node.outputs),
        splittable=frozenset(),
    )


_METADATA_ONLY = frozenset({"alias", "detach"})
"""Elementwise-shaped ops that return a view: no kernel, no memory traffic."""
_LINEAR_UNARY = frozenset(
    {"clone", "_to_copy", "to", "contiguous", "neg", "alias", "detach", "copy", "lift_fresh_copy",
     "type_as", "_unsafe_view", "view", "reshape"}
)  # fmt: skip
_ELEMENTWISE = (
    "add sub rsub mul div true_divide gelu silu relu relu_ tanh sigmoid exp log log1p pow rsqrt "
    "sqrt neg abs where masked_fill clone _to_copy to contiguous dropout native_dropout maximum "
    "minimum clamp clamp_min clamp_max erf sin cos reciprocal zeros_like ones_like full_like "
    "empty_like rand_like detach alias lift_fresh_copy copy copy_ type_as bitwise_not eq ne lt gt "
    "le ge logical_and logical_or logical_not sign square mish hardtanh leaky_relu elu softplus "
    "fill fill_ add_ mul_ div_ logical_xor bernoulli lerp addcmul addcdiv"
).split()


def _tril(node: OpNode) -> OpDims:
    d = _elementwise(node)
    n = len(_out_shape(node))
    return OpDims(
        inputs=d.inputs,
        outputs=d.outputs,
        splittable=d.splittable - {f"d{n - 1}", f"d{n - 2}"},
        follow=True,
    )


def _build_rules() -> Mapping[str, Callable[[OpNode], OpDims | None]]:
    rules: dict[str, Callable[[OpNode], OpDims | None]] = {n: _elementwise for n in _ELEMENTWISE}
    rules.update(
        mm=_mm,
        bmm=_mm,
        matmul=_mm,
        addmm=_addmm,
        baddbmm=_addmm,
        linear=_linear,
        embedding=_embedding,
        scaled_dot_product_attention=_sdpa,
        _scaled_dot_product_flash_attention=_sdpa,
        _scaled_dot_product_flash_attention_for_cpu=_sdpa,
        _scaled_dot_product_efficient_attention=_sdpa,
        _scaled_dot_product_cudnn_attention=_sdpa,
        _scaled_dot_product_attention_math=_sdpa,
        convolution=_conv,
        conv2d=_conv,
        conv1d=_conv,
        native_layer_norm=_layer_norm,
        layer_norm=_layer_norm,
        rms_norm=_rms_norm,
        _fused_rms_norm=_rms_norm,
        _softmax=_softmax,
        softmax=_softmax,
        _log_softmax=_softmax,
        log_softmax=_softmax,
        sum=lambda n: _reduction(n, linear=True),
        mean=lambda n: _reduction(n, linear=True),
        amax=lambda n: _reduction(n, linear=False),
        amin=lambda n: _reduction(n, linear=False),
        max=lambda n: _reduction(n, linear=False),
        var=lambda n: _reduction(n, linear=False),
        var_mean=lambda n: _reduction(n, linear=False),
        view=_view,
        _unsafe_view=_view,
        reshape=_view,
        flatten=_view,
        unflatten=_view,
        t=_transpose,
        transpose=_transpose,
        permute=_permute,
        unsqueeze=_same_rank_map,
        squeeze=_same_rank_map,
        expand=_same_rank_map,
        slice=lambda n: _along_dim(n, 1, keeps_dim=True, views=True),
        narrow=lambda n: _along_dim(n, 1, keeps_dim=True, views=True),
        select=lambda n: _along_dim(n, 1, keeps_dim=False, views=True),
        split=lambda n: _along_dim(n, 2, keeps_dim=True, views=True),
        split_with_sizes=lambda n: _along_dim(n, 2, keeps_dim=True, views=True),
        chunk=lambda n: _along_dim(n, 2, keeps_dim=True, views=True),
        unbind=lambda n: _along_dim(n, 1, keeps_dim=False, views=True),
        cat=_cat,
        getitem=_getitem,
        index_put=_dispatch,
        index_put_=_dispatch,
        index_select=_combine,
        topk=_topk,
        gather=_gather,
        cumsum=_scan,
        cumprod=_scan,
        repeat=_repeat,
        tril=_tril,
        triu=_tril,
        arange=_creation,
        zeros=_creation,
        ones=_creation,
        full=_creation,
        empty=_creation,
        scalar_tensor=_creation,
        empty_strided=_creation,
        empty_permuted=_creation,
    )
    return MappingProxyType(rules)


RULES: Mapping[str, Callable[[OpNode], OpDims | None]] = _build_rules()
"""Base op name -> dims rule (read-only; add a family by adding a function and an entry)."""


def op_dims(node: OpNode) -> OpDims | None:
    """The op's dims record, or None when no rule knows it (the caller replicates and reports)."""
    name = base_name(node.op)
    rule = RULES.get(name)
    if rule is None and name.endswith("_") and not name.startswith("_"):
        rule = RULES.get(name[:-1])  # an in-place variant (sigmoid_, tanh_) splits like its op
    if rule is None:
        return None
    try:
        dims = rule(node)
    except (IndexError, TypeError, ValueError):
        return None  # unexpected argument layout: treated as unknown, reported by name
    if dims is None:
        return None
    if len(dims.inputs) != len(node.input_metas) or len(dims.outputs) != len(node.outputs):
        return None
    return dims


# -- strategies from label choices --------------------------------------------------------------
Choice = tuple[str | None, ...]
"""Per mesh axis: the label split over it, ``"*P"`` for a Partial pass-through, or None."""


def _spec_for(
    labels: tuple[str | None, ...], choice: Choice, *, partial: bool, reds: frozenset[str]
) -> Spec:
    out = []
    for lab in choice:
        if lab == "*P":
            out.append(PARTIAL if partial else REPLICATE)
        elif lab is not None and lab in labels:
            out.append(Shard(labels.index(lab)))
        elif lab is not None and lab in reds:
            out.append(PARTIAL)
        else:
            out.append(REPLICATE)
    return tuple(out)


def _divisible(
    dims: OpDims, choice: Choice, metas: tuple[TensorMeta, ...], mesh_shape: tuple[int, ...]
) -> bool:
    labs = dims.inputs + dims.outputs
    for lab in set(c for c in choice if c not in (None, "*P")):
        n = 1
        for c, size in zip(choice, mesh_shape):
            if c == lab:
                n *= size
        for t, (ls, m) in enumerate(zip(labs, metas)):
            if t in dims.uneven:
                continue
            for pos, x in enumerate(ls):
                if x == lab and m.shape[pos] % n:
                    return False
    return True


def build_strategy(
    dims: OpDims,
    choice: Choice,
    *,
    input_metas: tuple[TensorMeta, ...],
    mesh_shape: tuple[int, ...],
    grad_inputs: tuple[bool, ...],
    param_inputs: tuple[bool, ...],
    axis_names: tuple[str, ...] = (),
    output_metas: tuple[TensorMeta, ...] = (),
) -> Strategy:
    """The strategy that splits ``choice[a]`` over mesh axis ``a`` (see module docstring)."""
    in_specs = tuple(
        _spec_for(
            ls,
            choice,
            partial=(i == dims.partial_input),
            reds=dims.reductions if i in dims.bias_inputs else frozenset(),
        )
        for i, ls in enumerate(dims.inputs)
    )
    out_specs = tuple(
        _spec_for(ls, choice, partial=True, reds=dims.reductions) for ls in dims.outputs
    )
    divisor = 1
    colls: list[Collective] = []
    for a, (lab, size) in enumerate(zip(choice, mesh_shape)):
        if lab is None or lab == "*P":
            continue
        divisor *= size
        if dims.exchange is not None and lab == dims.exchange[0]:
            t = dims.exchange[1]
            metas = tuple(input_metas) + tuple(output_metas)
            specs = in_specs + out_specs
            nbytes = metas[t].nbytes * local_numel_fraction(specs[t], mesh_shape)
            colls.append(Collective("all_to_all", nbytes, a, "fwd"))
            colls.append(Collective("all_to_all", nbytes, a, "bwd"))
        if lab in dims.row_stats and output_metas:
            pos = dims.outputs[0].index(lab) if lab in dims.outputs[0] else -1
            full = output_metas[0]
            rows = full.numel // max(1, full.shape[pos]) if pos >= 0 else full.numel
            # fp32 statistics of the rows this device holds (other axes may split the rows)
            stat = 4.0 * rows * local_numel_fraction(out_specs[0], mesh_shape, skip_axis=a)
            colls.append(Collective("all_reduce", stat, a, "fwd"))  # row maximum
            colls.append(Collective("all_reduce", stat, a, "fwd"))  # sum of exponentials
            colls.append(Collective("all_reduce", stat, a, "bwd"))  # sum of grad x softmax
        if lab in dims.reductions:
            continue  # output is Partial: its gradient arrives whole, inputs' grads are not partial
        for i, (ls, meta) in enumerate(zip(dims.inputs, input_metas)):
            if lab in ls or not grad_inputs[i]:
                continue
            nbytes = meta.nbytes * local_numel_fraction(in_specs[i], mesh_shape, skip_axis=a)
            phase: Phase = "grad_sync" if param_inputs[i] else "bwd"
            colls.append(Collective("all_reduce", nbytes, a, phase, i))
    names = axis_names or tuple(str(a) for a in range(len(mesh_shape)))
    name = ",".join(f"{lab}@{n}" for lab, n in zip(choice, names) if lab is not None) or "R"
    return Strategy(name, in_specs, out_specs, divisor, tuple(colls))


def enumerate_strategies(
    dims: OpDims,
    *,
    input_metas: tuple[TensorMeta, ...],
    output_metas: tuple[TensorMeta, ...],
    mesh_shape: tuple[int, ...],
    grad_inputs: tuple[bool, ...],
    param_inputs: tuple[bool, ...],
    axis_names: tuple[str, ...] = (),
) -> list[Strategy]:
    """Every valid assignment of one splittable label (or none) to each mesh axis."""
    options = [None, *sorted(dims.splittable)]
    metas = tuple(input_metas) + tuple(output_metas)
    res = []
    for choice in itertools.product(options, repeat=len(mesh_shape)):
        if any(c is not None and size == 1 for c, size in zip(choice, mesh_shape)):
            continue  # splitting over a size-1 axis is the same strategy as not splitting
        if not _divisible(dims, choice, metas, mesh_shape):
            continue
        res.append(
            build_strategy(
                dims,
                choice,
                output_metas=output_metas,
                input_metas=input_metas,
                mesh_shape=mesh_shape,
                grad_inputs=grad_inputs,
                param_inputs=param_inputs,
                axis_names=axis_names,
            )
        )
    return res


def follow_strategy(
    dims: OpDims,
    primary_spec: Spec,
    *,
    input_metas: tuple[TensorMeta, ...],
    output_metas: tuple[TensorMeta, ...],
    mesh_shape: tuple[int, ...],
    grad_inputs: tuple[bool, ...],
    param_inputs: tuple[bool, ...],
    axis_names: tuple[str, ...] = (),
) -> Strategy:
    """The strategy a trivial op takes when its primary operand arrives as ``primary_spec``.

    Where the operand's placement cannot be kept (a split of a normalised dim, a Partial into a
    non-linear op) that axis falls back to Replicate; the edge cost then prices the gather.
    """
    labels = dims.inputs[dims.primary]
    metas = tuple(input_metas) + tuple(output_metas)
    choice: list[str | None] = []
    for p in primary_spec:
        lab: str | None = None
        if isinstance(p, Shard) and p.dim < len(labels):
            cand = labels[p.dim]
            if cand is not None and cand in dims.splittable:
                lab = cand
        elif isinstance(p, Partial) and dims.partial_input == dims.primary:
            lab = "*P"
        choice.append(lab)
        if lab not in (None, "*P") and not _divisible(
            dims, tuple(choice) + (None,) * (len(mesh_shape) - len(choice)), metas, mesh_shape
        ):
            choice[-1] = None
    return build_strategy(
        dims,
        tuple(choice),
        output_metas=output_metas,
        input_metas=input_metas,
        mesh_shape=mesh_shape,
        grad_inputs=grad_inputs,
        param_inputs=param_inputs,
        axis_names=axis_names,
    )


def replicate_strategy(n_inputs: int, n_outputs: int, ndim_mesh: int) -> Strategy:
    """The conservative strategy of an unknown op: everything whole on every device."""
    rep = (REPLICATE,) * ndim_mesh
    return Strategy("R", (rep,) * n_inputs, (rep,) * n_outputs, 1, ())


def tensor_strategies(
    meta: TensorMeta, mesh_shape: tuple[int, ...], *, max_shard_dims: int | None = None
) -> list[Spec]:
    """Storage layouts of a parameter or graph input: Replicate or Shard(d) on each axis."""
    dims = list(range(len(meta.shape)))[:max_shard_dims]
    res = []
    for combo in itertools.product([None, *dims], repeat=len(mesh_shape)):
        if any(c is not None and size == 1 for c, size in zip(combo, mesh_shape)):
            continue
        ok = True
        for d in set(c for c in combo if c is not None):
            n = 1
            for c, size in zip(combo, mesh_shape):
                if c == d:
                    n *= size
            ok &= meta.shape[d] % n == 0
        if ok:
            res.append(tuple(REPLICATE if c is None else Shard(c) for c in combo))
    return res


# -- resharding ---------------------------------------------------------------------------------
def reshard(
    src: Spec, dst: Spec, meta: TensorMeta, mesh_shape: tuple[int, ...], *, requires_grad: bool
) -> tuple[Collective, ...]:
    """Collectives turning layout ``src`` into ``dst``, forward and their backward duals.

    Axis by axis: P->R all-reduce (backward: nothing, the gradient is already replicated);
    P->S reduce-scatter (backward all-gather); S->R all-gather (backward: a local slice); S(d)->S(e)
    all-to-all (both ways); R->S a local slice (backward all-gather, because the producer ran
    replicated and needs the whole gradient). No gradient, no backward duals.
    """
    colls: list[Collective] = []
    cur = list(src)
    for a, (s, d) in enumerate(zip(src, dst)):
        if s == d:
            continue
        buf = meta.nbytes * local_numel_fraction(tuple(cur), mesh_shape, skip_axis=a)
        local = buf / mesh_shape[a]
        if isinstance(s, Partial):
            if isinstance(d, Shard):
                colls.append(Collective("reduce_scatter", buf, a, "fwd"))
                if requires_grad:
                    colls.append(Collective("all_gather", buf, a, "bwd"))
            else:
                colls.append(Collective("all_reduce", buf, a, "fwd"))
        elif isinstance(s, Shard):
            if isinstance(d, Shard):
                colls.append(Collective("all_to_all", local, a, "fwd"))
                if requires_grad:
                    colls.append(Collective("all_to_all", local, a, "bwd"))
            else:  # to R (or P: a replicated value is a valid partial after a local zeroing)
                colls.append(Collective("all_gather", buf, a, "fwd"))
        else:  # R -> S or R -> P: local, free forward
            if isinstance(d, Shard) and requires_grad:
                colls.append(Collective("all_gather", buf, a, "bwd"))
        cur[a] = d
    return tuple(colls)
