"""A plan that does not fit the world or the model fails on every rank before any collective.

In the multi-process tests only rank 0 calls ``apply_plan``; the other ranks go straight to a
barrier. Had ``apply_plan`` entered any collective (mesh creation, a DTensor broadcast, a
pipeline send) rank 0 would block until the harness timeout and the test would fail with a
timeout instead of the expected ``ConfigError``.
"""

from __future__ import annotations

import pytest

from autopar.emit.mesh import validate_plan
from autopar.errors import ConfigError
from tests.emit.harness import run_distributed
from tests.emit.workers import bad_plan_worker, make_plan, megatron_tp, small_gpt

WAIT_S = 15
"""How long rank 0 may wait in a collective its idle peers never join before the test fails."""


@pytest.mark.distributed
def test_world_size_mismatch_fails_before_any_collective(tmp_path):
    plan = make_plan(layers=2, dp=2, tp=2, tp_placements=megatron_tp(2))  # needs 4 ranks
    run_distributed(
        bad_plan_worker,
        world=2,
        tmp_path=tmp_path,
        args=(plan.to_dict(), 2, "world size 2"),
        timeout_s=WAIT_S,
    )


@pytest.mark.distributed
def test_unknown_parameter_names_fail_before_any_collective(tmp_path):
    places = {**megatron_tp(2), "layers.7.attn.q.weight": "S(0)"}
    # a 2-D mesh: building it creates sub-groups, a collective step the error must precede
    plan = make_plan(layers=2, dp=2, tp=2, tp_placements=places)
    run_distributed(
        bad_plan_worker,
        world=4,
        tmp_path=tmp_path,
        args=(plan.to_dict(), 2, "layers.7.attn.q.weight"),
        timeout_s=WAIT_S,
    )


# -- the same checks, pure (no processes) -----------------------------------------------------


def _validate(plan, *, world=None, layers=2):
    model = small_gpt(layers)
    validate_plan(plan, world_size=world if world is not None else plan.num_devices, model=model)


def test_valid_plans_pass():
    _validate(make_plan(layers=2, dp=2, tp=2, tp_placements=megatron_tp(2)))
    _validate(make_plan(layers=2, pp=2, stage_layers=[["embed", "layers.0"], ["layers.1", "head"]],
                        microbatches=2))  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "world", "field", "text"),
    [
        ({"dp": 4}, 8, "mesh.shape", "world size 8"),
        ({"dp": 4, "num_devices": 8}, 4, "num_devices", "8 devices"),
        ({"tp": 2, "tp_placements": {"layers.0.attn.q.weight": "S(2)"}}, 2, None, "S(2)"),
        ({"tp": 2, "tp_placements": {"layers.0.attn.q.weight": "P"}}, 2, None, "partial"),
        ({"schedule": "zb"}, 1, "schedule", "zb"),
        ({"zero_stage": 4}, 1, "zero_stage", "4"),
        ({"recompute": "some"}, 1, "recompute", "some"),
        (
            {"pp": 2, "stage_layers": [["embed", "layers.0"], ["layers.0", "layers.1", "head"]]},
            2,
            "stages[1].layers",
            "stage 0 and stage 1",
        ),
        ({"pp": 2, "stage_layers": [["embed", "layers.0"], ["head"]]}, 2, "stages", "layers.1"),
        (
            {"pp": 2, "stage_layers": [["embed", "layers.0"], ["layers.1", "lm_head"]]},
            2,
            "stages[1].layers",
            "lm_head",
        ),
        (
            {"pp": 2, "stage_layers": [["embed", "layers.1"], ["layers.0", "head"]]},
            2,
            "stages[1].layers",
            "out of model order",
        ),
    ],
)
def test_bad_plans_name_the_mismatch(kwargs, world, field, text):
    layers = kwargs.pop("layers", 2)
    with pytest.raises(ConfigError) as info:
        _validate(make_plan(layers=layers, **kwargs), world=world, layers=layers)
    if field is not None:
        assert info.value.field == field
    if text is not None:
        assert text in str(info.value)


def test_uneven_tp_split_is_rejected():
    # pos_embed is [16, 64]; tp=3 cannot split 16 rows evenly
    plan = make_plan(layers=2, tp=4, tp_placements={"pos_embed.weight": "S(0)"})
    _validate(plan)  # 16 % 4 == 0 is fine
    from dataclasses import replace

    from autopar.plan import Mesh, Parallel, Stage

    plan3 = make_plan(layers=2, tp=4, tp_placements={"layers.0.mlp.up.weight": "S(1)"})
    plan3 = replace(
        plan3,
        num_devices=3,
        parallel=Parallel(tp=3),
        mesh=Mesh(shape=(3,), dim_names=("tp",)),
        stages=(Stage(layers=plan3.stages[0].layers, devices=(0, 1, 2)),),
    )
    with pytest.raises(ConfigError, match="does not split evenly over tp=3"):
        _validate(plan3)


def test_sequence_parallel_needs_an_even_sequence_split():
    plan = make_plan(layers=2, tp=2, tp_placements=megatron_tp(2), sequence_parallel=True)
    _validate(plan)  # 16 tokens over tp=2
    from dataclasses import replace

    with pytest.raises(ConfigError, match="seq_len=15") as info:
        _validate(replace(plan, seq_len=15))
    assert info.value.field == "sequence_parallel"


def test_stage_devices_must_follow_row_major_mesh():
    from dataclasses import replace

    from autopar.plan import Stage

    plan = make_plan(
        layers=2, pp=2, dp=2, stage_layers=[["embed", "layers.0"], ["layers.1", "head"]]
    )
    swapped = replace(
        plan,
        stages=(
            Stage(layers=plan.stages[0].layers, devices=(0, 2)),
            Stage(layers=plan.stages[1].layers, devices=(1, 3)),
        ),
    )
    with pytest.raises(ConfigError, match=r"ranks \(0, 1\)") as info:
        _validate(swapped)
    assert info.value.field == "stages[0].devices"


def test_a_tp_plan_without_op_layouts_is_refused():
    """A tp > 1 plan must say how every op is split: nothing is guessed from module names."""
    from autopar.emit.program import build_program

    model = small_gpt(2)
    plan = make_plan(layers=2, tp=2, tp_placements=megatron_tp(2))
    with pytest.raises(ConfigError, match="no op layouts") as info:
        build_program(model, plan, model.example_inputs(4))
    assert info.value.field == "layouts"


def test_a_plan_for_another_model_is_refused():
    from autopar.emit.program import build_program
    from tests.user_models import renamed_gpt

    plan = make_plan(layers=2, dp=2)
    other = renamed_gpt(layers=2, hidden=64, heads=4, vocab=128, seq_len=16, device="cpu")
    with pytest.raises(ConfigError, match="layers") as info:
        build_program(other, plan, other.example_inputs(4))
    assert info.value.field == "layers"


def test_a_model_in_another_dtype_than_priced_is_refused():
    from dataclasses import replace

    import torch

    plan = replace(make_plan(layers=2), dtype="bf16")
    model = small_gpt(2)  # float32
    with pytest.raises(ConfigError) as info:
        validate_plan(plan, world_size=1, model=model)
    assert info.value.field == "dtype"
    assert "float32" in str(info.value) and "bf16" in str(info.value)
    validate_plan(plan, world_size=1, model=model.to(torch.bfloat16))  # cast: applied as priced


def test_gradients_priced_in_fp32_for_a_bf16_model_are_refused():
    from dataclasses import replace

    import torch

    from autopar.plan import Stack

    plan = make_plan(layers=2)
    plan = replace(plan, dtype="bf16", stack=replace(plan.stack, name="megatron-core",
                                                     grad_dtype="fp32"))  # fmt: skip
    with pytest.raises(ConfigError) as info:
        validate_plan(plan, world_size=1, model=small_gpt(2).to(torch.bfloat16))
    assert info.value.field == "stack.grad_dtype"
    assert "--grad-dtype bf16" in str(info.value)
    assert isinstance(plan.stack, Stack)
