"""LLaMA-style decoder: RMSNorm, SwiGLU, rotary positions, grouped-query attention, no biases.

Shapes of the Llama 3 presets come from the Llama 3 paper (arXiv 2407.21783, Table 3); input and
output embeddings are separate matrices, which is why 8B counts 8.03B parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from autopar.models.blocks import (
    Attention,
    SwiGLU,
    check_divisible,
    check_positive,
    construct,
    rotary_tables,
    token_example_inputs,
)

__all__ = ["LlamaConfig", "Llama", "LlamaBlock", "llama"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LlamaConfig:
    """Hyper-parameters of a LLaMA decoder."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    """Key/value heads (grouped-query attention); equal to ``heads`` for plain multi-head."""
    vocab: int
    seq_len: int
    ffn_hidden: int
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class LlamaBlock(nn.Module):
    """Pre-RMSNorm block: ``x + attn(attn_norm(x), rope)`` then ``x + mlp(mlp_norm(x))``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = Attention(
            hidden=cfg.hidden, heads=cfg.heads, kv_heads=cfg.kv_heads, bias=False, causal=True
        )
        self.mlp_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = SwiGLU(hidden=cfg.hidden, ffn_hidden=cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """LLaMA decoder; ``forward(tokens[b, s]) -> logits[b, s, V]``.

    ``tok_embed``, ``norm`` and ``lm_head`` may be None and entries of ``layers`` deleted (a
    pipeline stage); the rotary tables are recomputed per call from the sequence length, so
    every stage can run on its own.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embed: nn.Embedding | None = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleDict({str(i): LlamaBlock(cfg) for i in range(cfg.layers)})
        self.norm: nn.RMSNorm | None = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embed(tokens) if self.tok_embed is not None else tokens
        if len(self.layers):
            rope = rotary_tables(
                h.shape[1],
                self.config.head_dim,
                theta=self.config.rope_theta,
                device=h.device,
                dtype=h.dtype,
            )
            for layer in self.layers.values():
                h = layer(h, rope)
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is not None:
            h = self.lm_head(h)
        return h

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor]:
        """Default inputs on the model's device: tokens, or hidden states for a later stage."""
        return token_example_inputs(self, batch_size)


def llama(
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int | None = None,
    vocab: int = 128256,
    seq_len: int = 8192,
    ffn_hidden: int | None = None,
    rope_theta: float = 500000.0,
    norm_eps: float = 1e-5,
    tie_embeddings: bool = False,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
) -> Llama:
    """A LLaMA decoder of the given shape.

    ``ffn_hidden`` defaults to LLaMA's rule: 2/3 of ``4 * hidden`` rounded up to 256.
    """
    kv_heads = kv_heads or heads
    if ffn_hidden is None:
        ffn_hidden = 256 * -(-int(8 * hidden / 3) // 256)
    check_positive(
        layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab,
        seq_len=seq_len, ffn_hidden=ffn_hidden,
    )  # fmt: skip
    check_divisible("hidden", hidden, "heads", heads)
    check_divisible("heads", heads, "kv_heads", kv_heads)
    cfg = LlamaConfig(
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        seq_len=seq_len,
        ffn_hidden=ffn_hidden,
        rope_theta=rope_theta,
        norm_eps=norm_eps,
        tie_embeddings=tie_embeddings,
    )
    return construct(Llama, cfg, device=device, dtype=dtype)
