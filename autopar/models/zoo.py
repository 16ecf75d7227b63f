"""Named model presets, ``build(name)``, ``list_models()`` and the model-spec parser.

Shapes come from the papers named in ``PUBLISHED``; models are built from these configs only,
never downloaded. Everything builds on ``meta`` by default so counting or tracing GPT-3 175B
allocates no parameter memory.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autopar.errors import AutoparError, ConfigError, UserCodeError, user_code_location
from autopar.models.bert import bert
from autopar.models.gpt import gpt
from autopar.models.llama import llama
from autopar.models.mlp import mlp
from autopar.models.moe import moe
from autopar.models.vit import vit

__all__ = [
    "FAMILIES",
    "PRESETS",
    "PUBLISHED",
    "ModelInfo",
    "build",
    "list_models",
    "parse_model_spec",
    "param_count",
    "attach_example_inputs",
    "load_callable",
]

FAMILIES: Mapping[str, Callable[..., nn.Module]] = {
    "gpt": gpt,
    "llama": llama,
    "bert": bert,
    "vit": vit,
    "moe": moe,
    "mlp": mlp,
}
"""Family name -> factory taking keyword shape arguments plus ``device`` and ``dtype``."""


def _gpt3(layers: int, hidden: int, heads: int) -> tuple[str, dict[str, Any]]:
    return "gpt", {"layers": layers, "hidden": hidden, "heads": heads, "ffn_hidden": 4 * hidden,
                   "vocab": 50257, "seq_len": 2048, "tie_embeddings": True}  # fmt: skip


def _llama3(layers: int, hidden: int, heads: int, ffn: int) -> tuple[str, dict[str, Any]]:
    return "llama", {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": 8,
                     "ffn_hidden": ffn, "vocab": 128256, "seq_len": 8192,
                     "rope_theta": 500000.0}  # fmt: skip


PRESETS: Mapping[str, tuple[str, dict[str, Any]]] = {
    # GPT-3 paper (arXiv 2005.14165) Table 2.1; 1.3B uses 16 heads of 128 (the table's 24 heads
    # do not divide d_model 2048) and 13B d_model 5120 (40 x 128; the table prints 5140).
    "gpt3-125m": _gpt3(12, 768, 12),
    "gpt3-350m": _gpt3(24, 1024, 16),
    "gpt3-760m": _gpt3(24, 1536, 16),
    "gpt3-1.3b": _gpt3(24, 2048, 16),
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    "gpt3-13b": _gpt3(40, 5120, 40),
    "gpt3-175b": _gpt3(96, 12288, 96),
    # Llama 3 paper (arXiv 2407.21783) Table 3 and the model cards.
    "llama3-8b": _llama3(32, 4096, 32, 14336),
    "llama3-70b": _llama3(80, 8192, 64, 28672),
    "llama3-405b": _llama3(126, 16384, 128, 53248),
    # BERT paper (arXiv 1810.04805) section 3.
    "bert-large": (
        "bert",
        {
            "layers": 24,
            "hidden": 1024,
            "heads": 16,
            "ffn_hidden": 4096,
            "vocab": 30522,
            "seq_len": 512,
        },
    ),  # fmt: skip
    # ViT paper (arXiv 2010.11929) Table 1, 224x224 images with 14x14 patches.
    "vit-h-14": (
        "vit",
        {
            "layers": 32,
            "hidden": 1280,
            "heads": 16,
            "ffn_hidden": 5120,
            "image_size": 224,
            "patch_size": 14,
        },
    ),  # fmt: skip
    # GShard-style MoE on the GPT-3 1.3B shape: 8 experts in every other block, top-2 routing.
    "moe-1.3b-8e": (
        "moe",
        {
            "layers": 24,
            "hidden": 2048,
            "heads": 16,
            "experts": 8,
            "top_k": 2,
            "moe_every": 2,
            "vocab": 50257,
            "seq_len": 2048,
        },
    ),  # fmt: skip
    "mlp-small": ("mlp", {"layers": 4, "hidden": 1024}),
}
"""Preset name -> (family, factory keyword arguments)."""

PUBLISHED: Mapping[str, tuple[float, str]] = {
    "gpt3-125m": (125e6, "GPT-3 paper Table 2.1"),
    "gpt3-350m": (350e6, "GPT-3 paper Table 2.1"),
    "gpt3-760m": (760e6, "GPT-3 paper Table 2.1"),
    "gpt3-1.3b": (1.3e9, "GPT-3 paper Table 2.1"),
    "gpt3-2.7b": (2.7e9, "GPT-3 paper Table 2.1"),
    "gpt3-6.7b": (6.7e9, "GPT-3 paper Table 2.1"),
    "gpt3-13b": (13e9, "GPT-3 paper Table 2.1"),
    "gpt3-175b": (175e9, "GPT-3 paper Table 2.1 (Megatron SC21: 174.6B with vocab 51200)"),
    "llama3-8b": (8.03e9, "Llama 3 model card"),
    "llama3-70b": (70.6e9, "Llama 3 model card"),
    "llama3-405b": (405.9e9, "Llama 3 model card"),
    "bert-large": (340e6, "BERT paper (rounded; Hugging Face counts 335M)"),
    "vit-h-14": (632e6, "ViT paper Table 1"),
}
"""Preset name -> (published parameter count, source)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """One row of ``list_models()``."""

    name: str
    family: str
    params: int
    """Parameters of the built model (shared tensors counted once), counted on ``meta``."""
    published_params: float | None
    source: str


def param_count(model: nn.Module) -> int:
    """Distinct parameters of ``model`` (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


DTYPES: Mapping[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
    "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32,
}  # fmt: skip
"""Dtype spellings accepted in spec strings and YAML (``gpt3-175b:dtype=bf16``)."""


def _call_family(
    family: str, kwargs: Mapping[str, Any], *, device: str | torch.device, where: str | None
) -> nn.Module:
    factory = FAMILIES[family]
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype '{dtype}'", file=where, field="dtype",
                              allowed=sorted(DTYPES))  # fmt: skip
        kwargs = {**kwargs, "dtype": DTYPES[dtype]}
    allowed = [p for p in inspect.signature(factory).parameters if p not in ("device", "dtype")]
    for key in kwargs:
        if key not in allowed and key != "dtype":
            raise ConfigError(
                f"unknown {family} parameter '{key}'", file=where, field=key, allowed=allowed
            )
    missing = [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.default is inspect.Parameter.empty and p.name not in kwargs
    ]
    if missing:
        raise ConfigError(
            f"{family} needs {', '.join(missing)}", file=where, field=missing[0], allowed=allowed
        )
    try:
        return factory(**kwargs, device=device)
    except AutoparError:
        raise
    except Exception as exc:  # noqa: BLE001 - shapes torch cannot build (storage overflow, ...)
        shown = ",".join(f"{k}={v}" for k, v in kwargs.items() if k != "dtype")
        raise ConfigError(
            f"cannot build {family}:{shown}: {_exception_line(exc)}", file=where, field="model"
        ) from exc


def build(name: str, *, device: str | torch.device = "meta", **overrides: Any) -> nn.Module:
    """The preset ``name`` as an ``nn.Module`` on ``device``; ``overrides`` replace preset fields.

    ``build("gpt3-175b", layers=4)`` keeps 175B widths with 4 blocks: cheap to trace, same block.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown model '{name}'", field="model", allowed=sorted(PRESETS))
    family, kwargs = PRESETS[name]
    return _call_family(family, {**kwargs, **overrides}, device=device, where=None)


def list_models() -> list[ModelInfo]:
    """Every preset with its parameter count (built on ``meta``: no memory is allocated)."""
    rows = []
    for name, (family, _) in PRESETS.items():
        published, source = PUBLISHED.get(name, (None, "autopar preset"))
        count = param_count(build(name, device="meta"))
        rows.append(
            ModelInfo(
                name=name, family=family, params=count, published_params=published, source=source
            )
        )
    return rows


def _parse_value(text: str) -> Any:
    """``"48" -> 48``, ``"1.25" -> 1.25``, ``"true" -> True``; anything else stays a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text.strip()


def _parse_kv(text: str, *, spec: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"'{item}' in model spec '{spec}' is not key=value", field="model")
        out[key.strip()] = _parse_value(value)
    return out


def _from_yaml(path: str, *, device: str | torch.device) -> nn.Module:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read model file: {exc}", file=path) from exc
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping with 'family' or 'preset'", file=path)
    data = dict(data)
    preset = data.pop("preset", None)
    family = data.pop("family", None)
    if (preset is None) == (family is None):
        raise ConfigError(
            "give exactly one of 'preset' (a zoo name) or 'family' (with its shape fields)",
            file=path,
            field="family",
            allowed=sorted(FAMILIES),
        )
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(
                f"unknown preset '{preset}'", file=path, field="preset", allowed=sorted(PRESETS)
            )
        family, base = PRESETS[preset]
        data = {**base, **data}
    if family not in FAMILIES:
        raise ConfigError(
            f"unknown family '{family}'", file=path, field="family", allowed=sorted(FAMILIES)
        )
    return _call_family(family, data, device=device, where=path)


def _exception_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_callable(spec: str, *, what: str = "model", field: str = "model") -> Callable[..., Any]:
    """``package.module:name`` -> the callable it names. Import failures of the user's module
    (a SyntaxError, an exception at import) are ``UserCodeError`` with the user's line."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise ConfigError(f"{what} {spec!r} is not 'package.module:function'", field=field)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import '{module_name}': {exc}", field=field) from exc
    except Exception as exc:  # noqa: BLE001 - the user's module is broken: say where
        raise UserCodeError(
            f"importing '{module_name}' failed: {_exception_line(exc)}",
            spec=spec,
            location=user_code_location(exc),
            field=field,
            what=what,
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"'{module_name}' has no callable '{attr}'", field=field)
    return factory


def _call_user(
    fn: Callable[..., Any], spec: str, *, what: str = "model", field: str = "model", **kwargs: Any
) -> Any:
    """Call the user's ``fn``: a missing argument or an exception inside it is a
    ``UserCodeError`` naming the spec and the user's own failing line."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        needed = [
            p.name
            for p in sig.parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in kwargs
        ]
        if needed:
            raise UserCodeError(
                f"it needs argument(s) {', '.join(needed)} but is called with none; wrap it in "
                "a function without arguments",
                spec=spec,
                field=field,
                what=what,
            )
    try:
        return fn(**kwargs)
    except AutoparError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code raised: say where, not a traceback
        raise UserCodeError(
            f"calling it raised {_exception_line(exc)}",
            spec=spec,
            location=user_code_location(exc),
            field=field,
            what=what,
        ) from exc


def _from_factory(spec: str, *, device: str | torch.device) -> nn.Module:
    factory = load_callable(spec)
    with torch.device(device):
        model = _call_user(factory, spec, field="model")
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"'{spec}' returned {type(model).__name__}, expected a torch.nn.Module", field="model"
        )
    return model


# ---------------------------------------------------------------------------------------------
# example inputs for models that do not bring them
# ---------------------------------------------------------------------------------------------
def _first_embedding(model: nn.Module) -> nn.Embedding | None:
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _config_seq_len(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("seq_len", "max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _resize_batch(x: Any, batch_size: int, device: torch.device) -> Any:
    from torch.utils import _pytree as pytree

    def fit(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        t = t.to(device)
        if t.dim() == 0 or t.shape[0] == batch_size:
            return t
        if t.shape[0] > batch_size:
            return t[:batch_size]
        reps = -(-batch_size // t.shape[0])
        return torch.cat([t] * reps, dim=0)[:batch_size]

    return pytree.tree_map(fit, x)


def attach_example_inputs(
    model: nn.Module, spec: str | None = None, *, seq_len: int | None = None
) -> nn.Module:
    """Give ``model`` an ``example_inputs(batch_size=1)`` method (what tracing and the emitter
    call) when it has none, or when ``spec`` names one; returns ``model``.

    ``spec`` (``package.module:function``): a function of no arguments returning one batch of
    what the forward takes (a tensor, a tuple of positional inputs or a dict of keyword inputs),
    batch on dim 0; it is called once and its tensors are resized along dim 0 and moved to the
    model's device. Without ``spec``, a model without the method that has an ``nn.Embedding``
    (a token model) gets token ids ``[batch, seq_len]`` from its first embedding's vocabulary
    (``seq_len``, else the model config's length); any other model is left as it is (tracing
    then says it needs example inputs).
    """
    import types

    if spec is not None:
        what = "example inputs"
        fn = load_callable(spec, what=what, field="--example-inputs")
        cached: list[Any] = []

        def from_user(self: nn.Module, batch_size: int = 1) -> Any:
            if not cached:
                with torch.device("cpu"):
                    batch = _call_user(fn, spec, what=what, field="--example-inputs")
                if not isinstance(batch, torch.Tensor | tuple | list | dict):
                    raise ConfigError(
                        f"'{spec}' returned {type(batch).__name__}; expected a tensor, a tuple "
                        "of positional inputs or a dict of keyword inputs",
                        field="--example-inputs",
                    )
                cached.append(tuple(batch) if isinstance(batch, list) else batch)
            return _resize_batch(cached[0], batch_size, _model_device(self))

        model.example_inputs = types.MethodType(from_user, model)
        return model
    if callable(getattr(model, "example_inputs", None)):
        return model
    embed = _first_embedding(model)
    length = seq_len or _config_seq_len(model)
    if embed is None or length is None:
        return model
    vocab = int(embed.num_embeddings)

    def tokens(self: nn.Module, batch_size: int = 1) -> tuple[torch.Tensor]:
        return (torch.randint(0, vocab, (batch_size, length), device=_model_device(self)),)

    model.example_inputs = types.MethodType(tokens, model)
    return model


def parse_model_spec(
    spec: str,
    *,
    device: str | torch.device = "meta",
    example_inputs: str | None = None,
    seq_len: int | None = None,
) -> nn.Module:
    """Build the model a user names on the command line.

    Accepted forms: a zoo name (``gpt3-175b``); a zoo name or family with overrides
    (``gpt3-175b:layers=4``, ``gpt:layers=48,hidden=8192,heads=64``); a Hugging Face config
    (``hf:LlamaConfig:hidden_size=256,num_hidden_layers=2``, needs the hf extra); a YAML file with
    ``family:`` or ``preset:`` plus fields; ``package.module:factory`` (called with no arguments
    under ``torch.device(device)``). Anything else raises ConfigError listing the valid names;
    an exception in the user's own code (the factory or its module) is a ``UserCodeError``
    with the user's failing line.

    ``example_inputs`` / ``seq_len``: see ``attach_example_inputs`` (a model without an
    ``example_inputs`` method gets one from that function, or token ids for token models).
    """
    if not isinstance(spec, str):
        raise ConfigError(
            f"a model spec is a string, got {type(spec).__name__}",
            field="model",
            allowed=sorted(PRESETS),
        )
    if not spec.strip():
        raise ConfigError("empty model spec", field="model", allowed=sorted(PRESETS))
    return attach_example_inputs(
        _build_spec(spec.strip(), device=device), example_inputs, seq_len=seq_len
    )


def _build_spec(spec: str, *, device: str | torch.device) -> nn.Module:
    if spec in PRESETS:
        return build(spec, device=device)
    if spec.endswith((".yaml", ".yml")) or os.path.isfile(spec):
        return _from_yaml(spec, device=device)
    head, sep, tail = spec.partition(":")
    if sep and head == "hf":
        from autopar.models.hf import parse_hf_spec

        return parse_hf_spec(tail, device=device)
    if sep and head in FAMILIES:
        return _call_family(head, _parse_kv(tail, spec=spec), device=device, where=None)
    if sep and head in PRESETS:
        return build(head, device=device, **_parse_kv(tail, spec=spec))
    if sep and "=" not in tail and tail.isidentifier():
        return _from_factory(spec, device=device)
    raise ConfigError(
        f"unknown model '{spec}': use a zoo name, 'family:key=value,...' "
        f"(families: {', '.join(FAMILIES)}), a YAML file or 'package.module:factory'",
        field="model",
        allowed=sorted(PRESETS),
    )
