"""Hugging Face transformers models built from a config (no weights, no download).

Optional: needs the ``hf`` extra (``pip install autopar[hf]``). The model is built on ``meta``
with the KV cache off (training has no cache) and gets an ``example_inputs(batch_size=1)``
method like the zoo's, so ``autopar.trace(model)`` works unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from autopar.errors import ConfigError

__all__ = ["hf_model", "parse_hf_spec"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigError(
            "Hugging Face models need transformers: pip install 'autopar[hf]'", field="model"
        ) from exc
    return transformers


def hf_model(
    config: Any,
    *,
    seq_len: int | None = None,
    device: str | torch.device = "meta",
    causal_lm: bool = True,
    **config_kwargs: Any,
) -> nn.Module:
    """A transformers model from ``config`` (a ``PretrainedConfig`` or its class name, e.g.
    ``"LlamaConfig"``, with ``config_kwargs``), on ``device``.

    ``seq_len`` sets the length ``example_inputs`` uses (default: the config's
    ``max_position_embeddings``, capped at 2048).
    """
    tf = _transformers()
    if isinstance(config, str):
        cls = getattr(tf, config, None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, tf.PretrainedConfig):
            raise ConfigError(f"transformers has no config class '{config}'", field="model")
        try:
            config = cls(**config_kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad {cls.__name__} fields: {exc}", field="model") from exc
    elif config_kwargs:
        raise ConfigError("config_kwargs only apply when config is a class name", field="model")
    config.use_cache = False
    auto = tf.AutoModelForCausalLM if causal_lm else tf.AutoModel
    with torch.device(device):
        model = auto.from_config(config)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if seq_len is None:
        seq_len = min(int(getattr(config, "max_position_embeddings", 2048) or 2048), 2048)
    if vocab < 1:
        raise ConfigError("config has no vocab_size; pass example_inputs to trace()", field="model")

    def example_inputs(self: nn.Module, batch_size: int = 1) -> dict[str, torch.Tensor]:
        dev = next(self.parameters()).device
        return {"input_ids": torch.randint(0, vocab, (batch_size, seq_len), device=dev)}

    model.example_inputs = types.MethodType(example_inputs, model)
    return model


def parse_hf_spec(text: str, *, device: str | torch.device = "meta") -> nn.Module:
    """``"LlamaConfig:hidden_size=256,num_hidden_layers=2"`` -> ``hf_model(...)``."""
    from autopar.models.zoo import _parse_kv

    cls_name, _, fields = text.partition(":")
    kwargs = _parse_kv(fields, spec=f"hf:{text}")
    seq_len = kwargs.pop("seq_len", None)
    return hf_model(cls_name, seq_len=seq_len, device=device, **kwargs)
