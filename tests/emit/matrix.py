"""The emitter's test matrix: models written the way users write them x plans from the search.

Kept out of the ``test_*`` modules so spawned processes import only this file.

Every cell trains 3 AdamW steps on 4 gloo ranks from the same initial weights as one process
on the whole batch and must give the same losses and final weights (relative L2 error
<= 1e-5). Parameters whose true gradient is exactly zero (the key bias: softmax is
shift-invariant) get an Adam update made of float noise in both runs; they are compared with an
absolute bound of ``lr x steps`` instead.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch

VOCAB = 128
SEQ = 16
HIDDEN = 64
HEADS = 4
LAYERS = 4
GLOBAL_BATCH = 8
LR = 1e-3
STEPS = 3
RTOL = 1e-5
REPO = Path(__file__).resolve().parents[2]

MODELS = ("zoo-gpt", "zoo-llama", "renamed", "fused-qkv", "hf-llama", "hf-gpt2")


def build(name: str, device: str = "cpu") -> torch.nn.Module:
    """One of ``MODELS`` with seeded weights on ``device`` (``meta`` for the search)."""
    from autopar.models import gpt, llama
    from tests.user_models import FusedQKVGPT, renamed_gpt

    torch.manual_seed(0)
    if name == "zoo-gpt":  # tied input/output embeddings (the zoo's default)
        return gpt(layers=LAYERS, hidden=HIDDEN, heads=HEADS, vocab=VOCAB, seq_len=SEQ,
                   dropout=0.0, device=device)  # fmt: skip
    if name == "zoo-llama":  # grouped-query attention, rotary tables passed to every block
        return llama(layers=LAYERS, hidden=HIDDEN, heads=HEADS, kv_heads=2, vocab=VOCAB,
                     seq_len=SEQ, ffn_hidden=128, device=device)  # fmt: skip
    if name == "renamed":  # other names, blocks in a ModuleList called ``stack``
        return renamed_gpt(layers=LAYERS, hidden=HIDDEN, heads=HEADS, vocab=VOCAB, seq_len=SEQ, dropout=0.0,
                           tie_embeddings=False, device=device)  # fmt: skip
    if name == "fused-qkv":  # nanoGPT: one c_attn Linear for q, k and v; tied embeddings
        with torch.device(device):
            return FusedQKVGPT(layers=LAYERS, hidden=HIDDEN, heads=HEADS, vocab=VOCAB,
                               seq_len=SEQ)  # fmt: skip
    if name in ("hf-llama", "hf-gpt2"):
        import transformers

        from autopar.models.hf import hf_model

        if name == "hf-llama":
            cfg = transformers.LlamaConfig(
                vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                max_position_embeddings=SEQ,
            )  # fmt: skip
        else:
            cfg = transformers.GPT2Config(
                vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=SEQ,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            )  # fmt: skip
        torch.manual_seed(0)
        return hf_model(cfg, seq_len=SEQ, device=device)
    raise ValueError(name)


def logits_of(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def four_device_cluster(tmp_path: Path) -> Path:
    """The shipped PCIe 4090 box cut down to 4 devices per host."""
    text = (REPO / "topologies" / "pcie-4090.yaml").read_text()
    text, n = re.subn(r"devices_per_host:\s*8", "devices_per_host: 4", text)
    assert n == 1, "pcie-4090.yaml no longer has one 'devices_per_host: 8' line"
    text = re.sub(r"^name:.*$", "name: pcie-4090-x4", text, count=1, flags=re.M)
    path = tmp_path / "pcie-4090-x4.yaml"
    path.write_text(text)
    return path


def cell_worker(rank: int, world: int, cases: list[tuple[str, str, dict]]) -> None:
    """Run every (cell, model, plan) case on this rank; each must equal one process."""
    from autopar.plan import Plan

    for cell, model_name, plan_dict in cases:
        try:
            _train_and_compare(model_name, Plan.from_dict(plan_dict))
        except Exception as e:
            raise AssertionError(f"cell {cell} / {model_name} on rank {rank}: {e}") from e


def _full_params(pm: Any) -> dict[str, torch.Tensor]:
    return pm.full_parameters()


def _train_and_compare(model_name: str, plan: Any) -> None:
    from autopar.emit.apply import apply_plan, cross_entropy_loss

    model = build(model_name)
    reference = copy.deepcopy(model)
    pm = apply_plan(model, plan)
    assert pm.executor.stats.output_corrections == 0, pm.executor.stats.corrected[:5]
    opt = pm.make_optimizer(torch.optim.AdamW, lr=LR)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR)
    grad_max: dict[str, torch.Tensor] = {}
    for step in range(STEPS):
        x, y = batch(seed=step + 1)
        loss = pm.step(pm.local_batch(x), pm.local_batch(y))
        ref_loss = cross_entropy_loss(logits_of(reference(x)), y)
        ref_loss.backward()
        for name, p in reference.named_parameters(remove_duplicate=False):
            if p.grad is not None:
                g = p.grad.detach().abs()
                grad_max[name] = torch.maximum(grad_max[name], g) if name in grad_max else g
        assert abs(float(loss) - float(ref_loss)) <= RTOL * abs(float(ref_loss)), (
            f"step {step}: loss {float(loss)} vs one process {float(ref_loss)}"
        )
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert pm.executor.stats.output_corrections == 0, pm.executor.stats.corrected[:5]
    ref = dict(reference.named_parameters(remove_duplicate=False))
    full = _full_params(pm)
    assert full, "this rank holds no parameters"
    scale = max(float(g.max()) for g in grad_max.values())
    for name, p in full.items():
        want = ref[name].detach()
        got = p.detach()
        # true gradient zero: float noise many orders below the model's largest gradient
        noise = grad_max.get(name, torch.ones_like(want)) <= 1e-5 * scale
        gap = (got - want).abs()
        assert float(gap[noise].sum()) <= LR * STEPS * 1.01 * int(noise.sum()), f"{name}: noise"
        diff = float(gap[~noise].norm())
        ref_norm = float(want[~noise].norm())
        assert diff <= RTOL * ref_norm, f"weight {name}: relative error {diff / ref_norm:.2e}"
