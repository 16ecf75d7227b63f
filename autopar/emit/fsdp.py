"""Data parallelism on the ``dp`` mesh axis: FSDP2 ``fully_shard`` or FSDP2-based ``replicate``.

ZeRO stage -> PyTorch API:

* 0: ``replicate`` (``torch.distributed._composable.replicate_with_fsdp``, DDP semantics built on
  FSDP2 so it composes with tensor-parallel DTensors and pipeline stages): full parameters,
  gradients and optimizer state on every rank, gradients all-reduced.
* 3: ``fully_shard(reshard_after_forward=True)`` per block, then on the stage root: parameters,
  gradients and optimizer state sharded; parameters all-gathered before each use and freed after.
* 1 and 2: ``fully_shard(reshard_after_forward=False)``. Gradients are reduce-scattered and
  optimizer state sharded as in ZeRO-2; parameters are gathered once per forward and kept
  until backward ends. ZeRO-1 (sharded optimizer only, full gradients) has no FSDP2
  equivalent; it is run as ZeRO-2, which computes the same update with less memory.
* ``offload == "full"`` (ZeRO-3 only): ``fully_shard(offload_policy=CPUOffloadPolicy())``, the
  sharded parameters, gradients and optimizer state live in host memory and each block's
  shard is copied to the device before use (what the search priced as ``full`` offload).

Which tensor dim FSDP shards follows the plan's ``dp`` placement ``S(d)`` through
``shard_placement_fn`` (dim 0 when the plan says ``R``), so a plan's sharding is what runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from autopar.errors import ConfigError

__all__ = ["apply_data_parallel"]


def apply_data_parallel(
    module: nn.Module,
    *,
    dp_mesh,
    zero_stage: int,
    blocks: Iterable[nn.Module] = (),
    shard_dims: Mapping[str, int] | None = None,
    cpu_offload: bool = False,
) -> str:
    """Apply DP/ZeRO to one stage module in place; returns the API used (for logs and tests).

    ``blocks`` are wrapped one by one before the root so each block's parameters are gathered
    and freed on their own (communication overlaps the previous block's compute).
    ``shard_dims`` maps parameter FQNs to the dim FSDP shards. ``cpu_offload`` keeps the
    shards in host memory (ZeRO-3 only).
    """
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
    from torch.distributed.tensor import Shard

    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(
            f"unknown ZeRO stage {zero_stage!r}", field="zero_stage", allowed=(0, 1, 2, 3)
        )
    if cpu_offload and zero_stage != 3:
        raise ConfigError(
            f"CPU offload of the model state needs ZeRO stage 3, the plan has {zero_stage}",
            field="zero_stage",
        )
    if zero_stage == 0:
        replicate(module, mesh=dp_mesh)
        return "replicate"

    dims = {id(p): shard_dims[n] for n, p in module.named_parameters() if n in (shard_dims or {})}

    def placement(param: nn.Parameter):
        d = dims.get(id(param))
        return Shard(d) if d is not None else None

    reshard = zero_stage == 3
    pin = dp_mesh.device_type == "cuda"
    policy = CPUOffloadPolicy(pin_memory=pin) if cpu_offload else OffloadPolicy()
    for unit in (*blocks, module):
        fully_shard(
            unit, mesh=dp_mesh, reshard_after_forward=reshard, shard_placement_fn=placement,
            offload_policy=policy,
        )  # fmt: skip
    extra = ", offload_policy=CPUOffloadPolicy()" if cpu_offload else ""
    return f"fully_shard(reshard_after_forward={reshard}{extra})"
