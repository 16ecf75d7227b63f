"""Train a model under an autopar plan.

    autopar plan gpt:layers=4,hidden=128,heads=4,vocab=128,seq_len=16 --cluster pcie-4090 \
        --global-batch 16 --dtype fp32 --json plan.json
    autopar launch plan.json -- examples/train_gpt.py --steps 20

``autopar launch`` runs this file under torchrun with the plan's world size and passes the
plan path in ``AUTOPAR_PLAN``; ``--plan`` overrides it. The model is ``--model`` (default: the
spec the plan was searched for, ``plan.model_spec``: a zoo name, ``family:k=v,...``,
``hf:Config:...`` or ``package.module:factory``), built under one seed on every rank. Data is
synthetic but learnable: each sequence counts upwards modulo the vocabulary from a random
start, so the loss visibly falls within a few steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from autopar.emit.apply import apply_plan
from autopar.emit.launch import PLAN_ENV
from autopar.models import parse_model_spec
from autopar.models.zoo import DTYPES
from autopar.plan import Plan


def counting_batch(
    *, step: int, batch: int, seq_len: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch of step ``step`` (identical on every rank): inputs and next-token targets."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    seq = (start + torch.arange(seq_len + 1)) % vocab
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--plan", default=os.environ.get(PLAN_ENV), help=f"plan JSON (default ${PLAN_ENV})"
    )
    p.add_argument("--model", default=None, help="model spec (default: the plan's model_spec)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.plan:
        print(
            f"no plan: pass --plan or run under `autopar launch` (sets {PLAN_ENV})", file=sys.stderr
        )
        return 2
    plan = Plan.from_json(args.plan)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if distributed else 0
    try:
        spec = args.model or plan.model_spec
        if not spec:
            print("the plan names no model spec: pass --model", file=sys.stderr)
            return 2
        torch.manual_seed(args.seed)  # same initial weights on every rank
        # the dtype the plan was priced for (apply_plan refuses a model in another one)
        model = parse_model_spec(spec, device="cpu").to(DTYPES[plan.dtype])
        vocab = next(m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding))
        pm = apply_plan(model, plan)
        opt = pm.make_optimizer(torch.optim.AdamW, lr=args.lr)  # fp32 masters for 16-bit plans
        for step in range(args.steps):
            t0 = time.perf_counter()
            x, y = counting_batch(
                step=step, batch=plan.global_batch, seq_len=plan.seq_len, vocab=vocab
            )
            loss = pm.step(pm.local_batch(x), pm.local_batch(y))
            opt.step()
            opt.zero_grad()
            if rank == 0:
                print(
                    f"step {step} loss {float(loss):.4f} ({time.perf_counter() - t0:.2f} s)",
                    flush=True,
                )
        if distributed:
            dist.barrier()  # let in-flight pipeline sends finish before any rank tears down
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
