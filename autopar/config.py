"""TrainingConfig: the training setup a plan is searched for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from autopar.errors import ConfigError

__all__ = ["TrainingConfig", "Dtype", "Optimizer", "DTYPE_BYTES", "OPTIMIZER_STATE_BYTES"]

Dtype = Literal["bf16", "fp16", "fp32"]
Optimizer = Literal["adam", "adamw", "sgd", "sgd_momentum"]

#: bytes per element of each training dtype
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}

#: optimizer state bytes per parameter, including the fp32 master copy under mixed precision
#: (ZeRO paper, arXiv 1910.02054: Adam keeps fp32 weight + momentum + variance = 12 bytes).
OPTIMIZER_STATE_BYTES: dict[tuple[str, bool], int] = {
    ("adam", True): 12,
    ("adamw", True): 12,
    ("sgd", True): 4,
    ("sgd_momentum", True): 8,
    ("adam", False): 8,
    ("adamw", False): 8,
    ("sgd", False): 0,
    ("sgd_momentum", False): 4,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingConfig:
    """What is trained and how; the search chooses everything else."""

    global_batch: int = 512
    """Sequences per optimizer step, summed over data-parallel replicas and microbatches."""
    seq_len: int | None = None
    """Tokens per sequence; None takes the model's own default (e.g. 2048 for GPT-3)."""
    dtype: Dtype = "bf16"
    """Compute dtype of weights and activations; bf16/fp16 imply mixed precision with fp32 master weights."""
    optimizer: Optimizer = "adam"
    """Optimizer whose state is kept per parameter (adam: 12 bytes/param under mixed precision)."""
    memory_headroom: float = 0.1
    """Fraction of device memory kept free for the allocator, workspaces and fragmentation."""

    def __post_init__(self) -> None:
        if not isinstance(self.global_batch, int) or self.global_batch < 1:
            raise ConfigError(
                f"must be a positive integer, got {self.global_batch!r}", field="global_batch"
            )
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 1):
            raise ConfigError(f"must be a positive integer, got {self.seq_len!r}", field="seq_len")
        if self.dtype not in get_args(Dtype):
            raise ConfigError(
                f"unknown dtype {self.dtype!r}", field="dtype", allowed=get_args(Dtype)
            )
        if self.optimizer not in get_args(Optimizer):
            raise ConfigError(
                f"unknown optimizer {self.optimizer!r}",
                field="optimizer",
                allowed=get_args(Optimizer),
            )
        if not 0.0 <= self.memory_headroom < 1.0:
            raise ConfigError(
                f"must be in [0, 1), got {self.memory_headroom!r}", field="memory_headroom"
            )

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of weights, gradients and activations."""
        return DTYPE_BYTES[self.dtype]

    @property
    def mixed_precision(self) -> bool:
        """True when an fp32 master copy is kept beside 16-bit weights."""
        return self.dtype != "fp32"

    @property
    def optimizer_state_bytes(self) -> int:
        """Optimizer bytes per parameter (master weights included under mixed precision)."""
        return OPTIMIZER_STATE_BYTES[(self.optimizer, self.mixed_precision)]
