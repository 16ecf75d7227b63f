"""autopar.export: launch commands for torchtitan 0.3.0 and Megatron-LM, checked against upstream.

Three plans built by hand (a GPT-3 175B interleaved plan with uneven chunks, a Llama GQA plan,
a dp-only ZeRO-3 plan) are exported and then read back the way the target reads them:

* torchtitan: against ``fixtures/exports/torchtitan-0.3.0.json`` (field names, types and
  subcommands generated from the installed 0.3.0 wheel by ``make_torchtitan_fixture.py``) with
  the validation rules of its ``Trainer.Config`` / ``ParallelDims`` / pipeline builder, and,
  where torchtitan imports, with its own ``ConfigManager`` and pipeline helpers.
* Megatron-LM: an argparse parser built from ``fixtures/exports/megatron-lm-arguments.json``
  (the arguments' definitions at a pinned commit) plus ``validate_args``' rules, and
  megatron-core's own ``TransformerConfig`` (layout / uneven-pipeline / GQA / recompute checks)
  and microbatch calculator where megatron-core imports.

The ``test_bug_*`` tests each pin one defect of the old ``explain.emit`` output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import tomllib

from autopar import plan as plan_module
from autopar.errors import ConfigError
from autopar.export import EXPORT_FORMATS, export_plan
from autopar.plan import Mesh, Parallel, Plan, Stage

FIXTURES = Path(__file__).parent / "fixtures" / "exports"
TITAN = json.loads((FIXTURES / "torchtitan-0.3.0.json").read_text())
MEGATRON = json.loads((FIXTURES / "megatron-lm-arguments.json").read_text())

# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------
_PLAN_FIELDS = {f.name for f in dataclasses.fields(Plan)}


class _PlanWithFacts(Plan):
    """A Plan without model_facts / stack / layers fields: carry them as attributes."""


def _native(key: str, value: Any) -> Any:
    """The brief's plain-dict form of a new Plan field, in the Plan's own types where it has them."""
    stack_cls, layer_cls = (
        getattr(plan_module, "Stack", None),
        getattr(plan_module, "LayerSpec", None),
    )
    if key == "stack" and stack_cls is not None:
        known = {f.name: f for f in dataclasses.fields(stack_cls)}
        out = {}
        for k, v in value.items():
            if k in known and k == "sequence_parallel" and isinstance(known[k].default, str):
                v = "on" if v else "off"
            if k in known:
                out[k] = v
        return stack_cls(**out)
    if key == "layers" and layer_cls is not None:
        return tuple(layer_cls(name=d["name"], kind=d["kind"]) for d in value)
    return value


def _make_plan(**kw: Any) -> Plan:
    extra = {k: kw.pop(k) for k in ("model_facts", "stack", "layers") if k in kw}
    native = {k: _native(k, v) for k, v in extra.items() if k in _PLAN_FIELDS}
    extra = {k: v for k, v in extra.items() if k not in _PLAN_FIELDS}
    plan = (_PlanWithFacts if extra else Plan)(**kw, **native)
    for k, v in extra.items():
        setattr(plan, k, v)
    return plan


def _layers(blocks: int) -> list[dict[str, str]]:
    return [
        {"name": "embed", "kind": "embed", "module": "tok_embed"},
        *({"name": f"layers.{i}", "kind": "block", "module": f"layers.{i}"} for i in range(blocks)),
        {"name": "head", "kind": "head", "module": "lm_head"},
    ]


def _stages(chunk_blocks: list[int], pp: int, ranks_per_stage: int) -> tuple[Stage, ...]:
    """One Stage per chunk in chunk order, chunk c on pipeline rank c % pp (the plan layout)."""
    stages, k = [], 0
    for c, size in enumerate(chunk_blocks):
        layers = [f"layers.{i}" for i in range(k, k + size)]
        k += size
        if c == 0:
            layers.insert(0, "embed")
        if c == len(chunk_blocks) - 1:
            layers.append("head")
        r = c % pp
        devices = tuple(range(r * ranks_per_stage, (r + 1) * ranks_per_stage))
        stages.append(Stage(layers=tuple(layers), devices=devices))
    return tuple(stages)


GPT3_FACTS = {
    "family": "gpt",
    "layers": 96,
    "hidden": 12288,
    "heads": 96,
    "kv_heads": 96,
    "ffn_hidden": 49152,
    "vocab": 50257,
    "seq_len": 2048,
    "norm": "layernorm",
    "activation": "gelu",
    "position": "learned",
    "tied_embeddings": True,
    "bias": True,
}
LLAMA_FACTS = {
    "family": "llama",
    "layers": 80,
    "hidden": 8192,
    "heads": 64,
    "kv_heads": 8,
    "ffn_hidden": 28672,
    "vocab": 128256,
    "seq_len": 8192,
    "norm": "rmsnorm",
    "activation": "swiglu",
    "position": "rope",
    "tied_embeddings": False,
    "bias": False,
}


def gpt3_chunks() -> list[int]:
    """96 blocks in pp x v = 8 x 9 chunks: each rank holds 12 blocks, 3 chunks of 2 and 6 of 1."""
    return [2 if c // 8 < 3 else 1 for c in range(72)]


def gpt3_plan(**over: Any) -> Plan:
    """GPT-3 175B-like: 96 blocks, pp=8 interleaved with v=9 uneven chunks, tp=2, ZeRO-1."""
    pp, dp, tp = 8, 96, 2
    fields: dict[str, Any] = dict(
        model="gpt3-175b",
        cluster="dgx-a100 x192",
        num_devices=pp * dp * tp,
        global_batch=1536,
        seq_len=2048,
        dtype="bf16",
        parallel=Parallel(dp=dp, tp=tp, pp=pp),
        mesh=Mesh(shape=(pp, dp, tp), dim_names=("pp", "dp", "tp")),
        stages=_stages(gpt3_chunks(), pp, dp * tp),
        microbatches=16,
        micro_batch_size=1,
        schedule="interleaved_1f1b",
        virtual_stages=9,
        zero_stage=1,
        recompute="full",
        sequence_parallel=True,
        model_facts=dict(GPT3_FACTS),
        stack={"attention": "flash", "sequence_parallel": True, "overlap_grad_reduce": True},
        layers=_layers(96),
    )
    fields.update(over)
    return _make_plan(**fields)


def llama_plan(**over: Any) -> Plan:
    """Llama 3 70B-like GQA: tp=8, pp=4 1F1B (first/last stage 2 blocks short), selective, SP."""
    pp, dp, tp = 4, 4, 8
    fields: dict[str, Any] = dict(
        model="llama3-70b",
        cluster="dgx-h100 x16",
        num_devices=pp * dp * tp,
        global_batch=128,
        seq_len=8192,
        dtype="bf16",
        parallel=Parallel(dp=dp, tp=tp, pp=pp),
        mesh=Mesh(shape=(pp, dp, tp), dim_names=("pp", "dp", "tp")),
        stages=_stages([19, 21, 21, 19], pp, dp * tp),
        microbatches=32,
        micro_batch_size=1,
        schedule="1f1b",
        virtual_stages=1,
        zero_stage=1,
        recompute="selective",
        sequence_parallel=True,
        model_facts=dict(LLAMA_FACTS),
        stack={"attention": "flash", "sequence_parallel": True, "overlap_grad_reduce": True},
        layers=_layers(80),
    )
    fields.update(over)
    return _make_plan(**fields)


def zero3_plan(**over: Any) -> Plan:
    """dp-only ZeRO-3 on 64 devices, 64 microbatches of 1, an old plan without model facts."""
    blocks = [f"layers.{i}" for i in range(32)]
    fields: dict[str, Any] = dict(
        model="llama2-7b",
        cluster="dgx-a100 x8",
        num_devices=64,
        global_batch=4096,
        seq_len=4096,
        dtype="bf16",
        parallel=Parallel(dp=64, tp=1, pp=1),
        mesh=Mesh(shape=(64,), dim_names=("dp",)),
        stages=(Stage(layers=("embed", *blocks, "head"), devices=tuple(range(64))),),
        microbatches=64,
        micro_batch_size=1,
        schedule="1f1b",
        zero_stage=3,
        recompute="full",
        sequence_parallel=False,
    )
    fields.update(over)
    return _make_plan(**fields)


PLANS = {"gpt3": gpt3_plan, "llama": llama_plan, "zero3": zero3_plan}


# ---------------------------------------------------------------------------------------------
# reading an export back: the shell command
# ---------------------------------------------------------------------------------------------
def _command_tokens(text: str, after: str) -> list[str]:
    """Tokens of the torchrun command after ``after`` (continuation lines joined)."""
    body = [ln for ln in text.splitlines() if ln and not ln.startswith(("#", "export ", "unset "))]
    start = next((i for i, ln in enumerate(body) if ln.startswith("torchrun")), 0)
    joined = " ".join(ln.rstrip("\\").strip() for ln in body[start:])
    tokens = shlex.split(joined)
    return tokens[tokens.index(after) + 1 :] if after in tokens else tokens


def _env_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(("export ", "unset "))]


def _comments(text: str, tag: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if ln.startswith(f"# {tag}:"))


# ---------------------------------------------------------------------------------------------
# torchtitan 0.3.0, from the pinned fixture
# ---------------------------------------------------------------------------------------------
def _titan_value(kind: str, values: list[str]) -> Any:
    if kind == "list[list[str]] | None":
        return None if values == ["None"] else [v.split(",") for v in values]
    assert len(values) == 1, (kind, values)
    (text,) = values
    if kind.endswith("| None") and text == "None":
        return None
    base = kind.removesuffix(" | None")
    if base == "int":
        return int(text)
    if base.startswith("Literal["):
        allowed = re.findall(r"'([^']*)'", base)
        assert text in allowed, (text, allowed)
        return text
    assert base == "str", kind
    return text


def titan_parse_fixture(text: str) -> dict[str, Any]:
    """Parse an export as torchtitan 0.3.0's CLI would (fields, types, subcommands)."""
    tokens = _command_tokens(text, "torchtitan.train")
    out: dict[str, Any] = {"training": {}, "parallelism": {}, "required": {}, "ac": None}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in TITAN["required_args"]:
            out["required"][tok] = tokens[i + 1]
            i += 2
            continue
        if tok.startswith("activation-checkpoint:"):
            assert i == len(tokens) - 1, "the subcommand must come last"
            out["ac"] = tok.split(":", 1)[1]
            assert out["ac"] in TITAN["activation_checkpoint_subcommands"]
            i += 1
            continue
        assert tok.startswith("--"), tok
        section, _, key = tok[2:].partition(".")
        assert section in TITAN["sections"], f"unknown section in {tok}"
        fields = TITAN["sections"][section]
        name, negated = key.replace("-", "_"), False
        if name not in fields and name.startswith("no_") and name[3:] in fields:
            name, negated = name[3:], True
        assert name in fields, f"torchtitan 0.3.0 has no {section}.{name}"
        kind = fields[name]["type"]
        j = i + 1
        if kind == "bool":
            out[section][name] = not negated
        else:
            while j < len(tokens) and not tokens[j].startswith("--") and ":" not in tokens[j]:
                j += 1
            out[section][name] = _titan_value(kind, tokens[i + 1 : j])
        i = j
    assert set(out["required"]) == set(TITAN["required_args"])
    return out


def titan_merged(parsed: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Fixture defaults overlaid with the export's values (what the trainer ends up with)."""
    merged = {}
    for section, fields in TITAN["sections"].items():
        merged[section] = {k: v["default"] for k, v in fields.items()}
        merged[section].update(parsed[section])
    return merged


def titan_validate(cfg: dict[str, dict[str, Any]], world: int) -> dict[str, Any]:
    """torchtitan 0.3.0's checks on the parsed config; returns the derived batch and stages.

    Transcribed from ``Trainer.Config.__post_init__`` (microbatch size, CUDA graphs with PP),
    ``ParallelDims._validate`` (degrees multiply to the world size), ``Trainer.__init__``
    (gradient accumulation), ``pipeline_parallel._get_pipeline_metadata`` /
    ``_get_pp_rank_to_stage_indices_mapping`` (stage count) and torch's schedules.
    """
    from torch.distributed.pipelining.schedules import (
        PipelineScheduleMulti,
        PipelineScheduleSingle,
        get_schedule_class,
    )

    tr, par = cfg["training"], cfg["parallelism"]
    pp, mbs = par["pipeline_parallel_degree"], par["pipeline_parallel_microbatch_size"]
    assert mbs > 0
    if pp > 1:
        assert tr["local_batch_size"] % mbs == 0
        assert tr["disable_cuda_graphs"], "CUDA graphs do not support pipeline parallelism"
    rep, shard = par["data_parallel_replicate_degree"], par["data_parallel_shard_degree"]
    cp, tp = par["context_parallel_degree"], par["tensor_parallel_degree"]
    assert shard >= 1, "the export must not leave the shard degree to be inferred"
    assert rep * shard * cp * tp * pp == world
    batch_degree = rep * shard
    gbs = tr["global_batch_size"]
    assert gbs % (tr["local_batch_size"] * batch_degree) == 0
    out: dict[str, Any] = {
        "accumulation": gbs // (tr["local_batch_size"] * batch_degree),
        "dp": batch_degree,
    }
    if pp > 1:
        schedule = get_schedule_class(par["pipeline_parallel_schedule"])
        parts = par["module_fqns_per_model_part"]
        assert parts is not None, "the export gives the split explicitly"
        assert par["pipeline_parallel_layers_per_stage"] is None
        assert len(parts) % pp == 0
        per_rank = len(parts) // pp
        if issubclass(schedule, PipelineScheduleSingle):
            assert per_rank == 1
        else:
            assert issubclass(schedule, PipelineScheduleMulti) and per_rank >= 2
        m = tr["local_batch_size"] // mbs
        if par["pipeline_parallel_schedule"] == "Interleaved1F1B":
            assert m % max(1, m // pp) == 0
        if par["pipeline_parallel_schedule"] == "1F1B":
            assert m >= pp
        out.update(microbatches=m, parts=parts, per_rank=per_rank)
    return out


def _titan_expected_parts(plan: Plan) -> list[list[str]]:
    """The plan's stages in torchtitan's Decoder module names."""
    names = {"embed": ["tok_embeddings"], "head": ["norm", "lm_head"]}
    return [[m for layer in st.layers for m in names.get(layer, [layer])] for st in plan.stages]


@pytest.mark.parametrize("name", sorted(PLANS))
def test_torchtitan_export_reads_back_with_plan_semantics(name) -> None:
    plan = PLANS[name]()
    text = export_plan(plan, "torchtitan")
    parsed = titan_parse_fixture(text)
    cfg = titan_merged(parsed)
    derived = titan_validate(cfg, plan.num_devices)
    p = plan.parallel
    par, tr = cfg["parallelism"], cfg["training"]
    # degrees: ZeRO-3 -> FSDP over dp, ZeRO-1 -> FSDP (noted), ZeRO-0 -> replicate
    assert par["tensor_parallel_degree"] == p.tp and par["pipeline_parallel_degree"] == p.pp
    assert derived["dp"] == p.dp
    # batch: global batch kept, microbatches run exactly as planned
    assert tr["global_batch_size"] == plan.global_batch
    assert tr["seq_len"] == plan.seq_len
    if p.pp > 1:
        assert derived["microbatches"] == plan.microbatches
        assert par["pipeline_parallel_microbatch_size"] == plan.micro_batch_size
        assert derived["accumulation"] == 1
        assert derived["parts"] == _titan_expected_parts(plan)
        assert derived["per_rank"] == len(plan.stages) // p.pp
    else:
        assert tr["local_batch_size"] == plan.micro_batch_size
        assert derived["accumulation"] == plan.microbatches
    assert parsed["ac"] == plan.recompute
    if p.tp > 1:
        assert par["enable_sequence_parallel"] is plan.sequence_parallel
    # set explicitly, so the base config function's own values cannot leak in
    assert {"local_batch_size", "global_batch_size", "seq_len"} <= set(parsed["training"])
    explicit = {"data_parallel_replicate_degree", "data_parallel_shard_degree"}
    explicit |= {"tensor_parallel_degree", "pipeline_parallel_degree", "context_parallel_degree"}
    assert explicit <= set(parsed["parallelism"])


def test_torchtitan_zero_stages_map_to_replicate_or_shard() -> None:
    def par(plan: Plan) -> dict[str, Any]:
        return titan_merged(titan_parse_fixture(export_plan(plan, "torchtitan")))["parallelism"]

    z3 = par(zero3_plan())
    assert (z3["data_parallel_replicate_degree"], z3["data_parallel_shard_degree"]) == (1, 64)
    assert z3["fsdp_reshard_after_forward"] == "always"
    z0 = par(llama_plan(zero_stage=0))
    assert (z0["data_parallel_replicate_degree"], z0["data_parallel_shard_degree"]) == (4, 1)
    text = export_plan(llama_plan(zero_stage=1), "torchtitan")
    z1 = titan_merged(titan_parse_fixture(text))["parallelism"]
    assert (z1["data_parallel_replicate_degree"], z1["data_parallel_shard_degree"]) == (1, 4)
    assert z1["fsdp_reshard_after_forward"] == "never"
    assert "ZeRO-1 has no torchtitan equivalent" in _comments(text, "NOTE")


def test_torchtitan_notes_sequence_parallel_disagreement() -> None:
    text = export_plan(llama_plan(sequence_parallel=False, stack={}), "torchtitan")
    cfg = titan_merged(titan_parse_fixture(text))
    assert cfg["parallelism"]["enable_sequence_parallel"] is False
    assert "turns sequence parallelism on with tensor parallelism by default" in text
    on = titan_merged(titan_parse_fixture(export_plan(llama_plan(), "torchtitan")))
    assert on["parallelism"]["enable_sequence_parallel"] is True


def test_torchtitan_schedule_names_are_torchs() -> None:
    from torch.distributed.pipelining.schedules import get_schedule_class

    for plan, name in (
        (gpt3_plan(), "Interleaved1F1B"),
        (llama_plan(), "1F1B"),
        (llama_plan(schedule="gpipe"), "GPipe"),
    ):
        cfg = titan_merged(titan_parse_fixture(export_plan(plan, "torchtitan")))
        assert cfg["parallelism"]["pipeline_parallel_schedule"] == name
        get_schedule_class(name)


# -- torchtitan itself, where it imports (a throwaway venv: its deps replace hf packages) -----
def _titan_real() -> Any:
    pytest.importorskip("tyro")
    return pytest.importorskip("torchtitan.trainer")


_REGISTRY = """
from torchtitan.models.llama3.config_registry import llama3_debugmodel


def autopar_base():
    return llama3_debugmodel()
"""


@pytest.mark.parametrize("name", sorted(PLANS))
def test_torchtitan_config_manager_accepts_export(name, tmp_path, monkeypatch) -> None:
    _titan_real()
    import torch
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.pipeline_parallel import _get_pp_rank_to_stage_indices_mapping
    from torchtitan.models.llama3 import model_registry

    (tmp_path / "autopar_titan_registry.py").write_text(_REGISTRY)
    monkeypatch.syspath_prepend(str(tmp_path))
    plan = PLANS[name]()
    tokens = _command_tokens(export_plan(plan, "torchtitan"), "torchtitan.train")
    tokens[tokens.index("--module") + 1] = "autopar_titan_registry"
    tokens[tokens.index("--config") + 1] = "autopar_base"
    cfg = ConfigManager().parse_args(tokens)  # tyro: unknown keys or bad values exit

    ParallelDims.from_config(cfg.parallelism, world_size=plan.num_devices)  # degrees multiply
    pinned = titan_parse_fixture(export_plan(plan, "torchtitan"))  # the fixture's reading
    for section in ("training", "parallelism"):
        for key, value in pinned[section].items():
            assert getattr(getattr(cfg, section), key) == value, (section, key)
    want_ac = {"none": type(None), "full": "FullAC", "selective": "SelectiveAC"}[plan.recompute]
    ac = cfg.activation_checkpoint
    assert ac is None if want_ac is type(None) else type(ac).__qualname__.startswith(want_ac)

    p = plan.parallel
    if p.pp > 1:
        parts = cfg.parallelism.module_fqns_per_model_part
        for rank in range(p.pp):  # torchtitan's chunk -> rank map is the plan's
            got = _get_pp_rank_to_stage_indices_mapping(
                rank, p.pp, cfg.parallelism.pipeline_parallel_schedule, len(parts)
            )
            assert {plan.stages[c].devices for c in got} == {plan.stages[rank].devices}
        spec = model_registry("debugmodel").model
        blocks = sum(1 for st in plan.stages for n in st.layers if n.startswith("layers."))
        with torch.device("meta"):
            model = dataclasses.replace(spec, layers=[spec.layers[0]] * blocks).build()
        for part in parts:  # every name is a module of torchtitan's Decoder
            for fqn in part:
                model.get_submodule(fqn)
        assert sorted(f for part in parts for f in part) == sorted(
            ["tok_embeddings", "norm", "lm_head", *(f"layers.{i}" for i in range(blocks))]
        )


def test_torchtitan_config_manager_rejects_toml_era_keys(tmp_path, monkeypatch) -> None:
    _titan_real()
    from torchtitan.config import ConfigManager

    (tmp_path / "autopar_titan_registry.py").write_text(_REGISTRY)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["--module", "autopar_titan_registry", "--config", "autopar_base"]
    with pytest.raises(SystemExit):
        ConfigManager().parse_args([*base, "--parallelism.pipeline-parallel-split-points", "x"])


# ---------------------------------------------------------------------------------------------
# Megatron-LM, from the pinned argument definitions
# ---------------------------------------------------------------------------------------------
def megatron_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    for flag, spec in MEGATRON["arguments"].items():
        kw: dict[str, Any] = {}
        if "dest" in spec:
            kw["dest"] = spec["dest"]
        if "action" in spec:
            parser.add_argument(flag, action=spec["action"], **kw)
            continue
        kw["type"] = {"int": int, "str": str}[spec["type"]]
        kw["default"] = spec.get("default")
        if "choices" in spec:
            kw["choices"] = spec["choices"]
        if "nargs" in spec:
            kw["nargs"] = spec["nargs"]
        parser.add_argument(flag, **kw)
    return parser


def megatron_parse(text: str) -> argparse.Namespace:
    tokens = _command_tokens(text, MEGATRON["entry_point"])
    args, unknown = megatron_parser().parse_known_args(tokens)
    assert not unknown, f"not Megatron-LM arguments: {unknown}"
    return args


def megatron_validate(args: argparse.Namespace, env: list[str], world: int) -> dict[str, Any]:
    """``validate_args``' rules for the flags the export writes (fixture ``rules``)."""
    tp, pp, cp = (
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.context_parallel_size,
    )
    assert world % (tp * pp * cp) == 0
    dp = world // (tp * pp * cp)
    vpp_flags = [
        args.num_layers_per_virtual_pipeline_stage,
        args.num_virtual_stages_per_pipeline_rank,
        args.pipeline_model_parallel_layout,
    ]
    assert sum(f is not None for f in vpp_flags) <= 1
    vpp = None
    if args.pipeline_model_parallel_layout is not None:
        stages = args.pipeline_model_parallel_layout.split("|")
        assert len(stages) % pp == 0
        vpp = len(stages) // pp
    elif args.num_layers_per_virtual_pipeline_stage is not None:
        assert args.decoder_first_pipeline_num_layers is None
        assert args.decoder_last_pipeline_num_layers is None
        assert args.num_layers % pp == 0
        per_stage = args.num_layers // pp
        assert per_stage % args.num_layers_per_virtual_pipeline_stage == 0
        vpp = per_stage // args.num_layers_per_virtual_pipeline_stage
    elif args.decoder_first_pipeline_num_layers is None:
        assert args.num_layers % pp == 0
    vpp = None if vpp == 1 else vpp
    if args.overlap_param_gather:
        assert args.use_distributed_optimizer or args.use_megatron_fsdp
        assert args.overlap_grad_reduce
    connections_one = "export CUDA_DEVICE_MAX_CONNECTIONS=1" in env
    if args.use_torch_fsdp2:
        assert pp == 1 and not args.use_distributed_optimizer
        assert not args.gradient_accumulation_fusion and args.untie_embeddings_and_output_weights
        assert not args.fp16 and not connections_one
    if args.use_megatron_fsdp:
        assert args.ckpt_format == "fsdp_dtensor" and not connections_one
    if (tp > 1 or cp > 1) and not (args.use_torch_fsdp2 or args.use_megatron_fsdp):
        assert connections_one, "Megatron asserts CUDA_DEVICE_MAX_CONNECTIONS=1 with tp > 1"
    if args.recompute_granularity == "selective":
        assert args.recompute_method is None
    for required in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"):
        if getattr(args, required) is None:
            return {"dp": dp, "vpp": vpp, "incomplete": required}
    assert args.max_position_embeddings >= args.seq_length
    assert args.global_batch_size % (args.micro_batch_size * dp) == 0
    return {
        "dp": dp,
        "vpp": vpp,
        "microbatches": args.global_batch_size // (args.micro_batch_size * dp),
    }


def megatron_core_config(args: argparse.Namespace, vpp: int | None) -> Any:
    """megatron-core's TransformerConfig from the parsed flags, as arguments.py builds it."""
    pytest.importorskip("megatron.core")
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    kw: dict[str, Any] = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        pipeline_model_parallel_layout=args.pipeline_model_parallel_layout,
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
        sequence_parallel=args.sequence_parallel and args.tensor_model_parallel_size > 1,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        normalization=args.normalization,
        add_bias_linear=args.add_bias_linear,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        gradient_accumulation_fusion=args.gradient_accumulation_fusion,
    )
    if args.swiglu:  # core_transformer_config_from_args
        kw.update(activation_func=F.silu, gated_linear_unit=True, bias_activation_fusion=True)
    else:  # validate_args switches bias-gelu fusion off without biases
        kw.update(bias_activation_fusion=args.add_bias_linear)
    return TransformerConfig(**kw)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_megatron_export_parses_and_validates(name) -> None:
    plan = PLANS[name]()
    text = export_plan(plan, "megatron")
    args = megatron_parse(text)
    derived = megatron_validate(args, _env_lines(text), plan.num_devices)
    p = plan.parallel
    assert derived["dp"] == p.dp
    assert args.micro_batch_size == plan.micro_batch_size
    assert args.global_batch_size == plan.global_batch
    assert args.seq_length == plan.seq_len
    assert args.num_layers == sum(
        1 for st in plan.stages for n in st.layers if n.startswith("layers.")
    )
    if "incomplete" not in derived:
        assert derived["microbatches"] == plan.microbatches
    expected_vpp = len(plan.stages) // p.pp if p.pp > 1 else 1
    assert derived["vpp"] == (expected_vpp if expected_vpp > 1 else None)


@pytest.mark.filterwarnings("ignore::UserWarning")  # megatron-core's advice on CUDA graphs etc.
@pytest.mark.parametrize("name", ["gpt3", "llama"])
def test_megatron_core_accepts_export(name) -> None:
    plan = PLANS[name]()
    text = export_plan(plan, "megatron")
    args = megatron_parse(text)
    derived = megatron_validate(args, _env_lines(text), plan.num_devices)
    config = megatron_core_config(args, derived["vpp"])
    from megatron.core.num_microbatches_calculator import ConstantNumMicroBatchesCalculator

    calc = ConstantNumMicroBatchesCalculator(
        args.global_batch_size, args.micro_batch_size, derived["dp"], False, rank=1
    )
    assert calc.get() == plan.microbatches
    p = plan.parallel
    layout = config.pipeline_model_parallel_layout
    if layout is not None:
        # megatron-core's own reading of the layout: chunk c is (pp rank c % pp, virtual stage
        # c // pp), layer ids run through the chunks in that order, as in the plan
        from megatron.core.transformer.enums import LayerType

        names = {"embed": LayerType.embedding, "head": LayerType.loss}
        for c, st in enumerate(plan.stages):
            want = [names.get(n, LayerType.decoder) for n in st.layers]
            assert layout.layout[c % p.pp][c // p.pp] == want, c
        assert layout.virtual_pipeline_model_parallel_size == plan.virtual_stages
    if config.num_layers_in_first_pipeline_stage is not None:
        sizes = [sum(1 for n in st.layers if n.startswith("layers.")) for st in plan.stages]
        assert config.num_layers_in_first_pipeline_stage == sizes[0]
        assert config.num_layers_in_last_pipeline_stage == sizes[-1]


def test_megatron_zero_stages() -> None:
    z1 = megatron_parse(export_plan(llama_plan(), "megatron"))
    assert z1.use_distributed_optimizer and not z1.use_megatron_fsdp
    z2 = megatron_parse(export_plan(llama_plan(zero_stage=2), "megatron"))
    assert z2.use_megatron_fsdp and z2.data_parallel_sharding_strategy == "optim_grads"
    z0 = megatron_parse(export_plan(llama_plan(zero_stage=0), "megatron"))
    assert not (z0.use_distributed_optimizer or z0.use_megatron_fsdp)
    assert z0.overlap_grad_reduce and not z0.overlap_param_gather


def test_megatron_recompute_and_sequence_parallel() -> None:
    full = megatron_parse(export_plan(gpt3_plan(), "megatron"))
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == (
        "full",
        "uniform",
        1,
    )
    sel = megatron_parse(export_plan(llama_plan(), "megatron"))
    assert sel.recompute_granularity == "selective" and sel.recompute_method is None
    assert sel.sequence_parallel and sel.bf16
    none = megatron_parse(
        export_plan(llama_plan(recompute="none", sequence_parallel=False), "megatron")
    )
    assert none.recompute_granularity is None and not none.sequence_parallel


def test_megatron_even_interleaving_uses_layers_per_virtual_stage() -> None:
    """96 blocks on pp=8 x v=4 divide evenly: Megatron's own flag, 3 blocks per chunk."""
    plan = gpt3_plan(stages=_stages([3] * 32, 8, 192), virtual_stages=4, microbatches=16)
    text = export_plan(plan, "megatron")
    args = megatron_parse(text)
    assert args.num_layers_per_virtual_pipeline_stage == 3
    assert args.pipeline_model_parallel_layout is None
    assert megatron_validate(args, _env_lines(text), plan.num_devices)["vpp"] == 4
    assert "chunks hold" not in text


# ---------------------------------------------------------------------------------------------
# the reported bugs, one test each (each fails on the old explain.emit output)
# ---------------------------------------------------------------------------------------------
def test_bug_torchtitan_writes_what_0_3_0_reads_not_toml() -> None:
    text = export_plan(llama_plan(), "torchtitan")
    with pytest.raises(tomllib.TOMLDecodeError):
        tomllib.loads(text)  # TOML job configs were removed; the old export was TOML
    assert "-m torchtitan.train" in text and "--module" in text and "--config" in text
    titan_parse_fixture(text)  # every key is a 0.3.0 field (unknown keys are an error)


def test_bug_torchtitan_has_no_split_points() -> None:
    text = export_plan(llama_plan(), "torchtitan")
    assert "split_points" not in text and "split-points" not in text
    parts = titan_merged(titan_parse_fixture(text))["parallelism"]["module_fqns_per_model_part"]
    assert [len(p) for p in parts] == [20, 21, 21, 21]  # embed+19, 21, 21, 19+norm+lm_head


def _titan_values(text: str) -> dict[str, dict[str, Any]]:
    """The export's training/parallelism values, read as TOML if it is TOML (the old format)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return titan_merged(titan_parse_fixture(text))
    merged = titan_merged({"training": {}, "parallelism": {}})
    for section in merged:
        merged[section].update(doc.get(section, {}))
    return merged


def test_bug_torchtitan_local_batch_is_one_microbatch_without_pipeline() -> None:
    """64 microbatches of 1 on dp=64: torchtitan must run 1 sequence at a time, 64 times."""
    plan = zero3_plan()
    cfg = _titan_values(export_plan(plan, "torchtitan"))
    assert cfg["training"]["local_batch_size"] == 1
    assert titan_validate(cfg, plan.num_devices)["accumulation"] == 64


def test_bug_torchtitan_stage_count_divides_pp() -> None:
    """96 blocks + embed + head with layers_per_stage=1 made 98 stages; pp=8 needs 72 here."""
    plan = gpt3_plan()
    cfg = _titan_values(export_plan(plan, "torchtitan"))
    par = cfg["parallelism"]
    lps = par["pipeline_parallel_layers_per_stage"]
    if lps is not None:  # torchtitan's own stage count from layers_per_stage
        assert math.ceil((96 + 1 + 1) / lps) % 8 == 0
    assert len(par["module_fqns_per_model_part"]) == 72 == 8 * plan.virtual_stages
    assert titan_validate(cfg, plan.num_devices)["per_rank"] == 9


def test_bug_megatron_virtual_stages_match_the_plan() -> None:
    """96 blocks on pp=8 with v=9 uneven chunks: not 12 virtual stages of 1 layer."""
    plan = gpt3_plan()
    text = export_plan(plan, "megatron")
    args = megatron_parse(text)
    assert args.num_layers_per_virtual_pipeline_stage is None
    assert megatron_validate(args, _env_lines(text), plan.num_devices)["vpp"] == 9
    stages = args.pipeline_model_parallel_layout.split("|")
    assert [s.count("t") for s in stages] == gpt3_chunks()
    assert stages[0].startswith("E") and stages[-1].endswith("L")


def test_bug_megatron_sets_cuda_device_max_connections() -> None:
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in _env_lines(
        export_plan(gpt3_plan(), "megatron")
    )
    fsdp = export_plan(llama_plan(zero_stage=3), "megatron")
    assert _env_lines(fsdp) == ["unset CUDA_DEVICE_MAX_CONNECTIONS"]  # FSDP asserts != 1
    assert _env_lines(export_plan(zero3_plan(), "megatron")) == [
        "unset CUDA_DEVICE_MAX_CONNECTIONS"
    ]


def test_bug_megatron_overlaps_what_the_price_overlaps() -> None:
    args = megatron_parse(export_plan(gpt3_plan(), "megatron"))
    assert args.overlap_grad_reduce and args.overlap_param_gather
    off = gpt3_plan(stack={"attention": "flash", "overlap_grad_reduce": False})
    args = megatron_parse(export_plan(off, "megatron"))
    assert not args.overlap_grad_reduce and not args.overlap_param_gather


def test_bug_megatron_model_shape_flags_from_facts() -> None:
    llama = megatron_parse(export_plan(llama_plan(), "megatron"))
    assert llama.group_query_attention and llama.num_query_groups == 8
    assert llama.swiglu and llama.normalization == "RMSNorm"
    assert llama.position_embedding_type == "rope"
    assert llama.untie_embeddings_and_output_weights and not llama.add_bias_linear
    assert (llama.hidden_size, llama.num_attention_heads, llama.ffn_hidden_size) == (
        8192,
        64,
        28672,
    )
    assert llama.max_position_embeddings == 8192
    gpt = megatron_parse(export_plan(gpt3_plan(), "megatron"))
    assert not gpt.group_query_attention and not gpt.swiglu
    assert gpt.normalization == "LayerNorm" and gpt.position_embedding_type == "learned_absolute"
    assert not gpt.untie_embeddings_and_output_weights and gpt.add_bias_linear
    assert gpt.attention_backend == "flash"


def test_bug_megatron_zero3_is_fsdp() -> None:
    text = export_plan(zero3_plan(), "megatron")
    args = megatron_parse(text)
    assert args.use_megatron_fsdp and args.data_parallel_sharding_strategy == "optim_grads_params"
    assert args.use_distributed_optimizer and not args.gradient_accumulation_fusion
    assert args.ckpt_format == "fsdp_dtensor"
    assert "No ZeRO-3" not in text and "weights stay replicated" not in text


# ---------------------------------------------------------------------------------------------
# missing facts, old plans, errors
# ---------------------------------------------------------------------------------------------
def test_missing_model_facts_become_todos_not_guesses() -> None:
    text = export_plan(zero3_plan(), "megatron")
    args = megatron_parse(text)
    assert args.hidden_size is None and args.num_attention_heads is None
    assert args.max_position_embeddings is None and not args.swiglu
    todos = _comments(text, "TODO")
    for flag in (
        "--hidden-size",
        "--num-attention-heads",
        "--ffn-hidden-size",
        "--max-position-embeddings",
        "--num-query-groups",
        "--swiglu",
        "--normalization",
        "--position-embedding-type",
        "--untie-embeddings-and-output-weights",
        "--disable-bias-linear",
    ):
        assert flag in todos, flag
    assert args.num_layers == 32  # counted from the plan's stages, not a guess
    titan = export_plan(zero3_plan(), "torchtitan")
    assert "32 blocks; no model facts in this plan" in _comments(titan, "TODO")


def test_launcher_uses_the_plans_hosts_when_it_has_them() -> None:
    info_cls = getattr(plan_module, "ClusterInfo", None)
    if info_cls is None or "cluster_info" not in _PLAN_FIELDS:
        pytest.skip("this Plan carries no cluster_info")
    info = info_cls(name="dgx-h100", nodes=16, devices_per_host=8, device="h100")
    for fmt in EXPORT_FORMATS:
        text = export_plan(llama_plan(cluster_info=info), fmt)
        assert "torchrun --nnodes 16 --nproc-per-node 8 " in text
        assert "NNODES" not in text
    assert '"${NNODES:?' in export_plan(llama_plan(), "megatron")


def test_plan_without_sequence_length() -> None:
    text = export_plan(zero3_plan(seq_len=None), "megatron")
    assert megatron_parse(text).seq_length is None
    assert "--seq-length <tokens per sample>" in _comments(text, "TODO")
    titan = export_plan(zero3_plan(seq_len=None), "torchtitan")
    assert "seq_len" not in titan_parse_fixture(titan)["training"]


def test_plan_json_round_trip_exports_the_same() -> None:
    plan = zero3_plan()
    again = Plan.from_json(plan.to_json())
    for fmt in EXPORT_FORMATS:
        assert export_plan(again, fmt) == export_plan(plan, fmt)


def test_unknown_format_names_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="torchtitan, megatron"):
        export_plan(llama_plan(), "deepspeed")  # type: ignore[arg-type]


def test_fixtures_name_their_pinned_sources() -> None:
    assert TITAN["version"] == "0.3.0" and TITAN["source"]["wheel_sha256"]
    assert re.fullmatch(r"[0-9a-f]{40}", MEGATRON["source"]["commit"])
    assert "module_fqns_per_model_part" in TITAN["sections"]["parallelism"]
    assert "pipeline_parallel_split_points" not in TITAN["sections"]["parallelism"]
