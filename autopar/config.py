"""TrainingConfig: the training setup a plan is searched for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from autopar.errors import ConfigError

__all__ = [
    "TrainingConfig",
    "Dtype",
    "Optimizer",
    "Attention",
    "SequenceParallel",
    "Offload",
    "STACKS",
    "RECOMPUTE_KINDS",
    "DTYPE_BYTES",
    "OPTIMIZER_STATE_BYTES",
    "OPTIMIZER_STEP_PASSES",
]

Dtype = Literal["bf16", "fp16", "fp32"]
Optimizer = Literal[
    "adam", "adamw", "sgd", "sgd_momentum", "adafactor", "lion", "adam8bit", "stateless"
]
Offload = Literal["auto", "none", "optimizer", "full"]
Attention = Literal["flash", "unfused"]
SequenceParallel = Literal["auto", "on", "off"]
#: activation recompute kinds: none, the attention core (selective), whole blocks (full)
RECOMPUTE_KINDS = ("none", "selective", "full")

#: Software stacks a plan can be priced for: what each sets, and where that comes from.
STACKS: dict[str, dict[str, object]] = {
    "megatron-2021": {
        "attention": "unfused",
        "sequence_parallel": "off",
        "overlap_grad_reduce": False,
        "grad_dtype": None,
        "pipeline_scatter_gather": True,
        "recompute": ("none", "full"),
        "source": "Megatron-LM as measured in Narayanan et al., SC21 (arXiv 2104.04473): "
        "attention materialises the score tensor (fused scale-mask-softmax kernel, no "
        "FlashAttention), no sequence parallelism and no selective recompute (both added in "
        "2022, Korthikanti et al., arXiv 2205.05198), data-parallel gradient all-reduce after "
        "the pipeline flush, gradients in the fp16 training dtype, and each pipeline send "
        "split over the tensor-parallel ranks and all-gathered over NVLink on arrival (§4.1, "
        "scatter/gather)",
    },
    "megatron-core": {
        "attention": "flash",
        "sequence_parallel": "on",
        "overlap_grad_reduce": True,
        "grad_dtype": "fp32",
        "pipeline_scatter_gather": False,
        "recompute": RECOMPUTE_KINDS,
        "source": "Megatron-Core (NVIDIA/Megatron-LM core_v0.x): Transformer Engine fused "
        "attention, --sequence-parallel with tensor parallelism, --overlap-grad-reduce "
        "--overlap-param-gather with --use-distributed-optimizer; with --bf16 gradients are "
        "accumulated and reduced in fp32 main-grad buffers (megatron/training/arguments.py "
        "turns on --accumulate-allreduce-grads-in-fp32); pipeline sends whole tensors (core's "
        "p2p_communication has no scatter/gather: with --sequence-parallel they are already "
        "split)",
    },
    "torchtitan": {
        "attention": "flash",
        "sequence_parallel": "on",
        "overlap_grad_reduce": True,
        "grad_dtype": "fp32",
        "pipeline_scatter_gather": False,
        "recompute": RECOMPUTE_KINDS,
        "source": "torchtitan 0.3 (pytorch/torchtitan): F.scaled_dot_product_attention "
        "(flash / cuDNN kernels), sequence parallel applied with tensor parallel, FSDP2 "
        "reduce-scatter overlapped with backward, in fp32 (training.mixed_precision_reduce "
        "defaults to float32); torch.distributed.pipelining sends each stage's output whole",
    },
}

#: bytes per element of each training dtype
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}

#: optimizer state bytes per parameter, including the fp32 master copy under mixed precision
#: (ZeRO paper, arXiv 1910.02054: Adam keeps fp32 weight + momentum + variance = 12 bytes).
#: Adafactor (arXiv 1804.04235) keeps factored second moments (a row and a column vector per
#: matrix: negligible per parameter) and no first moment by default: the master copy only.
#: Lion (arXiv 2302.06675) keeps one fp32 momentum. 8-bit Adam (bitsandbytes, arXiv 2110.02861)
#: keeps both moments in 8 bits. "stateless" is the limit case of SWAN-style optimizers
#: (arXiv 2412.13148): no state beyond the master copy.
OPTIMIZER_STATE_BYTES: dict[tuple[str, bool], int] = {
    ("adam", True): 12,
    ("adamw", True): 12,
    ("sgd", True): 4,
    ("sgd_momentum", True): 8,
    ("adafactor", True): 4,
    ("lion", True): 8,
    ("adam8bit", True): 6,
    ("stateless", True): 4,
    ("adam", False): 8,
    ("adamw", False): 8,
    ("sgd", False): 0,
    ("sgd_momentum", False): 4,
    ("adafactor", False): 0,
    ("lion", False): 4,
    ("adam8bit", False): 2,
    ("stateless", False): 0,
}

#: Optimizer-step passes over the state per parameter, relative to reading and writing it once
#: (an update reads and writes every state tensor; Adafactor also reduces rows and columns).
OPTIMIZER_STEP_PASSES: dict[str, float] = {
    "adam": 1.0, "adamw": 1.0, "sgd": 1.0, "sgd_momentum": 1.0, "adafactor": 1.5,
    "lion": 1.0, "adam8bit": 1.2, "stateless": 1.0,
}  # fmt: skip


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
    offload: Offload = "auto"
    """Where model state may live off the device: ``auto`` (searched: only where it helps),
    ``none``, ``optimizer`` (optimizer state and fp32 master weights in host memory, updated
    by the CPU: ZeRO-Offload) or ``full`` (also the weights and gradients: FSDP2's CPU offload).
    Activation offload per pipeline stage is searched unless ``none``."""
    grad_clip: float | None = 1.0
    """Global gradient-norm clipping threshold (Megatron-LM's ``--clip-grad`` default 1.0);
    None turns it off. Priced: one pass over the gradients for their norm, a scalar
    all-reduce over every rank, one pass to scale them."""
    stack: str | None = None
    """A software-stack preset (``STACKS``) setting the five fields below together (a field
    given explicitly wins over the preset) and the recompute kinds the search may choose (a
    recompute pinned in the search wins)."""
    attention: Attention | None = None
    """How attention runs: ``flash`` (fused kernel, the default) or ``unfused`` (scores
    materialised in memory)."""
    sequence_parallel: SequenceParallel | None = None
    """``auto`` (searched, the default), ``on`` or ``off``."""
    overlap_grad_reduce: bool | None = None
    """Data-parallel gradient reduction overlapped with backward (default on)."""
    grad_dtype: Dtype | None = None
    """Dtype gradients are accumulated and reduced in (default: ``dtype``). fp32 under bf16
    training doubles gradient memory and data-parallel traffic; Megatron-LM and torchtitan
    do it by default for accuracy."""
    pipeline_scatter_gather: bool | None = None
    """A pipeline send of an activation replicated over tensor parallelism goes as 1/tp per
    rank and is all-gathered over tp on arrival (Megatron-LM 2021-22, SC21 §4.1; default off).
    Sends already split by sequence parallelism are unchanged."""

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
        if self.grad_clip is not None and (
            isinstance(self.grad_clip, bool)
            or not isinstance(self.grad_clip, int | float)
            or self.grad_clip <= 0
        ):
            raise ConfigError(
                f"must be a positive number or None, got {self.grad_clip!r}", field="grad_clip"
            )
        if self.offload not in get_args(Offload):
            raise ConfigError(
                f"unknown offload {self.offload!r}", field="offload", allowed=get_args(Offload)
            )
        if self.stack is not None and self.stack not in STACKS:
            raise ConfigError(f"unknown stack {self.stack!r}", field="stack", allowed=tuple(STACKS))
        if self.attention is not None and self.attention not in get_args(Attention):
            raise ConfigError(
                f"unknown attention {self.attention!r}",
                field="attention",
                allowed=get_args(Attention),
            )
        if self.sequence_parallel is not None and self.sequence_parallel not in get_args(
            SequenceParallel
        ):
            raise ConfigError(
                f"unknown sequence_parallel {self.sequence_parallel!r}",
                field="sequence_parallel",
                allowed=get_args(SequenceParallel),
            )
        if self.overlap_grad_reduce is not None and not isinstance(self.overlap_grad_reduce, bool):
            raise ConfigError("must be true or false", field="overlap_grad_reduce")
        if self.pipeline_scatter_gather is not None and not isinstance(
            self.pipeline_scatter_gather, bool
        ):
            raise ConfigError("must be true or false", field="pipeline_scatter_gather")
        if self.grad_dtype is not None and self.grad_dtype not in get_args(Dtype):
            raise ConfigError(
                f"unknown grad_dtype {self.grad_dtype!r}",
                field="grad_dtype",
                allowed=get_args(Dtype),
            )

    def _stacked(self, key: str, default: object) -> object:
        own = getattr(self, key)
        if own is not None:
            return own
        if self.stack is not None:
            return STACKS[self.stack][key]
        return default

    @property
    def attention_kernel(self) -> str:
        """``flash`` or ``unfused``, after the stack preset."""
        return str(self._stacked("attention", "flash"))

    @property
    def sequence_parallel_mode(self) -> str:
        """``auto``, ``on`` or ``off``, after the stack preset."""
        return str(self._stacked("sequence_parallel", "auto"))

    @property
    def overlaps_grad_reduce(self) -> bool:
        """Whether dp gradient reduction overlaps backward, after the stack preset."""
        return bool(self._stacked("overlap_grad_reduce", True))

    @property
    def scatter_gathers_pipeline(self) -> bool:
        """Whether tp-replicated pipeline sends are split over tp, after the stack preset."""
        return bool(self._stacked("pipeline_scatter_gather", False))

    @property
    def recompute_options(self) -> tuple[str, ...]:
        """Activation recompute kinds the stack offers the search (every kind without one)."""
        if self.stack is None:
            return RECOMPUTE_KINDS
        return tuple(STACKS[self.stack]["recompute"])  # type: ignore[arg-type]

    @property
    def grad_dtype_name(self) -> str:
        """Dtype of gradients as accumulated and reduced, after the stack preset."""
        return str(self._stacked("grad_dtype", None) or self.dtype)

    @property
    def grad_bytes(self) -> int:
        """Bytes per gradient element."""
        return DTYPE_BYTES[self.grad_dtype_name]

    @property
    def state_bytes_per_param(self) -> float:
        """Weight + gradient + optimizer-state bytes of one parameter, before any ZeRO split."""
        return self.dtype_bytes + self.grad_bytes + self.optimizer_state_bytes

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
