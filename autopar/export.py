"""Export a Plan as a launch command for another trainer, in the vocabulary of a pinned release.

Imports nothing from the solver: everything written is already in the Plan. Whatever the target
cannot express is said in a ``# NOTE:`` comment, and every fact the Plan lacks (old plans have no
``model_facts``) is a ``# TODO:`` naming the flag to add: nothing is guessed or dropped silently.

torchtitan 0.3.0 (the release on PyPI)
    TOML job configs are gone: a job is a Python ``config_registry`` function chosen with
    ``--module`` / ``--config`` plus tyro CLI overrides ``--<section>.<field>`` (unknown keys are
    an error). Fields used, from ``torchtitan/config/configs.py``: ``training.local_batch_size``
    (sequences per data-parallel rank per gradient-accumulation step; with pipeline parallelism
    it is cut into ``parallelism.pipeline_parallel_microbatch_size`` pieces),
    ``training.global_batch_size`` (gradient accumulation = global / (local x dp)),
    ``parallelism.data_parallel_replicate_degree`` / ``data_parallel_shard_degree`` /
    ``fsdp_reshard_after_forward``, ``tensor_parallel_degree``, ``enable_sequence_parallel``
    (on by default), ``pipeline_parallel_degree``, ``pipeline_parallel_schedule`` (names of
    ``torch.distributed.pipelining.schedules.get_schedule_class``),
    ``module_fqns_per_model_part`` (one module list per stage chunk, chunk c on pipeline rank
    c % pp: the only way 0.3.0 takes an explicit split; ``pipeline_parallel_split_points`` is
    gone) and the ``activation-checkpoint:{selective,full,none}`` subcommand. Model shape is
    the config function's ``model_spec``, which the CLI cannot set.
Megatron-LM (``megatron/training/arguments.py`` at commit ``000c4ac2``, Megatron-Core 0.16)
    ``pretrain_gpt.py`` flags: parallel degrees, ``--num-layers-per-virtual-pipeline-stage``
    when the chunks are equal, ``--decoder-first/last-pipeline-num-layers`` when only the end
    stages differ, else ``--pipeline-model-parallel-layout`` (one ``|``-separated stage per
    chunk in chunk order: ``E`` embedding, ``t`` block, ``L`` output layer and loss);
    ``--use-distributed-optimizer`` (ZeRO-1), Megatron-FSDP ``--use-megatron-fsdp
    --data-parallel-sharding-strategy optim_grads[_params]`` (ZeRO-2/3), ``--overlap-grad-reduce``
    / ``--overlap-param-gather``, recompute, ``--sequence-parallel``, precision and the model
    shape flags, plus ``CUDA_DEVICE_MAX_CONNECTIONS=1`` whenever tensor parallelism runs
    without FSDP (``validate_args`` asserts it) and unset under FSDP (which asserts the
    opposite).

Both frameworks lay ranks out as autopar does (pp outermost, tp innermost) and place
interleaved chunk c on pipeline rank c % pp.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass
from typing import Any, Literal

from autopar.errors import ConfigError
from autopar.plan import Plan

__all__ = [
    "EXPORT_FORMATS",
    "ExportFormat",
    "MEGATRON_LM_COMMIT",
    "TORCHTITAN_VERSION",
    "export_plan",
]

ExportFormat = Literal["torchtitan", "megatron"]
EXPORT_FORMATS: tuple[str, ...] = ("torchtitan", "megatron")
TORCHTITAN_VERSION = "0.3.0"
MEGATRON_LM_COMMIT = "000c4ac24f61159c138b0975def722c65245983c"
MEGATRON_CORE_VERSION = "0.16.1"

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)$")
_TITAN_SCHEDULE = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved_1f1b": "Interleaved1F1B"}
_TITAN_EMBED = ("tok_embeddings",)
_TITAN_HEAD = ("norm", "lm_head")


# ---------------------------------------------------------------------------------------------
# what both exporters read from the plan
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class _Chunk:
    """One pipeline stage chunk (a Plan ``Stage``) reduced to what a trainer needs."""

    embed: bool
    """Holds the token embedding."""
    blocks: tuple[int, ...]
    """Transformer block indices (0-based, model order)."""
    head: bool
    """Holds the final norm and the output projection."""
    other: tuple[str, ...]
    """Layer names that are none of the above (reported, never placed)."""


def _facts(plan: Plan) -> dict[str, Any]:
    return dict(getattr(plan, "model_facts", None) or {})


def _stack(plan: Plan) -> dict[str, Any]:
    """``plan.stack`` as a dict, whether the plan carries a dict, a ``Stack`` or nothing."""
    raw = getattr(plan, "stack", None)
    if isinstance(raw, dict):
        return dict(raw)
    if raw is not None and dataclasses.is_dataclass(raw):
        return {f.name: getattr(raw, f.name) for f in dataclasses.fields(raw)}
    return {}


def _stack_sp(stack: dict[str, Any]) -> bool | None:
    """The stack's sequence-parallel setting: True/"on", False/"off", None for "auto"/unset."""
    value = stack.get("sequence_parallel")
    if isinstance(value, bool):
        return value
    return {"on": True, "off": False}.get(str(value)) if value is not None else None


def _launcher(plan: Plan, tail: list[str]) -> tuple[list[str], list[str]]:
    """``torchrun`` with the plan's hosts when it knows them; comments for what it does not."""
    info = getattr(plan, "cluster_info", None)
    nodes = getattr(info, "nodes", None)
    per_host = getattr(info, "devices_per_host", None)
    if nodes and per_host and nodes * per_host == plan.num_devices:
        head = ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(per_host)]
        comments = []
        if nodes > 1:
            comments.append(
                "# run on every host with torchrun's rendezvous flags (--rdzv-backend c10d "
                "--rdzv-endpoint HOST:PORT)"
            )
    else:
        head = [
            "torchrun",
            "--nnodes",
            '"${NNODES:?set to the number of hosts}"',
            "--nproc-per-node",
            '"${NPROC_PER_NODE:?set to the devices per host}"',
        ]
        comments = [f"# set NNODES x NPROC_PER_NODE to the world size {plan.num_devices}"]
    return head + tail, comments


def _kinds(plan: Plan) -> dict[str, str]:
    """Layer name -> ``embed`` / ``block`` / ``head`` from ``plan.layers`` when it is there."""
    out: dict[str, str] = {}
    for entry in getattr(plan, "layers", None) or ():
        name = entry.get("name") if isinstance(entry, dict) else getattr(entry, "name", None)
        kind = entry.get("kind") if isinstance(entry, dict) else getattr(entry, "kind", None)
        if name is not None and kind is not None:
            out[str(name)] = str(kind)
    return out


def _kind(name: str, kinds: dict[str, str]) -> str:
    if name in kinds:
        return kinds[name]
    if _BLOCK.search(name):
        return "block"
    leaf = name.rsplit(".", 1)[-1]
    if name == "embed" or leaf in ("tok_embed", "tok_embeddings", "embed_tokens", "wte"):
        return "embed"
    if name == "head" or leaf in ("lm_head", "output", "norm"):
        return "head"
    return "other"


def _chunks(plan: Plan) -> list[_Chunk]:
    """The plan's stages in chunk order, blocks numbered by their place in the model."""
    kinds = _kinds(plan)
    chunks, next_block = [], 0
    for stage in plan.stages:
        embed = head = False
        blocks: list[int] = []
        other: list[str] = []
        for name in stage.layers:
            kind = _kind(name, kinds)
            if kind == "embed":
                embed = True
            elif kind == "head":
                head = True
            elif kind == "block":
                blocks.append(next_block)
                next_block += 1
            else:
                other.append(name)
        chunks.append(_Chunk(embed=embed, blocks=tuple(blocks), head=head, other=tuple(other)))
    return chunks


def _pipeline_notes(plan: Plan, chunks: list[_Chunk]) -> list[str]:
    """What neither trainer can run as planned: chunk placement and unknown layers."""
    notes = []
    pp = plan.parallel.pp
    if pp > 1 and len(chunks) % pp:
        notes.append(
            f"the plan lists {len(chunks)} stages for pp={pp}; both trainers need a multiple of pp"
        )
    elif pp > 1:
        looped = all(
            tuple(plan.stages[c].devices) == tuple(plan.stages[c % pp].devices)
            for c in range(len(plan.stages))
        )
        if not looped:
            notes.append(
                "the plan does not place chunk c on pipeline rank c % pp; both trainers do, so "
                "the chunks below run on different ranks than planned"
            )
    others = [n for c in chunks for n in c.other]
    if others:
        notes.append(f"layers {others} are neither embedding, block nor head and are not placed")
    return notes


def _batch_note(plan: Plan) -> str | None:
    p = plan.parallel
    per_rank = plan.microbatches * plan.micro_batch_size
    if per_rank * p.dp != plan.global_batch:
        return (
            f"the plan's batch does not add up: {plan.microbatches} microbatches x "
            f"{plan.micro_batch_size} x dp {p.dp} = {per_rank * p.dp}, global batch "
            f"{plan.global_batch}; the global batch below is the plan's"
        )
    return None


def _overlap(plan: Plan) -> bool:
    """Whether the plan's price hides gradient synchronisation behind the backward pass.

    A plan without a ``stack`` was priced by the search's default, which overlaps the dp
    gradient reduction with the last microbatch's backward (see ``autopar.solver.search``).
    """
    value = _stack(plan).get("overlap_grad_reduce")
    return True if value is None else bool(value)


def _grad_dtype(plan: Plan) -> str:
    """The dtype the plan priced gradients in (its stack's, else its training dtype)."""
    return str(_stack(plan).get("grad_dtype") or plan.dtype)


def _command(head: list[str], args: list[list[str]]) -> str:
    """``head`` then one argument group per continuation line, shell-quoted where needed."""
    lines = [" ".join(head)]
    lines += ["  " + " ".join(_quote(tok) for tok in group) for group in args]
    return " \\\n".join(lines)


def _quote(token: str) -> str:
    if token.startswith('"${') and token.endswith('}"'):
        return token  # a deliberate shell parameter expansion
    return shlex.quote(token)


# ---------------------------------------------------------------------------------------------
# torchtitan 0.3.0
# ---------------------------------------------------------------------------------------------
def _titan_modules(chunk: _Chunk) -> list[str]:
    names = list(_TITAN_EMBED) if chunk.embed else []
    names += [f"layers.{i}" for i in chunk.blocks]
    if chunk.head:
        names += list(_TITAN_HEAD)
    return names


def _export_torchtitan(plan: Plan) -> str:
    p = plan.parallel
    facts, stack = _facts(plan), _stack(plan)
    chunks = _chunks(plan)
    notes = _pipeline_notes(plan, chunks)
    batch_note = _batch_note(plan)
    if batch_note:
        notes.append(batch_note)

    # batch: torchtitan's local batch is per data-parallel rank per accumulation step
    if p.pp > 1:
        local = plan.microbatches * plan.micro_batch_size
        accumulation = 1
    else:
        local = plan.micro_batch_size
        accumulation = plan.microbatches
    training = []
    if plan.seq_len is not None:
        training.append(["--training.seq-len", str(plan.seq_len)])
    else:
        notes.append(
            "the plan has no sequence length (not a token model); torchtitan trains decoders "
            "on token sequences and keeps its config's training.seq_len"
        )
    training += [
        ["--training.local-batch-size", str(local)],
        ["--training.global-batch-size", str(plan.global_batch)],
    ]
    if p.pp > 1:
        training.append(["--training.disable-cuda-graphs"])  # Trainer.Config rejects PP with them
    if plan.dtype == "fp16":
        notes.append("torchtitan 0.3.0 has no fp16 mixed precision; bfloat16 is the nearest")
    training.append(
        ["--training.mixed-precision-param", "float32" if plan.dtype == "fp32" else "bfloat16"]
    )
    if _grad_dtype(plan) != "fp32" and p.dp > 1:
        notes.append(
            f"the plan priced {_grad_dtype(plan)} gradient reduction; torchtitan 0.3.0 reduces "
            "in float32 only (training.mixed_precision_reduce): twice the data-parallel traffic"
        )

    # data parallel: replicate (DDP) vs shard (FSDP2)
    zero = plan.zero_stage
    parallelism: list[list[str]] = []
    if zero == 0 or p.dp == 1:
        replicate, shard = p.dp, 1
    else:
        replicate, shard = 1, p.dp
    parallelism += [
        ["--parallelism.data-parallel-replicate-degree", str(replicate)],
        ["--parallelism.data-parallel-shard-degree", str(shard)],
    ]
    if shard > 1:
        policy = "always" if zero == 3 else "never"
        parallelism.append(["--parallelism.fsdp-reshard-after-forward", policy])
        if zero in (1, 2):
            notes.append(
                f"ZeRO-{zero} has no torchtitan equivalent: FSDP2 stores weights sharded. "
                "reshard_after_forward='never' keeps them gathered from forward to backward, so "
                "memory and traffic per step are those of ZeRO-2 (one all-gather, one "
                "reduce-scatter)"
            )
    if p.pp == 1 and plan.microbatches > 1 and p.dp > 1:
        notes.append(
            f"torchtitan 0.3.0 synchronises gradients after each of the {accumulation} "
            "gradient-accumulation steps (no no_sync); the plan prices "
            + ("that for ZeRO-3" if zero == 3 else "one synchronisation per step")
        )

    # tensor / sequence parallel
    parallelism.append(["--parallelism.tensor-parallel-degree", str(p.tp)])
    sp = bool(plan.sequence_parallel)
    stack_sp = _stack_sp(stack)
    if stack_sp is not None and stack_sp != sp:
        notes.append(
            f"plan.sequence_parallel={sp} but its stack says {stack['sequence_parallel']}; "
            "the plan's field is used"
        )
    if p.tp > 1:
        if sp:
            parallelism.append(["--parallelism.enable-sequence-parallel"])
        else:
            parallelism.append(["--parallelism.no-enable-sequence-parallel"])
            notes.append(
                "torchtitan turns sequence parallelism on with tensor parallelism by default; "
                "the plan runs tensor parallelism without it, so it is switched off"
            )
    elif sp:
        notes.append("the plan asks for sequence parallelism with tp=1: nothing to shard, ignored")
    parallelism.append(["--parallelism.context-parallel-degree", "1"])

    # pipeline
    parallelism.append(["--parallelism.pipeline-parallel-degree", str(p.pp)])
    if p.pp > 1:
        schedule = _TITAN_SCHEDULE.get(plan.schedule)
        if schedule is None:
            raise ConfigError(
                f"unknown schedule {plan.schedule!r}",
                field="schedule",
                allowed=tuple(_TITAN_SCHEDULE),
            )
        v = len(chunks) // p.pp if len(chunks) % p.pp == 0 else plan.virtual_stages
        if v > 1 and schedule != "Interleaved1F1B":
            notes.append(
                f"{v} chunks per rank need a multi-stage schedule; Interleaved1F1B is used "
                f"instead of {schedule}"
            )
            schedule = "Interleaved1F1B"
        if v == 1 and schedule == "Interleaved1F1B":
            notes.append("one chunk per rank: Interleaved1F1B needs two or more, 1F1B is used")
            schedule = "1F1B"
        parallelism += [
            ["--parallelism.pipeline-parallel-schedule", schedule],
            ["--parallelism.pipeline-parallel-microbatch-size", str(plan.micro_batch_size)],
            ["--parallelism.pipeline-parallel-layers-per-stage", "None"],
            ["--parallelism.module-fqns-per-model-part"]
            + [",".join(_titan_modules(c)) for c in chunks],
        ]
        m = plan.microbatches
        if schedule == "Interleaved1F1B":
            rounds = max(1, m // p.pp)
            if m % rounds:
                notes.append(
                    f"torch's Interleaved1F1B needs the {m} microbatches to be a multiple of "
                    f"max(1, {m} // pp) = {rounds}; it will refuse this batch"
                )
        elif schedule == "1F1B" and m < p.pp:
            notes.append(f"torch's 1F1B refuses fewer microbatches ({m}) than stages ({p.pp})")
        notes.append(
            "module names are torchtitan's Decoder ones (tok_embeddings, layers.<i>, norm, "
            "lm_head); a model with other names needs its own module_fqns_per_model_part"
        )

    # activation checkpointing
    recompute = plan.recompute
    if recompute not in ("none", "selective", "full"):
        raise ConfigError(
            f"unknown recompute {recompute!r}",
            field="recompute",
            allowed=("none", "selective", "full"),
        )
    if recompute == "selective":
        notes.append(
            "torchtitan's selective AC is per-op (saves matmul and attention outputs, recomputes "
            "every other matmul and the pointwise ops); the plan priced recomputing the "
            "attention core only, so memory and recompute time differ"
        )
    attention = stack.get("attention")
    if attention:
        notes.append(
            f"the plan assumes {attention} attention; torchtitan picks the attention backend "
            "in the model_spec of the config function, not on the command line"
        )

    shape = _shape_summary(plan, facts)
    header = [
        f"# autopar plan for {plan.model} on {plan.cluster} -> torchtitan {TORCHTITAN_VERSION}",
        "# torchtitan 0.3.0 reads a Python config_registry function (--module/--config) plus",
        "# --<section>.<field> overrides; TOML job configs no longer exist.",
        f"# world size {p.world_size} = pp {p.pp} x dp {p.dp} x tp {p.tp}",
        f"# batch: {plan.global_batch} sequences per step = dp {p.dp} x local batch {local} x "
        f"{accumulation} accumulation step(s)"
        + (
            f"; each local batch runs as {plan.microbatches} pipeline microbatches of "
            f"{plan.micro_batch_size}"
            if p.pp > 1
            else ""
        ),
        f"# TODO: point TORCHTITAN_MODULE / TORCHTITAN_CONFIG at a config_registry function that "
        f"builds {plan.model} ({shape}); its model_spec sets the model shape, which the CLI "
        "cannot.",
    ]
    header += [f"# NOTE: {n}" for n in notes]
    head, launch_notes = _launcher(plan, ["-m", "torchtitan.train"])
    header += launch_notes
    cmd = _command(
        head,
        [
            [
                "--module",
                '"${TORCHTITAN_MODULE:?TODO: torchtitan model module, e.g. llama3}"',
                "--config",
                '"${TORCHTITAN_CONFIG:?TODO: its config_registry function, e.g. llama3_70b}"',
            ],
            *training,
            *parallelism,
            [f"activation-checkpoint:{recompute}"],
        ],
    )
    return "\n".join([*header, cmd]) + "\n"


def _shape_summary(plan: Plan, facts: dict[str, Any]) -> str:
    blocks = sum(len(c.blocks) for c in _chunks(plan))
    keys = ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "norm", "activation")
    known = [f"{k}={facts[k]}" for k in keys if facts.get(k) is not None]
    if "position" in facts:
        known.append(f"position={facts['position']}")
    return ", ".join(known) if known else f"{blocks} blocks; no model facts in this plan"


# ---------------------------------------------------------------------------------------------
# Megatron-LM
# ---------------------------------------------------------------------------------------------
def _megatron_layout(chunks: list[_Chunk]) -> str:
    stages = []
    for c in chunks:
        stages.append(("E" if c.embed else "") + "t" * len(c.blocks) + ("L" if c.head else ""))
    return "|".join(stages)


def _megatron_pipeline(plan: Plan, chunks: list[_Chunk], notes: list[str]) -> list[list[str]]:
    p = plan.parallel
    args = [
        ["--tensor-model-parallel-size", str(p.tp)],
        ["--pipeline-model-parallel-size", str(p.pp)],
    ]
    if p.pp == 1:
        return args
    sizes = [len(c.blocks) for c in chunks]
    v = len(chunks) // p.pp
    ends_only = (
        chunks[0].embed
        and chunks[-1].head
        and not any(c.embed for c in chunks[1:])
        and not any(c.head for c in chunks[:-1])
    )
    if ends_only and len(set(sizes)) == 1:
        if v > 1:
            # blocks / (pp * v) divides evenly: Megatron's own interleaved split
            args.append(["--num-layers-per-virtual-pipeline-stage", str(sizes[0])])
        return args
    middle = sizes[1:-1]
    if ends_only and v == 1 and len(set(middle)) <= 1:
        args += [
            ["--decoder-first-pipeline-num-layers", str(sizes[0])],
            ["--decoder-last-pipeline-num-layers", str(sizes[-1])],
        ]
        return args
    # uneven chunks (or embedding/head away from the ends): spell every stage out
    args.append(["--pipeline-model-parallel-layout", _megatron_layout(chunks)])
    if v > 1:
        notes.append(
            f"the plan's {len(chunks)} chunks hold {' or '.join(map(str, sorted(set(sizes))))} "
            "blocks (blocks not divisible by pp x chunks), so no layers-per-virtual-stage value "
            "fits; --pipeline-model-parallel-layout gives each chunk's blocks (chunk c on rank "
            "c % pp, as planned)"
        )
    return args


def _megatron_model(plan: Plan, facts: dict[str, Any], todos: list[str]) -> list[list[str]]:
    """Model shape flags from ``plan.model_facts``; a missing fact is a TODO, never a guess."""
    blocks = sum(len(c.blocks) for c in _chunks(plan))
    args: list[list[str]] = []
    layers = facts.get("layers")
    if layers is not None and int(layers) != blocks:
        todos.append(
            f"model_facts says {layers} layers but the plan's stages hold {blocks} blocks; "
            f"--num-layers {blocks} follows the stages"
        )
    args.append(["--num-layers", str(blocks)])

    def put(flag: str, key: str, what: str) -> None:
        if facts.get(key) is None:
            todos.append(f"add {flag} <{what}> (not in this plan's model_facts)")
        else:
            args.append([flag, str(int(facts[key]))])

    put("--hidden-size", "hidden", "hidden size")
    put("--num-attention-heads", "heads", "attention heads")
    put("--ffn-hidden-size", "ffn_hidden", "MLP hidden size")
    heads, kv = facts.get("heads"), facts.get("kv_heads")
    if kv is None:
        todos.append(
            "add --group-query-attention --num-query-groups <kv heads> if the model uses GQA "
            "(kv_heads not in this plan's model_facts)"
        )
    elif heads is None or int(kv) != int(heads):
        args.append(["--group-query-attention", "--num-query-groups", str(int(kv))])

    if plan.seq_len is None:
        todos.append("add --seq-length <tokens per sample> (the plan has no sequence length)")
    else:
        args.append(["--seq-length", str(plan.seq_len)])
    max_pos = facts.get("seq_len")
    if max_pos is None:
        todos.append(
            "add --max-position-embeddings <model context length> (required, >= --seq-length; "
            "not in this plan's model_facts)"
        )
    else:
        if plan.seq_len is not None and int(max_pos) < plan.seq_len:
            todos.append(
                f"model_facts seq_len {max_pos} is shorter than the planned sequence "
                f"{plan.seq_len}; Megatron requires --max-position-embeddings >= --seq-length"
            )
        args.append(["--max-position-embeddings", str(int(max_pos))])

    activation = facts.get("activation")
    if activation is None:
        todos.append("add --swiglu if the MLP is SwiGLU (activation not in model_facts)")
    elif activation == "swiglu":
        args.append(["--swiglu"])
    elif activation in ("squared_relu", "relu2"):
        args.append(["--squared-relu"])
    elif activation != "gelu":
        todos.append(f"Megatron has no flag for the {activation!r} MLP activation")

    norm = facts.get("norm")
    if norm is None:
        todos.append("add --normalization LayerNorm|RMSNorm (norm not in model_facts)")
    elif norm in ("rmsnorm", "layernorm"):
        args.append(["--normalization", "RMSNorm" if norm == "rmsnorm" else "LayerNorm"])
    else:
        todos.append(f"Megatron has no --normalization for {norm!r}")

    if "position" not in facts:
        todos.append(
            "add --position-embedding-type rope|learned_absolute|none (position not in model_facts)"
        )
    else:
        position = facts["position"]
        mapping = {"rope": "rope", "learned": "learned_absolute", None: "none"}
        if position in mapping:
            args.append(["--position-embedding-type", mapping[position]])
        else:
            todos.append(f"Megatron has no --position-embedding-type for {position!r}")

    tied = facts.get("tied_embeddings")
    if tied is None:
        todos.append(
            "add --untie-embeddings-and-output-weights if the output layer has its own weight "
            "(tied_embeddings not in model_facts; Megatron ties them by default)"
        )
    elif not tied:
        args.append(["--untie-embeddings-and-output-weights"])

    bias = facts.get("bias")
    if bias is None:
        todos.append("add --disable-bias-linear if the Linear layers have no bias (bias unknown)")
    elif not bias:
        args.append(["--disable-bias-linear"])
    return args


def _export_megatron(plan: Plan) -> str:
    p = plan.parallel
    facts, stack = _facts(plan), _stack(plan)
    chunks = _chunks(plan)
    notes = _pipeline_notes(plan, chunks)
    todos: list[str] = []
    batch_note = _batch_note(plan)
    if batch_note:
        notes.append(batch_note)

    args = _megatron_pipeline(plan, chunks, notes)
    if p.pp > 1:
        if plan.schedule == "gpipe":
            notes.append("Megatron has no GPipe schedule; it runs 1F1B (same bubble, less memory)")
        v = len(chunks) // p.pp if len(chunks) % p.pp == 0 else 1
        m = plan.microbatches
        if v > 1 and (m < p.pp or m % p.pp):
            notes.append(
                f"Megatron's interleaved schedule runs microbatches in groups of pp={p.pp}; it "
                f"refuses {m} microbatches (needs a multiple of pp)"
            )
    args += [
        ["--micro-batch-size", str(plan.micro_batch_size)],
        ["--global-batch-size", str(plan.global_batch)],
    ]
    args += _megatron_model(plan, facts, todos)

    # tensor / sequence parallel and the attention kernel
    sp = bool(plan.sequence_parallel)
    if sp and p.tp > 1:
        args.append(["--sequence-parallel"])
    elif sp:
        notes.append("the plan asks for sequence parallelism with tp=1; Megatron turns it off")
    if stack.get("pipeline_scatter_gather") and not sp and p.tp > 1 and p.pp > 1:
        notes.append(
            "the plan priced pipeline sends split over tp (Megatron-LM 2021-22 scatter/gather); "
            "Megatron-Core sends them whole without --sequence-parallel: slower sends than priced"
        )
    attention = stack.get("attention")
    if attention in ("flash", "unfused"):
        args.append(["--attention-backend", attention])
    elif attention:
        notes.append(f"Megatron has no --attention-backend for {attention!r}")

    # recompute
    if plan.recompute == "full":
        args.append(
            [
                "--recompute-granularity",
                "full",
                "--recompute-method",
                "uniform",
                "--recompute-num-layers",
                "1",
            ]
        )
    elif plan.recompute == "selective":
        args.append(["--recompute-granularity", "selective"])  # recomputes core_attn

    # data parallel: ZeRO stage -> distributed optimizer / Megatron-FSDP
    zero = plan.zero_stage if p.dp > 1 else 0
    fsdp = zero >= 2
    overlap = _overlap(plan)
    if zero == 1:
        args.append(["--use-distributed-optimizer"])
    elif fsdp:
        strategy = "optim_grads_params" if zero == 3 else "optim_grads"
        args += [
            ["--use-megatron-fsdp", "--data-parallel-sharding-strategy", strategy],
            ["--use-distributed-optimizer", "--no-gradient-accumulation-fusion"],
            ["--ckpt-format", "fsdp_dtensor"],
        ]
        if zero == 3 and p.pp == 1:
            notes.append(
                "torch FSDP2 is the other ZeRO-3 path (--use-torch-fsdp2 "
                "--no-gradient-accumulation-fusion --untie-embeddings-and-output-weights "
                "--ckpt-format torch_dist, no --use-distributed-optimizer); it refuses pipeline "
                "parallelism and tied embeddings"
            )
        if zero == 2:
            notes.append(
                "ZeRO-2 is Megatron-FSDP's optim_grads strategy; --use-distributed-optimizer "
                "without FSDP is the classic alternative but keeps a full gradient buffer "
                "(ZeRO-1 memory)"
            )
    if overlap and p.dp > 1:
        args.append(["--overlap-grad-reduce"])
        if zero >= 1:
            args.append(["--overlap-param-gather"])
    elif p.dp > 1:
        notes.append("the plan's stack does not overlap gradient reduction; no overlap flags")

    if plan.dtype in ("bf16", "fp16"):
        args.append([f"--{plan.dtype}"])
    megatron_grads = "fp32" if plan.dtype in ("bf16", "fp32") else "fp16"
    if _grad_dtype(plan) != megatron_grads:
        notes.append(
            f"the plan priced {_grad_dtype(plan)} gradients; Megatron-LM accumulates and "
            f"reduces {plan.dtype} training's gradients in {megatron_grads}"
        )

    env: list[str] = []
    if fsdp:
        env.append("unset CUDA_DEVICE_MAX_CONNECTIONS")
        if p.tp > 1:
            notes.append(
                "Megatron-FSDP asserts CUDA_DEVICE_MAX_CONNECTIONS != 1 while tensor/sequence "
                "parallel kernels want 1; Megatron only warns about the combination"
            )
    elif p.tp > 1:
        env.append("export CUDA_DEVICE_MAX_CONNECTIONS=1")
    notes.append(
        "per-parameter placements come from Megatron's layer classes (column/row parallel "
        "Linear); autopar's placements are not passed"
    )

    header = [
        f"# autopar plan for {plan.model} on {plan.cluster} -> Megatron-LM pretrain_gpt.py",
        f"# arguments of megatron/training/arguments.py @ {MEGATRON_LM_COMMIT[:8]} "
        f"(Megatron-Core {MEGATRON_CORE_VERSION})",
        f"# world size {p.world_size} = pp {p.pp} x dp {p.dp} x tp {p.tp} "
        "(Megatron derives dp = world / (tp x pp)); "
        f"{plan.global_batch // max(1, plan.micro_batch_size * p.dp)} microbatches of "
        f"{plan.micro_batch_size} per data-parallel rank",
        "# TODO: add the data, tokenizer, optimizer and schedule flags (--data-path or "
        "--mock-data, --tokenizer-type, --lr, --train-iters, ...)"
        + (
            f"; the tokenizer sets the {facts['vocab']}-token vocabulary (padded to a multiple "
            "of --make-vocab-size-divisible-by x tp)"
            if facts.get("vocab") is not None
            else ""
        ),
    ]
    header += [f"# TODO: {t}" for t in todos]
    header += [f"# NOTE: {n}" for n in notes]
    head, launch_notes = _launcher(plan, ["pretrain_gpt.py"])
    header += launch_notes
    cmd = _command(head, args)
    return "\n".join([*header, *env, cmd]) + "\n"


# ---------------------------------------------------------------------------------------------
def export_plan(plan: Plan, fmt: ExportFormat) -> str:
    """The plan as a launch command for ``fmt``: ``"torchtitan"`` (0.3.0) or ``"megatron"``.

    The text is a shell snippet: comments (``# NOTE:`` what the target cannot express,
    ``# TODO:`` what the plan does not know), environment lines, then one ``torchrun`` command.
    """
    if fmt == "torchtitan":
        return _export_torchtitan(plan)
    if fmt == "megatron":
        return _export_megatron(plan)
    raise ConfigError(f"unknown export format {fmt!r}", field="emit", allowed=EXPORT_FORMATS)
