"""A small multi-layer perceptron: the smallest model with layers to split, for quick checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autopar.models.blocks import check_positive, construct, first_device, first_dtype

__all__ = ["MLPConfig", "MLP", "MLPBlock", "mlp"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MLPConfig:
    """Hyper-parameters of the MLP."""

    layers: int
    hidden: int
    in_features: int
    out_features: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class MLPBlock(nn.Module):
    """Residual ``x + down(relu(up(x)))`` block, hidden -> 4*hidden -> hidden."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.relu(self.up(x)))


class MLP(nn.Module):
    """``forward(x[b, in_features]) -> [b, out_features]``; ``inp``/``head`` may be None."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.config = cfg
        self.inp: nn.Linear | None = nn.Linear(cfg.in_features, cfg.hidden)
        self.layers = nn.ModuleDict({str(i): MLPBlock(cfg.hidden) for i in range(cfg.layers)})
        self.head: nn.Linear | None = nn.Linear(cfg.hidden, cfg.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inp is not None:
            x = self.inp(x)
        for layer in self.layers.values():
            x = layer(x)
        if self.head is not None:
            x = self.head(x)
        return x

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor]:
        cfg = self.config
        width = cfg.in_features if self.inp is not None else cfg.hidden
        return (torch.randn(batch_size, width, device=first_device(self), dtype=first_dtype(self)),)


def mlp(
    *,
    layers: int = 4,
    hidden: int = 1024,
    in_features: int | None = None,
    out_features: int | None = None,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
) -> MLP:
    """An MLP of ``layers`` residual blocks (in/out widths default to ``hidden``)."""
    in_features = in_features or hidden
    out_features = out_features or hidden
    check_positive(layers=layers, hidden=hidden, in_features=in_features, out_features=out_features)
    cfg = MLPConfig(
        layers=layers, hidden=hidden, in_features=in_features, out_features=out_features
    )
    return construct(MLP, cfg, device=device, dtype=dtype)
