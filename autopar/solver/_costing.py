"""Per-layer prices for the outer search: one ``LayerCost`` per (layer, dp, tp, micro-batch size).

Two ways to fill a LayerCost, both from the traced layer graph:

* ``ilp_layer_cost``: the intra-op ILP (``autopar.sharding.layer_plan.solve_layer``) chooses
  every op's sharding on the stage mesh (dp, tp) and prices compute, tensor-parallel
  communication, gradient synchronisation and saved activations. Used for the plan the search
  returns and its close runners-up.
* ``analytic_layer_cost``: the Megatron-LM split written down directly (column-parallel
  q/k/v/up/gate, row-parallel o/down, vocabulary-parallel embedding and logits; norms and
  residuals replicated, or sharded over the sequence when sequence parallelism is on), priced
  op by op with the same cost functions (``compute_time_s``, ``mesh_collective_time_s``,
  ``saved_activation_bytes``). No solver call, so every candidate of a large search can be
  priced in microseconds; the ILP then refines the best shapes. The benchmark that prices
  Megatron's published configurations uses it on purpose: the split is fixed there, so an ILP
  would only rediscover it.

Everything is per device and per microbatch unless the name says ``per step``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from autopar.config import DTYPE_BYTES

__all__ = [
    "LayerCost",
    "analytic_layer_cost",
    "ilp_layer_cost",
    "in_training_dtype",
    "layer_kind",
    "MATMUL_OPS",
]

MATMUL_OPS = frozenset(
    {
        "aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default",
        "aten.matmul.default", "aten.linear.default",
        "aten._scaled_dot_product_flash_attention.default",
        "aten._scaled_dot_product_efficient_attention.default",
        "aten._scaled_dot_product_cudnn_attention.default",
        "aten.scaled_dot_product_attention.default",
        "aten._scaled_dot_product_flash_attention_for_cpu.default",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerCost:
    """What one layer costs on one device of a (dp, tp) stage mesh, per microbatch."""

    name: str
    fwd_s: float
    """Forward compute time."""
    bwd_s: float
    """Backward compute time (input and weight gradients)."""
    tp_fwd_s: float
    """Tensor-parallel communication on the forward critical path."""
    tp_bwd_s: float
    """Tensor-parallel communication on the backward critical path."""
    grad_sync_s: float
    """All-reduce of this layer's gradients over the dp axis, once per step (ZeRO 0-2)."""
    zero3_gather_s: float
    """All-gather of this layer's 16-bit weights over dp, one pass (ZeRO-3 pays it per use)."""
    zero3_reduce_s: float
    """Reduce-scatter of this layer's gradients over dp, once per microbatch under ZeRO-3."""
    params_per_device: float
    """Parameters held per device after the tensor-parallel split (before ZeRO)."""
    act_bytes: float
    """Activations saved for backward (no recompute)."""
    input_bytes: float
    """The layer input, all that full recompute keeps."""
    output_bytes: float
    """Activation sent to the next pipeline stage if a boundary follows this layer."""
    core_fwd_s: float = 0.0
    """Forward time of the attention core (softmax, dropout, score matmuls): selective recompute."""
    core_act_bytes: float = 0.0
    """Activations the attention core saves, dropped by selective recompute."""
    fwd_flops: float = 0.0
    """Model FLOPs of this layer per microbatch per device (forward)."""
    bwd_flops: float = 0.0
    placements: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Per-parameter placements (one string per stage mesh axis: dp, tp), keyed by the FQNs of
    the layer that was priced (``param_names``); the search renames them per real layer."""
    param_names: tuple[str, ...] = ()
    """Parameter FQNs of the priced (representative) layer, in the layer's order."""
    source: str = "analytic"
    status: str = "analytic"
    gap: float = 0.0

    def latency_s(self, recompute: str) -> float:
        """fwd + bwd + exposed tensor-parallel comm + what ``recompute`` re-runs."""
        return self.fwd_s + self.bwd_s + self.tp_fwd_s + self.tp_bwd_s + self.recompute_s(recompute)

    def recompute_s(self, recompute: str) -> float:
        if recompute == "full":
            return self.fwd_s + self.tp_fwd_s
        if recompute == "selective":
            return self.core_fwd_s
        return 0.0

    def saved_bytes(self, recompute: str) -> float:
        """Activation bytes one microbatch leaves on the device until its backward."""
        if recompute == "full":
            return self.input_bytes
        if recompute == "selective":
            return max(0.0, self.act_bytes - self.core_act_bytes)
        return self.act_bytes

    def transient_bytes(self, recompute: str) -> float:
        """Extra peak while this layer is recomputed and back-propagated."""
        if recompute == "full":
            return self.act_bytes
        if recompute == "selective":
            return self.core_act_bytes
        return 0.0


def layer_kind(name: str) -> str:
    """``"embed"``, ``"block"`` or ``"head"`` from the layer name group_layers gives."""
    if name.startswith("layers."):
        return "block"
    return name


def _in(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _op_split(op: Any, layer_name: str, kind: str) -> bool:
    """Does Megatron's split divide this op's work by tp? (module-path rule, see module doc)."""
    path = op.module_path
    if kind == "block":
        rel = path[len(layer_name) + 1 :] if path.startswith(layer_name + ".") else ""
        return rel.split(".")[0] in ("attn", "mlp", "moe", "attention", "feed_forward")
    if kind == "head":
        return any(_in(path, p) or path.endswith("." + p) for p in ("lm_head", "head", "output"))
    return False


def op_base(op_name: str) -> str:
    """``"aten.view.default"`` -> ``"view"``."""
    parts = op_name.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "aten" else parts[0]


def _op_bytes(op: Any) -> float:
    """Bytes a kernel reads and writes; views move nothing, a lookup reads only its rows.

    Views are metadata (a later contiguous copy is its own aten op); everything else, creation
    ops included, writes its output: the same rule as the ILP's (``rules.OpDims.moves_bytes``).
    """
    base = op_base(op.op)
    if base in _ALIAS_OPS:
        return 0.0
    out = float(sum(m.nbytes for m in op.outputs))
    if base in ("embedding", "index_select", "gather"):
        return 2.0 * out + sum(float(m.nbytes) for m in op.input_metas[1:])
    return float(sum(m.nbytes for m in op.input_metas)) + out


def _matmul_dims(op: Any, split: int) -> tuple[int, ...] | None:
    """(m, n, k) of a 2-D/batched matmul after dividing its parallel dim by ``split``."""
    if op.op not in MATMUL_OPS or len(op.input_metas) < 2:
        return None
    if "attention" in op.op:
        q = op.input_metas[0].shape  # (b, heads, s, d_head): heads split by tp
        if len(q) < 3:
            return None
        batch = 1
        for d in q[:-2]:
            batch *= d
        return (max(1, batch // split), max(1, q[-2]), max(1, q[-2]), max(1, q[-1]))
    a, b = op.input_metas[-2].shape, op.input_metas[-1].shape
    if op.op == "aten.addmm.default" and len(op.input_metas) >= 3:
        a, b = op.input_metas[1].shape, op.input_metas[2].shape
    if len(a) < 2 or len(b) < 2:
        return None
    m = 1
    for d in a[:-1]:
        m *= d
    k, n = a[-1], b[-1]
    if op.op in ("aten.bmm.default", "aten.baddbmm.default"):
        m = a[-2]
    n = max(1, n // split) if n >= split else n
    return (int(m), int(n), int(k))


def analytic_layer_cost(
    *,
    name: str,
    graph: Any,
    ops: tuple[Any, ...],
    params: dict[str, Any],
    input_bytes: float,
    output_bytes: float,
    dp: int,
    tp: int,
    full_mesh: Any,
    cluster: Any,
    dtype: str,
    grad_bytes_per_param: int,
    sequence_parallel: bool,
    compute_time_s: Any,
    mesh_collective_time_s: Any,
    saved_tensors: Any,
    collective_time_s: Any,
    attention_kernel: str = "fused",
) -> LayerCost:
    """Price one layer under Megatron's tensor-parallel split (ops already at micro-batch b).

    ``ops`` are the layer's operator nodes at the per-device micro-batch, ``params`` its
    parameters {fqn: TensorMeta}. ``full_mesh`` is the (pp, dp, tp) LogicalMesh whose dp and tp
    groups the collectives run on (all groups at once, so NICs are shared as in the real step).
    ``saved_tensors`` is ``cost.memory.saved_tensors``: activations are counted per stored
    tensor (:func:`_saved_per_op`), as the intra-op ILP counts them.
    """
    kind = layer_kind(name)
    device = cluster.device
    fwd_s = bwd_s = core_fwd = 0.0
    act = core_act = 0.0
    fwd_flops = bwd_flops = 0.0
    saved_of = _saved_per_op(
        graph, ops, kind=kind, tp=tp, sequence_parallel=sequence_parallel,
        saved_tensors=saved_tensors,
    )  # fmt: skip
    for op in ops:
        split = _op_split(op, name, kind)
        k = tp if (split or sequence_parallel) else 1
        dims = _matmul_dims(op, tp if split else 1)
        nbytes = _op_bytes(op) / k
        f = compute_time_s(
            flops=op.fwd_flops / k, bytes_moved=nbytes, device=device, dtype=dtype, matmul_dims=dims
        )
        b = compute_time_s(
            flops=op.bwd_flops / k,
            bytes_moved=2.0 * nbytes,
            device=device,
            dtype=dtype,
            matmul_dims=dims,
        )
        saved = saved_of.get(op.name, 0.0)
        if attention_kernel == "unfused" and "scaled_dot_product" in op.op:
            f, b, scores_saved = _unfused_attention(
                op, k, dims, device=device, dtype=dtype, compute_time_s=compute_time_s
            )
            saved += scores_saved
        fwd_s += f
        bwd_s += b
        act += saved
        fwd_flops += op.fwd_flops / k
        bwd_flops += op.bwd_flops / k
        if kind == "block" and op.module_path.endswith(".attn") and op.op not in _LINEAR_OPS:
            core_fwd += f
            core_act += saved
    # Megatron's communication: two all-reduces of the hidden state per block in forward (after
    # the row-parallel o and down projections) and two in backward (before the column-parallel
    # inputs); sequence parallelism turns each into all-gather + reduce-scatter, same volume.
    tp_fwd = tp_bwd = 0.0
    if tp > 1:
        ar = mesh_collective_time_s("all_reduce", output_bytes, full_mesh, "tp", cluster)
        if kind == "block":
            tp_fwd, tp_bwd = 2 * ar, 2 * ar
        elif kind == "embed":
            tp_fwd = ar  # vocabulary-parallel lookup: partial sums reduced once
        elif kind == "head":
            tp_bwd = mesh_collective_time_s("all_reduce", input_bytes, full_mesh, "tp", cluster)
    # per-device parameters after the split (norms and position tables replicated)
    per_dev = 0.0
    placements: dict[str, tuple[str, ...]] = {}
    for fqn, meta in params.items():
        split_dim = _param_split_dim(fqn, meta, kind)
        n = float(meta.numel)
        if split_dim is not None and tp > 1:
            n /= tp
        per_dev += n
        placements[fqn] = ("R", f"S({split_dim})" if split_dim is not None and tp > 1 else "R")
    grad_bytes = per_dev * grad_bytes_per_param
    w_bytes = per_dev * DTYPE_BYTES[dtype]
    grad_sync = gather = reduce = 0.0
    if dp > 1 and per_dev > 0:
        grad_sync = mesh_collective_time_s("all_reduce", grad_bytes, full_mesh, "dp", cluster)
        rail = _rail(full_mesh.groups("dp")[0], cluster)
        if rail is None:  # the dp group sits inside one host: NVLink
            gather = mesh_collective_time_s("all_gather", w_bytes, full_mesh, "dp", cluster)
            reduce = mesh_collective_time_s("reduce_scatter", grad_bytes, full_mesh, "dp", cluster)
        else:
            gather = collective_time_s("all_gather", w_bytes, rail, cluster)
            reduce = collective_time_s("reduce_scatter", grad_bytes, rail, cluster)
    p2p_bytes = output_bytes / tp if tp > 1 else output_bytes  # Megatron's scatter/gather p2p
    return LayerCost(
        name=name,
        fwd_s=fwd_s,
        bwd_s=bwd_s,
        tp_fwd_s=tp_fwd,
        tp_bwd_s=tp_bwd,
        grad_sync_s=grad_sync,
        zero3_gather_s=gather,
        zero3_reduce_s=reduce,
        params_per_device=per_dev,
        act_bytes=act,
        input_bytes=input_bytes / (tp if sequence_parallel and tp > 1 else 1),
        output_bytes=p2p_bytes,
        core_fwd_s=core_fwd,
        core_act_bytes=core_act,
        fwd_flops=fwd_flops,
        bwd_flops=bwd_flops,
        placements=placements,
    )


ATTENTION_KERNELS = ("fused", "unfused")


def _rail(group: tuple[int, ...], cluster: Any) -> tuple[int, ...] | None:
    """One rank per host of ``group`` (the first), or None if the group fits in one host.

    ZeRO-3 gathers are priced on this "rail": the full buffer crossing one NIC per device, as a
    flat ring over the data-parallel group does when every rank's neighbour is on another host.
    Table 2 of Megatron-LM SC21 is the evidence: DeepSpeed ZeRO-3's step time stays at ~67 s for
    175B and ~180 s for 530B whatever the GPU count, i.e. each GPU moved its (n-1)/n · 2P bytes
    per pass at ~21-23 GB/s, one HDR NIC, not the 8-NIC hierarchical rate.
    """
    per_host: dict[int, int] = {}
    for r in group:
        per_host.setdefault(cluster.host_of(r), r)
    if len(per_host) <= 1:
        return None
    return tuple(sorted(per_host.values()))


# Passes over the (b, heads, s, s) score tensor of unfused attention, in units of its 16-bit
# size (Megatron-LM 2021: QK^T bmm, fused scale-mask-softmax, dropout, then the AV bmm).
# forward: write QK^T (1) + softmax read/write (2) + dropout read/write + 1-byte mask (2.5)
#          + AV reads the probabilities (1)                                          = 6.5
# backward: dP from the AV bmm (1) + dropout backward (2.5) + softmax backward reads P and dP,
#           writes dS (3) + the two bmms read dS (2)                                   = 8.5
# kept for backward: softmax output (2 B) + dropout mask (1 B) + dropout output (2 B) = 5 B per
# score, the 5·a·s/h term of Korthikanti et al. (arXiv 2205.05198).
_UNFUSED_FWD_PASSES = 6.5
_UNFUSED_BWD_PASSES = 8.5
_UNFUSED_SAVED_BYTES_PER_SCORE = 5.0


def _unfused_attention(
    op: Any, k: int, dims: Any, *, device: Any, dtype: str, compute_time_s: Any
) -> tuple[float, float, float]:
    """(fwd_s, bwd_s, score_bytes_saved) of attention that materialises its scores.

    The two batched GEMMs run at tensor-core rate; the score tensor's passes are separate
    memory-bound kernels, so their time adds to the GEMMs' instead of hiding under a roofline.
    The saved bytes are the score tensors only: q, k, v are counted with the other stored
    tensors (``_saved_per_op``).
    """
    q = op.input_metas[0]
    kk = op.input_metas[1] if len(op.input_metas) > 1 else q
    batch = 1
    for d in q.shape[:-2]:
        batch *= d
    scores = batch * q.shape[-2] * kk.shape[-2] / k
    item = 2.0 if dtype in ("bf16", "fp16") else 4.0
    qkvo = (sum(m.nbytes for m in op.input_metas[:3]) + sum(m.nbytes for m in op.outputs)) / k
    gemm_f = compute_time_s(
        flops=op.fwd_flops / k, bytes_moved=qkvo, device=device, dtype=dtype, matmul_dims=dims
    )
    # backward GEMMs: 4 bmms of the forward's size (dV, dP, dQ, dK), no flash-style recompute
    gemm_b = compute_time_s(
        flops=2.0 * op.fwd_flops / k,
        bytes_moved=2 * qkvo,
        device=device,
        dtype=dtype,
        matmul_dims=dims,
    )
    mem_f = compute_time_s(
        flops=0.0, bytes_moved=_UNFUSED_FWD_PASSES * item * scores, device=device, dtype=dtype
    )
    mem_b = compute_time_s(
        flops=0.0, bytes_moved=_UNFUSED_BWD_PASSES * item * scores, device=device, dtype=dtype
    )
    saved = _UNFUSED_SAVED_BYTES_PER_SCORE * scores * item / 2.0
    return gemm_f + mem_f, gemm_b + mem_b, saved


#: pure views: their output is their first input's storage (no kernel, nothing stored twice)
_ALIAS_OPS = frozenset(
    {
        "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze",
        "squeeze", "slice", "select", "alias", "split", "split_with_sizes", "detach",
        "as_strided", "unbind", "chunk", "narrow", "view_as", "expand_as", "getitem",
        "flatten", "unflatten", "_reshape_alias",
    }
)  # fmt: skip
_LOOKUP_OPS = frozenset({"embedding", "index_select", "gather"})


def _saved_per_op(
    graph: Any,
    ops: tuple[Any, ...],
    *,
    kind: str,
    tp: int,
    sequence_parallel: bool,
    saved_tensors: Any,
) -> dict[str, float]:
    """Per op name: bytes per device of the stored tensors it is the first to keep for backward.

    Each storage counts once (views resolved), like ``cost.memory.graph_saved_activation_bytes``
    and the ILP's memory row. Under Megatron's split a tensor is divided by tp when it is
    sharded: outputs of column-parallel matmuls (weight split on dim 0) and everything computed
    from them, until a row-parallel matmul (split on dim 1) or a vocabulary-parallel lookup
    all-reduces it back to a replicated tensor; with sequence parallelism every tensor is
    (Korthikanti et al.: 10 + 24/t bytes·sbh without it, 34/t with it).
    """
    root: dict[str, str] = {}
    sharded: dict[str, bool] = {}
    split_of: dict[str, int | None] = {}  # param-derived node -> Megatron split dim

    def node_of(name: str) -> Any:
        try:
            return graph.node(name)
        except (KeyError, AttributeError):
            return None

    for op in ops:
        base = op_base(op.op)
        ins = list(op.inputs)
        if base in _ALIAS_OPS and ins:
            src = ins[0]
            root[op.name] = root.get(src, src)
            sharded[op.name] = sharded.get(src, False)
            if src in split_of:
                split_of[op.name] = split_of[src]
            elif (n := node_of(src)) is not None and n.kind == "param" and n.output is not None:
                split_of[op.name] = _param_split_dim(
                    n.params[0] if n.params else src, n.output, kind
                )
            continue
        dims = []
        for p in ins:
            if p in split_of:
                dims.append(split_of[p])
            elif (n := node_of(p)) is not None and n.kind == "param" and n.output is not None:
                dims.append(_param_split_dim(n.params[0] if n.params else p, n.output, kind))
        if tp > 1 and 0 in dims and base not in _LOOKUP_OPS:
            sharded[op.name] = True  # column-parallel: output features split
        elif tp > 1 and (1 in dims or (0 in dims and base in _LOOKUP_OPS)):
            sharded[op.name] = False  # row-parallel / vocabulary-parallel: all-reduced
        else:
            sharded[op.name] = any(sharded.get(p, False) for p in ins)
    out: dict[str, float] = {}
    seen: set[str] = set()
    for op in ops:
        total = 0.0
        for t in saved_tensors(op):
            if t.nbytes <= 0:
                continue
            is_input = t.key in op.inputs
            storage = root.get(t.key, t.key) if is_input else t.key
            if storage in seen:
                continue
            seen.add(storage)
            cut = sequence_parallel or (
                sharded.get(t.key, False) if is_input else sharded.get(op.name, False)
            )
            total += float(t.nbytes) / (tp if cut and tp > 1 else 1)
        if total:
            out[op.name] = total
    return out


_LINEAR_OPS = frozenset({"aten.mm.default", "aten.addmm.default", "aten.linear.default"})


def _param_split_dim(fqn: str, meta: Any, kind: str) -> int | None:
    """Tensor dim Megatron shards over tp: column-parallel -> 0, row-parallel weight -> 1."""
    parts = fqn.split(".")
    leaf = parts[-1]
    owner = parts[-2] if len(parts) >= 2 else ""
    if kind == "block":
        if owner in ("q", "k", "v", "qkv", "up", "gate", "fc1", "w1", "w3"):
            return 0
        if owner in ("o", "down", "proj", "fc2", "w2"):
            return 1 if leaf == "weight" else None
        return None
    if kind in ("embed", "head"):
        if owner in ("tok_embed", "lm_head", "output", "wte") and len(meta.shape) == 2:
            return 0
    return None


def ilp_layer_cost(
    base: LayerCost, sharding: Any, *, params_per_device: float, grad_sync_s: float
) -> LayerCost:
    """A LayerCost whose compute, comm and memory come from the intra-op ILP's LayerSharding.

    Forward and backward communication are the ILP's own ``comm_fwd_s`` / ``comm_bwd_s`` (what
    full recompute re-runs is the forward part). ``params_per_device`` is what one device holds
    before ZeRO (split by tp only; a dp split of the ILP's is ZeRO-3, which the search applies);
    ``grad_sync_s`` the bucketed gradient synchronisation the search prices for it.
    Selective recompute and p2p sizes keep the analytic estimate of ``base``: the ILP does not
    report them.
    """
    return replace(
        base,
        fwd_s=float(sharding.fwd_compute_s),
        bwd_s=float(sharding.bwd_compute_s),
        tp_fwd_s=float(sharding.comm_fwd_s),
        tp_bwd_s=float(sharding.comm_bwd_s),
        grad_sync_s=float(grad_sync_s),
        params_per_device=float(params_per_device),
        act_bytes=float(sharding.activation_bytes),
        core_act_bytes=min(base.core_act_bytes, float(sharding.activation_bytes)),
        placements={k: tuple(v) for k, v in sharding.placements.items()},
        source="ilp",
        status=str(sharding.status),
        gap=float(sharding.gap or 0.0),
    )


_TORCH_DTYPE = {
    "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
    "fp32": "float32", "float32": "float32",
}  # fmt: skip


def in_training_dtype(graph: Any, dtype: str) -> Any:
    """The graph with fp32 activations and weights re-stated in the training dtype.

    Zoo models are built on meta in fp32; under bf16/fp16 mixed precision the activations,
    weights the kernels read and messages on the wire are 16-bit, so bytes are priced as such.
    Both pricers (the analytic split here, the intra-op ILP in ``sharding.layer_plan``) go
    through this one function, so their byte counts agree. Returns ``graph`` itself when
    nothing changes (fp32 training, or a graph already in the training dtype).
    """
    from dataclasses import replace as dc_replace

    from autopar.graph.opgraph import OpGraph, TensorMeta

    target = _TORCH_DTYPE.get(dtype)
    if target is None:
        from autopar.errors import ConfigError

        raise ConfigError(
            f"unknown dtype {dtype!r}", field="dtype", allowed=("bf16", "fp16", "fp32")
        )
    if target == "float32":
        return graph
    if not any(m.dtype == "float32" for node in graph for m in (*node.outputs, *node.input_metas)):
        return graph

    def conv(m: TensorMeta) -> TensorMeta:
        return TensorMeta(m.shape, target, m.batch_dim) if m.dtype == "float32" else m

    g = graph.nx_graph.copy()
    for _, data in g.nodes(data=True):
        op = data["op"]
        if any(m.dtype == "float32" for m in (*op.outputs, *op.input_metas)):
            data["op"] = dc_replace(
                op,
                outputs=tuple(conv(m) for m in op.outputs),
                input_metas=tuple(conv(m) for m in op.input_metas),
            )
    for _, _, data in g.edges(data=True):
        if "tensor" in data and data["tensor"] is not None:
            data["tensor"] = conv(data["tensor"])
    return OpGraph(g, name=graph.name, batch_size=graph.batch_size, metadata=dict(graph.metadata))
