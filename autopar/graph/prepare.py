"""Model preparation for the search: trace once, group into layers, state in the training dtype.

``prepare_model`` turns an ``nn.Module`` (or an already traced ``OpGraph``) into the list of
layers the search prices: ``embed``, one entry per block (named by its module path), ``head``,
each with its own layer graph at batch 1 in the training dtype and a structural signature
(identical blocks share one, so each distinct block is priced once).

Depth folding: when the model's repeated-block container (found structurally: the
``ModuleList`` / ``ModuleDict`` / ``Sequential`` whose children are identical and hold the most
parameters, whatever it is called) has more than two entries, the model is traced with its first
two blocks only and the second block's layer graph is reused for every later block, parameter
FQNs renamed. Tracing GPT-3 175B in full takes ~15 s here; two blocks take well under a second.
A folded trace that does not show exactly two identical blocks falls back to a full trace.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

from autopar.errors import ConfigError
from autopar.graph.opgraph import OpGraph, TensorMeta

__all__ = [
    "PreparedLayer",
    "PreparedModel",
    "prepare_model",
    "in_training_dtype",
    "block_container_module",
    "model_facts",
]

_TORCH_DTYPE = {
    "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
    "fp32": "float32", "float32": "float32",
}  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class PreparedLayer:
    """One layer as the search sees it."""

    name: str
    """``"embed"``, the block's module path, or ``"head"`` (labels only)."""
    kind: str
    """``"embed"``, ``"block"`` or ``"head"``."""
    signature: str
    """Structural hash: equal for identical layers (priced once)."""
    params: tuple[str, ...]
    """FQNs of the parameters this layer owns in the real model (a tied one counts once)."""
    graph: OpGraph
    """The layer's own graph at batch 1, training dtype (shared by layers with one signature)."""
    graph_params: tuple[str, ...] = ()
    """``params`` as named inside ``graph`` (differs for blocks reused by depth folding)."""
    module: str = ""
    """Module path of a block (empty for embed/head)."""

    def __post_init__(self) -> None:
        if not self.graph_params:
            object.__setattr__(self, "graph_params", self.params)


@dataclass(frozen=True, slots=True, kw_only=True)
class PreparedModel:
    """Everything the search needs to know about the model, at batch 1."""

    name: str
    graph: OpGraph
    layers: tuple[PreparedLayer, ...]
    seq_len: int | None
    """Tokens per sample for token models (from the input's second dim); None otherwise."""
    fwd_flops_per_sample: float
    bwd_flops_per_sample: float
    param_count: int
    facts: dict[str, Any] = field(default_factory=dict)
    """Architecture facts read from the model's config (labels for exports, never decisions)."""

    @property
    def num_blocks(self) -> int:
        return sum(1 for layer in self.layers if layer.kind == "block")


def in_training_dtype(graph: OpGraph, dtype: str) -> OpGraph:
    """The graph with fp32 activations and weights re-stated in the training dtype.

    Zoo models are built on meta in fp32; under bf16/fp16 mixed precision the activations,
    weights the kernels read and messages on the wire are 16-bit, so bytes are priced as such.
    Returns ``graph`` itself when nothing changes.
    """
    from dataclasses import replace as dc_replace

    import networkx as nx  # noqa: F401  (the graph copy below is a networkx graph)

    target = _TORCH_DTYPE.get(dtype)
    if target is None:
        raise ConfigError(
            f"unknown dtype {dtype!r}", field="dtype", allowed=("bf16", "fp16", "fp32")
        )
    if target == "float32":
        return graph
    if not any(m.dtype == "float32" for node in graph for m in (*node.outputs, *node.input_metas)):
        return graph

    def conv(m: TensorMeta) -> TensorMeta:
        return TensorMeta(m.shape, target, m.batch_dim) if m.dtype == "float32" else m

    from autopar.graph.trace import LOSS_PATH

    g = graph.nx_graph.copy()
    for _, data in g.nodes(data=True):
        op = data["op"]
        if op.module_path == LOSS_PATH:
            continue  # the loss runs in fp32 whatever the training dtype
        if any(m.dtype == "float32" for m in (*op.outputs, *op.input_metas)):
            data["op"] = dc_replace(
                op,
                outputs=tuple(conv(m) for m in op.outputs),
                input_metas=tuple(conv(m) for m in op.input_metas),
            )
    for _, _, data in g.edges(data=True):
        if "tensor" in data and data["tensor"] is not None:
            data["tensor"] = conv(data["tensor"])
    return OpGraph(g, name=graph.name, batch_size=graph.batch_size, metadata=dict(graph.metadata))


# ---------------------------------------------------------------------------------------------
# the repeated-block container, found by structure
# ---------------------------------------------------------------------------------------------
def _structure(module: Any) -> tuple:
    return tuple((n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters()) + tuple(
        (n, type(m).__name__) for n, m in module.named_modules()
    )


def block_container_module(model: Any) -> tuple[str, Any] | None:
    """``(path, container)`` of the model's repeated blocks, or None.

    The container is a ``ModuleList`` / ``ModuleDict`` / ``Sequential`` with at least two
    structurally identical children (same parameter names, shapes, dtypes and module types);
    among several, the one holding the most parameters. Its name plays no part.
    """
    from torch import nn

    best: tuple[int, str, Any] | None = None
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList | nn.ModuleDict | nn.Sequential):
            continue
        children = [c for c in mod.children()]
        if len(children) < 2:
            continue
        ref = _structure(children[0])
        if not ref or any(_structure(c) != ref for c in children[1:]):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, path, mod)
    return None if best is None else (best[1], best[2])


def _shallow_fold(model: Any) -> tuple[Any, str, list[str]] | None:
    """A shallow view of ``model`` whose block container keeps its first two blocks only.

    Modules on the path to the container are copied shallowly (their parameter and module
    dicts are new, the tensors are shared), so the user's model is left untouched.
    """
    from torch import nn

    found = block_container_module(model)
    if found is None:
        return None
    path, container = found
    keys = [k for k, _ in container.named_children()]
    if len(keys) <= 2 or not path:
        return None
    if isinstance(container, nn.ModuleDict):
        short = nn.ModuleDict({k: container[k] for k in keys[:2]})
    elif isinstance(container, nn.Sequential):
        short = nn.Sequential(*[container[int(k)] for k in keys[:2]])
    else:
        short = nn.ModuleList([container[int(k)] for k in keys[:2]])
    root = _shallow_copy(model)
    parent = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = _shallow_copy(parent._modules[part])
        parent._modules[part] = child
        parent = child
    parent._modules[parts[-1]] = short
    return root, path, keys


def _shallow_copy(module: Any) -> Any:
    out = copy.copy(module)
    out._modules = dict(module._modules)
    out._parameters = dict(module._parameters)
    out._buffers = dict(module._buffers)
    return out


def _unfold(
    layers: list[PreparedLayer], container: str, keys: list[str]
) -> list[PreparedLayer] | None:
    """Re-expand a two-block trace to all blocks: block 0 as traced, the rest copies of block 1."""
    blocks = [i for i, layer in enumerate(layers) if layer.kind == "block"]
    if len(blocks) != 2:
        return None
    first, second = layers[blocks[0]], layers[blocks[1]]
    if first.name != f"{container}.{keys[0]}" or second.name != f"{container}.{keys[1]}":
        return None
    out = layers[: blocks[0]] + [first]
    prefix = second.name + "."
    for key in keys[1:]:
        name = f"{container}.{key}"
        params = tuple(
            (f"{name}." + p[len(prefix) :]) if p.startswith(prefix) else p for p in second.params
        )
        out.append(replace(second, name=name, module=name, params=params,
                           graph_params=second.graph_params))  # fmt: skip
    out += layers[blocks[1] + 1 :]
    return out


# ---------------------------------------------------------------------------------------------
# inputs at the requested sequence length
# ---------------------------------------------------------------------------------------------
def _vocab_of(model: Any) -> int | None:
    """Rows of the model's first embedding table (the token vocabulary of a token model)."""
    from torch import nn

    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            return int(mod.num_embeddings)
    return None


def _example_at(model: Any, seq_len: int | None) -> Any:
    """The model's example inputs at batch 1, token inputs stretched to ``seq_len``."""
    import torch
    from torch.utils import _pytree as pytree

    factory = getattr(model, "example_inputs", None)
    if not callable(factory):
        return None
    try:
        example = factory(batch_size=1)
    except TypeError:
        example = factory()
    if seq_len is None:
        return example
    vocab = _vocab_of(model) or 2

    def stretch(x: Any) -> Any:
        if (
            isinstance(x, torch.Tensor)
            and x.dim() == 2
            and not x.is_floating_point()
            and x.shape[1] != seq_len
        ):
            return torch.randint(0, vocab, (x.shape[0], seq_len), device=x.device)
        return x

    return pytree.tree_map(stretch, example)


def _seq_len_of(graph: OpGraph) -> int | None:
    """Tokens per sample: the second dim of a 2-D integer input (token ids), else None (images,
    features: what the graph takes decides, never a config attribute)."""
    for node in graph:
        out = node.output
        if node.kind == "input" and out is not None and len(out.shape) == 2:
            if not out.dtype.startswith(("float", "bfloat", "complex")):
                return int(out.shape[1])
    return None


# ---------------------------------------------------------------------------------------------
# facts (labels for exports and explanations)
# ---------------------------------------------------------------------------------------------
_HF_KEYS = {
    "layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads", "ffn_hidden": "intermediate_size",
    "vocab": "vocab_size", "seq_len": "max_position_embeddings",
}  # fmt: skip


def model_facts(model: Any) -> dict[str, Any]:
    """Architecture facts from the model's config, for exports and explanations only.

    Zoo configs and Hugging Face configs are read; anything else gives what the module tree
    shows (norm and activation kinds, tied embeddings). Nothing here chooses a plan.
    """
    from torch import nn

    facts: dict[str, Any] = {}
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for key in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "seq_len"):
            value = getattr(cfg, key, None)
            if value is None and key in _HF_KEYS:
                value = getattr(cfg, _HF_KEYS[key], None)
            if isinstance(value, int):
                facts[key] = value
        if "kv_heads" not in facts and "heads" in facts:
            facts["kv_heads"] = facts["heads"]
        tie = getattr(cfg, "tie_embeddings", getattr(cfg, "tie_word_embeddings", None))
        if isinstance(tie, bool):
            facts["tied_embeddings"] = tie
        act = getattr(cfg, "hidden_act", None)
        if isinstance(act, str):
            facts["activation"] = "swiglu" if act == "silu" else act
        facts["family"] = type(model).__name__
    if model is not None and isinstance(model, nn.Module):
        norms = {type(m).__name__ for m in model.modules()}
        if any("RMSNorm" in n for n in norms):
            facts.setdefault("norm", "rmsnorm")
        elif any("LayerNorm" in n for n in norms):
            facts.setdefault("norm", "layernorm")
        seen: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
        facts.setdefault("tied_embeddings", any(n > 1 for n in seen.values()))
    return facts


# ---------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------
def _model_name(model: Any) -> str:
    cfg = getattr(model, "config", None)
    base = type(model).__name__.lower()
    if cfg is not None and hasattr(cfg, "layers") and hasattr(cfg, "hidden"):
        return f"{base}(layers={cfg.layers}, hidden={cfg.hidden})"
    return base


def _layers_of(graph: OpGraph) -> list[PreparedLayer]:
    from autopar.graph.layers import group_layers, layer_graph

    return [
        PreparedLayer(
            name=layer.name,
            kind=layer.kind,
            signature=layer.signature,
            params=tuple(layer.params),
            graph=layer_graph(graph, layer),
            module=layer.module_path,
        )
        for layer in group_layers(graph)
    ]


def prepare_model(
    model_or_graph: Any, *, seq_len: int | None = None, dtype: str = "bf16"
) -> PreparedModel:
    """Trace (if needed), group into layers, and state everything at batch 1 in ``dtype``."""
    from torch import nn

    from autopar.graph.trace import trace

    facts: dict[str, Any] = {}
    if isinstance(model_or_graph, OpGraph):
        graph = model_or_graph
        name = graph.name
        fold = None
    elif isinstance(model_or_graph, nn.Module):
        model = model_or_graph
        facts = model_facts(model)
        inputs = _example_at(model, seq_len)
        fold = _shallow_fold(model)
        graph = None
        if fold is not None:
            try:
                graph = trace(fold[0], inputs, name=type(model).__name__.lower(), with_loss=True)
            except Exception:  # noqa: BLE001 - a model that needs all its blocks: trace in full
                fold, graph = None, None
        if graph is None:
            graph = trace(model, inputs, name=type(model).__name__.lower(), with_loss=True)
        name = _model_name(model)
    else:
        raise ConfigError(
            f"expected an nn.Module or an OpGraph, got {type(model_or_graph).__name__}",
            field="model",
        )
    if graph.batch_size != 1:
        graph = graph.with_batch(1)
    graph = in_training_dtype(graph, dtype)
    layers = _layers_of(graph)
    if fold is not None:
        unfolded = _unfold(layers, fold[1], fold[2])
        if unfolded is None:  # the folded trace did not show two blocks: trace in full
            graph = in_training_dtype(
                trace(model_or_graph, _example_at(model_or_graph, seq_len), with_loss=True), dtype
            )
            if graph.batch_size != 1:
                graph = graph.with_batch(1)
            layers = _layers_of(graph)
        else:
            layers = unfolded
    if not layers:
        raise ConfigError("the model has no layers to place", field="model")
    fwd = sum(float(layer.graph.fwd_flops) for layer in layers)
    bwd = sum(float(layer.graph.bwd_flops) for layer in layers)
    counted: dict[str, int] = {}
    for layer in layers:
        metas = layer.graph.params()
        for fqn, inner in zip(layer.params, layer.graph_params):
            if inner in metas:
                counted[fqn] = metas[inner].numel
    return PreparedModel(
        name=name,
        graph=graph,
        layers=tuple(layers),
        seq_len=seq_len or _seq_len_of(graph),
        fwd_flops_per_sample=fwd,
        bwd_flops_per_sample=bwd,
        param_count=int(sum(counted.values())),
        facts=facts,
    )
