"""Building blocks shared by the zoo's transformer families.

Module names follow torchtitan (``attn.{q,k,v,o}``, ``mlp.{up,down}`` / ``mlp.{gate,up,down}``)
because the emitter addresses parameters by these paths when it applies tensor parallelism.
Attention reshapes with ``-1`` for the head count so a column-sharded ``q``/``k``/``v`` (fewer
local heads per rank) runs through the same code unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from autopar.errors import ConfigError

M = TypeVar("M", bound=nn.Module)

__all__ = [
    "Attention",
    "GeluMLP",
    "SwiGLU",
    "rotary_tables",
    "apply_rotary",
    "first_device",
    "first_dtype",
    "check_positive",
    "check_divisible",
    "construct",
]


def first_device(module: nn.Module) -> torch.device:
    """Device of the module's first parameter or buffer (``meta`` for a parameter-free module)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("meta")


def first_dtype(module: nn.Module) -> torch.dtype:
    """Floating dtype of the first parameter, so example hidden states match the weights."""
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def learned_position_decoder_forward(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """GPT-style forward shared by decoders with learned positions (gpt, moe).

    Each part that is None (or a deleted ``layers`` key) is skipped, so a pipeline stage cut
    from the model passes hidden states through: the emitter relies on this.
    """
    h = tokens
    if model.tok_embed is not None:
        h = model.tok_embed(tokens)
    if model.pos_embed is not None:
        h = h + model.pos_embed(torch.arange(h.shape[1], device=h.device))
        h = F.dropout(h, getattr(model.config, "dropout", 0.0), model.training)
    for layer in model.layers.values():
        h = layer(h)
    if model.norm is not None:
        h = model.norm(h)
    if model.lm_head is not None:
        h = model.lm_head(h)
    return h


def token_example_inputs(model: nn.Module, batch_size: int) -> tuple[torch.Tensor]:
    """Default inputs of a token model: tokens, or hidden states for a pipeline stage without
    ``tok_embed`` (the model's ``config`` gives ``seq_len``, ``hidden`` and ``vocab``)."""
    cfg = model.config
    dev = first_device(model)
    if getattr(model, "tok_embed", None) is None:
        shape = (batch_size, cfg.seq_len, cfg.hidden)
        return (torch.randn(shape, device=dev, dtype=first_dtype(model)),)
    return (torch.randint(0, cfg.vocab, (batch_size, cfg.seq_len), device=dev),)


def rotary_tables(
    seq_len: int, head_dim: int, *, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[seq_len, head_dim // 2]`` of rotary position embeddings (RoFormer).

    Computed in ``forward`` rather than kept as a buffer so a model built on ``meta`` and
    materialised later (or split into pipeline stages) never carries a stale table.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., :d/2], x[..., d/2:])`` of ``x[b, s, heads, d]`` (GPT-NeoX layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(
        self,
        *,
        hidden: int,
        heads: int,
        kv_heads: int | None = None,
        bias: bool = True,
        causal: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        kv_heads = kv_heads or heads
        self.dropout = dropout
        """Dropout on the attention probabilities (while training)."""
        check_divisible("hidden", hidden, "heads", heads)
        check_divisible("heads", heads, "kv_heads", kv_heads)
        self.head_dim = hidden // heads
        self.n_rep = heads // kv_heads
        """Query heads per key/value head: a ratio, so it survives tensor-parallel sharding."""
        self.causal = causal
        self.q = nn.Linear(hidden, heads * self.head_dim, bias=bias)
        self.k = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.v = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.o = nn.Linear(heads * self.head_dim, hidden, bias=bias)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, self.head_dim)
        k = self.k(x).view(b, s, -1, self.head_dim)
        v = self.v(x).view(b, s, -1, self.head_dim)
        if rope is not None:
            q = apply_rotary(q, *rope)
            k = apply_rotary(k, *rope)
        if self.n_rep > 1:
            k = k.unsqueeze(3).expand(-1, -1, -1, self.n_rep, -1).reshape(b, s, -1, self.head_dim)
            v = v.unsqueeze(3).expand(-1, -1, -1, self.n_rep, -1).reshape(b, s, -1, self.head_dim)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=self.causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class GeluMLP(nn.Module):
    """The GPT/BERT/ViT feed-forward: ``down(gelu(up(x)))``."""

    def __init__(self, *, hidden: int, ffn_hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, ffn_hidden, bias=bias)
        self.down = nn.Linear(ffn_hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """The LLaMA feed-forward: ``down(silu(gate(x)) * up(x))`` (Shazeer, arXiv 2002.05202)."""

    def __init__(self, *, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, ffn_hidden, bias=False)
        self.up = nn.Linear(hidden, ffn_hidden, bias=False)
        self.down = nn.Linear(ffn_hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_positive(**values: object) -> None:
    """Reject non-positive or non-integer shape fields with a ConfigError naming the field."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"must be a positive integer, got {value!r}", field=name)


def check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    if value % by:
        raise ConfigError(f"{name}={value} is not divisible by {by_name}={by}", field=name)


def construct(
    cls: Callable[[Any], M], cfg: Any, *, device: str | torch.device, dtype: torch.dtype | None
) -> M:
    """Instantiate ``cls(cfg)`` directly on ``device`` (``meta``: no storage is allocated)."""
    with torch.device(device):
        model = cls(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model
