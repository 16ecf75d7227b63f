"""Models written the way users write them, for tests that names never decide anything.

* ``RenamedGPT`` / ``RenamedLlama``: the zoo's GPT and Llama computations with every module,
  parameter and container renamed (``stack`` is a ``ModuleList``, attention is ``mixer`` with
  ``wq/wk/wv/wo``, the MLP is ``ffn`` with ``lin1/lin2`` or ``w1/w2/w3``), built from the same
  config dataclasses so the two can be compared plan for plan.
* ``FusedQKVGPT``: nanoGPT style: ``transformer.h`` blocks whose attention is one ``c_attn``
  Linear producing q, k and v together, split after the matmul, tied ``wte`` / ``lm_head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autopar.models.blocks import apply_rotary, rotary_tables
from autopar.models.gpt import GPTConfig
from autopar.models.llama import LlamaConfig


class _Mixer(nn.Module):
    def __init__(
        self, hidden: int, heads: int, kv_heads: int, bias: bool, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.p = dropout
        self.hd = hidden // heads
        self.rep = heads // kv_heads
        self.wq = nn.Linear(hidden, heads * self.hd, bias=bias)
        self.wk = nn.Linear(hidden, kv_heads * self.hd, bias=bias)
        self.wv = nn.Linear(hidden, kv_heads * self.hd, bias=bias)
        self.wo = nn.Linear(heads * self.hd, hidden, bias=bias)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.hd)
        k = self.wk(x).view(b, s, -1, self.hd)
        v = self.wv(x).view(b, s, -1, self.hd)
        if rope is not None:
            q = apply_rotary(q, *rope)
            k = apply_rotary(k, *rope)
        if self.rep > 1:
            k = k.unsqueeze(3).expand(-1, -1, -1, self.rep, -1).reshape(b, s, -1, self.hd)
            v = v.unsqueeze(3).expand(-1, -1, -1, self.rep, -1).reshape(b, s, -1, self.hd)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            dropout_p=self.p if self.training else 0.0,
        )
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class _GeluFFN(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(hidden, ffn)
        self.lin2 = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x), approximate="tanh"))


class _GLU(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w3 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _GPTCell(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.p = cfg.dropout
        self.ln_a = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mixer = _Mixer(cfg.hidden, cfg.heads, cfg.heads, bias=True, dropout=cfg.dropout)
        self.ln_b = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.ffn = _GeluFFN(cfg.hidden, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + F.dropout(self.mixer(self.ln_a(x)), self.p, self.training)
        return x + F.dropout(self.ffn(self.ln_b(x)), self.p, self.training)


class RenamedGPT(nn.Module):
    """The zoo GPT's computation under other names, blocks in a ModuleList called ``stack``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.stack = nn.ModuleList([_GPTCell(cfg) for _ in range(cfg.layers)])
        self.final_ln = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.out_proj.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.pos(torch.arange(h.shape[1], device=h.device))
        h = F.dropout(h, self.config.dropout, self.training)
        for cell in self.stack:
            h = cell(h)
        return self.out_proj(self.final_ln(h))

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor]:
        dev = self.emb.weight.device
        return (torch.randint(0, self.config.vocab, (batch_size, self.config.seq_len), device=dev),)


class _LlamaCell(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.pre_mix = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mixer = _Mixer(cfg.hidden, cfg.heads, cfg.kv_heads, bias=False)
        self.pre_ffn = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.ffn = _GLU(cfg.hidden, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x = x + self.mixer(self.pre_mix(x), rope)
        return x + self.ffn(self.pre_ffn(x))


class RenamedLlama(nn.Module):
    """The zoo Llama's computation under other names, blocks in a ModuleList called ``trunk``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.vocab_in = nn.Embedding(cfg.vocab, cfg.hidden)
        self.trunk = nn.ModuleList([_LlamaCell(cfg) for _ in range(cfg.layers)])
        self.post = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.vocab_out = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.vocab_in(ids)
        rope = rotary_tables(
            h.shape[1], self.config.head_dim, theta=self.config.rope_theta, device=h.device,
            dtype=h.dtype,
        )  # fmt: skip
        for cell in self.trunk:
            h = cell(h, rope)
        return self.vocab_out(self.post(h))

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor]:
        dev = self.vocab_in.weight.device
        return (torch.randint(0, self.config.vocab, (batch_size, self.config.seq_len), device=dev),)


class _CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.n_embd, self.n_head = hidden, heads
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class _NanoBlock(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden)
        self.attn = _CausalSelfAttention(hidden, heads)
        self.ln_2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class FusedQKVGPT(nn.Module):
    """nanoGPT's layout: one fused ``c_attn`` for q, k, v; tied ``wte`` and ``lm_head``."""

    def __init__(self, *, layers: int, hidden: int, heads: int, vocab: int, seq_len: int) -> None:
        super().__init__()
        self.vocab, self.seq_len = vocab, seq_len
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, hidden),
                wpe=nn.Embedding(seq_len, hidden),
                h=nn.ModuleList([_NanoBlock(hidden, heads) for _ in range(layers)]),
                ln_f=nn.LayerNorm(hidden),
            )
        )
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(0, idx.shape[1], dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor]:
        dev = self.lm_head.weight.device
        return (torch.randint(0, self.vocab, (batch_size, self.seq_len), device=dev),)


def renamed_gpt(*, device: str = "meta", **kw) -> RenamedGPT:
    """A RenamedGPT with the zoo's ``gpt(...)`` defaults."""
    from autopar.models.gpt import gpt

    cfg = gpt(device="meta", **kw).config
    with torch.device(device):
        return RenamedGPT(cfg)


def renamed_llama(*, device: str = "meta", **kw) -> RenamedLlama:
    """A RenamedLlama with the zoo's ``llama(...)`` defaults."""
    from autopar.models.llama import llama

    cfg = llama(device="meta", **kw).config
    with torch.device(device):
        return RenamedLlama(cfg)
