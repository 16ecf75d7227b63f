"""BERT encoder (arXiv 1810.04805): post-LayerNorm blocks, bidirectional attention, MLM head.

The masked-LM head (dense + GELU + LayerNorm, decoder tied to the token embedding) is kept
because pre-training runs it; the NSP pooler is left out (it contributes no work to MLM steps).
BERT-large then counts 335M parameters (as Hugging Face reports) against the paper's rounded
"340M".
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
    token_example_inputs,
)

__all__ = ["BertConfig", "Bert", "BertBlock", "bert"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder."""

    layers: int
    hidden: int
    heads: int
    vocab: int
    seq_len: int
    ffn_hidden: int
    type_vocab: int = 2
    norm_eps: float = 1e-12
    dropout: float = 0.1
    """``hidden_dropout_prob`` and ``attention_probs_dropout_prob`` of BERT (Devlin et al. 2019,
    the released configs): 0.1 on embeddings, attention probabilities and residual branches."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class BertBlock(nn.Module):
    """Post-LN block: ``attn_norm(x + attn(x))`` then ``mlp_norm(x + mlp(x))``."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.p = cfg.dropout
        self.attn = Attention(
            hidden=cfg.hidden, heads=cfg.heads, bias=True, causal=False, dropout=cfg.dropout
        )
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = GeluMLP(hidden=cfg.hidden, ffn_hidden=cfg.ffn_hidden, bias=True)
        self.mlp_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + F.dropout(self.attn(x), self.p, self.training))
        return self.mlp_norm(x + F.dropout(self.mlp(x), self.p, self.training))


class Bert(nn.Module):
    """BERT with its MLM head; ``forward(tokens[b, s]) -> logits[b, s, V]``.

    ``tok_embed`` (with the position/type embeddings), ``head_transform``, ``norm`` and
    ``lm_head`` may be None and entries of ``layers`` deleted for pipeline stages.
    """

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embed: nn.Embedding | None = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos_embed: nn.Embedding | None = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.type_embed: nn.Embedding | None = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.embed_norm: nn.LayerNorm | None = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.layers = nn.ModuleDict({str(i): BertBlock(cfg) for i in range(cfg.layers)})
        self.head_transform: nn.Linear | None = nn.Linear(cfg.hidden, cfg.hidden)
        self.norm: nn.LayerNorm | None = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.hidden, cfg.vocab, bias=True)
        self.lm_head.weight = self.tok_embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = tokens
        if self.tok_embed is not None:
            h = self.tok_embed(tokens)
            if self.pos_embed is not None:
                h = h + self.pos_embed(torch.arange(tokens.shape[1], device=tokens.device))
            if self.type_embed is not None:
                h = h + self.type_embed(torch.zeros_like(tokens))
            if self.embed_norm is not None:
                h = self.embed_norm(h)
            h = F.dropout(h, self.config.dropout, self.training)
        for layer in self.layers.values():
            h = layer(h)
        if self.head_transform is not None:
            h = F.gelu(self.head_transform(h))
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is not None:
            h = self.lm_head(h)
        return h

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor]:
        """Default inputs on the model's device: tokens, or hidden states for a later stage."""
        return token_example_inputs(self, batch_size)


def bert(
    *,
    layers: int,
    hidden: int,
    heads: int,
    vocab: int = 30522,
    seq_len: int = 512,
    ffn_hidden: int | None = None,
    dropout: float = 0.1,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
) -> Bert:
    """A BERT encoder with MLM head (``ffn_hidden`` defaults to ``4 * hidden``)."""
    ffn_hidden = ffn_hidden or 4 * hidden
    check_positive(
        layers=layers, hidden=hidden, heads=heads, vocab=vocab, seq_len=seq_len,
        ffn_hidden=ffn_hidden,
    )  # fmt: skip
    check_divisible("hidden", hidden, "heads", heads)
    cfg = BertConfig(
        layers=layers, hidden=hidden, heads=heads, vocab=vocab, seq_len=seq_len,
        ffn_hidden=ffn_hidden, dropout=dropout,
    )  # fmt: skip
    return construct(Bert, cfg, device=device, dtype=dtype)
