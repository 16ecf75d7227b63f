"""Stage modules that run the plan's layers of the traced program, and the pipeline schedule.

A ``StageModule`` runs a contiguous run of the plan's layers (one pipeline stage, or one
interleaved chunk) of the traced program (``emit.program``). It holds exactly the parameters
its layers read, registered under their real FQNs in a skeleton of the model's module tree, so
``named_parameters()`` names what the user's model names and FSDP / optimizers see ordinary
modules. Each block is a ``LayerRunner`` submodule at the block's module path: one FSDP unit
and the unit activation checkpointing wraps. Any container works (``ModuleList``,
``ModuleDict``, ``Sequential``, HF ``model.layers``): the cut is by layer, not by module class.

What crosses a stage boundary: every value a later layer reads that was made by an earlier
stage, in program order (the hidden state, and e.g. a mask built from the input ids); values
that depend on no input and no parameter (positions, rotary tables) are recomputed where they
are needed instead of sent. Activations cross as local shards: whole, or split along the
token dim under sequence parallelism (``tensor_parallel.boundary_placement``).

A parameter shared by layers on different stages (tied input/output embeddings) has a copy on
each stage, registered under the FQN the stage's layers use (``tok_embed.weight`` on the
first, ``lm_head.weight`` on the last); ``ParallelModel`` all-reduces their gradients once per
step, as Megatron-LM does.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from autopar.emit.program import LayerPart, Program
from autopar.emit.tensor_parallel import OpStats, boundary_placement, run_op, to_placement
from autopar.errors import ConfigError
from autopar.graph.trace import DEVICE_NODE

__all__ = ["Executor", "LayerRunner", "StageModule", "build_stage_module", "build_schedule"]


_RUN_AS = {
    torch.ops.aten.view.default: torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default: torch.ops.aten.reshape.default,
}
"""A traced ``view`` assumed the strides the fake tensors had; a local shard or a kernel on
another device may lay memory out differently, and ``reshape`` is the same values either way."""


_RESHAPES = frozenset(_RUN_AS.values())


def _contiguous(grad: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(grad, DTensor) and not grad.to_local().is_contiguous():
        return DTensor.from_local(
            grad.to_local().contiguous(), grad.device_mesh, grad.placements, run_check=False,
            shape=grad.shape, stride=grad.stride(),
        )  # fmt: skip
    return grad


class Executor:
    """Runs fx nodes of the program with the plan's layouts (plain tensors when tp == 1)."""

    def __init__(
        self,
        program: Program,
        *,
        tp_mesh: Any,
        sequence_parallel: bool,
        recompute: str,
        device: torch.device,
        recompute_layers: Sequence[str] = (),
        offload_layers: Sequence[str] = (),
    ) -> None:
        self.program = program
        self.device = device
        self.mesh = tp_mesh
        self.tp = tp_mesh.size() if tp_mesh is not None else 1
        self.sequence_parallel = sequence_parallel
        self.recompute = recompute
        self.recompute_layers = frozenset(recompute_layers)
        """Blocks fully recomputed on top of ``recompute`` (the plan's per-stage relief)."""
        self.offload_layers = frozenset(offload_layers)
        """Blocks whose saved activations wait in host memory for the backward."""
        self.stats = OpStats()
        self.layouts = {n: lay for part in program.parts for n, lay in part.layouts.items()}
        gm = program.traced.graph_module
        self._attrs = {n: getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}

    # -- one node -----------------------------------------------------------------------------
    def run_node(self, node: fx.Node, env: dict[fx.Node, Any], fetch: Callable) -> Any:
        def value(a: fx.Node) -> Any:
            if a in env:
                return env[a]
            return fetch(a)

        if node.name == DEVICE_NODE:
            return self.device
        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        target = _RUN_AS.get(node.target, node.target)
        if node.op == "get_attr":
            return self._attrs[node]
        if target is operator.getitem or self.mesh is None:
            return target(*args, **kwargs)
        out = run_op(node, args, kwargs, self.layouts.get(node), self.mesh, self.stats, target)
        if target in _RESHAPES and isinstance(out, torch.Tensor) and out.requires_grad:
            # the gradient of a reshape is reshaped back; a DTensor whose local shard arrives
            # with strides of a transpose cannot be viewed, so it is made contiguous first
            out.register_hook(_contiguous)
        return out

    def run_nodes(self, nodes: Sequence[fx.Node], env: dict[fx.Node, Any], fetch: Callable) -> None:
        for node in nodes:
            if node not in env:
                env[node] = self.run_node(node, env, fetch)

    # -- one layer, with selective recompute of its attention core -----------------------------
    def run_part(self, part: LayerPart, env: dict[fx.Node, Any], fetch: Callable) -> None:
        if self.recompute != "selective" or not part.core:
            self.run_nodes(part.nodes, env, fetch)
            return
        from autopar.emit.checkpointing import core_regions, run_checkpointed

        regions = core_regions(part)
        pending = {n: r for r in regions for n in r.nodes}
        for node in part.nodes:
            if node in env:
                continue
            region = pending.get(node)
            if region is None:
                env[node] = self.run_node(node, env, fetch)
            elif node is region.nodes[-1]:
                run_checkpointed(self, region, env, fetch)

    # -- boundaries -----------------------------------------------------------------------------
    def to_boundary(self, node: fx.Node, value: Any) -> Any:
        """A value leaving a stage: a plain local tensor in the boundary layout."""
        from torch.distributed.tensor import DTensor

        if not isinstance(value, DTensor):
            return value
        text = self._boundary_text(node)
        want = to_placement(text)
        if value.placements[0] != want:
            value = value.redistribute(self.mesh, [want])
        return value.to_local()

    def to_output(self, value: Any) -> tuple[Any, str]:
        """A model output as a plain tensor: whole, or still split over the vocabulary (last
        dim), which the loss reads where it is (``loss_parallel``); partial sums are reduced."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if not isinstance(value, DTensor):
            return value, "R"
        p = value.placements[0]
        if isinstance(p, Shard) and p.dim in (value.ndim - 1, -1):
            return value.to_local(), f"S({value.ndim - 1})"
        if p != Replicate():
            value = value.redistribute(self.mesh, [Replicate()])
        return value.to_local(), "R"

    def from_boundary(self, node: fx.Node, value: Any) -> Any:
        """A value entering a stage (a local tensor) as the DTensor it stands for."""
        from torch.distributed.tensor import DTensor

        if self.mesh is None or not isinstance(value, torch.Tensor):
            return value
        return DTensor.from_local(
            value, self.mesh, [to_placement(self._boundary_text(node))], run_check=False
        )

    def _boundary_text(self, node: fx.Node) -> str:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.is_floating_point():
            return "R"
        return boundary_placement(
            tuple(val.shape), sequence_parallel=self.sequence_parallel, tp=self.tp
        )


class LayerRunner(nn.Module):
    """One block of the program: its parameters live under this module (an FSDP unit)."""

    def __init__(self, part: LayerPart, executor: Executor, stage: StageModule) -> None:
        super().__init__()
        self._part = part
        self._executor = executor
        # a plain attribute, not a submodule: the stage owns the runner, not the other way
        object.__setattr__(self, "_stage", stage)

    def forward(self, env: dict[fx.Node, Any]) -> dict[fx.Node, Any]:
        ex, name = self._executor, self._part.name
        if ex.recompute == "full" or name in ex.recompute_layers:
            from autopar.emit.checkpointing import run_layer_checkpointed

            return run_layer_checkpointed(self, env)
        if name in ex.offload_layers:
            # what autograd saves for backward is copied to host memory and back on use
            pin = ex.device.type == "cuda"
            with torch.autograd.graph.save_on_cpu(pin_memory=pin):
                return self.run(env)
        return self.run(env)

    def run(self, env: dict[fx.Node, Any]) -> dict[fx.Node, Any]:
        env = dict(env)
        self._executor.run_part(self._part, env, self._stage.fetch)
        return {n: env[n] for n in self._stage.exports_of(self._part)}


class StageModule(nn.Module):
    """A contiguous run of the plan's layers (see the module docstring)."""

    def __init__(
        self,
        program: Program,
        part_indices: Sequence[int],
        *,
        params: dict[fx.Node, nn.Parameter],
        param_names: dict[fx.Node, str],
        buffers: dict[fx.Node, torch.Tensor],
        executor: Executor,
        is_first: bool,
        is_last: bool,
    ) -> None:
        super().__init__()
        self._program = program
        self._executor = executor
        self._parts = [program.parts[i] for i in part_indices]
        self.is_first, self.is_last = is_first, is_last
        self._where: dict[fx.Node, tuple[nn.Module, str]] = {}
        runners: dict[str, LayerRunner] = {}
        self._runner_of: dict[int, LayerRunner] = {}
        for part in self._parts:
            if part.kind == "block":
                runner = LayerRunner(part, executor, self)
                runners[part.name] = runner
                self._runner_of[id(part)] = runner
        for node, param in params.items():
            self._where[node] = self._place(param_names[node], param, runners, buffer=False)
        for node, buf in buffers.items():
            self._where[node] = self._place(program.buffers[node], buf, runners, buffer=True)
        for name, runner in runners.items():
            if not self._attached(name):
                self._attach_module(name, runner, runners)
        self._plan_io()

    # -- the skeleton of the model's module tree ------------------------------------------------
    def _attached(self, path: str) -> bool:
        try:
            self.get_submodule(path)
            return True
        except AttributeError:
            return False

    def _parent(self, path: str, runners: dict[str, LayerRunner]) -> tuple[nn.Module, str]:
        """The module that owns ``path``'s last name, made on the way (a block's runner where the
        path passes through a block, a bare ``nn.Module`` elsewhere), and that name."""
        *parents, leaf = path.split(".")
        mod: nn.Module = self
        prefix = ""
        for p in parents:
            prefix = f"{prefix}.{p}" if prefix else p
            child = mod._modules.get(p)
            if child is None:
                child = runners.get(prefix) or nn.Module()
                mod.add_module(p, child)
            mod = child
        return mod, leaf

    def _attach_module(self, path: str, module: nn.Module, runners: dict[str, LayerRunner]) -> None:
        mod, leaf = self._parent(path, runners)
        if leaf not in mod._modules:
            mod.add_module(leaf, module)

    def _place(
        self, fqn: str, tensor: torch.Tensor, runners: dict[str, LayerRunner], *, buffer: bool
    ) -> tuple[nn.Module, str]:
        mod, leaf = self._parent(fqn, runners)
        if buffer:
            mod.register_buffer(leaf, tensor, persistent=False)
        else:
            mod.register_parameter(leaf, tensor)
        return mod, leaf

    def fetch(self, node: fx.Node) -> Any:
        """The current value of a parameter / buffer placeholder (FSDP swaps them in and out)."""
        where = self._where.get(node)
        if where is None:
            raise ConfigError(
                f"stage needs {node.name}, which it does not hold (a parameter used on two "
                "stages that is not tied, or a value the plan did not send)",
                field="stages",
            )
        mod, attr = where
        return getattr(mod, attr)

    # -- what enters and leaves ----------------------------------------------------------------
    def _plan_io(self) -> None:
        program = self._program
        mine = {n for part in self._parts for n in part.nodes}
        layer_of = program.layer_of()
        first = min(layer_of[n] for n in mine) if mine else 0
        last = max(layer_of[n] for n in mine) if mine else 0
        order = {n: i for i, n in enumerate(program.graph.nodes)}

        def live_across(boundary: int) -> list[fx.Node]:
            """Non-constant values made before layer ``boundary`` and read at or after it."""
            out = []
            for n in program.graph.nodes:
                if n.op not in ("placeholder", "call_function") or n in program.constant:
                    continue
                if n in program.params or n in program.buffers:
                    continue
                if n.op == "call_function" and layer_of.get(n, -1) >= boundary:
                    continue
                users = [u for u in n.users if u.op == "output" or layer_of.get(u, -1) >= boundary]
                if users:
                    out.append(n)
            return sorted(out, key=order.__getitem__)

        self.inputs = list(program.inputs) if self.is_first else live_across(first)
        if self.is_last:
            self.outputs = [
                a for a in program.output.args[0] if isinstance(a, fx.Node)
            ]  # fmt: skip
        else:
            self.outputs = live_across(last + 1)
        exports: dict[int, list[fx.Node]] = {}
        for part in self._parts:
            made = set(part.nodes)
            exports[id(part)] = [
                n for n in made if any(u not in made for u in n.users if u.op != "output")
                or any(u.op == "output" for u in n.users) or n in self.outputs
            ]  # fmt: skip
        self._exports = exports

    def exports_of(self, part: LayerPart) -> list[fx.Node]:
        return self._exports[id(part)]

    def _constants(self, env: dict[fx.Node, Any]) -> None:
        """Recompute the constant values this stage reads (positions, rotary tables...)."""
        need: list[fx.Node] = []
        seen: set[fx.Node] = set()

        def visit(n: fx.Node) -> None:
            if n in seen or n in env or n not in self._program.constant:
                return
            seen.add(n)
            for a in n.all_input_nodes:
                visit(a)
            if n.op != "placeholder":
                need.append(n)

        for part in self._parts:
            for node in part.nodes:
                for a in node.all_input_nodes:
                    visit(a)
        owned = {n for part in self._parts for n in part.nodes}
        for n in need:
            if n not in owned and n not in env:
                env[n] = self._executor.run_node(n, env, self.fetch)

    def forward(self, *args: Any) -> Any:
        ex = self._executor
        env: dict[fx.Node, Any] = {}
        if self.is_first:
            for node, value in zip(self.inputs, args):
                env[node] = value
        else:
            for node, value in zip(self.inputs, args):
                env[node] = ex.from_boundary(node, value)
        self._constants(env)
        for part in self._parts:
            runner = self._runner_of.get(id(part))
            if runner is not None:
                env.update(runner(env))
            else:
                ex.run_part(part, env, self.fetch)
        out = [env[n] for n in self.outputs]
        if self.is_last:
            local = [ex.to_output(v) for v in out]
            self.output_placements = [p for _, p in local]
            values = tuple(v for v, _ in local)
            return values if len(values) != 1 else values[0]
        return tuple(ex.to_boundary(n, v) for n, v in zip(self.outputs, out))


def _stage_param_names(program: Program, parts: list[LayerPart]) -> dict[fx.Node, str]:
    """Each parameter this stage reads, named by the FQN its own layers use for it."""
    names: dict[fx.Node, str] = {}
    for part in parts:
        modules = {str(n.meta.get("custom", {}).get("module_path", "")) for n in part.nodes}
        for node in part.nodes:
            for a in node.all_input_nodes:
                if a in program.params and a not in names:
                    aliases = program.params[a]
                    pick = next((f for f in aliases if f.rpartition(".")[0] in modules), aliases[0])
                    names[a] = pick
    return names


def build_stage_module(
    program: Program,
    part_indices: Sequence[int],
    *,
    model: nn.Module,
    executor: Executor,
    is_first: bool,
    is_last: bool,
    distribute: Callable[[str, torch.Tensor], nn.Parameter] | None,
) -> StageModule:
    """The stage running ``part_indices`` with its own copies of the parameters it reads.

    ``distribute(fqn, tensor)`` turns a parameter into what the stage holds (a DTensor on the
    tp mesh with the plan's placement); None keeps plain parameters.
    """
    parts = [program.parts[i] for i in part_indices]
    names = _stage_param_names(program, parts)
    by_fqn = dict(model.named_parameters(remove_duplicate=False))
    buf_by_fqn = dict(model.named_buffers())
    params: dict[fx.Node, nn.Parameter] = {}
    for node in names:
        src = by_fqn[program.params[node][0]]
        if distribute is not None:
            params[node] = distribute(program.params[node][0], src)
        else:
            params[node] = nn.Parameter(src.detach().clone(), requires_grad=src.requires_grad)
    needed_buffers = {
        a for part in parts for n in part.nodes for a in n.all_input_nodes if a in program.buffers
    }
    # constants this stage recomputes may read buffers too (rotary inverse frequencies)
    frontier = [a for part in parts for n in part.nodes for a in n.all_input_nodes]
    seen: set[fx.Node] = set()
    while frontier:
        a = frontier.pop()
        if a in seen or a not in program.constant:
            continue
        seen.add(a)
        if a in program.buffers:
            needed_buffers.add(a)
        frontier += a.all_input_nodes
    buffers = {b: buf_by_fqn[program.buffers[b]].detach().clone() for b in needed_buffers}
    return StageModule(
        program, part_indices, params=params, param_names=names, buffers=buffers,
        executor=executor, is_first=is_first, is_last=is_last,
    )  # fmt: skip


def build_schedule(
    stage_modules: Sequence[nn.Module],
    *,
    stage_indices: Sequence[int],
    num_stages: int,
    schedule: str,
    microbatches: int,
    device: torch.device,
    pp_group: Any,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
) -> tuple[Any, list[Any]]:
    """``PipelineStage`` per local stage module and the plan's schedule over them.

    ``scale_grads=True`` divides accumulated gradients by the microbatch count, so with a
    mean-reducing ``loss_fn`` the gradients equal those of the mean loss over the whole batch.
    """
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import (
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    stages = [
        PipelineStage(m, stage_index=i, num_stages=num_stages, device=device, group=pp_group)
        for m, i in zip(stage_modules, stage_indices)
    ]
    if schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(
            stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True
        ), stages
    if len(stages) != 1:
        raise ConfigError(
            f"schedule {schedule!r} runs one stage per rank, this rank has {len(stages)}",
            field="schedule",
            allowed=("interleaved_1f1b",),
        )
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    return cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True), stages
