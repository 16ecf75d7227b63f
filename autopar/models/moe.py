"""GShard-style mixture-of-experts decoder (Lepikhin et al., arXiv 2006.16668).

Every ``moe_every``-th block replaces its dense MLP with ``experts`` GELU MLPs behind a top-2
softmax router. Dispatch follows GShard: each expert takes at most
``capacity = ceil(top_k * tokens / experts * capacity_factor)`` tokens, earlier choices first
(all first choices before any second choice), overflow is dropped and the kept weights are
renormalised over the top-k. Everything has static shapes (one-hot masks, cumsum, index_add,
index_select), so the block traces under fake tensors; the experts are batched weights
``[E, h, f]`` multiplied with ``bmm``, the layout expert parallelism shards on dim 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autopar.errors import ConfigError
from autopar.models.blocks import (
    Attention,
    GeluMLP,
    ceil_div,
    check_divisible,
    check_positive,
    construct,
    learned_position_decoder_forward,
    token_example_inputs,
)

__all__ = ["MoEConfig", "MoE", "MoEBlock", "MoEMLP", "Experts", "moe"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MoEConfig:
    """Hyper-parameters of a GShard-style MoE decoder."""

    layers: int
    hidden: int
    heads: int
    vocab: int
    seq_len: int
    ffn_hidden: int
    experts: int
    top_k: int = 2
    moe_every: int = 2
    """Blocks ``moe_every - 1, 2 * moe_every - 1, ...`` are MoE (GShard: every other block)."""
    capacity_factor: float = 2.0
    norm_eps: float = 1e-5

    def is_moe(self, index: int) -> bool:
        return index % self.moe_every == self.moe_every - 1

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Experts(nn.Module):
    """``experts`` GELU MLPs stored as batched weights: ``up[E, h, f]``, ``down[E, f, h]``."""

    def __init__(self, *, experts: int, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.empty(experts, hidden, ffn_hidden))
        self.down = nn.Parameter(torch.empty(experts, ffn_hidden, hidden))
        nn.init.normal_(self.up, std=hidden**-0.5)
        nn.init.normal_(self.down, std=ffn_hidden**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[E, C, h] -> [E, C, h]``: expert ``e`` applied to its ``C`` slots."""
        return torch.bmm(F.gelu(torch.bmm(x, self.up), approximate="tanh"), self.down)


class MoEMLP(nn.Module):
    """Router + capacity-limited top-k dispatch + batched experts + weighted combine."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.num_experts = cfg.experts
        self.top_k = cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.router = nn.Linear(cfg.hidden, cfg.experts, bias=False)
        self.experts = Experts(experts=cfg.experts, hidden=cfg.hidden, ffn_hidden=cfg.ffn_hidden)

    def capacity(self, tokens: int) -> int:
        return max(1, ceil_div(int(self.top_k * tokens * self.capacity_factor), self.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        n_e, k = self.num_experts, self.top_k
        tokens = b * s
        cap = self.capacity(tokens)
        flat = x.reshape(tokens, d)
        probs = torch.softmax(self.router(flat).float(), dim=-1)
        top_p, top_i = probs.topk(k, dim=-1)  # [T, k]
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        # choice-major order: every token's first choice is placed before any second choice
        choice = top_i.t().reshape(k * tokens)  # [kT]
        onehot = (choice.unsqueeze(1) == torch.arange(n_e, device=x.device)).to(torch.int32)
        slot_in_expert = ((torch.cumsum(onehot, dim=0) - 1) * onehot).sum(dim=1)  # [kT]
        kept = slot_in_expert < cap
        overflow = torch.full_like(choice, n_e * cap)
        slot = torch.where(kept, choice * cap + slot_in_expert, overflow)
        src = flat.repeat(k, 1)  # [kT, d]
        buf = flat.new_zeros(n_e * cap + 1, d).index_add(0, slot, src)
        out = self.experts(buf[: n_e * cap].view(n_e, cap, d))
        out = torch.cat((out.reshape(n_e * cap, d), flat.new_zeros(1, d)), dim=0)
        weight = (top_p.t().reshape(k * tokens) * kept).to(x.dtype).unsqueeze(1)
        combined = (out.index_select(0, slot) * weight).view(k, tokens, d).sum(dim=0)
        return combined.view(b, s, d)


class MoEBlock(nn.Module):
    """Pre-LN decoder block whose ``mlp`` is dense (GeluMLP) or an MoEMLP."""

    def __init__(self, cfg: MoEConfig, *, sparse: bool) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = Attention(hidden=cfg.hidden, heads=cfg.heads, bias=True, causal=True)
        self.mlp_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp: nn.Module = (
            MoEMLP(cfg) if sparse else GeluMLP(hidden=cfg.hidden, ffn_hidden=cfg.ffn_hidden)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class MoE(nn.Module):
    """GShard-style MoE decoder; ``forward(tokens[b, s]) -> logits[b, s, V]``.

    Same pipeline-stage conventions as GPT: ``tok_embed``/``pos_embed``/``norm``/``lm_head`` may
    be None and entries of ``layers`` deleted.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embed: nn.Embedding | None = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos_embed: nn.Embedding | None = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.layers = nn.ModuleDict(
            {str(i): MoEBlock(cfg, sparse=cfg.is_moe(i)) for i in range(cfg.layers)}
        )
        self.norm: nn.LayerNorm | None = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return learned_position_decoder_forward(self, tokens)

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor]:
        """Default inputs on the model's device: tokens, or hidden states for a later stage."""
        return token_example_inputs(self, batch_size)


def moe(
    *,
    layers: int,
    hidden: int,
    heads: int,
    experts: int = 8,
    top_k: int = 2,
    moe_every: int = 2,
    capacity_factor: float = 2.0,
    vocab: int = 50257,
    seq_len: int = 2048,
    ffn_hidden: int | None = None,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
) -> MoE:
    """A GShard-style MoE decoder (``ffn_hidden`` defaults to ``4 * hidden`` per expert)."""
    ffn_hidden = ffn_hidden or 4 * hidden
    check_positive(
        layers=layers, hidden=hidden, heads=heads, experts=experts, top_k=top_k,
        moe_every=moe_every, vocab=vocab, seq_len=seq_len, ffn_hidden=ffn_hidden,
    )  # fmt: skip
    check_divisible("hidden", hidden, "heads", heads)
    if top_k > experts:
        raise ConfigError(f"top_k={top_k} exceeds experts={experts}", field="top_k")
    if not capacity_factor > 0:
        raise ConfigError(f"must be > 0, got {capacity_factor!r}", field="capacity_factor")
    cfg = MoEConfig(
        layers=layers, hidden=hidden, heads=heads, vocab=vocab, seq_len=seq_len,
        ffn_hidden=ffn_hidden, experts=experts, top_k=top_k, moe_every=moe_every,
        capacity_factor=capacity_factor,
    )  # fmt: skip
    return construct(MoE, cfg, device=device, dtype=dtype)
