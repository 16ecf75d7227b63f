"""Hand-made plans for the emitter's validation tests and the per-rank body that applies one.

Kept out of the ``test_*`` modules so spawned processes import only this file. Plans that train
come from the search (``tests/emit/matrix.py``); these are for checking what is refused.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from autopar.emit.apply import apply_plan
from autopar.errors import ConfigError
from autopar.plan import LayerSpec, Mesh, Parallel, Plan, Stage

VOCAB = 128
SEQ = 16
HIDDEN = 64
GLOBAL_BATCH = 8


def small_gpt(layers: int, *, seed: int = 0) -> torch.nn.Module:
    from autopar.models.gpt import gpt

    torch.manual_seed(seed)
    return gpt(
        layers=layers,
        hidden=HIDDEN,
        heads=4,
        vocab=VOCAB,
        seq_len=SEQ,
        tie_embeddings=False,
        dropout=0.0,
        device="cpu",
    )


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def megatron_tp(layers: int) -> dict[str, str]:
    """Megatron's split as tp placements: q/k/v/up column, o/down row, vocab-parallel ends."""
    out = {"tok_embed.weight": "S(0)", "lm_head.weight": "S(0)"}
    for i in range(layers):
        p = f"layers.{i}"
        for lin in ("attn.q", "attn.k", "attn.v", "mlp.up"):
            out[f"{p}.{lin}.weight"] = "S(0)"
            out[f"{p}.{lin}.bias"] = "S(0)"
        for lin in ("attn.o", "mlp.down"):
            out[f"{p}.{lin}.weight"] = "S(1)"
            out[f"{p}.{lin}.bias"] = "R"
    return out


def make_plan(
    *,
    layers: int,
    dp: int = 1,
    tp: int = 1,
    pp: int = 1,
    virtual_stages: int = 1,
    stage_layers: list[list[str]] | None = None,
    schedule: str = "1f1b",
    microbatches: int | None = None,
    zero_stage: int = 0,
    recompute: str = "none",
    tp_placements: dict[str, str] | None = None,
    num_devices: int | None = None,
    sequence_parallel: bool = False,
) -> Plan:
    """A hand-made plan in the search's format (placements per non-pp axis, row-major ranks)."""
    names = tuple(n for n, d in (("pp", pp), ("dp", dp), ("tp", tp)) if d > 1) or ("dp",)
    shape = tuple({"pp": pp, "dp": dp, "tp": tp}[n] for n in names)
    all_layers = ["embed"] + [f"layers.{i}" for i in range(layers)] + ["head"]
    stage_layers = stage_layers or [all_layers]
    per_stage = dp * tp
    stages = tuple(
        Stage(
            layers=tuple(ls),
            devices=tuple(range((i % pp) * per_stage, (i % pp + 1) * per_stage)),
        )
        for i, ls in enumerate(stage_layers)
    )
    axes = [n for n in names if n != "pp"]
    placements: dict[str, tuple[str, ...]] = {}
    for fqn, tp_text in (tp_placements or {}).items():
        placements[fqn] = tuple(
            tp_text if a == "tp" else ("S(0)" if zero_stage == 3 else "R") for a in axes
        )
    local_batch = GLOBAL_BATCH // dp
    microbatches = microbatches if microbatches is not None else max(1, pp)
    specs = tuple(
        LayerSpec(name=n, kind=n if n in ("embed", "head") else "block", signature=n[:6])
        for n in all_layers
    )
    return Plan(
        layers=specs,
        model="gpt-test",
        cluster="cpu-gloo",
        num_devices=num_devices if num_devices is not None else dp * tp * pp,
        global_batch=GLOBAL_BATCH,
        seq_len=SEQ,
        dtype="fp32",
        parallel=Parallel(dp=dp, tp=tp, pp=pp),
        mesh=Mesh(shape=shape, dim_names=names),
        stages=stages,
        microbatches=microbatches,
        micro_batch_size=local_batch // microbatches,
        schedule=schedule,
        virtual_stages=virtual_stages,
        zero_stage=zero_stage,
        recompute=recompute,
        sequence_parallel=sequence_parallel,
        placements=placements,
    )


def bad_plan_worker(rank: int, world: int, plan_dict: dict, layers: int, match: str) -> None:
    """Only rank 0 applies the bad plan; the others never enter a collective.

    If ``apply_plan`` issued any collective before raising, rank 0 would block until the
    harness timeout and fail with a timeout error instead of the expected ConfigError.
    """
    if rank == 0:
        plan = Plan.from_dict(plan_dict)
        try:
            apply_plan(small_gpt(layers), plan)
        except ConfigError as e:
            assert match in str(e), f"error does not name the mismatch: {e}"
        else:
            raise AssertionError("apply_plan accepted a bad plan")
    dist.barrier()
