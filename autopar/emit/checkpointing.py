"""Activation checkpointing for ``plan.recompute``.

* ``full``: each block keeps only its input; the whole block is recomputed in backward
  (Chen et al. 2016, what Megatron calls full recompute).
* ``selective``: Korthikanti et al. 2022's choice: recompute only the attention core
  (``softmax(QK^T)V``), whose activations grow with ``s^2`` yet cost little to redo, and save
  every other op's output. Implemented with PyTorch's op-level selective checkpointing: a
  policy that marks the attention-core ops ``MUST_RECOMPUTE`` and everything else
  ``PREFER_SAVE`` (collectives included, so recompute never repeats a tensor-parallel
  all-reduce).

The composable ``torch.distributed._composable.checkpoint`` is used rather than
``checkpoint_wrapper``: it installs hooks instead of wrapping the module, so parameter names
stay those the plan uses, and it composes with ``fully_shard`` applied afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from autopar.errors import ConfigError

__all__ = ["ATTENTION_CORE_OPS", "attention_core_policy", "apply_activation_checkpointing"]


def _ops(*names: str) -> frozenset:
    """Overloads ``"op.overload"`` of aten that exist in this PyTorch build."""
    found = []
    for name in names:
        op, _, overload = name.partition(".")
        packet = getattr(torch.ops.aten, op, None)
        if packet is not None and overload in packet.overloads():
            found.append(getattr(packet, overload))
    return frozenset(found)


ATTENTION_CORE_OPS = _ops(
    "_scaled_dot_product_flash_attention.default",
    "_scaled_dot_product_flash_attention_for_cpu.default",
    "_scaled_dot_product_efficient_attention.default",
    "_scaled_dot_product_cudnn_attention.default",
    "_scaled_dot_product_attention_math.default",
    "bmm.default",
    "baddbmm.default",
    "_softmax.default",
    "softmax.int",
)
"""Ops recomputed under ``selective``: scaled-dot-product attention kernels and the unfused
``QK^T`` / softmax / ``PV`` sequence (both are what SDPA lowers to)."""


def attention_core_policy(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: recompute the attention core, save everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op in ATTENTION_CORE_OPS:
        return CheckpointPolicy.MUST_RECOMPUTE
    return CheckpointPolicy.PREFER_SAVE


def apply_activation_checkpointing(blocks: Iterable[nn.Module], *, mode: str) -> int:
    """Checkpoint each module of ``blocks`` per ``mode``; returns how many were wrapped.

    Call after tensor parallelism (so recompute replays the TP hooks inside the block) and
    before ``fully_shard`` (so FSDP's unshard happens outside the recomputed region).
    """
    from torch.distributed._composable import checkpoint
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    if mode == "none":
        return 0
    if mode not in ("full", "selective"):
        raise ConfigError(
            f"unknown recompute mode {mode!r}",
            field="recompute",
            allowed=("none", "selective", "full"),
        )
    count = 0
    for block in blocks:
        if mode == "full":
            checkpoint(block)
        else:
            checkpoint(
                block,
                context_fn=partial(create_selective_checkpoint_contexts, attention_core_policy),
            )
        count += 1
    return count
