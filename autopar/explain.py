"""Turn a Plan into words: the CLI's plan text, why runners-up lost, where axes sit on hosts.

Imports nothing from the solver: everything printed is already in the Plan, so a plan read
back from JSON renders exactly like a freshly searched one. (The plan as another framework's
launch configuration is ``autopar.export``.)
"""

from __future__ import annotations

from autopar.plan import Alternative, Plan, TimeBreakdown

__all__ = ["render", "why", "host_mapping"]

GiB = 1024**3


# ---------------------------------------------------------------------------------------------
# text rendering
# ---------------------------------------------------------------------------------------------
def _fmt_s(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


TERM_WORDS = {
    "compute": "compute",
    "recompute": "recompute",
    "tp_comm": "tensor-parallel comm",
    "pp_bubble": "pipeline bubble",
    "pp_comm": "pipeline p2p",
    "dp_comm": "data-parallel comm",
    "offload": "host offload",
}


def why(alt: Alternative, win_step_s: float, win: TimeBreakdown) -> str:
    """Why a runner-up lost: its extra time and the term that grew most."""
    terms = {t: getattr(alt.breakdown, t) - getattr(win, t) for t in TERM_WORDS}
    term, delta = max(terms.items(), key=lambda kv: kv[1])
    gap = alt.step_time_s - win_step_s
    if abs(gap) <= 1e-9 * max(1.0, win_step_s):
        return "ties on time"
    return (
        f"+{_fmt_gap(gap)} ({100 * gap / win_step_s:.1f}%), most on {TERM_WORDS[term]} "
        f"(+{_fmt_gap(delta)})"
    )


def _fmt_gap(s: float) -> str:
    return _fmt_s(s)


def host_mapping(plan: Plan) -> str:
    """Which mesh axis stays inside a host and which crosses hosts (tp innermost)."""
    info = plan.cluster_info
    if info is None:
        return ""
    per_host = max(1, info.devices_per_host)
    parts = []
    inner = 1
    for name in ("tp", "dp", "pp"):
        deg = plan.mesh.degree(name)
        if deg == 1:
            continue
        lo, hi = inner, inner * deg
        if hi <= per_host:
            parts.append(f"{name}={deg} inside a host")
        elif lo >= per_host:
            parts.append(f"{name}={deg} across hosts")
        else:
            parts.append(f"{name}={deg} spans {hi // per_host} hosts ({per_host // lo} per host)")
        inner = hi
    body = ", ".join(parts) if parts else "single device"
    return f"{body} ({per_host} devices per host, tp innermost)"


def _layer_span(layers: tuple[str, ...], kinds: dict[str, str]) -> str:
    """Compact summary of a stage's layers: ``embed, layers.0-11`` (runs of blocks joined)."""
    runs: list[list[tuple[str, int]]] = []
    for name in layers:
        if kinds.get(name) == "block":
            prefix, _, idx = name.rpartition(".")
            num = int(idx) if idx.isdigit() else -1
            if runs and runs[-1][-1][0] == prefix and num == runs[-1][-1][1] + 1 and num >= 0:
                runs[-1].append((prefix, num))
            else:
                runs.append([(prefix, num)])

    def label(run: list[tuple[str, int]]) -> str:
        (p0, a), (_, b) = run[0], run[-1]
        first = f"{p0}.{a}" if p0 else str(a)
        return first + (f"-{b}" if len(run) > 1 else "")

    span = ", ".join(label(r) for r in runs)
    first = next((i for i, n in enumerate(layers) if kinds.get(n) == "block"), len(layers))
    before = list(layers[:first])
    after = [n for n in layers[first:] if kinds.get(n) != "block"]
    return ", ".join([*before, *([span] if span else []), *after])


def _block_count(layers: tuple[str, ...], kinds: dict[str, str]) -> int:
    return sum(1 for n in layers if kinds.get(n) == "block")


def _stage_lines(plan: Plan) -> list[str]:
    """One line per pipeline rank group; an interleaved plan lists its chunks on that line."""
    kinds = plan.layer_kinds
    groups: dict[tuple[int, ...], list[tuple[str, ...]]] = {}
    for st in plan.stages:
        groups.setdefault(tuple(st.devices), []).append(tuple(st.layers))
    lines = []
    for i, (devices, chunks) in enumerate(groups.items()):
        if len(chunks) == 1:
            text = _layer_span(chunks[0], kinds)
        else:
            sizes = [_block_count(c, kinds) for c in chunks]
            spans = [_layer_span(c, kinds) for c in chunks]
            shown = spans if len(spans) <= 4 else [*spans[:2], "...", spans[-1]]
            text = f"{len(chunks)} chunks of {'/'.join(map(str, sorted(set(sizes))))} blocks: "
            text += " | ".join(shown)
        lines.append(f"  {i:>3}  {_device_span(devices):<22} {text}")
    return lines


def _device_span(devices: tuple[int, ...]) -> str:
    if not devices:
        return "-"
    if list(devices) == list(range(devices[0], devices[0] + len(devices))):
        return f"ranks {devices[0]}-{devices[-1]}" if len(devices) > 1 else f"rank {devices[0]}"
    shown = ",".join(str(d) for d in devices[:8])
    return f"ranks {shown}{',...' if len(devices) > 8 else ''} ({len(devices)})"


def _relief_text(
    recompute: str, recompute_blocks: int, offload: str, offload_blocks: int
) -> tuple[str, str]:
    """Short recompute and offload columns: ``none+3`` (3 blocks fully recomputed), ``opt+act2``."""
    rec = recompute + (f"+{recompute_blocks}" if recompute_blocks else "")
    off = {"none": "-", "optimizer": "opt", "full": "full"}.get(offload, offload)
    if offload_blocks:
        off = ("" if off == "-" else off + "+") + f"act{offload_blocks}"
    return rec, off


def _alt_row(a: Alternative, plan: Plan) -> str:
    p = a.parallel
    pred = plan.predicted
    reason = why(a, pred.step_time_s, pred.breakdown) if pred is not None else ""
    rec, off = _relief_text(a.recompute, a.recompute_blocks, a.offload, a.offload_blocks)
    return (
        f"  {p.dp:>4} {p.tp:>3} {p.pp:>3}  {a.micro_batch_size:>3} {a.microbatches:>5}  "
        f"{a.schedule:<16} {a.zero_stage:>4}  {rec:<12} {off:<9} "
        f"{'on ' if a.sequence_parallel else 'off'}"
        f" {_fmt_s(a.step_time_s):>10}  {a.memory_gib_per_device:>6.1f}  {reason}"
    )


def _blocks_by_rank(plan: Plan, names: tuple[str, ...]) -> str:
    """``layers.0-3 (pp rank 0), layers.40 (pp rank 1)``: relieved blocks and where they run."""
    kinds = plan.layer_kinds
    wanted = set(names)
    parts = []
    pp = max(1, plan.parallel.pp)
    for r in range(pp):
        mine = tuple(n for i, st in enumerate(plan.stages) if i % pp == r for n in st.layers
                     if n in wanted)  # fmt: skip
        if mine:
            parts.append(f"{_layer_span(mine, kinds)}" + (f" (pp rank {r})" if pp > 1 else ""))
    return "; ".join(parts)


def _memory_lines(plan: Plan) -> list[str]:
    """The recompute and offload lines under the plan's settings."""
    rec = plan.recompute
    if plan.recompute_layers:
        rec += (
            f" + full recompute of {len(plan.recompute_layers)} blocks where memory is short: "
            + _blocks_by_rank(plan, plan.recompute_layers)
        )
    lines = [f"recompute    {rec}" + ("   sequence parallel: on" if plan.sequence_parallel else "")]
    where = "NVMe" if plan.offload_device == "nvme" else "host memory"
    if plan.offload == "optimizer":
        lines.append(
            f"offload      optimizer state and fp32 master weights in {where}; the optimizer "
            "steps on the CPU (ZeRO-Offload)"
        )
    elif plan.offload == "full":
        lines.append(
            "offload      weights, gradients and optimizer state in host memory, copied to the "
            "device per block (FSDP2 CPUOffloadPolicy)"
            + ("; optimizer state on NVMe" if plan.offload_device == "nvme" else "")
        )
    if plan.offload != "none" and plan.offload_device == "nvme":
        lines.append(
            "             (NVMe offload is ZeRO-Infinity's: apply_plan refuses it, PyTorch has "
            "no NVMe optimizer offload; run this layout with DeepSpeed)"
        )
    if plan.activation_offload_layers:
        lines.append(
            f"act offload  saved activations of {len(plan.activation_offload_layers)} blocks in "
            "host memory (save_on_cpu): " + _blocks_by_rank(plan, plan.activation_offload_layers)
        )
    return lines


def _gap_note(plan: Plan) -> str:
    gap = plan.solver.get("gap") if plan.solver else None
    if plan.solver.get("stopped_early") and isinstance(gap, int | float):
        factor = 1.0 / max(1e-9, 1.0 - gap)
        return (
            f"   (search stopped at its time limit: a better plan is at most {factor:.2f}x faster)"
        )
    return ""


LANDSCAPE_ROWS = 12
"""Shapes shown in the landscape table; the JSON keeps all of them."""


def render(plan: Plan) -> str:
    """The plan as the CLI prints it: what was chosen, what it costs, and what it beat."""
    p = plan.parallel
    unit = "sequences" if plan.seq_len else "samples"
    shape = (
        f"batch {plan.global_batch} x seq {plan.seq_len}"
        if plan.seq_len
        else (f"batch {plan.global_batch}")
    )
    stack = plan.stack
    stack_txt = (f"stack {stack.name}: " if stack.name else "stack: ") + (
        f"{stack.attention} attention, sequence parallel {stack.sequence_parallel}, "
        f"grad reduce {'overlapped' if stack.overlap_grad_reduce else 'not overlapped'}"
        f" in {plan.grad_dtype}"
        + (", pipeline sends scatter/gather over tp" if stack.pipeline_scatter_gather else "")
    )
    lines = [
        f"autopar plan for {plan.model} on {plan.cluster} ({plan.num_devices} devices)",
        f"  {shape}, {plan.dtype}, {plan.optimizer}; {stack_txt}",
        "",
        f"parallelism  dp={p.dp} tp={p.tp} pp={p.pp}",
        f"mesh         {tuple(plan.mesh.shape)} over {tuple(plan.mesh.dim_names)}",
    ]
    mapping = host_mapping(plan)
    if mapping:
        lines.append(f"host mapping {mapping}")
    lines.append(
        f"microbatches {plan.microbatches} x {plan.micro_batch_size} {unit} per data-parallel rank"
    )
    sched = plan.schedule
    if plan.virtual_stages > 1:
        sched += f" (v={plan.virtual_stages} chunks per device)"
    lines += [
        f"schedule     {sched}",
        f"ZeRO         stage {plan.zero_stage}",
        *_memory_lines(plan),
        "",
        f"stages ({plan.parallel.pp}"
        + (f" x {plan.virtual_stages} chunks" if len(plan.stages) > plan.parallel.pp else "")
        + "):",
    ]
    lines += _stage_lines(plan)

    pred = plan.predicted
    if pred is not None:
        mem = pred.memory
        cap = mem.capacity / GiB if mem.capacity else 0.0
        lines += [
            "",
            "predicted:",
            f"  step time        {_fmt_s(pred.step_time_s)}{_gap_note(plan)}",
            (
                f"  tokens/s         {pred.tokens_per_s:,.0f}"
                if plan.seq_len
                else f"  samples/s        {pred.tokens_per_s:,.0f}"
            ),
            f"  TFLOP/s/device   {pred.tflops_per_device:.1f}   (model FLOPs, recompute not counted)",
            f"  MFU              {pred.mfu * 100:.1f}%",
            f"  memory/device    {pred.memory_gib_per_device:.1f} GiB of {cap:.1f} GiB usable",
            "",
            "time per step (exposed):",
        ]
        b = pred.breakdown
        total = max(pred.step_time_s, 1e-30)
        for name, val in (
            ("compute", b.compute),
            ("recompute", b.recompute),
            ("tensor-parallel comm", b.tp_comm),
            ("pipeline bubble", b.pp_bubble),
            ("pipeline p2p", b.pp_comm),
            ("data-parallel comm", b.dp_comm),
            *([("host offload", b.offload)] if b.offload > 0 else []),
        ):
            lines.append(f"  {name:<22} {_fmt_s(val):>10}  {100 * val / total:5.1f}%")
        lines.append(f"  {'overlapped comm':<22} {_fmt_s(b.overlapped_comm):>10}  (hidden)")
        lines.append("memory per device (most loaded stage):")
        for name, val in (
            ("weights", mem.weights),
            ("gradients", mem.grads),
            ("optimizer", mem.optimizer),
            ("activations", mem.activations),
            ("other", mem.other),
        ):
            lines.append(f"  {name:<22} {val / GiB:>8.2f} GiB")
        if mem.host > 0:
            lines.append(
                f"  {'in host memory':<22} {mem.host / GiB:>8.2f} GiB of "
                f"{mem.host_capacity / GiB:.1f} GiB (this device's share of its host)"
            )
    if plan.alternatives:
        lines += [
            "",
            "runners-up (why they lost):",
            "    dp  tp  pp  mbs   #mb  schedule         ZeRO  recompute    offload   sp "
            "       step  GiB/dev",
        ]
        lines += [_alt_row(a, plan) for a in plan.alternatives]
    if plan.landscape:
        lines += ["", "best per (dp, tp, pp):"]
        ranked = sorted(plan.landscape, key=lambda a: a.step_time_s)
        win = plan.predicted
        lines += [
            f"  dp={a.parallel.dp:<4} tp={a.parallel.tp:<2} pp={a.parallel.pp:<3} "
            f"{_fmt_s(a.step_time_s):>10}  "
            + (
                "chosen"
                if win is not None
                and a.step_time_s <= win.step_time_s * (1 + 1e-12)
                and a.parallel == plan.parallel
                else why(a, win.step_time_s, win.breakdown)
                if win is not None
                else ""
            )
            for a in ranked[:LANDSCAPE_ROWS]
        ]
        if len(ranked) > LANDSCAPE_ROWS:
            lines.append(
                f"  ... {len(ranked) - LANDSCAPE_ROWS} more shapes, slowest "
                f"{_fmt_s(ranked[-1].step_time_s)} (all in the plan's JSON 'landscape')"
            )
    if plan.unknown_ops:
        shown = ", ".join(f"{op} x{n}" for op, n in sorted(plan.unknown_ops.items()))
        lines += ["", f"ops without a sharding rule (run replicated): {shown}"]
    if plan.indivisible_params:
        tp = plan.parallel.tp
        shown = "; ".join(
            f"{name} {tuple(dims)}, "
            + ", ".join(f"dim {i} = {d}" for i, d in enumerate(dims) if d % tp)
            for name, dims in sorted(plan.indivisible_params.items())
        )
        lines += [
            "",
            f"whole on every tp rank, a dimension does not divide by tp={tp}: {shown}. Splits "
            f"are even: padding that dimension (e.g. the vocabulary) to a multiple of {tp} would "
            "let it split",
        ]
    if plan.solver:
        s = plan.solver
        parts = [f"{k}={v}" for k, v in s.items() if not isinstance(v, dict | list)]
        lines += ["", "solver: " + ", ".join(parts)]
    return "\n".join(lines)
