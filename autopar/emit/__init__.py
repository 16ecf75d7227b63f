"""Plan -> torch.distributed, one file per PyTorch API (see ``apply.py`` for the order).

pm = autopar.emit.apply_plan(model, plan)   # inside an initialised process group
loss = pm.step(pm.local_batch(x), pm.local_batch(y)); opt.step()
"""

from autopar.emit.apply import ParallelModel, apply_plan, cross_entropy_loss
from autopar.emit.launch import launch, torchrun_command
from autopar.emit.mesh import build_device_mesh, rank_layout, validate_plan

__all__ = [
    "ParallelModel",
    "apply_plan",
    "cross_entropy_loss",
    "launch",
    "torchrun_command",
    "build_device_mesh",
    "rank_layout",
    "validate_plan",
]
