"""Vision Transformer (arXiv 2010.11929): patch embedding, class token, pre-LN encoder blocks.

ViT-H/14 on 224x224 images has 256 patches plus the class token (sequence 257) and 632M
parameters with a 1000-class head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from autopar.models.blocks import (
    Attention,
    GeluMLP,
    check_divisible,
    check_positive,
    construct,
    first_device,
    first_dtype,
)

__all__ = ["ViTConfig", "ViT", "ViTBlock", "vit"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ViTConfig:
    """Hyper-parameters of a ViT classifier."""

    layers: int
    hidden: int
    heads: int
    ffn_hidden: int
    image_size: int
    patch_size: int
    channels: int = 3
    classes: int = 1000
    norm_eps: float = 1e-6

    @property
    def seq_len(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class ViTBlock(nn.Module):
    """Pre-LN encoder block with bidirectional attention."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = Attention(hidden=cfg.hidden, heads=cfg.heads, bias=True, causal=False)
        self.mlp_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = GeluMLP(hidden=cfg.hidden, ffn_hidden=cfg.ffn_hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class ViT(nn.Module):
    """ViT; ``forward(images[b, c, H, W]) -> logits[b, classes]``.

    ``patch_embed`` (with class token and positions), ``norm`` and ``head`` may be None and
    entries of ``layers`` deleted for pipeline stages; hidden states then pass through.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed: nn.Conv2d | None = nn.Conv2d(
            cfg.channels, cfg.hidden, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.hidden))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.layers = nn.ModuleDict({str(i): ViTBlock(cfg) for i in range(cfg.layers)})
        self.norm: nn.LayerNorm | None = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.head: nn.Linear | None = nn.Linear(cfg.hidden, cfg.classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = images
        if self.patch_embed is not None:
            h = self.patch_embed(images).flatten(2).transpose(1, 2)
            cls = self.cls_token.expand(h.shape[0], -1, -1)
            h = torch.cat((cls, h), dim=1) + self.pos_embed
        for layer in self.layers.values():
            h = layer(h)
        if self.norm is not None:
            h = self.norm(h)
        if self.head is not None:
            h = self.head(h[:, 0])
        return h

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor]:
        cfg = self.config
        dev, dtype = first_device(self), first_dtype(self)
        if self.patch_embed is None:
            shape = (batch_size, cfg.seq_len, cfg.hidden)
        else:
            shape = (batch_size, cfg.channels, cfg.image_size, cfg.image_size)
        return (torch.randn(shape, device=dev, dtype=dtype),)


def vit(
    *,
    layers: int,
    hidden: int,
    heads: int,
    ffn_hidden: int | None = None,
    image_size: int = 224,
    patch_size: int = 16,
    channels: int = 3,
    classes: int = 1000,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
) -> ViT:
    """A ViT classifier (``ffn_hidden`` defaults to ``4 * hidden``)."""
    ffn_hidden = ffn_hidden or 4 * hidden
    check_positive(
        layers=layers, hidden=hidden, heads=heads, ffn_hidden=ffn_hidden,
        image_size=image_size, patch_size=patch_size, channels=channels, classes=classes,
    )  # fmt: skip
    check_divisible("hidden", hidden, "heads", heads)
    check_divisible("image_size", image_size, "patch_size", patch_size)
    cfg = ViTConfig(
        layers=layers, hidden=hidden, heads=heads, ffn_hidden=ffn_hidden,
        image_size=image_size, patch_size=patch_size, channels=channels, classes=classes,
    )  # fmt: skip
    return construct(ViT, cfg, device=device, dtype=dtype)
