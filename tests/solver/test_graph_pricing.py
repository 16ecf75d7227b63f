"""Plans come from the traced graph, never from module names (issue 11).

* The same GPT and Llama built twice, with the zoo's names and with every module, parameter and
  container renamed, get the same plan and the same step time.
* A CNN and an MLP with tp pinned: the predicted compute is the sum over ops of each op's time at
  the split the plan records for it (no op is priced split that the plan leaves whole).
* Hugging Face Llama, Mistral and GPT-2 from small configs with tp=2: the ILP splits attention
  and MLP weights.
* An ILP answer that splits activations on tp reaches the plan as per-op layouts.
* Ops no rule knows are named in the plan and run replicated; a model of such ops plans as
  data parallel; an LSTM plans instead of crashing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autopar.config import TrainingConfig
from autopar.models import gpt, llama
from autopar.plan import parse_placement
from autopar.solver.search import search
from autopar.topology.load import load_cluster
from tests.user_models import renamed_gpt, renamed_llama


def _shape(p):
    return (p.parallel, p.microbatches, p.micro_batch_size, p.schedule, p.virtual_stages,
            p.zero_stage, p.recompute, p.sequence_parallel)  # fmt: skip


@pytest.mark.parametrize(
    ("build", "renamed", "kw", "cluster", "nodes", "config"),
    [
        (gpt, renamed_gpt, dict(layers=96, hidden=12288, heads=96, tie_embeddings=False),
         "dgx-a100", 128, TrainingConfig(global_batch=1536)),
        (llama, renamed_llama, dict(layers=32, hidden=4096, heads=32, kv_heads=8,
                                    ffn_hidden=14336, seq_len=8192),
         "dgx-h100", 8, TrainingConfig(global_batch=512)),
    ],
    ids=["gpt3-175b", "llama3-8b"],
)  # fmt: skip
def test_renamed_models_get_the_same_plan(build, renamed, kw, cluster, nodes, config):
    c = load_cluster(cluster, nodes=nodes)
    zoo = search(build(**kw), c, config, progress=False)
    other = search(renamed(**kw), c, config, progress=False)
    assert _shape(other) == _shape(zoo)
    assert other.predicted.step_time_s == pytest.approx(zoo.predicted.step_time_s, rel=0.01)
    # names only label output: the renamed model's stages name its own modules
    assert any(n.startswith(("stack.", "trunk.")) for st in other.stages for n in st.layers)


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(64 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(x).flatten(1))

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor]:
        return (torch.randn(batch_size, 3, 16, 16, device="meta"),)


def _op_sum_compute(plan, model, cluster, config) -> float:
    """M x Σ over ops of forward and backward time at the local shapes the plan's layouts give,
    plus the optimizer step: what the predicted compute must be for one pipeline stage."""
    from autopar.cost.ops import op_time_s
    from autopar.graph.prepare import prepare_model
    from autopar.solver.search import _optimizer_line

    prepared = prepare_model(model, seq_len=config.seq_len, dtype=config.dtype)
    tp = plan.parallel.tp
    total = 0.0
    for layer in prepared.layers:
        graph = layer.graph.with_batch(plan.micro_batch_size)
        ops = [n for n in graph if n.kind == "op"]
        layouts = plan.layouts[layer.signature]
        assert [o.op for o in layouts] == [n.op for n in ops]
        needs_grad: dict[str, bool] = {}
        for node in graph:
            if node.kind in ("param", "input", "buffer"):
                # a layer's float input is an activation another layer made: it needs a grad
                floating = bool(node.output) and node.output.dtype.startswith(("float", "bfloat"))
                needs_grad[node.name] = node.kind == "param" or (node.kind == "input" and floating)
                continue
            needs_grad[node.name] = bool(node.output) and node.output.dtype.startswith(
                ("float", "bfloat")
            ) and any(needs_grad.get(p, False) for p in node.inputs)  # fmt: skip

        def local(meta, text):
            kind, dim = parse_placement(text)
            shape = list(meta.shape)
            if kind == "S":
                shape[dim] //= tp
            return shape

        for node, lay in zip(ops, layouts):
            split = max(1, tp if any(t.startswith("S") for t in (*lay.inputs, lay.output)) else 1)
            ins = [local(m, t) for m, t in zip(node.input_metas, lay.inputs)]
            outs = [local(node.outputs[0], lay.output)] + [list(m.shape) for m in node.outputs[1:]]
            kw = dict(input_shapes=ins, output_shapes=outs, divisor=split, device=cluster.device,
                      dtype=config.dtype)  # fmt: skip
            total += op_time_s(node, phase="fwd", **kw)
            if needs_grad[node.name]:
                total += op_time_s(node, phase="bwd", **kw)
    intercept, slope = _optimizer_line(cluster, config)
    params = 0.0
    for fqn, spec in plan.placements.items():
        numel = dict(model.named_parameters())[fqn].numel()
        params += numel / (tp if spec[-1].startswith("S") else 1)
    return plan.microbatches * total + intercept + slope * params


@pytest.mark.parametrize("which", ["cnn", "mlp"])
def test_compute_is_the_ops_at_the_split_the_plan_applies(which):
    from autopar.models import mlp

    model = _CNN().to("meta") if which == "cnn" else mlp(layers=3, hidden=1024)
    cluster = load_cluster("dgx-a100", nodes=1)
    config = TrainingConfig(global_batch=64)
    fixed = {"tp": 8, "pp": 1, "recompute": "none", "zero": 0}
    plan = search(model, cluster, config, fixed=fixed, progress=False)
    assert plan.parallel.tp == 8
    want = _op_sum_compute(plan, model, cluster, config)
    assert plan.predicted.breakdown.compute == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    "spec",
    [
        "LlamaConfig:hidden_size=1024,intermediate_size=2816,num_hidden_layers=2,"
        "num_attention_heads=16,num_key_value_heads=8,vocab_size=32000,seq_len=2048",
        "MistralConfig:hidden_size=1024,intermediate_size=2816,num_hidden_layers=2,"
        "num_attention_heads=16,num_key_value_heads=8,vocab_size=32000,seq_len=2048",
        "GPT2Config:n_embd=1024,n_layer=2,n_head=16,vocab_size=32000,n_positions=1024,seq_len=1024",
    ],
    ids=["llama", "mistral", "gpt2"],
)
def test_hf_models_split_attention_and_mlp_on_tp(spec):
    pytest.importorskip("transformers")
    from autopar.models.hf import parse_hf_spec

    plan = search(parse_hf_spec(spec), load_cluster("dgx-a100", nodes=1),
                  TrainingConfig(global_batch=16), fixed={"tp": 2}, progress=False)  # fmt: skip
    split = {fqn for fqn, spec_ in plan.placements.items() if spec_[-1].startswith("S")}
    attn = [f for f in split if ".attn." in f or ".self_attn." in f]
    mlp_ = [f for f in split if ".mlp." in f]
    assert attn and mlp_, sorted(split)


def test_activation_splits_reach_the_plan_as_op_layouts():
    """Small blocks and many tokens: the ILP keeps weights whole and splits the tokens over tp;
    the plan says so op by op (the emitter applies it: tests/emit/test_matrix.py)."""
    model = gpt(layers=2, hidden=256, heads=4, vocab=1024, seq_len=1024)
    plan = search(model, load_cluster("dgx-a100", nodes=1), TrainingConfig(global_batch=64),
                  fixed={"tp": 2, "pp": 1}, progress=False)  # fmt: skip
    block = next(layer for layer in plan.layers if layer.kind == "block")
    ops = plan.layouts[block.signature]
    matmuls = [o for o in ops if o.op in ("aten.mm.default", "aten.addmm.default")]
    assert matmuls
    # a matmul with its weight whole ("R") and its activation split ("S(..)") on tp
    assert any(o.inputs[-1] == "R" and any(t.startswith("S") for t in o.inputs[:-1])
               for o in matmuls), [(o.op, o.inputs, o.output) for o in matmuls]  # fmt: skip


class _Opaque(nn.Module):
    """Every op is one no sharding rule knows."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(256, 256))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.i0(torch.special.erfcx(x @ self.w))

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor]:
        return (torch.randn(batch_size, 256, device=self.w.device),)


def test_unknown_ops_are_named_and_the_model_plans_as_data_parallel():
    with torch.device("meta"):
        model = _Opaque()
    plan = search(model, load_cluster("dgx-a100", nodes=1), TrainingConfig(global_batch=64),
                  progress=False)  # fmt: skip
    assert plan.unknown_ops, "the plan lists the ops no rule knows"
    assert any("erfcx" in op or "i0" in op for op in plan.unknown_ops)
    assert plan.parallel.dp == 8 and plan.parallel.tp == 1
    from autopar.explain import render

    assert "without a sharding rule" in render(plan)


def test_an_lstm_plans_conservatively():
    class LSTMModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(1000, 64)
            self.lstm = nn.LSTM(64, 128, num_layers=1, batch_first=True)
            self.out = nn.Linear(128, 1000)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.lstm(self.emb(x))[0])

        def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor]:
            return (torch.randint(0, 1000, (batch_size, 16), device="meta"),)

    with torch.device("meta"):
        model = LSTMModel()
    plan = search(model, load_cluster("dgx-a100", nodes=1), TrainingConfig(global_batch=64),
                  fixed={"tp": 1}, progress=False)  # fmt: skip
    assert plan.parallel.dp == 8 and plan.predicted.step_time_s > 0


def test_a_vocabulary_tp_does_not_divide_is_reported_not_silently_replicated():
    """Splits are even, so a 1001-row table cannot be split by rows at tp 4: the plan names it
    with its shape (explain says which dimension and that padding would offer the split); a
    1024-row table raises nothing."""
    from autopar.explain import render
    from autopar.plan import Plan

    cluster = load_cluster("dgx-a100", nodes=1)
    cfg = TrainingConfig(global_batch=16, seq_len=64)
    odd = search(gpt(layers=2, hidden=128, heads=4, vocab=1001, seq_len=64), cluster, cfg,
                 fixed={"tp": 4, "pp": 1}, progress=False)  # fmt: skip
    assert odd.indivisible_params == {"tok_embed.weight": (1001, 128)}
    assert "tok_embed.weight (1001, 128), dim 0 = 1001" in render(odd)
    assert Plan.from_json(odd.to_json()).indivisible_params == odd.indivisible_params
    even = search(gpt(layers=2, hidden=128, heads=4, vocab=1024, seq_len=64), cluster, cfg,
                  fixed={"tp": 4, "pp": 1}, progress=False)  # fmt: skip
    assert even.indivisible_params == {}
