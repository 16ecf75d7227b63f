"""Single-process tests of the emitter's pure pieces: layer map, stage cut, TP styles,
checkpointing policy and the torchrun command line."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autopar.emit.checkpointing import apply_activation_checkpointing
from autopar.emit.launch import PLAN_ENV, launch, torchrun_command
from autopar.emit.pipeline import build_stage_module, layer_map
from autopar.emit.tensor_parallel import tp_styles
from autopar.errors import ConfigError
from tests.emit.workers import batch, make_plan, megatron_tp, small_gpt


def test_layer_map_of_the_zoo_gpt():
    lmap = layer_map(small_gpt(3))
    assert lmap.container == "layers"
    assert lmap.embed == ("tok_embed", "pos_embed")
    assert lmap.head == ("norm", "lm_head")
    assert lmap.names == ("embed", "layers.0", "layers.1", "layers.2", "head")


def test_stage_modules_chained_equal_the_full_model():
    model = small_gpt(3)
    x, _ = batch()
    want = model(x)
    cuts = [["embed", "layers.0"], ["layers.1"], ["layers.2", "head"]]
    stages = [build_stage_module(model, layers=c, copy_model=True) for c in cuts]
    held = [
        sorted({n.split(".")[1] for n, _ in s.named_parameters() if n.startswith("layers.")})
        for s in stages
    ]
    assert held == [["0"], ["1"], ["2"]]
    assert stages[0].lm_head is None and stages[2].tok_embed is None
    h = x
    for s in stages:
        h = s(h)
    torch.testing.assert_close(h, want, rtol=0, atol=0)


def test_stage_cut_in_place_keeps_full_model_names():
    model = small_gpt(2)
    stage = build_stage_module(model, layers=["layers.1", "head"])
    assert stage is model
    names = {n for n, _ in model.named_parameters()}
    assert "layers.1.attn.q.weight" in names and "lm_head.weight" in names
    assert not any(n.startswith(("layers.0.", "tok_embed")) for n in names)


def test_tp_styles_derive_megatron_pairs_from_placements():
    model = small_gpt(1)
    styles = {a.module: (a.style, a.sharded_io) for a in tp_styles(model, tp_of=megatron_tp(1))}
    assert styles["layers.0.attn.q"] == ("colwise", True)
    assert styles["layers.0.attn.o"] == ("rowwise", True)
    assert styles["layers.0.mlp.up"] == ("colwise", True)
    assert styles["layers.0.mlp.down"] == ("rowwise", True)
    assert styles["lm_head"] == ("colwise", False)  # no rowwise sibling: output gathered
    assert styles["tok_embed"] == ("rowwise", False)  # vocabulary-parallel embedding
    assert "layers.0.attn_norm" not in styles  # replicated parameters stay plain tensors


def test_tp_styles_need_no_gpt_names():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_in = nn.Linear(8, 32)
            self.fc_out = nn.Linear(32, 8)
            self.scale = nn.Parameter(torch.ones(8))

    model = nn.Sequential(Block(), nn.Linear(8, 4))
    tp_of = {
        "0.fc_in.weight": "S(0)",
        "0.fc_in.bias": "S(0)",
        "0.fc_out.weight": "S(1)",
        "0.scale": "S(0)",
        "1.weight": "S(1)",
    }
    styles = {a.module: (a.style, a.sharded_io) for a in tp_styles(model, tp_of=tp_of)}
    assert styles == {
        "0": ("distribute", False),
        "0.fc_in": ("colwise", True),
        "0.fc_out": ("rowwise", True),
        "1": ("rowwise", False),
    }


def test_colwise_bias_must_follow_its_weight():
    tp_of = {"layers.0.attn.q.weight": "S(0)", "layers.0.attn.q.bias": "R"}
    with pytest.raises(ConfigError, match="bias must be S\\(0\\)"):
        tp_styles(small_gpt(1), tp_of=tp_of)


def _forward_ops_rerun_in_backward(block: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Count forward ops (attention kernel, biased matmul, layer norm) run during backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    watch = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default: "attention",
        torch.ops.aten.addmm.default: "linear",
        torch.ops.aten.native_layer_norm.default: "layer_norm",
    }
    counts = dict.fromkeys(watch.values(), 0)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in watch:
                counts[watch[func]] += 1
            return func(*args, **(kwargs or {}))

    loss = block(x).sum()
    with Count():
        loss.backward()
    return counts


def test_recompute_modes_rerun_what_they_promise_with_the_same_gradients():
    model = small_gpt(1)
    x = torch.randn(4, 16, 64)
    grads, rerun = {}, {}
    for mode in ("none", "selective", "full"):
        block = copy.deepcopy(model.layers["0"])
        assert apply_activation_checkpointing([block], mode=mode) == (mode != "none")
        rerun[mode] = _forward_ops_rerun_in_backward(block, x)
        grads[mode] = [p.grad for p in block.parameters()]
    assert rerun["none"] == {"attention": 0, "linear": 0, "layer_norm": 0}
    # selective: only the attention core is recomputed, the linears and norms are saved
    assert rerun["selective"] == {"attention": 1, "linear": 0, "layer_norm": 0}
    # full: the block runs again: both norms, attention, q/k/v/o and up (down's output is
    # needed by no backward formula, and non-reentrant checkpointing stops once it has all)
    assert rerun["full"] == {"attention": 1, "linear": 5, "layer_norm": 2}
    for mode in ("selective", "full"):
        for a, b in zip(grads[mode], grads["none"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


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


def test_sequence_parallel_roles_follow_the_tp_pairs():
    from autopar.emit.tensor_parallel import sequence_parallel_roles

    model = small_gpt(2)
    roles = sequence_parallel_roles(model, assignments=tp_styles(model, tp_of=megatron_tp(2)))
    assert roles == {
        "layers.0": "enter",
        **{f"layers.{i}.{c}": "norm" for i in (0, 1) for c in ("attn_norm", "mlp_norm")},
        **{f"layers.{i}.{c}": "gather" for i in (0, 1) for c in ("attn", "mlp")},
        "norm": "norm",
        "lm_head": "exit",
    }
    # nothing sharded inside the blocks: attention must still see the whole sequence
    plain = sequence_parallel_roles(model, assignments=[])
    assert plain["layers.1.attn"] == "gather_scatter" and plain["layers.1.mlp"] == "gather_scatter"
    # a later pipeline stage receives sequence shards: no "enter"
    stage = build_stage_module(small_gpt(2), layers=["layers.1", "head"])
    assert "layers.1" not in sequence_parallel_roles(stage, assignments=[])
    embed_only = build_stage_module(small_gpt(2), layers=["embed"])
    with pytest.raises(ConfigError, match="sequence parallelism"):
        sequence_parallel_roles(embed_only, assignments=[])


def test_multi_node_dry_run_leaves_master_addr_to_the_shell(tmp_path, capsys):
    path = tmp_path / "plan.json"
    make_plan(layers=2, dp=4).to_json(path)
    assert launch(path, ["train.py"], nnodes=2, dry_run=True) == 0
    line = capsys.readouterr().out.strip()
    assert '--rdzv-endpoint="${MASTER_ADDR}":29500' in line
    assert "--nnodes=2" in line and "--nproc-per-node=2" in line
