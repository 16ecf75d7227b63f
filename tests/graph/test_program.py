"""The traced fx program runs: with real weights it computes what the model computes (outputs
and gradients), and the OpGraph that prices it names its ops after the program's nodes."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from autopar.errors import ConfigError, TraceError
from autopar.graph import OpGraph, trace
from autopar.graph.trace import DEVICE_NODE, TracedProgram, trace_program
from autopar.models import gpt

aten = torch.ops.aten
# fx nodes that have no OpGraph node of their own (documented in autopar/graph/trace.py)
_FOLDED = {operator.getitem, aten.alias.default, aten.detach.default, getattr}


def _tiny_gpt(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return gpt(layers=2, hidden=32, heads=4, vocab=64, seq_len=8, dropout=0.0, device=device)


def _tiny_llama(device: str = "cpu") -> nn.Module:
    transformers = pytest.importorskip("transformers")
    from autopar.models.hf import hf_model

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    return hf_model(config, seq_len=8, device=device)


def _call_model(model: nn.Module, inputs: object) -> object:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _run(program: TracedProgram, model: nn.Module, inputs: object) -> object:
    params = [p for _, p in model.named_parameters()]
    buffers = [b for _, b in model.named_buffers()]
    flat = program.graph_module(*params, *buffers, *program.flatten_inputs(inputs))
    return program.unflatten_output(flat)


def _logits(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("mode", ["fake", "real"])
@pytest.mark.parametrize("build", [_tiny_gpt, _tiny_llama], ids=["zoo-gpt", "hf-llama"])
def test_program_computes_the_model_outputs_and_gradients(build, mode: str) -> None:
    model = build()
    inputs = model.example_inputs(2)
    program = trace_program(model, inputs, tracing_mode=mode)
    got = _run(program, model, inputs)
    want = _call_model(model, inputs)
    assert type(got) is type(want)  # an HF CausalLMOutputWithPast is rebuilt as one
    torch.testing.assert_close(_logits(got), _logits(want), atol=1e-5, rtol=1e-5)

    params = [p for _, p in model.named_parameters()]
    grads_got = torch.autograd.grad(_logits(got).square().mean(), params)
    grads_want = torch.autograd.grad(_logits(want).square().mean(), params)
    assert len(grads_got) == len(params) > 0
    for (name, _), a, b in zip(model.named_parameters(), grads_got, grads_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("build", [_tiny_gpt, _tiny_llama], ids=["zoo-gpt", "hf-llama"])
def test_program_traced_on_meta_runs_on_cpu(build) -> None:
    """Tensors the forward creates (positions, rotary angles) follow the inputs' device."""
    program = trace_program(build("meta"), build("meta").example_inputs(2))
    devices = [
        v for n in program.graph_module.graph.nodes for v in pytree.tree_leaves(dict(n.kwargs))
    ]
    assert not any(isinstance(v, torch.device) for v in devices)
    assert DEVICE_NODE in {n.name for n in program.graph_module.graph.nodes}
    model = build("cpu")
    inputs = model.example_inputs(2)
    got = _logits(_run(program, model, inputs))
    torch.testing.assert_close(got, _logits(_call_model(model, inputs)), atol=1e-5, rtol=1e-5)


def test_program_placeholders_names_and_specs() -> None:
    model = _tiny_gpt("meta")
    program = trace_program(model)
    placeholders = [n for n in program.graph_module.graph.nodes if n.op == "placeholder"]
    n_params = len(list(model.parameters()))
    assert len(program.param_names) == n_params
    assert len(placeholders) == n_params + len(program.buffer_names) + 1  # + tokens
    assert ("tok_embed.weight", "lm_head.weight") in program.param_names  # tied: one tensor
    assert program.output_is_tensor == (True,)
    assert program.input_spec == pytree.tree_flatten(((model.example_inputs()[0],), {}))[1]
    with pytest.raises(TraceError, match="structured"):
        program.flatten_inputs({"tokens": model.example_inputs()[0]})
    with pytest.raises(ConfigError, match="tracing_mode"):
        trace_program(model, tracing_mode="symbolic")  # type: ignore[arg-type]


def _check_names_match(graph: OpGraph, program: TracedProgram) -> None:
    fx_nodes = {n.name: n for n in program.graph_module.graph.nodes}
    ops = graph.ops()
    assert ops
    for op in ops:
        node = fx_nodes.get(op.name)
        assert node is not None and node.op == "call_function", op.name
        assert str(node.target) == op.op
    covered = {op.name for op in ops}
    for node in program.graph_module.graph.nodes:
        if node.op == "call_function" and node.name not in covered:
            assert node.target in _FOLDED or node.target.__name__.startswith("_assert"), node
    assert graph.node("output").kind == "output" and "output" in fx_nodes


@pytest.mark.parametrize("build", [_tiny_gpt, _tiny_llama], ids=["zoo-gpt", "hf-llama"])
@pytest.mark.parametrize("batch", [2, 3])
def test_opgraph_op_names_are_fx_node_names(build, batch: int) -> None:
    model = build("meta")
    inputs = model.example_inputs(batch)
    graph = trace(model, inputs)  # with batch detection: traced at batch and batch + 1
    assert graph.metadata["program_batch_size"] == batch
    _check_names_match(graph, trace_program(model, inputs))


class _Clash(nn.Module):
    """A parameter whose FQN is also the name make_fx gives an op node."""

    def __init__(self) -> None:
        super().__init__()
        self.mm = nn.Parameter(torch.randn(4, 4))
        self.add = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(x @ self.mm) + x


def test_placeholder_names_never_take_an_op_name() -> None:
    model, x = _Clash(), torch.randn(3, 4)
    graph, program = trace(model, (x,), detect_batch=False), trace_program(model, (x,))
    _check_names_match(graph, program)
    assert graph.node("mm").kind == "op" and graph.node("mm").op == "aten.mm.default"
    assert graph.params()["mm"].shape == (4, 4)  # the parameter node got another name
    torch.testing.assert_close(_run(program, model, (x,)), model(x))
