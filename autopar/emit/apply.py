"""``apply_plan``: turn a model and a Plan into something to train with, on this rank.

Order of application, and why:

1. **Validate** the plan against the world size and the model. Pure, so every rank raises the
   same ``ConfigError`` before any collective (a mismatch found later hangs the job).
2. **Mesh** (``init_device_mesh``): the first collective.
3. **Pipeline split** first: each rank keeps only its stage's layers, so tensor parallelism,
   checkpointing and FSDP see (and shard, and allocate) only the parameters this rank owns, and
   each stage module becomes its own FSDP root, which ``PipelineStage`` expects.
4. **Tensor parallelism** next: ``fully_shard`` must see TP's DTensor parameters to shard them
   further over ``dp`` (2-D parameters); sharding over dp first would hide the tp layout.
5. **Activation checkpointing** after TP so recompute replays the TP input/output hooks of the
   block's submodules, and before FSDP so FSDP's all-gather hooks sit outside the recomputed
   region (parameters are gathered once by FSDP's pre-backward hook, not re-gathered inside
   recompute).
6. **FSDP / replicate** last, per block then on the stage root.
7. **Schedule**: ``PipelineStage`` per local stage and the plan's schedule (pp > 1).

The result, :class:`ParallelModel`, hides the schedule: ``step(inputs, targets)`` runs forward
and backward for this rank's data-parallel share of the batch and returns the batch's mean
loss on every rank; the user owns the optimizer (``torch.optim.AdamW(pm.parameters())``).
Every rank must start from the same weights (build the model under the same seed).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from autopar.emit.checkpointing import apply_activation_checkpointing
from autopar.emit.fsdp import apply_data_parallel
from autopar.emit.mesh import RankLayout, build_device_mesh, rank_layout, validate_plan
from autopar.emit.pipeline import build_schedule, build_stage_module, layer_map
from autopar.emit.tensor_parallel import TPAssignment, apply_tensor_parallel
from autopar.errors import ConfigError
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
        mesh,
        modules: tuple[nn.Module, ...],
        loss_fn: LossFn,
        device: torch.device,
        schedule=None,
        tp_assignments: tuple[TPAssignment, ...] = (),
        dp_api: str = "",
    ) -> None:
        self.plan = plan
        self.layout = layout
        self.mesh = mesh
        self.modules = modules
        """Stage modules this rank runs (the whole model when pp == 1)."""
        self.loss_fn = loss_fn
        self.device = device
        self.schedule = schedule
        self.tp_assignments = tp_assignments
        """Modules tensor parallelism touched and how (colwise/rowwise/distribute)."""
        self.dp_api = dp_api
        """Data-parallel API applied (``replicate``, ``fully_shard(...)``, or "")."""
        num_stages = len(plan.stages)
        self.has_first_stage = 0 in layout.stage_indices
        self.has_last_stage = (num_stages - 1) in layout.stage_indices

    # -- parameters --------------------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters this rank holds, under the full model's FQNs (what ``placements`` use)."""
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
    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward + backward on this rank's local batch; returns the global mean loss.

        Gradients are left in ``.grad`` (averaged over data-parallel ranks and microbatches);
        call the optimizer next. The returned loss is the same on every rank (one all-reduce).
        """
        m = self.plan.microbatches
        if inputs.shape[0] % m:
            raise ValueError(
                f"local batch of {inputs.shape[0]} does not split into microbatches={m}"
            )
        inputs = inputs.to(self.device)
        targets = targets.to(self.device)
        if self.schedule is not None:
            local = self._pipeline_step(inputs, targets)
        else:
            local = self._accumulate_step(inputs, targets)
        return self._global_loss(local)

    def _pipeline_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first_stage else ()
        target = targets if self.has_last_stage else None
        self.schedule.step(*args, target=target, losses=losses)
        if not self.has_last_stage:
            return None
        return torch.stack([x.detach().float() for x in losses]).mean()

    def _accumulate_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        (module,) = self.modules
        m = self.plan.microbatches
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(zip(inputs.chunk(m), targets.chunk(m))):
            last = i == m - 1
            if hasattr(module, "set_requires_gradient_sync") and m > 1:
                module.set_requires_gradient_sync(last)
            loss = self.loss_fn(module(x), y)
            (loss / m).backward()
            total += loss.detach().float()
        return total / m

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


def _axis_dims(plan: Plan, axis: str) -> dict[str, str]:
    names = plan.stage_dim_names
    if axis not in names:
        return {}
    i = names.index(axis)
    return {fqn: spec[i] for fqn, spec in plan.placements.items()}


def _check_tied_parameters(model: nn.Module, plan: Plan) -> None:
    """A parameter shared by two layers must not be split across pipeline stages."""
    if plan.parallel.pp == 1:
        return
    lmap = layer_map(model)
    stage_of: dict[str, int] = {}
    for i, s in enumerate(plan.stages):
        for layer in s.layers:
            stage_of[layer] = i % plan.parallel.pp

    def layer_of(fqn: str) -> str:
        top = fqn.split(".")[0]
        if top == lmap.container:
            return ".".join(fqn.split(".")[:2])
        return "embed" if top in lmap.embed else "head"

    owners: dict[int, list[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(fqn)
    for names in owners.values():
        ranks = {stage_of.get(layer_of(n)) for n in names}
        if len(ranks) > 1:
            raise ConfigError(
                f"parameters {names} are one tied tensor but the plan puts them on different "
                "pipeline ranks; untie them (e.g. tie_embeddings=False) or keep them in one stage",
                field="stages",
            )


def apply_plan(model: nn.Module, plan: Plan, *, loss_fn: LossFn | None = None) -> ParallelModel:
    """Parallelise ``model`` as ``plan`` says on this rank; see the module docstring for order.

    Call inside an initialised default process group (``torchrun`` + ``init_process_group``);
    a one-device plan also runs without one. ``loss_fn(outputs, targets)`` must average over
    its batch (default: token cross-entropy), which is what makes microbatch and data-parallel
    averaging equal to the single-device mean loss.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = 1, 0
    lmap = layer_map(model)
    validate_plan(
        plan,
        world_size=world,
        model=model,
        model_layer_names=lmap.names if plan.parallel.pp > 1 else None,
    )
    _check_tied_parameters(model, plan)
    layout = rank_layout(plan, rank)
    loss_fn = loss_fn or cross_entropy_loss

    mesh = build_device_mesh(plan)
    device_type = mesh.device_type if mesh is not None else "cpu"
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if device_type == "cuda"
        else torch.device("cpu")
    )

    if plan.parallel.pp > 1:
        copy_model = len(layout.stage_indices) > 1
        modules = tuple(
            build_stage_module(model, layers=plan.stages[i].layers, copy_model=copy_model)
            for i in layout.stage_indices
        )
    else:
        modules = (model,)
    modules = tuple(m.to(device) for m in modules)

    tp_of = _axis_dims(plan, "tp")
    dp_dims = {
        fqn: dim
        for fqn, text in _axis_dims(plan, "dp").items()
        for kind, dim in [parse_placement(text)]
        if kind == "S"
    }
    assignments: list[TPAssignment] = []
    dp_api = ""
    for module in modules:
        stage_map = layer_map(module)
        blocks = (
            [b for b in getattr(module, stage_map.container).children()]
            if stage_map.container
            else [module]
        )
        if plan.parallel.tp > 1:
            assignments += apply_tensor_parallel(
                module,
                tp_mesh=mesh["tp"],
                tp_of=tp_of,
                sequence_parallel=plan.sequence_parallel,
            )
        apply_activation_checkpointing(
            blocks if plan.recompute != "none" else (), mode=plan.recompute
        )
        if plan.parallel.dp > 1:
            dp_api = apply_data_parallel(
                module,
                dp_mesh=mesh["dp"],
                zero_stage=plan.zero_stage,
                blocks=blocks if stage_map.container else (),
                shard_dims=dp_dims,
            )
    if plan.parallel.tp > 1 and not assignments:
        warnings.warn(
            f"tp={plan.parallel.tp} but the plan shards no parameter on tp: every tp rank "
            "computes the same thing",
            stacklevel=2,
        )

    schedule = None
    if plan.parallel.pp > 1:
        schedule, _ = build_schedule(
            modules,
            stage_indices=layout.stage_indices,
            num_stages=len(plan.stages),
            schedule=plan.schedule,
            microbatches=plan.microbatches,
            device=device,
            pp_group=mesh.get_group("pp"),
            loss_fn=loss_fn,
        )
    return ParallelModel(
        plan=plan,
        layout=layout,
        mesh=mesh,
        modules=modules,
        loss_fn=loss_fn,
        device=device,
        schedule=schedule,
        tp_assignments=tuple(assignments),
        dp_api=dp_api,
    )
