"""Trace an ``nn.Module`` into an OpGraph of ATen operators, without allocating its weights.

How the graph is obtained, and why:

- ``make_fx`` under fake tensors with the core-ATen decomposition table. Parameters are passed
  as graph inputs through ``torch.func.functional_call``, so a model built on ``meta`` (GPT-3
  175B, Llama 3 405B) traces in seconds with no parameter memory. ``torch.export`` gives the
  same graph but re-traces it once more to decompose, about three times slower on 96 layers.
- ``aten.scaled_dot_product_attention`` is kept as one node (a fused kernel in training) instead
  of its math decomposition, whose ``[b, heads, s, s]`` score tensors would misstate memory.
- Module paths come from forward hooks that annotate each node with the innermost module
  running when the node was created (``torch.fx.traceback.annotate``).
- Forward FLOPs use the per-op formulas registered in ``torch.utils.flop_counter``; backward
  FLOPs use its backward formulas where it has one (attention, convolution) and otherwise one
  forward's worth per differentiable operand of a matmul (input grad, weight grad).
- The batch dim of every tensor is found by tracing twice, at batch ``b`` and ``b + 1``, and
  diffing shapes node by node; ``OpGraph.with_batch`` uses it to re-state the graph for any
  micro-batch without tracing again.

The fx program itself is public (``trace_program`` -> ``TracedProgram``): the emitter executes
it with real (DTensor) parameters, so the graph that was priced is the graph that runs.
``trace()`` builds its OpGraph from that same program, and every OpGraph op node carries the
name of the fx node that produced it. fx nodes without an OpGraph node of their own:

- ``placeholder``: become ``param`` / ``buffer`` / ``input`` nodes named by FQN or argument
  name (match them by position: ``TracedProgram.param_names``, ``buffer_names``, inputs);
- ``operator.getitem``: folded into its producer (``OpNode.outputs[i]``);
- ``aten.alias`` / ``aten.detach``: folded into their operand;
- ``_assert*`` nodes without users (runtime checks, no tensor);
- ``run_device = getattr(<tensor placeholder>, "device")`` (``DEVICE_NODE``), the device the
  ops that create tensors use; OpNode arguments show the traced device in its place.

The fx ``output`` node becomes the OpGraph node ``output``.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import operator
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import networkx as nx
import torch
import torch.fx.traceback as fx_traceback
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import flop_registry

from autopar.errors import ConfigError, TraceError
from autopar.graph.opgraph import OpGraph, OpNode, TensorArg, TensorMeta, arg_leaves

__all__ = [
    "trace", "trace_program", "TracedProgram", "TracingMode", "DEVICE_NODE", "LOSS_PATH",
    "MATMUL_OPS",
    "VIEW_OPS",
]  # fmt: skip

aten = torch.ops.aten

MATMUL_OPS: frozenset[str] = frozenset(
    {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default"}
)
"""Ops whose backward costs one forward per differentiable matrix operand."""

VIEW_OPS: frozenset[str] = frozenset(
    {
        "aten.view.default", "aten._unsafe_view.default", "aten.reshape.default",
        "aten.permute.default", "aten.t.default", "aten.transpose.int", "aten.expand.default",
        "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.alias.default",
        "aten.slice.Tensor", "aten.select.int", "aten.detach.default", "aten._to_copy.default",
        "aten.clone.default",
    }
)  # fmt: skip
"""Ops that only re-describe (or copy) one tensor: a parameter read through them is still read."""

# Nodes folded away while building the OpGraph: pure aliases and assertion no-ops.
_ALIAS_TARGETS = {aten.alias.default, aten.detach.default}
_ASSERT_PREFIX = "_assert"

# Attention kept fused: the op we preserve, and the registered formulas we price it with.
_SDPA = aten.scaled_dot_product_attention.default
_SDPA_FWD_FORMULA = aten._scaled_dot_product_flash_attention
_SDPA_BWD_FORMULA = aten._scaled_dot_product_flash_attention_backward


TracingMode = Literal["fake", "real"]
"""``fake``: fake tensors, no memory and no data (the default; models built on ``meta``).
``real``: runs every op on the given tensors while recording (needs real parameters; lets ops
without a fake kernel through; data-dependent Python control flow still cannot be recorded)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TracedProgram:
    """One forward pass of a model as an aten fx program that can be run with any parameters.

    ``graph_module(*params, *buffers, *flat_inputs)`` returns the list of tensor leaves of what
    the model returns; ``unflatten_output`` rebuilds the model's return value from them. Tensors
    the forward creates (``arange``, ``zeros``...) are placed on the device of the first tensor
    input (or, without one, of the first parameter) at run time, not on the device traced on.
    Constants make_fx lifts into ``get_attr`` attributes stay on the traced device.
    """

    graph_module: torch.fx.GraphModule
    """Placeholders in order: unique parameters, buffers, then the flattened inputs."""
    param_names: tuple[tuple[str, ...], ...]
    """Per unique parameter (``model.named_parameters()`` order), all its FQNs: tied parameters
    (a shared embedding / LM head) have several."""
    buffer_names: tuple[str, ...]
    """Per buffer (``model.named_buffers()`` order), its FQN."""
    input_spec: pytree.TreeSpec
    """Tree of ``(args, kwargs)`` as traced: a tensor ``x`` is ``((x,), {})``, a tuple ``t`` is
    ``(t, {})``, a dict ``d`` is ``((), d)``; ``flatten_inputs`` applies the same rule."""
    output_spec: pytree.TreeSpec
    """Tree of the model's return value (a tensor, a tuple, an HF ``ModelOutput``...)."""
    output_is_tensor: tuple[bool, ...]
    """Per output leaf, whether it is a tensor: the graph returns only those, in leaf order."""
    output_constants: tuple[Any, ...] = ()
    """Per output leaf, its traced value when it is not a tensor (None where it is one)."""

    def flatten_inputs(self, example_inputs: Any) -> list[Any]:
        """The graph's input placeholders for ``example_inputs`` (same normalisation as trace);
        TraceError when their structure differs from the traced inputs'."""
        args, kwargs = _normalise_inputs(None, example_inputs)
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.input_spec:
            raise TraceError(
                f"inputs are structured as {spec}, the program was traced with {self.input_spec}"
            )
        return flat

    def unflatten_output(self, flat_tensors: Sequence[Any]) -> Any:
        """The model's return value from the graph's outputs (``graph_module(...)``)."""
        tensors = iter(flat_tensors)
        constants = self.output_constants or (None,) * len(self.output_is_tensor)
        leaves = [
            next(tensors) if is_tensor else const
            for is_tensor, const in zip(self.output_is_tensor, constants)
        ]
        return pytree.tree_unflatten(leaves, self.output_spec)


LOSS_PATH = "<loss>"
"""Module path of the ops ``trace(..., with_loss=True)`` adds after the model's forward."""


def trace(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    name: str | None = None,
    detect_batch: bool = True,
    with_loss: bool = False,
) -> OpGraph:
    """The ATen operator graph of one forward pass of ``model``.

    ``example_inputs``: a tensor, tuple of positional inputs or dict of keyword inputs, batch on
    dim 0; None takes ``model.example_inputs()`` (every zoo model has it). Inputs may live on
    ``meta``. ``detect_batch`` traces a second time at batch + 1 to label each tensor's batch
    dim (needed by ``OpGraph.with_batch``); turn it off to halve the trace time.

    Built from ``trace_program(model, example_inputs)``: op node names are its fx node names.
    (At batch 1, where the fx graph can elide batch-sized no-ops, the graph may come from the
    program at batch 2, re-stated for batch 1: ``metadata["program_batch_size"]`` says which.)

    ``with_loss`` appends the training loss the search prices: token cross-entropy in fp32 over
    the last dim of the model's first float output (its logits), labelled with module path
    ``LOSS_PATH`` (so it groups with the head, and the emitter, which runs the loss itself,
    knows these ops are not the model's).

    Raises TraceError naming the op and module when the model cannot be traced (data-dependent
    control flow, an op without a fake/meta kernel).
    """
    _check_module(model)
    with _gc_paused():
        return _trace(
            model, example_inputs, name=name, detect_batch=detect_batch, with_loss=with_loss
        )


def trace_program(
    model: nn.Module, example_inputs: Any = None, *, tracing_mode: TracingMode = "fake"
) -> TracedProgram:
    """The fx program of one forward pass of ``model`` that ``trace()`` prices.

    ``example_inputs`` as for ``trace``. Parameters, buffers and inputs are graph placeholders;
    attention stays one ``aten.scaled_dot_product_attention`` node; the rest is core ATen.
    """
    _check_module(model)
    if tracing_mode not in ("fake", "real"):
        raise ConfigError(
            f"unknown tracing_mode {tracing_mode!r}", field="tracing_mode", allowed=("fake", "real")
        )
    with _gc_paused():
        args, kwargs = _normalise_inputs(model, example_inputs)
        return _trace_program(model, args, kwargs, tracing_mode=tracing_mode)


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Tracing allocates ~10^5 short-lived objects per 100 layers; the cyclic collector's
    repeated passes over them cost ~10% of the trace time and free nothing useful."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    name: str | None,
    detect_batch: bool,
    with_loss: bool = False,
) -> OpGraph:
    start_s = time.perf_counter()
    args, kwargs = _normalise_inputs(model, example_inputs)
    batch = _batch_size(args, kwargs)
    program = _trace_program(model, args, kwargs, with_loss=with_loss)
    batch_dims: dict[int, tuple[int | None, ...]] | None = None
    batch_arg_positions: dict[int, tuple[int, ...]] = {}
    traced_batch = batch
    if detect_batch and batch is not None:
        args2, kwargs2 = _grow_batch(model, example_inputs, args, kwargs, batch)
        program2 = _trace_program(model, args2, kwargs2, with_loss=with_loss)
        diff = _diff_batch_dims(program.graph_module, program2.graph_module)
        if diff is None:
            # Batch 1 can elide no-op ops (an expand to the same shape); b+1 vs b+2 can be
            # compared, and that graph is then re-stated for batch b.
            args3, kwargs3 = _grow_batch(model, example_inputs, args2, kwargs2, batch + 1)
            program3 = _trace_program(model, args3, kwargs3, with_loss=with_loss)
            diff = _diff_batch_dims(program2.graph_module, program3.graph_module)
            if diff is not None:
                program = program2
                traced_batch = batch + 1
        if diff is not None:
            batch_dims, batch_arg_positions = diff
    input_names = _input_names(model, args, kwargs, program.input_spec.num_leaves)
    graph, unpriced, batch_args = _build_graph(
        program,
        input_names=input_names,
        param_requires_grad=[p.requires_grad for _, p in model.named_parameters()],
        batch_dims=batch_dims,
        batch_arg_positions=batch_arg_positions,
    )
    cfg = getattr(model, "config", None)
    metadata: dict[str, Any] = {
        "model_class": type(model).__name__,
        "trace_time_s": time.perf_counter() - start_s,
        "batch_dims_known": batch_dims is not None,
        "input_names": input_names,
        "ops_without_flop_formula": sorted(unpriced),
        "batch_args": batch_args,
        "program_batch_size": traced_batch,
    }
    if cfg is not None:
        metadata["config"] = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
        if getattr(cfg, "seq_len", None) is not None:
            metadata["seq_len"] = cfg.seq_len
    result = OpGraph(
        graph,
        name=name or type(model).__name__.lower(),
        batch_size=traced_batch if traced_batch is not None else 1,
        metadata=metadata,
    )
    return result.with_batch(batch) if traced_batch != batch else result


# -- inputs ----------------------------------------------------------------------------------
def _normalise_inputs(model: nn.Module | None, example_inputs: Any) -> tuple[tuple, dict]:
    if example_inputs is None:
        factory = getattr(model, "example_inputs", None)
        if not callable(factory):
            raise TraceError(
                f"{type(model).__name__} has no example_inputs(); pass example_inputs= "
                "(a tensor, a tuple of positional inputs or a dict of keyword inputs)",
                module=type(model).__name__,
            )
        example_inputs = factory()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return tuple(example_inputs), {}
    raise TraceError(
        f"example_inputs must be a tensor, tuple or dict, got {type(example_inputs).__name__}"
    )


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def _grow_batch(
    model: nn.Module, example_inputs: Any, args: tuple, kwargs: dict, batch: int
) -> tuple[tuple, dict]:
    """The same inputs with one more sample (dim 0), for the batch-dim diff."""
    factory = getattr(model, "example_inputs", None)
    if example_inputs is None and callable(factory):
        try:
            return _normalise_inputs(model, factory(batch_size=batch + 1))
        except TypeError:
            pass

    def grow(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
            return torch.cat((x, x[:1]), dim=0)
        return x

    return pytree.tree_map(grow, (args, kwargs))


# -- fx tracing ------------------------------------------------------------------------------
@contextlib.contextmanager
def _module_paths(model: nn.Module) -> Iterator[list[str]]:
    """Annotate nodes with the innermost running module's path; yields the live path stack."""
    paths = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    stack: list[tuple[str, contextlib.AbstractContextManager]] = []
    names: list[str] = []

    def pre(mod: nn.Module, _args: Any) -> None:
        path = paths.get(id(mod))
        if path is None:
            return
        cm = fx_traceback.annotate({"module_path": path})
        cm.__enter__()
        stack.append((path, cm))
        names.append(path)

    def post(mod: nn.Module, _args: Any, _out: Any) -> None:
        if id(mod) in paths and stack:
            stack.pop()[1].__exit__(None, None, None)
            names.pop()

    h_pre = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    h_post = torch.nn.modules.module.register_module_forward_hook(post)
    try:
        with fx_traceback.preserve_node_meta():
            try:
                yield names
            finally:  # a failed forward skips post-hooks: unwind before the meta is restored
                while stack:
                    stack.pop()[1].__exit__(None, None, None)
    finally:
        h_pre.remove()
        h_post.remove()


@contextlib.contextmanager
def _keep_fused_attention() -> Iterator[None]:
    """Keep ``aten.scaled_dot_product_attention`` as a node instead of its math decomposition.

    Uses the mechanism ``ExportedProgram.run_decompositions`` uses to preserve
    CompositeImplicitAutograd ops (private torch API, pinned by tests/graph).
    """
    from torch._dispatch.python import enable_python_dispatcher
    from torch._export.utils import _special_op_to_preserve_cia
    from torch.export.exported_program import _override_composite_implicit_decomp
    from torch.overrides import TorchFunctionMode

    sdpa_fn = torch.nn.functional.scaled_dot_product_attention
    dropout_fn = torch.nn.functional.dropout

    class PythonDispatchForAttention(TorchFunctionMode):
        """Enable the Python dispatcher (which honours the override) only inside attention:
        globally it would route every composite op through slow Python decompositions.

        Training dropout is recorded as ``aten.native_dropout`` (one op, a boolean mask), what
        runs on GPUs: on fake CPU tensors ATen would take its CPU path (``bernoulli_``, a
        float mask, ``div_``, ``mul``) and the saved mask would be priced in the float dtype.
        """

        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            if func is sdpa_fn:
                with enable_python_dispatcher():
                    return func(*args, **kwargs)
            if func is dropout_fn:
                bound = _dropout_args(*args, **kwargs)
                if bound is not None:
                    x, p = bound
                    return torch.ops.aten.native_dropout(x, p, True)[0]
            return func(*args, **kwargs)

    with (
        _override_composite_implicit_decomp({_SDPA: _special_op_to_preserve_cia}),
        PythonDispatchForAttention(),
    ):
        yield


def _dropout_args(
    input: Any, p: float = 0.5, training: bool = True, inplace: bool = False
) -> tuple[Any, float] | None:
    """(input, p) of an ``F.dropout`` call that drops in training, else None (left as is)."""
    if not training or inplace or not 0.0 < float(p) < 1.0:
        return None
    return input, float(p)


def _decomposition_table() -> dict:
    from torch._decomp import core_aten_decompositions

    table = dict(core_aten_decompositions())
    table.pop(_SDPA, None)
    return table


def _training_loss(out: Any) -> Any:
    """Token cross-entropy (fp32) over the last dim of the first float output with at least two
    dims, against fixed targets (the graph's shape is what matters; values never are)."""
    import torch.nn.functional as F

    logits = next(
        (t for t in pytree.tree_leaves(out)
         if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2),
        None,
    )  # fmt: skip
    if logits is None:
        return None
    with fx_traceback.annotate({"module_path": LOSS_PATH}):
        flat = logits.float().reshape(-1, logits.shape[-1])
        targets = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
        return F.cross_entropy(flat, targets)


def _trace_program(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    *,
    tracing_mode: TracingMode = "fake",
    with_loss: bool = False,
) -> TracedProgram:
    """make_fx over ``functional_call`` with parameters, buffers and inputs as placeholders."""
    named_params = list(model.named_parameters())
    named_buffers = list(model.named_buffers())
    aliases: dict[int, list[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(fqn)
    n_params, n_buffers = len(named_params), len(named_buffers)
    state_names = [n for n, _ in named_params] + [n for n, _ in named_buffers]
    flat_inputs, in_spec = pytree.tree_flatten((args, kwargs))
    returned: list[tuple[list[Any], pytree.TreeSpec]] = []

    def run(*flat: Any) -> list[torch.Tensor]:
        state = dict(zip(state_names, flat[: n_params + n_buffers]))
        a, kw = pytree.tree_unflatten(list(flat[n_params + n_buffers :]), in_spec)
        out = torch.func.functional_call(model, state, a, kw)
        if with_loss:
            loss = _training_loss(out)
            if loss is not None:
                out = (out, loss)
        leaves, out_spec = pytree.tree_flatten(out)
        returned.append((leaves, out_spec))
        return [t for t in leaves if isinstance(t, torch.Tensor)]

    flat = [p for _, p in named_params] + [b for _, b in named_buffers] + flat_inputs
    with _module_paths(model) as live, _keep_fused_attention():
        try:
            gm = make_fx(
                run, decomposition_table=_decomposition_table(), tracing_mode=tracing_mode
            )(*flat)
        except TraceError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised as TraceError with context
            raise _explain(exc, module=live[-1] if live else "") from exc

    _check_static_shapes(gm)
    _place_on_input_device(gm, n_state=n_params + n_buffers)
    leaves, out_spec = returned[-1]
    is_tensor = tuple(isinstance(t, torch.Tensor) for t in leaves)
    return TracedProgram(
        graph_module=gm,
        param_names=tuple(tuple(aliases[id(p)]) for _, p in named_params),
        buffer_names=tuple(n for n, _ in named_buffers),
        input_spec=in_spec,
        output_spec=out_spec,
        output_is_tensor=is_tensor,
        output_constants=tuple(None if t else leaf for t, leaf in zip(is_tensor, leaves)),
    )


DEVICE_NODE = "run_device"
"""Name of the ``getattr(<tensor placeholder>, "device")`` node the ops that create tensors
take their device from. It reads the first tensor input: a pipeline stage that runs a part of
the program without that input binds this node to its local device instead."""


def _is_device_node(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is getattr and node.args[1:] == ("device",)


def _place_on_input_device(gm: torch.fx.GraphModule, *, n_state: int) -> None:
    """Replace the traced device in ops' arguments (``arange(..., device=meta)``, a
    ``_to_copy`` to it) by the device of a tensor placeholder read at run time, so the program
    runs where its inputs are (each rank's GPU) whatever device it was traced on.

    The tensor it reads: the first input tensor on the traced device, else the first parameter
    or buffer (parameters can be DTensors; inputs are plain tensors on the local device).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    state_vals = [p.meta.get("val") for p in placeholders[:n_state]]
    traced = next(
        (v.device for v in [*state_vals, *(p.meta.get("val") for p in placeholders[n_state:])]
         if isinstance(v, torch.Tensor)),
        None,
    )  # fmt: skip
    if traced is None:
        return

    def is_traced_device(x: Any) -> bool:
        return isinstance(x, torch.device) and x == traced

    users = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and any(is_traced_device(x) for x in arg_leaves((n.args, tuple(n.kwargs.values()))))
    ]
    if not users:
        return
    order = placeholders[n_state:] + placeholders[:n_state]
    source = next(
        p
        for p in order
        if isinstance(p.meta.get("val"), torch.Tensor) and p.meta["val"].device == traced
    )
    with gm.graph.inserting_after(placeholders[-1]):
        device = gm.graph.create_node(
            "call_function", getattr, (source, "device"), name=DEVICE_NODE
        )
    device.meta["val"] = traced

    def swap(x: Any) -> Any:
        return device if is_traced_device(x) else x

    for n in users:
        n.args = torch.fx.node.map_aggregate(n.args, swap)
        n.kwargs = torch.fx.node.map_aggregate(n.kwargs, swap)
    gm.recompile()


def _check_static_shapes(gm: torch.fx.GraphModule) -> None:
    """Fake tensors give ops like ``nonzero`` a symbolic output size; no plan can price that."""
    for node in gm.graph.nodes:
        for v in _outputs_of(node.meta.get("val")):
            if isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in v.shape):
                module = (node.meta.get("custom") or {}).get("module_path", "")
                raise TraceError(
                    "the op's output shape depends on tensor values (nonzero, boolean-mask "
                    "indexing, unique...); use a fixed-size formulation (masks, topk, index_add "
                    "with a capacity) so shapes are known ahead of time",
                    op=str(node.target),
                    module=module or "<root>",
                )


def _input_names(model: nn.Module, args: tuple, kwargs: dict, n_flat: int) -> list[str]:
    try:
        params = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    names: list[str] = []
    for i, a in enumerate(args):
        base = params[i] if i < len(params) else f"input_{i}"
        leaves = pytree.tree_leaves(a)
        names += [base] if len(leaves) == 1 else [f"{base}_{j}" for j in range(len(leaves))]
    for key, v in kwargs.items():
        leaves = pytree.tree_leaves(v)
        names += [key] if len(leaves) == 1 else [f"{key}_{j}" for j in range(len(leaves))]
    names += [f"input_{i}" for i in range(len(names), n_flat)]
    return names[:n_flat]


def _explain(exc: Exception, *, module: str) -> TraceError:
    """A TraceError that names the op and module and says what to do."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        UnsupportedOperatorException,
    )
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    func = getattr(exc, "func", None)
    op = str(func) if func is not None else None
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, DataDependentOutputException | GuardOnDataDependentSymNode):
        msg = (
            "the forward depends on tensor values (data-dependent control flow such as "
            "`if x.sum() > 0` or `.item()`), which cannot be traced without real data; rewrite "
            "it with torch.where / torch.cond, or move it out of forward"
        )
    elif isinstance(exc, DynamicOutputShapeException):
        msg = (
            "an op's output shape depends on tensor values (e.g. nonzero, boolean-mask "
            "indexing, unique); use a fixed-size formulation (masks, topk, index_add with a "
            "capacity) so shapes are known ahead of time"
        )
    elif isinstance(exc, UnsupportedOperatorException):
        msg = (
            "the op has no fake/meta implementation, so it cannot run without data; register "
            "one with torch.library.register_fake"
        )
    else:
        msg = f"tracing failed: {type(exc).__name__}: {first_line}"
    return TraceError(msg, op=op, module=module or "<root>")


# -- graph construction ----------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _meta_of(val: Any, batch_dim: int | None) -> TensorMeta | None:
    if isinstance(val, torch.Tensor):
        return TensorMeta(tuple(int(d) for d in val.shape), _dtype_name(val.dtype), batch_dim)
    return None


def _outputs_of(val: Any) -> list[Any]:
    """The tensor(s) an fx node produced, as a flat list (tuples for multi-output ops)."""
    if isinstance(val, list | tuple):
        return list(val)
    return [val]


def _diff_batch_dims(
    gm_a: torch.fx.GraphModule, gm_b: torch.fx.GraphModule
) -> tuple[dict[int, tuple[int | None, ...]], dict[int, tuple[int, ...]]] | None:
    """From the same model traced at batch b and b+1, node by node (by position):
    the batch dim of each output, and which scalar arguments changed (``arg_leaves`` indices).

    None when the two graphs differ in structure (batch-dependent control flow).
    """
    nodes_a, nodes_b = list(gm_a.graph.nodes), list(gm_b.graph.nodes)
    if len(nodes_a) != len(nodes_b):
        return None
    dims_out: dict[int, tuple[int | None, ...]] = {}
    args_out: dict[int, tuple[int, ...]] = {}
    for i, (a, b) in enumerate(zip(nodes_a, nodes_b)):
        if a.op != b.op or a.target != b.target:
            return None
        dims: list[int | None] = []
        for va, vb in zip(_outputs_of(a.meta.get("val")), _outputs_of(b.meta.get("val"))):
            dim = None
            if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
                if va.dim() != vb.dim():
                    return None
                for d, (sa, sb) in enumerate(zip(va.shape, vb.shape)):
                    if sa != sb:
                        dim = d
                        break
            dims.append(dim)
        dims_out[i] = tuple(dims)
        if a.op == "call_function":
            changed = tuple(
                j
                for j, (x, y) in enumerate(zip(arg_leaves(a.args), arg_leaves(b.args)))
                if isinstance(x, int) and isinstance(y, int) and x != y
            )
            if changed:
                args_out[i] = changed
    return dims_out, args_out


def _flops(node: torch.fx.Node, grad_operands: int) -> tuple[float, float, bool]:
    """(fwd, bwd, priced) from torch.utils.flop_counter's registered formulas."""
    target = node.target
    out_val = node.meta.get("val")

    def val(x: Any) -> Any:
        return x.meta.get("val") if isinstance(x, torch.fx.Node) else x

    args = pytree.tree_map(val, node.args)
    kwargs = pytree.tree_map(val, node.kwargs)
    if target is _SDPA:
        q, k, v = args[:3]
        fwd = flop_registry[_SDPA_FWD_FORMULA](q, k, v, out_val=out_val)
        bwd = flop_registry[_SDPA_BWD_FORMULA](out_val, q, k, v, out_val=out_val)
        return float(fwd), float(bwd) if grad_operands else 0.0, True
    packet = getattr(target, "overloadpacket", None)
    formula = flop_registry.get(packet) if packet is not None else None
    if formula is None:
        return 0.0, 0.0, False
    fwd = float(formula(*args, **kwargs, out_val=out_val))
    # matmul / convolution: grad w.r.t. each differentiable operand costs about one forward
    return fwd, fwd * grad_operands, True


def _is_cheap(target: Any) -> bool:
    """Ops whose cost is memory traffic, not FLOPs (elementwise, views, reductions, ...)."""
    tags = getattr(target, "tags", ())
    return torch.Tag.pointwise in tags or torch.Tag.view_copy in tags or str(target) in VIEW_OPS


def _build_graph(
    program: TracedProgram,
    *,
    input_names: list[str],
    param_requires_grad: list[bool],
    batch_dims: dict[int, tuple[int | None, ...]] | None,
    batch_arg_positions: dict[int, tuple[int, ...]],
) -> tuple[nx.DiGraph, set[str], dict[str, tuple[int, ...]]]:
    """(graph, ops without a FLOP formula, batch-scaled scalar arguments per node name).

    Op nodes (and ``get_attr`` constants, and ``output``) are named exactly like their fx node;
    placeholders take their FQN / argument name, made unique against those.
    """
    gm = program.graph_module
    g = nx.DiGraph()
    param_names = program.param_names
    buffer_names = program.buffer_names
    n_params, n_buffers = len(param_names), len(buffer_names)
    unpriced: set[str] = set()
    batch_args: dict[str, tuple[int, ...]] = {}

    produced: dict[torch.fx.Node, tuple[str, int]] = {}
    """fx node -> (OpGraph producer name, output index) after folding getitem/alias."""
    constants: dict[torch.fx.Node, Any] = {}
    """fx nodes that stand for a constant in OpNode arguments (the run-time device)."""
    metas: dict[str, list[TensorMeta | None]] = {}
    needs_grad: dict[str, bool] = {}
    param_view: dict[str, tuple[str, ...]] = {}
    # fx names are unique in the fx graph: reserve them so a placeholder named after an FQN can
    # never take the name of an op node
    used_names: set[str] = {n.name for n in gm.graph.nodes if n.op != "placeholder"}
    rank = 0
    placeholder_i = 0

    def unique(base: str) -> str:
        name, k = base, 1
        while name in used_names:
            name, k = f"{base}_{k}", k + 1
        used_names.add(name)
        return name

    def add(
        op: OpNode, *, grad: bool, views: tuple[str, ...] = (), aligned: list | None = None
    ) -> None:
        nonlocal rank
        g.add_node(op.name, op=op, rank=rank)
        rank += 1
        metas[op.name] = aligned if aligned is not None else list(op.outputs)
        needs_grad[op.name] = grad
        param_view[op.name] = views

    for pos, node in enumerate(gm.graph.nodes):
        dims = batch_dims.get(pos) if batch_dims is not None else None
        val = node.meta.get("val")
        out_vals = _outputs_of(val)

        aligned = [
            _meta_of(v, dims[i] if dims and i < len(dims) else None) for i, v in enumerate(out_vals)
        ]

        def out_metas(aligned: list[TensorMeta | None] = aligned) -> tuple[TensorMeta, ...]:
            return tuple(m for m in aligned if m is not None)

        if node.op == "placeholder":
            i = placeholder_i
            placeholder_i += 1
            if i < n_params:
                fqns = tuple(param_names[i])
                name = unique(fqns[0])
                add(OpNode(name=name, kind="param", op="placeholder", outputs=out_metas(),
                           params=fqns, module_path=fqns[0].rpartition(".")[0]),
                    grad=param_requires_grad[i], views=fqns)  # fmt: skip
            elif i < n_params + n_buffers:
                fqn = buffer_names[i - n_params]
                name = unique(fqn)
                add(OpNode(name=name, kind="buffer", op="placeholder", outputs=out_metas(),
                           params=(fqn,), module_path=fqn.rpartition(".")[0]), grad=False)  # fmt: skip
            else:
                j = i - n_params - n_buffers
                base = input_names[j] if j < len(input_names) else f"input_{j}"
                name = unique(base)
                add(OpNode(name=name, kind="input", op="placeholder", outputs=out_metas()),
                    grad=False)  # fmt: skip
            produced[node] = (name, 0)
            continue
        if node.op == "get_attr":
            name = node.name
            add(OpNode(name=name, kind="buffer", op="get_attr", outputs=out_metas(),
                       params=(str(node.target),)), grad=False)  # fmt: skip
            produced[node] = (name, 0)
            continue
        if node.op == "output":
            outs = [a for a in pytree.tree_leaves(node.args) if isinstance(a, torch.fx.Node)]
            inputs = [produced[a] for a in outs if a in produced]
            name = node.name
            in_metas = tuple(metas[p][k] for p, k in inputs)
            add(OpNode(name=name, kind="output", op="output",
                       inputs=tuple(p for p, _ in inputs), input_metas=in_metas), grad=False)  # fmt: skip
            for idx, (p, k) in enumerate(inputs):
                if not g.has_edge(p, name):
                    g.add_edge(p, name, tensor=metas[p][k], index=idx)
            continue
        # call_function
        target = node.target
        if target is operator.getitem:
            src, k = produced[node.args[0]]
            produced[node] = (src, node.args[1] if k == 0 else k)
            continue
        if target in _ALIAS_TARGETS and isinstance(node.args[0], torch.fx.Node):
            produced[node] = produced[node.args[0]]
            continue
        if _is_device_node(node):
            constants[node] = val
            continue
        op_name = str(target)
        if getattr(target, "__name__", "").startswith(_ASSERT_PREFIX) and not node.users:
            continue
        tensor_inputs: list[tuple[str, int]] = []

        def strip(x: Any, acc: list[tuple[str, int]] = tensor_inputs) -> Any:
            if isinstance(x, torch.fx.Node):
                if x in produced:
                    acc.append(produced[x])
                    return TensorArg(len(acc) - 1)
                return constants.get(x)
            return x

        args = pytree.tree_map(strip, node.args)
        kwargs = pytree.tree_map(strip, dict(node.kwargs))
        grad = any(needs_grad[p] for p, _ in tensor_inputs) and any(
            isinstance(v, torch.Tensor) and v.is_floating_point() for v in out_vals
        )
        read: list[str] = []
        for p, _ in tensor_inputs:
            for fqn in param_view[p]:
                if fqn not in read:
                    read.append(fqn)
        matrix_operands = _matrix_operands(target, tensor_inputs)
        grad_operands = sum(needs_grad[p] for p, _ in matrix_operands)
        fwd, bwd, priced = _flops(node, grad_operands if grad else 0)
        if not priced and not _is_cheap(target):
            unpriced.add(op_name)
        custom = node.meta.get("custom") or {}
        name = node.name
        views = tuple(read) if op_name in VIEW_OPS and len(tensor_inputs) == 1 else ()
        add(
            OpNode(
                name=name,
                kind="op",
                op=op_name,
                inputs=tuple(p for p, _ in tensor_inputs),
                input_metas=tuple(metas[p][k] for p, k in tensor_inputs),
                outputs=out_metas(),
                args=tuple(args),
                kwargs=tuple(sorted(kwargs.items())),
                fwd_flops=fwd,
                bwd_flops=bwd,
                params=tuple(read),
                module_path=custom.get("module_path", ""),
            ),
            grad=grad,
            views=views,
            aligned=aligned,
        )
        produced[node] = (name, 0)
        if pos in batch_arg_positions:
            batch_args[name] = batch_arg_positions[pos]
        for idx, (p, k) in enumerate(tensor_inputs):
            if not g.has_edge(p, name):
                g.add_edge(p, name, tensor=metas[p][k], index=idx)
    return g, unpriced, batch_args


def _matrix_operands(target: Any, inputs: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The operands whose gradients a matmul-like op's backward computes."""
    name = str(target)
    if name in ("aten.addmm.default", "aten.baddbmm.default"):
        return inputs[1:3]
    if name in MATMUL_OPS or name.startswith("aten.convolution"):
        return inputs[:2]
    return inputs
