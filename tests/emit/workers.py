"""Per-rank bodies of the emitter's multi-process tests and the hand-made plans they apply.

Kept out of the ``test_*`` modules so spawned processes import only this file.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from autopar.emit.apply import apply_plan, cross_entropy_loss
from autopar.errors import ConfigError
from autopar.plan import Mesh, Parallel, Plan, Stage, parse_placement

VOCAB = 128
SEQ = 16
HIDDEN = 64
GLOBAL_BATCH = 8
RTOL = 1e-5
ATOL = 1e-8
"""Absolute floor (L2 norm) for gradients that are exactly zero in exact arithmetic: the key
bias (softmax is shift-invariant) has a true gradient of 0 and a float32 one of ~5e-10."""


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
    microbatches: int = 1,
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
    return Plan(
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


def _close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    """``||a - b|| <= RTOL * ||b|| + ATOL`` and the relative error, for messages."""
    diff = float((a - b).norm())
    ref = float(b.norm())
    return diff <= RTOL * ref + ATOL, diff / max(ref, 1e-30)


def _check_structure(pm, plan: Plan, expect: dict[str, Any], full_model: torch.nn.Module) -> None:
    """Evidence that the parallelism really happened (equal numbers alone would not prove it)."""
    params = dict(pm.named_parameters())
    full = dict(full_model.named_parameters())
    if "stage_blocks" in expect:
        want = expect["stage_blocks"][pm.layout.stage_indices[0] % plan.parallel.pp]
        have = sorted(int(n.split(".")[1]) for n in params if n.startswith("layers."))
        have = sorted(set(have))
        assert have == want, f"rank {pm.layout.rank} holds blocks {have}, expected {want}"
        assert len(params) < len(full)
    for name, (axis, dim) in expect.get("sharded", {}).items():
        if name not in params:
            continue
        p = params[name]
        assert isinstance(p, DTensor), f"{name} is not a DTensor: parallelism was skipped"
        mesh_dims = p.device_mesh.mesh_dim_names
        placement = p.placements[mesh_dims.index(axis)]
        # FSDP's dp shard of a dim that tp already splits shows as _StridedShard(dim)
        assert isinstance(placement, Shard | _StridedShard) and placement.dim == dim, (
            name,
            axis,
            p.placements,
        )
        assert p.to_local().numel() < full[name].numel()
    if "dp_api" in expect:
        assert pm.dp_api == expect["dp_api"], pm.dp_api
    for name in expect.get("replicated_dtensor", ()):
        if name in params:
            p = params[name]
            assert isinstance(p, DTensor) and p.device_mesh.mesh_dim_names[-1] == "tp", name


def _record_block_seq_lens(pm) -> list[int]:
    """Sequence length of every block output this rank computes (local view)."""
    seen: list[int] = []
    for module in pm.modules:
        for block in module.layers.values():
            block.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1]))
    return seen


def equivalence_worker(
    rank: int, world: int, plan_dict: dict, layers: int, expect: dict[str, Any]
) -> None:
    """Two training steps of the plan vs. one process on the whole batch: same loss, grads, weights."""
    _train_and_compare(Plan.from_dict(plan_dict), layers, expect)


def expect_from_plan(plan: Plan) -> dict[str, Any]:
    """Structure a plan promises: tp-sharded parameters; dp-sharded ones under ZeRO >= 1."""
    sharded: dict[str, tuple[str, int]] = {}
    axes = plan.stage_dim_names
    for fqn, spec in plan.placements.items():
        for axis, text in zip(axes, spec):
            kind, dim = parse_placement(text)
            if axis == "tp" and kind == "S" and plan.parallel.tp > 1:
                sharded[fqn] = ("tp", dim)
    out: dict[str, Any] = {"sharded": sharded}
    if plan.sequence_parallel and plan.parallel.tp > 1:
        out["block_seq_len"] = SEQ // plan.parallel.tp
    if plan.parallel.dp > 1:
        out["dp_api"] = (
            "replicate"
            if plan.zero_stage == 0
            else f"fully_shard(reshard_after_forward={plan.zero_stage == 3})"
        )
    return out


def searched_plan_worker(rank: int, world: int, plan_dict: dict, layers: int) -> None:
    """A plan from ``autopar.search``: equal to one process for 2 steps, then 4 more AdamW
    steps on learnable data with a falling loss."""
    from examples.train_gpt import counting_batch

    plan = Plan.from_dict(plan_dict)
    pm = _train_and_compare(plan, layers, expect_from_plan(plan))
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    losses = []
    for step in range(4):
        x, y = counting_batch(step=step, batch=plan.global_batch, seq_len=SEQ, vocab=VOCAB)
        losses.append(float(pm.step(pm.local_batch(x), pm.local_batch(y))))
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0], losses


def _train_and_compare(plan: Plan, layers: int, expect: dict[str, Any]):
    model = small_gpt(layers)
    reference = copy.deepcopy(model)
    x, y = batch()
    pm = apply_plan(model, plan)
    _check_structure(pm, plan, expect, reference)
    seq_lens = _record_block_seq_lens(pm)

    opt = torch.optim.SGD(pm.parameters(), lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    ref_params = dict(reference.named_parameters())
    losses = []
    for step in range(2):
        loss = pm.step(pm.local_batch(x), pm.local_batch(y))
        ref_loss = cross_entropy_loss(reference(x), y)
        ref_loss.backward()
        ref_loss = ref_loss.detach()
        assert abs(float(loss) - float(ref_loss)) <= RTOL * abs(float(ref_loss)), (
            f"step {step}: loss {float(loss)} vs single-process {float(ref_loss)}"
        )
        losses.append(float(loss))
        if step == 0 and "block_seq_len" in expect:
            # sequence parallelism: blocks hand on only this rank's share of the sequence
            assert seq_lens and set(seq_lens) == {expect["block_seq_len"]}, seq_lens
        if step == 0:
            grads = pm.full_gradients()
            assert grads, "this rank holds no gradients"
            for name, g in grads.items():
                ok, err = _close(g, ref_params[name].grad)
                assert ok, f"grad {name}: relative error {err:.2e}"
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for name, p in pm.full_parameters().items():
        ok, err = _close(p, ref_params[name].detach())
        assert ok, f"weight {name} after 2 steps: relative error {err:.2e}"
    assert losses[1] < losses[0]
    return pm


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
