"""Pipeline stages cut at the plan's layer boundaries, run by ``torch.distributed.pipelining``.

Layer names follow ``autopar.graph.layers``: ``"embed"`` (every top-level module registered
before the block container), ``"<container>.<key>"`` for each block (``"layers.3"``) and
``"head"`` (every top-level module registered after the container). A stage module is the
model with the parts of other stages removed, the torchtitan pattern: container entries are
deleted and embed/head modules set to None, so the model's own ``forward`` skips them and a
later stage takes hidden states instead of tokens. Parameter names stay those of the full
model, which is what ``plan.placements`` refers to.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from autopar.errors import ConfigError

__all__ = [
    "LayerMap",
    "layer_map",
    "build_stage_module",
    "build_schedule",
]

EMBED = "embed"
HEAD = "head"


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerMap:
    """How plan layer names map onto a model's top-level modules."""

    container: str | None
    """Name of the top-level ``ModuleDict``/``ModuleList`` holding the repeated blocks."""
    blocks: tuple[str, ...]
    """Keys of the container in model order (``"0"``, ``"1"``, ...)."""
    embed: tuple[str, ...]
    """Top-level children registered before the container."""
    head: tuple[str, ...]
    """Top-level children registered after the container."""

    @property
    def names(self) -> tuple[str, ...]:
        """Plan layer names in model order."""
        out: list[str] = [EMBED] if self.embed else []
        out += [f"{self.container}.{k}" for k in self.blocks]
        return tuple(out + ([HEAD] if self.head else []))


def layer_map(model: nn.Module) -> LayerMap:
    """Find the block container: the top-level ModuleDict/ModuleList with the most children.

    Generic on purpose (no GPT names): any model built the torchtitan way (embedding modules,
    a container of blocks, head modules) can be cut into stages.
    """
    children = list(model.named_children())
    # an emptied container (a pipeline stage without blocks) still marks the embed/head split
    containers = [
        (len(m), i, name)
        for i, (name, m) in enumerate(children)
        if isinstance(m, nn.ModuleDict | nn.ModuleList)
    ]
    if not containers:
        return LayerMap(container=None, blocks=(), embed=tuple(n for n, _ in children), head=())
    _, _, container = max(containers, key=lambda c: (c[0], -c[1]))
    blocks = tuple(k for k, _ in getattr(model, container).named_children())
    # None children (already removed parts) are kept in _modules; keep them in the map so a
    # stage module maps the same way as the full model.
    names = list(model._modules)
    pos = names.index(container)
    return LayerMap(
        container=container,
        blocks=blocks,
        embed=tuple(names[:pos]),
        head=tuple(names[pos + 1 :]),
    )


def build_stage_module(
    model: nn.Module, *, layers: Sequence[str], copy_model: bool = False
) -> nn.Module:
    """The part of ``model`` that runs ``layers`` (plan layer names of one stage).

    ``copy_model=False`` cuts ``model`` in place (one stage per rank: no second copy of the
    weights); interleaved schedules need several stage modules per rank and pass True.
    """
    lmap = layer_map(model)
    if lmap.container is None:
        raise ConfigError(
            f"{type(model).__name__} has no ModuleDict/ModuleList of blocks to cut into "
            "pipeline stages",
            field="stages",
        )
    if any(p is not None for p in model._parameters.values()):
        raise ConfigError(
            f"{type(model).__name__} has parameters on the root module "
            f"({list(model._parameters)}); pipeline stages can only split submodules",
            field="stages",
        )
    keep = set(layers)
    stage = copy.deepcopy(model) if copy_model else model
    container = getattr(stage, lmap.container)
    if not isinstance(container, nn.ModuleDict):
        raise ConfigError(
            f"'{lmap.container}' is a {type(container).__name__}; pipeline stages delete blocks "
            "by key and need an nn.ModuleDict (torchtitan pattern) so names stay stable",
            field="stages",
        )
    for key in lmap.blocks:
        if f"{lmap.container}.{key}" not in keep:
            del container[key]
    for part, names in ((EMBED, lmap.embed), (HEAD, lmap.head)):
        if part not in keep:
            for name in names:
                setattr(stage, name, None)
    return stage


def build_schedule(
    stage_modules: Sequence[nn.Module],
    *,
    stage_indices: Sequence[int],
    num_stages: int,
    schedule: str,
    microbatches: int,
    device: torch.device,
    pp_group,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
):
    """``PipelineStage`` per local stage module and the plan's schedule over them.

    ``scale_grads=True`` divides accumulated gradients by the microbatch count, so with a
    mean-reducing ``loss_fn`` the gradients equal those of the mean loss over the whole batch.
    Stage input/output shapes are inferred at the first step by the pipelining runtime.
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
