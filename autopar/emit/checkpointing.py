"""Activation recompute for ``plan.recompute``, on the traced program.

* ``full``: a block keeps only its inputs; its whole forward (tensor-parallel collectives
  included) is re-run in backward (Chen et al. 2016, Megatron's full recompute). The block's
  ``LayerRunner`` runs under ``torch.utils.checkpoint`` (non-reentrant): inside the FSDP unit,
  so FSDP gathers the block's weights once for backward and the recompute reuses them.
* ``selective``: only the attention core is re-run (Korthikanti et al. 2022): the region the
  search priced, found by its ops (``graph.regions.attention_core``: a fused attention node, or
  the score matmul -> softmax -> PV matmul chain), is run as one checkpointed function, so its
  internal activations (the score tensors) are not kept and everything else is.

Recompute runs the same ops with the same layouts as the forward, so shapes always match (the
old module-hook version recomputed a sequence-sharded block with gathered inputs and failed).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

from torch import fx

from autopar.emit.program import LayerPart
from autopar.errors import ConfigError

__all__ = ["Region", "core_regions", "run_checkpointed", "run_layer_checkpointed"]


@dataclass(frozen=True, slots=True)
class Region:
    """Nodes run as one checkpointed function, in program order (the last one triggers it)."""

    nodes: tuple[fx.Node, ...]
    inputs: tuple[fx.Node, ...]
    outputs: tuple[fx.Node, ...]


def core_regions(part: LayerPart) -> list[Region]:
    """The attention-core regions of a layer: connected groups of core nodes (plus the
    ``getitem``s reading them), each with its external inputs and the values read outside."""
    order = {n: i for i, n in enumerate(part.nodes)}
    core = set(part.core)
    for n in part.nodes:  # a multi-output core op's getitems belong to its region
        if n.op == "call_function" and any(a in core for a in n.all_input_nodes):
            if n.target is operator.getitem:
                core.add(n)
    groups: list[set[fx.Node]] = []
    for n in sorted(core, key=order.__getitem__):
        linked = [g for g in groups if any(a in g for a in n.all_input_nodes)]
        merged = {n}.union(*linked) if linked else {n}
        groups = [g for g in groups if g not in linked] + [merged]
    regions = []
    for g in groups:
        nodes = tuple(sorted(g, key=order.__getitem__))
        first, last = order[nodes[0]], order[nodes[-1]]
        between = [n for n in part.nodes[first:last] if n not in g]
        if any(a in g for n in between for a in n.all_input_nodes):
            raise ConfigError(
                f"layer {part.name!r}: an op between the attention core's ops reads one of its "
                "values, so the core cannot be recomputed as one region; use recompute full "
                "or none",
                field="recompute",
            )
        inputs = tuple(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in g))
        outputs = tuple(n for n in nodes if any(u not in g for u in n.users))
        regions.append(Region(nodes=nodes, inputs=inputs, outputs=outputs))
    return regions


def run_checkpointed(executor: Any, region: Region, env: dict, fetch: Any) -> None:
    """Run ``region`` under ``torch.utils.checkpoint``: its internals are recomputed in backward."""
    from torch.utils.checkpoint import checkpoint

    def fn(*values: Any) -> tuple:
        local = dict(zip(region.inputs, values))
        executor.run_nodes(region.nodes, local, fetch)
        return tuple(local[n] for n in region.outputs)

    values = [env[a] if a in env else fetch(a) for a in region.inputs]
    outs = checkpoint(fn, *values, use_reentrant=False)
    env.update(zip(region.outputs, outs))
    for n in region.nodes:
        env.setdefault(n, None)  # run: later nodes must not run it again


def run_layer_checkpointed(runner: Any, env: dict) -> dict:
    """A block under full recompute: only its inputs are kept for backward."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(runner.run, env, use_reentrant=False)
