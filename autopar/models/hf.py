"""Hugging Face transformers models built from a config (no weights, no download).

Optional: needs the ``hf`` extra (``pip install autopar[hf]``). ``hf_model`` builds the model
the way training runs it, so that ``autopar.trace(model)`` prices what will execute:

- on ``meta`` by default (no parameter memory; rotary ``inv_freq`` buffers are computed on meta
  too, and transformers' ``_init_weights`` recomputes them when the model is materialised);
- KV cache off (training has no cache);
- ``attn_implementation="sdpa"`` unless the config names another, so each attention is one
  fused ``aten.scaled_dot_product_attention`` node (models without SDPA support fall back to
  eager attention with a warning);
- the head that matches the architecture: a causal LM for decoders, a masked LM for encoders
  (BERT, RoBERTa...), the bare model otherwise (``head=`` overrides);
- in training mode, with the config's dropout (GPT-2 and BERT default to 0.1, so their graphs
  hold dropout masks; set ``resid_pdrop=0`` etc. to plan without);
- batches of whole, unpadded sequences. transformers decides from the *values* of
  ``position_ids`` whether a batch packs several sequences per row; under fake tensors it cannot
  look, so it assumes packing and materialises a ``[b, 1, s, s]`` packed-sequence mask, which in
  turn disables ``is_causal`` and SDPA's native grouped-query attention (K/V are then repeated
  per query head: 8x their memory on Llama 3 70B). While an ``hf_model``'s forward is traced,
  that check answers "not packed", as it does eagerly on real unpacked batches, so the trace is
  ``sdpa(q, k, v, is_causal=True, enable_gqa=True)`` like the eager run. Eager calls on real
  tensors keep transformers' own check (packed batches still get their mask).

Every model gets an ``example_inputs(batch_size=1)`` method like the zoo's.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import functools
import inspect
import re
import types
import warnings
from typing import Any, Literal

import torch
from torch import nn

from autopar.errors import ConfigError

__all__ = ["hf_model", "parse_hf_spec", "config_fields", "HEADS"]

HEADS = ("auto", "causal_lm", "masked_lm", "base")
"""``hf_model(head=...)``: which transformers auto class builds the model."""

Head = Literal["auto", "causal_lm", "masked_lm", "base"]

# Keys every config accepts through ``**kwargs`` without listing them (transformers 5.x pops
# them in ``PreTrainedConfig.__post_init__``); the rope ones only where the config has RoPE.
_BASE_LEGACY_KEYS = frozenset({"torch_dtype", "attn_implementation", "num_labels"})
_ROPE_LEGACY_KEYS = frozenset({"rope_theta", "rope_scaling", "partial_rotary_factor"})
_DOC_FIELD = re.compile(r"^\s+(\w+) \(`", re.MULTILINE)

_ASSUME_UNPACKED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "autopar_hf_assume_unpacked", default=False
)
"""True while an ``hf_model`` runs its forward (set by its hooks; a ContextVar, so concurrent
forwards of other models in other threads or tasks are unaffected)."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigError(
            "Hugging Face models need transformers: pip install 'autopar[hf]'", field="model"
        ) from exc
    return transformers


def _config_base(tf: Any) -> type:
    return getattr(tf, "PreTrainedConfig", None) or tf.PretrainedConfig


@functools.cache
def config_fields(cls: type) -> frozenset[str]:
    """The keyword arguments config class ``cls`` understands.

    The union of its (and its bases') ``__init__`` parameters, dataclass fields, ``attribute_map``
    aliases (``hidden_size`` for GPT-2's ``n_embd``), fields documented under ``Args:``,
    attributes of a default instance, and the legacy keys transformers still accepts
    (``torch_dtype``, ``rope_theta``...). Anything else a config would silently store as an
    unused attribute.
    """
    fields: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            try:
                params = inspect.signature(init).parameters.values()
            except (TypeError, ValueError):
                params = []
            fields |= {
                p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            } - {"self"}
        fields |= set(getattr(klass, "attribute_map", None) or {})
        fields |= set(_DOC_FIELD.findall(klass.__dict__.get("__doc__") or ""))
    if dataclasses.is_dataclass(cls):
        fields |= {f.name for f in dataclasses.fields(cls)}
    try:
        fields |= {k for k in vars(cls()) if not k.startswith("_")}
    except Exception:  # noqa: BLE001 - a config that needs arguments just has fewer known keys
        pass
    fields |= _BASE_LEGACY_KEYS
    if "rope_parameters" in fields:
        fields |= _ROPE_LEGACY_KEYS
    return frozenset(fields)


def _check_fields(cls: type, kwargs: dict[str, Any]) -> None:
    known = config_fields(cls)
    for key in kwargs:
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(
            f"{cls.__name__} has no field '{key}'{hint}", field=key, allowed=sorted(known)
        )


def _config_from_name(tf: Any, name: str, kwargs: dict[str, Any]) -> Any:
    cls = getattr(tf, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, _config_base(tf)):
        close = difflib.get_close_matches(name, [n for n in dir(tf) if n.endswith("Config")])
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"transformers has no config class '{name}'{hint}", field="model")
    _check_fields(cls, kwargs)
    from autopar.models.zoo import DTYPES

    kwargs = {
        k: DTYPES.get(v, v) if k in ("dtype", "torch_dtype") and isinstance(v, str) else v
        for k, v in kwargs.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad {cls.__name__} fields: {exc}", field="model") from exc


def _auto_class(tf: Any, config: Any, head: Head) -> Any:
    """The auto class for ``head``; ``auto``: masked LM for encoders, causal LM for decoders."""
    from transformers.models.auto import modeling_auto

    model_type = getattr(config, "model_type", "")
    causal = model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked = model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if head == "auto":
        # BERT-likes are in both tables (a causal head needs is_decoder=True): encoders -> MLM
        if masked and (not causal or not getattr(config, "is_decoder", False)):
            head = "masked_lm"
        else:
            head = "causal_lm" if causal else "base"
    if (head == "causal_lm" and not causal) or (head == "masked_lm" and not masked):
        raise ConfigError(
            f"transformers has no {head} head for model type '{model_type}'",
            field="head",
            allowed=[h for h, ok in (("causal_lm", causal), ("masked_lm", masked)) if ok]
            + ["base"],
        )
    return {
        "causal_lm": tf.AutoModelForCausalLM,
        "masked_lm": tf.AutoModelForMaskedLM,
        "base": tf.AutoModel,
    }[head]


def _build(auto: Any, config: Any, device: str | torch.device) -> nn.Module:
    chosen = getattr(config, "_attn_implementation_internal", None)
    if chosen not in (None, "sdpa"):  # the user asked for one (eager, flex...): keep it
        with torch.device(device):
            return auto.from_config(config, attn_implementation=chosen)
    with torch.device(device):
        try:
            return auto.from_config(config, attn_implementation="sdpa")
        except ValueError as exc:  # "... does not support ... scaled_dot_product_attention"
            if "sdpa" not in str(exc).lower() and "scaled_dot_product" not in str(exc):
                raise
    warnings.warn(
        f"{type(config).__name__} models do not support SDPA in transformers; attention is "
        "traced unfused (eager), with its [b, heads, s, s] scores",
        stacklevel=3,
    )
    with torch.device(device):
        return auto.from_config(config, attn_implementation="eager")


def _install_unpacked_check() -> bool:
    """Wrap ``transformers.masking_utils.find_packed_sequence_indices`` (once per process) so
    it answers "not packed" for fake tensors while an ``hf_model`` runs. False when this
    transformers has no such function (the trace then keeps whatever mask it builds)."""
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - transformers without masking_utils
        return False
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        return False
    if getattr(original, "__autopar_wrapped__", False):
        return True

    @functools.wraps(original)
    def find_packed_sequence_indices(position_ids: torch.Tensor) -> torch.Tensor | None:
        if _ASSUME_UNPACKED.get() and _is_traced(position_ids):
            return None
        return original(position_ids)

    find_packed_sequence_indices.__autopar_wrapped__ = True  # type: ignore[attr-defined]
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    return True


def _is_traced(t: torch.Tensor) -> bool:
    """A fake tensor, or any tensor while make_fx records (``tracing_mode="real"``): its values
    cannot steer Python control flow."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return isinstance(t, FakeTensor) or get_proxy_mode() is not None


def _assume_unpacked_batches(model: nn.Module) -> None:
    if not _install_unpacked_check():
        return
    tokens: list[contextvars.Token] = []

    def enter(_mod: nn.Module, _args: Any) -> None:
        tokens.append(_ASSUME_UNPACKED.set(True))

    def leave(_mod: nn.Module, _args: Any, _out: Any) -> None:
        if tokens:
            _ASSUME_UNPACKED.reset(tokens.pop())

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)


def hf_model(
    config: Any,
    *,
    seq_len: int | None = None,
    device: str | torch.device = "meta",
    head: Head = "auto",
    **config_kwargs: Any,
) -> nn.Module:
    """A transformers model from ``config`` (a ``PretrainedConfig`` or its class name, e.g.
    ``"LlamaConfig"``, with ``config_kwargs`` checked against the class's fields), on ``device``.

    ``seq_len`` sets the length ``example_inputs`` uses (default: the config's
    ``max_position_embeddings``, capped at 2048). ``head``: ``"auto"`` (causal LM for decoders,
    masked LM for encoders), ``"causal_lm"``, ``"masked_lm"`` or ``"base"`` (no head).
    """
    tf = _transformers()
    if head not in HEADS:
        raise ConfigError(f"unknown head '{head}'", field="head", allowed=HEADS)
    if isinstance(config, str):
        config = _config_from_name(tf, config, config_kwargs)
    elif config_kwargs:
        raise ConfigError("config_kwargs only apply when config is a class name", field="model")
    elif not isinstance(config, _config_base(tf)):
        raise ConfigError(
            f"expected a transformers config or its class name, got {type(config).__name__}",
            field="model",
        )
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 1:
        raise ConfigError("config has no vocab_size; pass example_inputs to trace()", field="model")
    if seq_len is None:
        seq_len = min(int(getattr(config, "max_position_embeddings", 2048) or 2048), 2048)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}", field="seq_len")
    config.use_cache = False
    model = _build(_auto_class(tf, config, head), config, device)
    _assume_unpacked_batches(model)

    def example_inputs(self: nn.Module, batch_size: int = 1) -> dict[str, torch.Tensor]:
        dev = next(self.parameters()).device
        return {"input_ids": torch.randint(0, vocab, (batch_size, seq_len), device=dev)}

    model.example_inputs = types.MethodType(example_inputs, model)
    return model


def parse_hf_spec(text: str, *, device: str | torch.device = "meta") -> nn.Module:
    """``"LlamaConfig:hidden_size=256,num_hidden_layers=2"`` -> ``hf_model(...)``.

    Besides the config's own fields, ``seq_len`` and ``head`` are hf_model's.
    """
    from autopar.models.zoo import _parse_kv

    cls_name, _, fields = text.partition(":")
    kwargs = _parse_kv(fields, spec=f"hf:{text}")
    seq_len = kwargs.pop("seq_len", None)
    head = kwargs.pop("head", "auto")
    return hf_model(cls_name.strip(), seq_len=seq_len, device=device, head=head, **kwargs)
