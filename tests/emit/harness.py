"""Run a function on N CPU processes joined by gloo, the way torchrun would, for tests.

Rendezvous goes through a ``FileStore`` in the test's tmp dir instead of a TCP port, so tests
running at the same time never collide on a port. Each process uses one intra-op thread (the
machine is shared) and a short collective timeout, so a rank that waits for a collective its
peers never issue fails within seconds instead of hanging the suite.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60


def _entry(
    rank: int, fn: Callable[..., Any], world: int, store: str, args: tuple, timeout_s: float
) -> None:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store, world),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, world, *args)
        # Every rank finishes its sends/receives before any tears gloo down: a rank that exits
        # while a peer's pipeline p2p is still in flight aborts that peer (std::terminate).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    *,
    world: int,
    tmp_path: Path,
    args: tuple = (),
    timeout_s: float = TIMEOUT_S,
) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` spawned processes; re-raise any failure.

    ``timeout_s`` bounds every collective and store wait in the workers.
    """
    store = str(tmp_path / f"store-{fn.__name__}")
    mp.spawn(_entry, args=(fn, world, store, args, timeout_s), nprocs=world, join=True)
