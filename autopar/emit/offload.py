"""Model-state offload as the plan priced it: where the optimizer's state and step live.

* ``optimizer`` (ZeRO-Offload, Ren et al. 2021): the optimizer state and an fp32 master copy
  of every parameter this rank holds live in host memory and the step runs on the CPU; after
  backward each gradient is copied to the host, and after the step the new weights are copied
  back. :class:`MasterWeightOptimizer` wraps any ``torch.optim`` optimizer to do that; on the
  device (``device=None``) it is plain mixed precision: 16-bit weights and gradients, fp32
  master copies and state, which is what the search prices for a bf16 / fp16 plan.
* ``full``: FSDP2's ``CPUOffloadPolicy`` (``fsdp.apply_data_parallel``) keeps the weight,
  gradient and optimizer shards on the host, so a plain optimizer already steps there.
* ``nvme`` (ZeRO-Infinity's optimizer state on NVMe) has no PyTorch API: refused.

Activation offload of single blocks is ``torch.autograd.graph.save_on_cpu`` in
``pipeline.LayerRunner``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from autopar.errors import ConfigError
from autopar.plan import Plan

__all__ = ["MasterWeightOptimizer", "check_offload"]


def check_offload(plan: Plan, *, has_process_group: bool) -> None:
    """Refuse (before any collective) an offload the emitter cannot run as priced."""
    if plan.offload != "none" and plan.offload_device == "nvme":
        raise ConfigError(
            "the plan keeps the optimizer state on NVMe (ZeRO-Infinity), which PyTorch cannot "
            "run; re-plan with more host memory or fewer devices per host, or run the plan's "
            "layout with DeepSpeed's offload_optimizer: {device: nvme}",
            field="offload_device",
        )
    if plan.offload == "full" and plan.zero_stage != 3:
        raise ConfigError(
            f"offload 'full' is FSDP2's CPU offload, which needs ZeRO-3; the plan has "
            f"zero_stage={plan.zero_stage}",
            field="zero_stage",
        )
    if plan.offload == "full" and plan.num_devices == 1 and not has_process_group:
        raise ConfigError(
            "offload 'full' runs through FSDP2, which needs a process group even on one device: "
            "launch with `torchrun --nproc-per-node 1` (or init_process_group) first",
            field="offload",
        )


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


class MasterWeightOptimizer:
    """``optimizer_cls`` stepping fp32 master copies of ``params``; the model keeps its weights.

    The masters live on ``device`` (``"cpu"``: ZeRO-Offload) or, with ``device=None``, next to
    each parameter. A rank's parameters may be tp / FSDP shards (DTensors): only the local
    shard is copied, so memory per rank is what the search priced (state / dp under ZeRO).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        optimizer_cls: type,
        *,
        device: str | None = "cpu",
        **kwargs: Any,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        pin = device == "cpu" and any(_local(p).device.type == "cuda" for p in self.params)
        self.master = [
            _local(p).detach().to(device or _local(p).device, torch.float32, copy=True)
            .requires_grad_(True)
            for p in self.params
        ]  # fmt: skip
        if pin:
            self.master = [m.pin_memory() for m in self.master]
        self.inner = optimizer_cls(self.master, **kwargs)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else _local(p.grad).to(m.device, torch.float32)
        self.inner.step()
        for p, m in zip(self.params, self.master):
            local = _local(p)
            local.copy_(m.to(local.device, local.dtype, non_blocking=True))

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
