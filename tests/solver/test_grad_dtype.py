"""The software stack a plan is priced for: gradients accumulated and reduced in fp32 under bf16
training (Megatron-LM's and torchtitan's default), priced in memory, data-parallel traffic and the
plan's stack; the recompute kinds a stack can run."""

from __future__ import annotations

import pytest
import torch

from autopar.config import TrainingConfig
from autopar.errors import ConfigError
from autopar.explain import render
from autopar.models import gpt
from autopar.plan import Plan
from autopar.solver.search import search
from autopar.topology.load import load_cluster

PIN = {"dp": 8, "tp": 1, "pp": 1, "zero": 0, "recompute": "none", "microbatches": 1}


@pytest.fixture(scope="module")
def plans() -> dict[str, Plan]:
    model = gpt(layers=4, hidden=1024, heads=16, vocab=32000, seq_len=512)
    cluster = load_cluster("dgx-a100", nodes=1)
    out = {}
    for key, kw in {"bf16": {}, "fp32": {"grad_dtype": "fp32"},
                    "core": {"stack": "megatron-core"},
                    "core-bf16": {"stack": "megatron-core", "grad_dtype": "bf16"}}.items():  # fmt: skip
        cfg = TrainingConfig(global_batch=16, overlap_grad_reduce=False, **kw)
        out[key] = search(model, cluster, cfg, fixed=PIN, progress=False)
    return out


def test_fp32_gradients_double_gradient_memory_and_dp_traffic(plans) -> None:
    bf16, fp32 = plans["bf16"].predicted, plans["fp32"].predicted
    assert fp32.memory.grads == pytest.approx(2 * bf16.memory.grads)
    assert fp32.memory.weights == pytest.approx(bf16.memory.weights)
    # the all-reduce is bandwidth-bound at these sizes: close to twice the time
    ratio = fp32.breakdown.dp_comm / bf16.breakdown.dp_comm
    assert 1.8 < ratio <= 2.0


def test_a_user_written_model_prices_fp32_gradients_the_same_way() -> None:
    """nanoGPT's layout (fused qkv, ModuleList, tied head): the gradient dtype comes from the
    config, the bytes from the traced parameters, no name involved."""
    from tests.user_models import FusedQKVGPT

    with torch.device("meta"):
        model = FusedQKVGPT(layers=2, hidden=512, heads=8, vocab=8192, seq_len=256)
    cluster = load_cluster("dgx-a100", nodes=1)
    grads = [
        search(model, cluster, TrainingConfig(global_batch=16, grad_dtype=g), fixed=PIN,
               progress=False).predicted.memory.grads
        for g in ("bf16", "fp32")
    ]  # fmt: skip
    assert grads[1] == pytest.approx(2 * grads[0]) and grads[0] > 0


def test_stack_preset_sets_fp32_and_an_explicit_field_wins(plans) -> None:
    assert plans["core"].stack.grad_dtype == "fp32"
    assert plans["core"].predicted.memory.grads == plans["fp32"].predicted.memory.grads
    assert plans["core-bf16"].stack.grad_dtype == "bf16"
    assert plans["core-bf16"].predicted.memory.grads == plans["bf16"].predicted.memory.grads
    assert TrainingConfig(stack="megatron-2021", dtype="fp16").grad_dtype_name == "fp16"


def test_plan_records_and_shows_the_gradient_dtype(plans) -> None:
    plan = plans["fp32"]
    again = Plan.from_json(plan.to_json())
    assert again.stack.grad_dtype == "fp32"
    assert "in fp32" in render(plan).splitlines()[1]


def test_unknown_gradient_dtype_names_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as exc:
        TrainingConfig(grad_dtype="int8")
    assert exc.value.field == "grad_dtype" and "fp32" in exc.value.allowed


def test_a_stack_limits_the_recompute_kinds_searched_unless_pinned():
    """Megatron-LM 2021 has no selective recompute: its preset never lets the search pick it,
    an explicit --recompute still does; the other stacks search every kind."""
    assert TrainingConfig(stack="megatron-2021").recompute_options == ("none", "full")
    assert TrainingConfig(stack="megatron-core").recompute_options == ("none", "selective", "full")
    assert TrainingConfig().recompute_options == ("none", "selective", "full")
    model = gpt(layers=4, hidden=512, heads=8, vocab=1024, seq_len=1024)
    cluster = load_cluster("dgx-a100", nodes=1)
    fixed = {"tp": 2, "pp": 1, "dp": 4, "zero": 1}
    kw = dict(fixed=fixed, progress=False, top_k=50)
    free = search(model, cluster, TrainingConfig(global_batch=64, stack="megatron-2021"), **kw)
    kinds = {free.recompute} | {a.recompute for a in free.alternatives}
    assert "selective" not in kinds and {"none", "full"} <= kinds
    pinned = search(model, cluster, TrainingConfig(global_batch=64, stack="megatron-2021"),
                    fixed={**fixed, "recompute": "selective"}, progress=False)  # fmt: skip
    assert pinned.recompute == "selective"
    other = search(model, cluster, TrainingConfig(global_batch=64, stack="megatron-core"), **kw)
    assert "selective" in {other.recompute} | {a.recompute for a in other.alternatives}
