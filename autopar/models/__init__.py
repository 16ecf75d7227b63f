"""Model zoo: parametric families (gpt, llama, bert, vit, moe, mlp) and named presets.

model = autopar.models.build("gpt3-175b")                 # on meta: no memory
model = autopar.models.gpt(layers=2, hidden=64, heads=4, vocab=128, seq_len=16, device="cpu")
model = autopar.models.parse_model_spec("gpt:layers=48,hidden=8192,heads=64")
"""

from autopar.models.bert import Bert, BertConfig, bert
from autopar.models.gpt import GPT, GPTConfig, gpt
from autopar.models.llama import Llama, LlamaConfig, llama
from autopar.models.mlp import MLP, MLPConfig, mlp
from autopar.models.moe import MoE, MoEConfig, moe
from autopar.models.vit import ViT, ViTConfig, vit
from autopar.models.zoo import (
    FAMILIES,
    PRESETS,
    PUBLISHED,
    ModelInfo,
    attach_example_inputs,
    build,
    list_models,
    param_count,
    parse_model_spec,
)

__all__ = [
    "FAMILIES", "PRESETS", "PUBLISHED", "ModelInfo", "build", "list_models", "param_count",
    "parse_model_spec", "attach_example_inputs", "gpt", "llama", "bert", "vit", "moe", "mlp", "GPT", "GPTConfig",
    "Llama", "LlamaConfig", "Bert", "BertConfig", "ViT", "ViTConfig", "MoE", "MoEConfig",
    "MLP", "MLPConfig",
]  # fmt: skip
