"""``apply_plan``: the model the user brings, parallelised exactly as the plan priced it.

What runs is the model's traced aten program (``emit.program``), the same graph the search
priced, not its Python ``forward``: layers, op layouts on tp and stage cuts come from the plan
and the graph, never from module names. Order of application, and why:

1. **Validate** the plan against the world size and the model, trace the model and match the
   plan's layers and per-op layouts to the trace, check that DTensor can run every split op and
   that selective recompute's regions are well formed. All pure and identical on every rank, so
   a plan that cannot be applied as priced is refused (``ConfigError``) before any collective.
2. **Mesh** (``init_device_mesh``): the first collective.
3. **Stages**: each rank builds only its stages' modules, holding only the parameters their
   layers read, as DTensors with the plan's tp placements (``tensor_parallel``).
4. **Recompute** is part of how a stage runs its blocks (``checkpointing``).
5. **FSDP / replicate** last, per block then on the stage root (``fsdp``): ``fully_shard`` must
   see the tp DTensors to shard them further over ``dp``.
6. **Schedule**: ``PipelineStage`` per local stage and the plan's schedule (pp > 1).

The result, :class:`ParallelModel`, hides the schedule: ``step(inputs, targets)`` runs forward
and backward for this rank's data-parallel share of the batch, reduces what the plan reduces
once per step (gradients partial over tp, tied weights' copies across stages) and returns the
batch's mean loss on every rank. ``pm.make_optimizer(torch.optim.AdamW, lr=...)`` builds the
optimizer where the plan puts it (on the device, or on the host for an ``optimizer`` offload
plan: ``emit.offload``). Every rank must start from the same weights (build the model under
the same seed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autopar.emit.mesh import (
    RankLayout,
    build_device_mesh,
    default_device_type,
    rank_layout,
    validate_plan,
)
from autopar.emit.program import Program, build_program, example_inputs_for
from autopar.errors import AutoparError, ConfigError
from autopar.plan import Plan, parse_placement

__all__ = ["ParallelModel", "apply_plan", "cross_entropy_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of ``logits[..., V]`` against integer ``targets[...]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


class ParallelModel:
    """This rank's part of the model, parallelised as the plan says, with a training step."""

    def __init__(
        self,
        *,
        plan: Plan,
        layout: RankLayout,
        mesh: Any,
        modules: tuple[nn.Module, ...],
        loss_fn: LossFn,
        device: torch.device,
        executor: Any,
        program: Program,
        schedule: Any = None,
        tied_groups: tuple[tuple[Any, tuple[tuple[nn.Module, str], ...]], ...] = (),
        dp_api: str = "",
    ) -> None:
        self.plan = plan
        self.layout = layout
        self.mesh = mesh
        self.modules = modules
        """Stage modules this rank runs (one when pp == 1)."""
        self.loss_fn = loss_fn
        self.device = device
        self.executor = executor
        """Runs the program; ``executor.stats`` counts any deviation from the plan's layouts."""
        self.program = program
        self.schedule = schedule
        self.tied_groups = tied_groups
        self.dp_api = dp_api
        """Data-parallel API applied (``replicate``, ``fully_shard(...)``, or "")."""
        num_stages = len(plan.stages)
        self.has_first_stage = 0 in layout.stage_indices
        self.has_last_stage = (num_stages - 1) in layout.stage_indices

    # -- parameters --------------------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters this rank holds, under the model's own FQNs."""
        seen: set[int] = set()
        for m in self.modules:
            for name, p in m.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Unsharded copies of this rank's parameters (collective over each parameter's mesh)."""
        return {n: _full(p.detach()) for n, p in self.named_parameters()}

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Unsharded gradients of this rank's parameters (collective; None grads skipped)."""
        return {n: _full(p.grad) for n, p in self.named_parameters() if p.grad is not None}

    def make_optimizer(self, optimizer_cls: type = torch.optim.AdamW, **kwargs: Any) -> Any:
        """``optimizer_cls`` over ``self.parameters()`` where and how the plan keeps it: for a
        16-bit plan with fp32 master weights (what the search priced: 12 bytes of Adam state
        per parameter include the master copy), on the host for ``offload == "optimizer"``.
        With offload, Adam and AdamW use their fused CPU kernel (the rate the search priced)."""
        if self.plan.offload != "none" and issubclass(
            optimizer_cls, (torch.optim.Adam, torch.optim.AdamW)
        ):
            kwargs.setdefault("fused", True)
        from autopar.emit.offload import MasterWeightOptimizer

        if self.plan.offload == "optimizer":
            return MasterWeightOptimizer(self.parameters(), optimizer_cls, **kwargs)
        if self.plan.dtype in ("bf16", "fp16"):
            return MasterWeightOptimizer(self.parameters(), optimizer_cls, device=None, **kwargs)
        return optimizer_cls(self.parameters(), **kwargs)

    # -- data --------------------------------------------------------------------------------
    def local_batch(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's data-parallel share (dim 0) of a global batch (tp ranks share data)."""
        dp = self.plan.parallel.dp
        if tensor.shape[0] % dp:
            raise ValueError(f"global batch {tensor.shape[0]} is not divisible by dp={dp}")
        n = tensor.shape[0] // dp
        i = self.layout.coord("dp")
        return tensor[i * n : (i + 1) * n]

    # -- training ----------------------------------------------------------------------------
    def step(self, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        """Forward + backward on this rank's local batch; returns the global mean loss.

        ``inputs`` is what the model's forward takes (a tensor, a tuple or a dict), batch on
        dim 0, ``plan.microbatches x plan.micro_batch_size`` samples. Gradients are left in
        ``.grad`` (averaged over data-parallel ranks and microbatches); call the optimizer next.
        """
        flat = self._flat_inputs(inputs)
        m = self.plan.microbatches
        want = m * self.plan.micro_batch_size
        for x in flat:
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] != want:
                raise ValueError(
                    f"local batch of {x.shape[0]} samples; the plan runs {m} microbatches of "
                    f"{self.plan.micro_batch_size} = {want} per data-parallel rank"
                )
        flat = [x.to(self.device) if isinstance(x, torch.Tensor) else x for x in flat]
        targets = targets.to(self.device)
        if self.schedule is not None:
            local = self._pipeline_step(flat, targets)
        else:
            local = self._accumulate_step(flat, targets)
        self._finish_gradients()
        return self._global_loss(local)

    def _flat_inputs(self, inputs: Any) -> list[Any]:
        """The program's input leaves: the structure the model was traced with, or one tensor
        for a model whose forward takes a single tensor argument (``input_ids`` of HF models)."""
        traced = self.program.traced
        if isinstance(inputs, torch.Tensor) and traced.input_spec.num_leaves == 1:
            return [inputs]
        return traced.flatten_inputs(inputs)

    def _pipeline_step(self, flat: list, targets: torch.Tensor) -> torch.Tensor | None:
        losses: list[torch.Tensor] = []
        args = tuple(flat) if self.has_first_stage else ()
        target = targets if self.has_last_stage else None
        self.schedule.step(*args, target=target, losses=losses)
        if not self.has_last_stage:
            return None
        return torch.stack([x.detach().float() for x in losses]).mean()

    def _accumulate_step(self, flat: list, targets: torch.Tensor) -> torch.Tensor:
        (module,) = self.modules
        m = self.plan.microbatches
        total = torch.zeros((), device=self.device)
        chunks = [x.chunk(m) if isinstance(x, torch.Tensor) and x.dim() > 0 else [x] * m
                  for x in flat]  # fmt: skip
        for i, y in enumerate(targets.chunk(m)):
            last = i == m - 1
            if hasattr(module, "set_requires_gradient_sync") and m > 1:
                module.set_requires_gradient_sync(last)
            out = module(*(c[i] for c in chunks))
            loss = self.loss_fn(out, y)
            (loss / m).backward()
            total += loss.detach().float()
        return total / m

    def _finish_gradients(self) -> None:
        """Once per step: gradients partial over tp, and copies of tied weights across stages."""
        import torch.distributed as dist

        from autopar.emit.tensor_parallel import reduce_partial_grads

        reduce_partial_grads(dict(self.named_parameters()))
        for group, where in self.tied_groups:
            grads = [g for g in (getattr(m, a).grad for m, a in where) if g is not None]
            if not grads:
                continue
            # row-major whatever the gradients' strides: collectives reduce raw buffers
            total = torch.zeros_like(_local(grads[0]), memory_format=torch.contiguous_format)
            for g in grads:
                total += _local(g)
            dist.all_reduce(total, group=group)
            for g in grads:
                _local(g).copy_(total)

    def _global_loss(self, local: torch.Tensor | None) -> torch.Tensor:
        import torch.distributed as dist

        if self.plan.num_devices == 1:
            assert local is not None
            return local
        contributes = local is not None and self.layout.coord("tp") == 0
        value = (
            local / self.plan.parallel.dp if contributes else torch.zeros((), device=self.device)
        )
        value = value.reshape(()).clone()
        dist.all_reduce(value)
        return value


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.clone()


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _one_rank_mesh(device_type: str) -> Any:
    """A one-rank ``dp`` mesh: FSDP2 (its CPU offload) needs one even on a single device."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (1,), mesh_dim_names=("dp",))


def _check_args(model: Any, plan: Any, loss_fn: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be a torch.nn.Module, got {type(model).__name__}", field="model"
        )
    if not isinstance(plan, Plan):
        raise ConfigError(
            f"plan must be an autopar.Plan (Plan.from_json(path)), got {type(plan).__name__}",
            field="plan",
        )
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError("loss_fn must be callable(outputs, targets) -> loss", field="loss_fn")


def _stage_parts(program: Program, plan: Plan) -> list[list[int]]:
    index = {part.name: i for i, part in enumerate(program.parts)}
    return [[index[name] for name in stage.layers] for stage in plan.stages]


def _tied_groups(
    program: Program, plan: Plan, stage_parts: list[list[int]], modules: dict[int, nn.Module]
) -> list[tuple[Any, tuple[tuple[nn.Module, str], ...]]]:
    """Process groups joining the copies of each tied weight across pipeline ranks (collective:
    every rank creates every group in the same order)."""
    import torch.distributed as dist

    pp = plan.parallel.pp
    if pp == 1:
        return []
    size = plan.parallel.dp * plan.parallel.tp
    stage_of_part = {p: s for s, parts in enumerate(stage_parts) for p in parts}
    out = []
    rank = dist.get_rank()
    for node in sorted(program.params, key=lambda n: program.params[n][0]):
        stages = sorted(
            {
                stage_of_part[i]
                for i, part in enumerate(program.parts)
                for n in part.nodes
                if node in n.all_input_nodes
            }
        )
        ranks_pp = sorted({s % pp for s in stages})
        if len(ranks_pp) <= 1:
            continue
        mine: list[tuple[nn.Module, str]] = []
        for s in stages:
            mod = modules.get(s)
            if mod is not None:
                mine.append(mod._where[node])  # (module, attribute): FSDP replaces the tensor
        for c in range(size):
            ranks = [r * size + c for r in ranks_pp]
            group = dist.new_group(ranks)
            if rank in ranks:
                out.append((group, tuple(mine)))
    return out


def _loss_wrapper(loss_fn: LossFn, is_default: bool, module_of_last: Any, tp_mesh: Any) -> LossFn:
    """The loss on the model's output as the last stage returns it (maybe split over the
    vocabulary: then cross-entropy runs vocabulary-parallel, as the plan priced)."""

    def wrapped(output: Any, target: torch.Tensor) -> torch.Tensor:
        out = output[0] if isinstance(output, tuple | list) else output
        placement = (getattr(module_of_last, "output_placements", None) or ["R"])[0]
        if placement == "R" or tp_mesh is None:
            return loss_fn(out, target)
        from torch.distributed.tensor import DTensor

        from autopar.emit.tensor_parallel import to_placement

        dt = DTensor.from_local(out, tp_mesh, [to_placement(placement)], run_check=False)
        if is_default:
            from torch.distributed.tensor.parallel import loss_parallel

            with loss_parallel():
                loss = loss_fn(dt, target)
            return loss.to_local() if isinstance(loss, DTensor) else loss
        return loss_fn(dt.full_tensor(), target)

    return wrapped


def apply_plan(
    model: nn.Module,
    plan: Plan,
    *,
    loss_fn: LossFn | None = None,
    example_inputs: Any = None,
) -> ParallelModel:
    """Parallelise ``model`` as ``plan`` says on this rank; see the module docstring for order.

    Call inside an initialised default process group (``torchrun`` + ``init_process_group``);
    a one-device plan also runs without one. ``loss_fn(outputs, targets)`` must average over
    its batch (default: token cross-entropy). ``example_inputs``: one batch of what the model's
    forward takes, for models without an ``example_inputs()`` method.
    """
    import torch.distributed as dist

    from autopar.emit.checkpointing import core_regions
    from autopar.emit.fsdp import apply_data_parallel
    from autopar.emit.offload import check_offload
    from autopar.emit.pipeline import Executor, build_schedule, build_stage_module
    from autopar.emit.tensor_parallel import check_ops_supported, distribute_parameter

    _check_args(model, plan, loss_fn)
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = 1, 0
    validate_plan(plan, world_size=world, model=model)
    check_offload(plan, has_process_group=dist.is_initialized())
    inputs = example_inputs_for(model, plan, plan.micro_batch_size, example_inputs)
    try:
        program = build_program(model, plan, inputs)
    except AutoparError:
        raise
    stage_parts = _stage_parts(program, plan)
    if plan.parallel.tp > 1:
        nodes = [n for part in program.parts for n in part.nodes if n.op == "call_function"]
        layouts = {n: lay for part in program.parts for n, lay in part.layouts.items()}
        check_ops_supported([n.target for n in nodes], [layouts.get(n) for n in nodes])
    if plan.recompute == "selective":
        for part in program.parts:
            core_regions(part)
    layout = rank_layout(plan, rank)
    user_loss = loss_fn or cross_entropy_loss

    mesh = build_device_mesh(plan)  # the first collective
    if mesh is not None:
        device_type = mesh.device_type
    elif dist.is_initialized():
        device_type = default_device_type()
    else:  # one device, no process group: the GPU when there is one
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if device_type == "cuda"
        else torch.device("cpu")
    )
    tp_mesh = mesh["tp"] if plan.parallel.tp > 1 else None
    executor = Executor(
        program, tp_mesh=tp_mesh, sequence_parallel=plan.sequence_parallel,
        recompute=plan.recompute, device=device, recompute_layers=plan.recompute_layers,
        offload_layers=plan.activation_offload_layers,
    )  # fmt: skip
    tp_of = {fqn: spec[plan.stage_dim_names.index("tp")] for fqn, spec in plan.placements.items()
             if "tp" in plan.stage_dim_names}  # fmt: skip

    def distribute(fqn: str, tensor: torch.Tensor) -> nn.Parameter:
        tensor = tensor.to(device)
        if tp_mesh is None:
            return nn.Parameter(tensor.detach().clone(), requires_grad=tensor.requires_grad)
        return distribute_parameter(tensor, tp_mesh, tp_of.get(fqn, "R"))

    modules: dict[int, nn.Module] = {}
    num = len(plan.stages)
    for i in layout.stage_indices:
        modules[i] = build_stage_module(
            program, stage_parts[i], model=model, executor=executor, is_first=i == 0,
            is_last=i == num - 1, distribute=distribute,
        ).to(device)  # fmt: skip
    tied = _tied_groups(program, plan, stage_parts, modules)
    dp_api = ""
    if plan.parallel.dp > 1 or plan.offload == "full":
        dp_mesh = mesh["dp"] if mesh is not None else _one_rank_mesh(device_type)
        dp_dims = {
            fqn: dim
            for fqn, spec in plan.placements.items()
            for kind, dim in [parse_placement(spec[0])]
            if kind == "S"
        }
        for module in modules.values():
            runners = list(module._runner_of.values())
            dp_api = apply_data_parallel(
                module, dp_mesh=dp_mesh, zero_stage=plan.zero_stage, blocks=runners,
                shard_dims=dp_dims, cpu_offload=plan.offload == "full",
            )  # fmt: skip
    last = modules.get(num - 1)
    wrapped = _loss_wrapper(user_loss, loss_fn is None, last, tp_mesh)
    ordered = tuple(modules[i] for i in layout.stage_indices)
    schedule = None
    if plan.parallel.pp > 1:
        schedule, _ = build_schedule(
            ordered,
            stage_indices=layout.stage_indices,
            num_stages=num,
            schedule=plan.schedule,
            microbatches=plan.microbatches,
            device=device,
            pp_group=mesh.get_group("pp"),
            loss_fn=wrapped,
        )
    return ParallelModel(
        plan=plan,
        layout=layout,
        mesh=mesh,
        modules=ordered,
        loss_fn=wrapped,
        device=device,
        executor=executor,
        program=program,
        schedule=schedule,
        tied_groups=tuple(tied),
        dp_api=dp_api,
    )
