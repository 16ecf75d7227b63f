"""GPT-2/3 style decoder: learned positions, pre-LayerNorm blocks, GELU MLP, biases everywhere.

Parameter count per block is ``12 h^2 + 13 h`` and the embeddings add ``(V + s) h``; with the
GPT-3 paper's shapes (arXiv 2005.14165, Table 2.1) and tied input/output embeddings this gives
174.6B for "175B".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autopar.models.blocks import (
    Attention,
    GeluMLP,
    check_divisible,
    check_positive,
    construct,
    learned_position_decoder_forward,
    token_example_inputs,
)

__all__ = ["GPTConfig", "GPT", "GPTBlock", "gpt"]


@dataclass(frozen=True, slots=True, kw_only=True)
class GPTConfig:
    """Hyper-parameters of a GPT decoder."""

    layers: int
    hidden: int
    heads: int
    vocab: int
    seq_len: int
    """Default sequence length: size of the position table and of ``example_inputs``."""
    ffn_hidden: int
    tie_embeddings: bool = True
    """GPT-3 shares the token embedding with the output projection (one V x h matrix)."""
    norm_eps: float = 1e-5
    dropout: float = 0.1
    """Dropout on embeddings, attention probabilities and both residual branches while
    training: 0.1 as in GPT-2 (``resid/embd/attn_pdrop``) and Megatron-LM's GPT defaults
    (``--hidden-dropout 0.1 --attention-dropout 0.1``). 0 removes the ops."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class GPTBlock(nn.Module):
    """``x + attn(attn_norm(x))`` then ``x + mlp(mlp_norm(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.p = cfg.dropout
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = Attention(
            hidden=cfg.hidden, heads=cfg.heads, bias=True, causal=True, dropout=cfg.dropout
        )
        self.mlp_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = GeluMLP(hidden=cfg.hidden, ffn_hidden=cfg.ffn_hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + F.dropout(self.attn(self.attn_norm(x)), self.p, self.training)
        return x + F.dropout(self.mlp(self.mlp_norm(x)), self.p, self.training)


class GPT(nn.Module):
    """GPT decoder; ``forward(tokens[b, s]) -> logits[b, s, V]``.

    Any of ``tok_embed``, ``pos_embed``, ``norm``, ``lm_head`` may be set to None and entries of
    ``layers`` deleted (a pipeline stage): forward then passes hidden states through, so a stage
    without ``tok_embed`` takes ``[b, s, h]`` activations instead of tokens.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embed: nn.Embedding | None = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos_embed: nn.Embedding | None = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.layers = nn.ModuleDict({str(i): GPTBlock(cfg) for i in range(cfg.layers)})
        self.norm: nn.LayerNorm | None = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return learned_position_decoder_forward(self, tokens)

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor]:
        """Default inputs on the model's device: tokens, or hidden states for a later stage."""
        return token_example_inputs(self, batch_size)


def gpt(
    *,
    layers: int,
    hidden: int,
    heads: int,
    vocab: int = 50257,
    seq_len: int = 2048,
    ffn_hidden: int | None = None,
    tie_embeddings: bool = True,
    norm_eps: float = 1e-5,
    dropout: float = 0.1,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
) -> GPT:
    """A GPT decoder of the given shape (``ffn_hidden`` defaults to ``4 * hidden``).

    Built on ``meta`` by default (no memory: shapes are all the planner needs); pass
    ``device="cpu"`` for real weights, deterministic under ``torch.manual_seed``.
    """
    check_positive(layers=layers, hidden=hidden, heads=heads, vocab=vocab, seq_len=seq_len)
    check_divisible("hidden", hidden, "heads", heads)
    cfg = GPTConfig(
        layers=layers,
        hidden=hidden,
        heads=heads,
        vocab=vocab,
        seq_len=seq_len,
        ffn_hidden=ffn_hidden or 4 * hidden,
        tie_embeddings=tie_embeddings,
        norm_eps=norm_eps,
        dropout=dropout,
    )
    return construct(GPT, cfg, device=device, dtype=dtype)
