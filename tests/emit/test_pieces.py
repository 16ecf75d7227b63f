"""Single-process tests of the emitter's pieces: the traced program cut into layers, stages run
in a chain, recompute regions, and the torchrun command line."""

from __future__ import annotations

import copy

import pytest
import torch

from autopar.emit.launch import PLAN_ENV, launch, torchrun_command
from autopar.emit.pipeline import Executor, build_stage_module
from autopar.emit.program import build_program
from autopar.errors import ConfigError
from tests.emit.workers import batch, make_plan, megatron_tp, small_gpt


def _stages(model, plan, inputs, recompute="none"):
    program = build_program(model, plan, inputs)
    ex = Executor(program, tp_mesh=None, sequence_parallel=False, recompute=recompute,
                  device=torch.device("cpu"))  # fmt: skip
    index = {p.name: i for i, p in enumerate(program.parts)}
    n = len(plan.stages)
    return program, [
        build_stage_module(
            program,
            [index[x] for x in st.layers],
            model=model,
            executor=ex,
            is_first=i == 0,
            is_last=i == n - 1,
            distribute=None,
        )  # fmt: skip
        for i, st in enumerate(plan.stages)
    ]


def test_stages_of_the_traced_program_chained_equal_the_model():
    model = small_gpt(3)
    x, _ = batch()
    want = model(x)
    cuts = [["embed", "layers.0"], ["layers.1"], ["layers.2", "head"]]
    plan = make_plan(layers=3, pp=3, stage_layers=cuts, microbatches=3)
    program, stages = _stages(model, plan, x)
    # each stage holds exactly the parameters its layers read, under the model's own names
    held = [sorted({n.split(".")[1] for n, _ in s.named_parameters() if n.startswith("layers.")})
            for s in stages]  # fmt: skip
    assert held == [["0"], ["1"], ["2"]]
    names0 = {n for n, _ in stages[0].named_parameters()}
    assert "tok_embed.weight" in names0 and "norm.weight" not in names0
    h = stages[0](x)
    h = stages[1](*h)
    got = stages[2](*h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tied_weights_get_a_copy_on_each_stage_under_the_name_that_stage_uses():
    from autopar.models import gpt

    torch.manual_seed(0)
    model = gpt(layers=2, hidden=64, heads=4, vocab=128, seq_len=16, dropout=0.0, device="cpu")
    assert model.lm_head.weight is model.tok_embed.weight
    plan = make_plan(layers=2, pp=2, stage_layers=[["embed", "layers.0"], ["layers.1", "head"]],
                     microbatches=2)  # fmt: skip
    x, _ = batch()
    _, (first, last) = _stages(model, plan, x)
    assert "tok_embed.weight" in dict(first.named_parameters())
    assert "lm_head.weight" in dict(last.named_parameters())
    assert "tok_embed.weight" not in dict(last.named_parameters())
    torch.testing.assert_close(last(*first(x)), model(x), rtol=1e-5, atol=1e-5)


def test_blocks_with_extra_inputs_run_in_any_container():
    """Llama blocks take (x, rope); the renamed GPT keeps its blocks in a ModuleList."""
    from autopar.models import llama
    from tests.user_models import renamed_gpt

    torch.manual_seed(0)
    for model in (
        llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seq_len=16, device="cpu"),
        renamed_gpt(layers=2, hidden=64, heads=4, vocab=128, seq_len=16, dropout=0.0, device="cpu"),
    ):
        from autopar.graph.layers import group_layers
        from autopar.graph.trace import trace

        x = model.example_inputs(4)[0]
        names = [layer.name for layer in group_layers(trace(model, x))]
        blocks = names[1:-1]
        cuts = [["embed", blocks[0]], [blocks[1], "head"]]
        from dataclasses import replace

        from autopar.plan import LayerSpec

        plan = make_plan(layers=2, pp=2, stage_layers=cuts, microbatches=2)
        plan = replace(plan, layers=tuple(
            LayerSpec(name=n, kind=n if n in ("embed", "head") else "block") for n in names
        ))  # fmt: skip
        _, (first, last) = _stages(model, plan, x)
        torch.testing.assert_close(last(*first(x)), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_same_gradients(mode):
    model = small_gpt(2)
    x, y = batch()
    plan = make_plan(layers=2)
    grads = {}
    for recompute in ("none", mode):
        m = copy.deepcopy(model)
        _, (stage,) = _stages(m, plan, x, recompute=recompute)
        loss = torch.nn.functional.cross_entropy(stage(x).flatten(0, 1), y.flatten())
        loss.backward()
        grads[recompute] = {n: p.grad for n, p in stage.named_parameters()}
    for name, g in grads["none"].items():
        torch.testing.assert_close(grads[mode][name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_selective_recompute_regions_are_the_attention_core():
    from autopar.emit.checkpointing import core_regions

    model = small_gpt(2)
    x, _ = batch()
    program = build_program(model, make_plan(layers=2), x)
    block = program.parts[1]
    regions = core_regions(block)
    assert len(regions) == 1
    assert [str(n.target) for n in regions[0].nodes] == [
        "aten.scaled_dot_product_attention.default"
    ]


def test_torchrun_command_single_and_multi_node():
    plan = make_plan(layers=2, dp=4, num_devices=None)
    cmd = torchrun_command(plan, ["train.py", "--steps", "3"], nnodes=None, python="python")
    assert cmd == [
        "python", "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        "--nproc-per-node=4", "train.py", "--steps", "3",
    ]  # fmt: skip
    multi = torchrun_command(plan, ["train.py"], nnodes=2, python="python")
    assert "--nnodes=2" in multi and "--nproc-per-node=2" in multi
    assert "--rdzv-backend=c10d" in multi
    with pytest.raises(ConfigError, match="nnodes=3"):
        torchrun_command(plan, ["train.py"], nnodes=3)
    with pytest.raises(ConfigError, match="no training script"):
        torchrun_command(plan, [])


def test_launch_dry_run_prints_the_exact_line(tmp_path, capsys):
    path = tmp_path / "plan.json"
    make_plan(layers=2, dp=2, tp=2, tp_placements=megatron_tp(2)).to_json(path)
    assert launch(path, ["examples/train_gpt.py", "--steps", "2"], dry_run=True) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{PLAN_ENV}={path.resolve()} ")
    assert "-m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=4" in line
    assert line.endswith("examples/train_gpt.py --steps 2")


def test_multi_node_dry_run_leaves_master_addr_to_the_shell(tmp_path, capsys):
    path = tmp_path / "plan.json"
    make_plan(layers=2, dp=4).to_json(path)
    assert launch(path, ["train.py"], nnodes=2, dry_run=True) == 0
    line = capsys.readouterr().out.strip()
    assert '--rdzv-endpoint="${MASTER_ADDR}":29500' in line
    assert "--nnodes=2" in line and "--nproc-per-node=2" in line


def test_bf16_plan_optimizer_steps_fp32_master_weights():
    """A 16-bit plan is priced with fp32 master weights in the optimizer state: make_optimizer
    keeps them, so many small updates accumulate (pure bf16 AdamW would round them away)."""
    from dataclasses import replace

    from autopar.emit.apply import apply_plan
    from autopar.emit.offload import MasterWeightOptimizer

    torch.manual_seed(0)
    model = small_gpt(2).to(torch.bfloat16)
    plan = replace(make_plan(layers=2), dtype="bf16")
    pm = apply_plan(model, plan)
    opt = pm.make_optimizer(torch.optim.SGD, lr=1e-4)
    assert isinstance(opt, MasterWeightOptimizer)
    assert all(m.dtype == torch.float32 and m.device == p.device
               for m, p in zip(opt.master, opt.params))  # fmt: skip
    p, m = opt.params[0], opt.master[0]
    start = m.detach().clone()
    for _ in range(8):
        opt.zero_grad()
        p.grad = torch.ones_like(p)
        opt.step()
    # 8 steps of 1e-4 move the fp32 master by 8e-4; bf16 alone (8 bits of mantissa) would not
    # move a weight of magnitude ~1 at all
    assert torch.allclose(start - m.detach(), torch.full_like(m, 8e-4), atol=1e-5)
    assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))
