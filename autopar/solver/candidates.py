"""Which (pp, dp, tp, micro-batch) shapes the search considers, and the pinned choices.

* ``tp`` (tensor parallel degree): divisors of the world size up to ``max_tp``. Whether an op
  can be split ``tp`` ways is the sharding rules' business (an attention with 2 KV heads is not
  split 4 ways: the ILP keeps it whole and prices that), not a filter here.
* ``pp``: divisors of ``world / tp`` up to the number of blocks.
* ``dp = world / (tp pp)``, which must divide the global batch.
* micro-batch size ``b``: divisors of the per-replica batch ``B / dp`` (up to 64); the number of
  microbatches is ``M = B / (dp b)``; a pipeline needs ``M >= pp``.

Enumeration costs O(number of divisors), never O(n): a global batch of 10^12 is fine.
When nothing is left, ``no_shapes_reason`` names the rule that removed the last option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autopar.config import RECOMPUTE_KINDS
from autopar.errors import ConfigError

__all__ = [
    "FIXED_KEYS",
    "SCHEDULES",
    "RECOMPUTE",
    "ZERO_STAGES",
    "MAX_MICRO_BATCH",
    "Shape",
    "divisors",
    "check_fixed",
    "enumerate_shapes",
    "no_shapes_reason",
]

FIXED_KEYS = (
    "dp", "tp", "pp", "microbatches", "micro_batch_size", "recompute", "zero", "schedule",
    "virtual_stages", "sequence_parallel",
)  # fmt: skip
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
RECOMPUTE = RECOMPUTE_KINDS
ZERO_STAGES = (0, 1, 2, 3)
MAX_MICRO_BATCH = 64


@dataclass(frozen=True, slots=True)
class Shape:
    """A (pp, dp, tp) layout with a micro-batch size."""

    pp: int
    dp: int
    tp: int
    b: int


def divisors(n: int) -> list[int]:
    """Divisors of ``n`` in increasing order, in O(sqrt(n)) steps."""
    if n < 1:
        return []
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def _micro_batches(per_replica: int, limit: int | None) -> list[int]:
    """Divisors of ``per_replica`` up to ``limit``, without factoring huge numbers in full."""
    cap = per_replica if limit is None else min(per_replica, limit)
    return [b for b in range(1, cap + 1) if per_replica % b == 0]


def check_fixed(fixed: dict[str, Any] | None) -> dict[str, Any]:
    """Validate pinned choices; raises ConfigError naming the key and what is allowed."""
    if fixed is not None and not isinstance(fixed, dict):
        raise ConfigError(
            f"fixed must be a dict, got {type(fixed).__name__}", field="fixed", allowed=FIXED_KEYS
        )
    fixed = dict(fixed or {})
    for k, v in fixed.items():
        if k not in FIXED_KEYS:
            raise ConfigError(f"unknown key {k!r}", field=f"fixed.{k}", allowed=FIXED_KEYS)
        if k == "recompute" and v not in RECOMPUTE:
            raise ConfigError(
                f"unknown recompute {v!r}", field="fixed.recompute", allowed=RECOMPUTE
            )
        if k == "schedule" and v not in SCHEDULES:
            raise ConfigError(f"unknown schedule {v!r}", field="fixed.schedule", allowed=SCHEDULES)
        if k == "zero" and v not in ZERO_STAGES:
            raise ConfigError(f"unknown ZeRO stage {v!r}", field="fixed.zero", allowed=ZERO_STAGES)
        if k == "sequence_parallel" and not isinstance(v, bool):
            raise ConfigError("must be true or false", field="fixed.sequence_parallel")
        if k in ("dp", "tp", "pp", "microbatches", "micro_batch_size", "virtual_stages") and (
            isinstance(v, bool) or not isinstance(v, int) or v < 1
        ):
            raise ConfigError(f"must be a positive integer, got {v!r}", field=f"fixed.{k}")
    v = fixed.get("virtual_stages", 1)
    if v > 1 and fixed.get("schedule", "interleaved_1f1b") != "interleaved_1f1b":
        raise ConfigError(
            f"virtual_stages={v} (model chunks per device) needs the interleaved_1f1b schedule, "
            f"not {fixed['schedule']!r}",
            field="fixed.virtual_stages",
        )
    return fixed


def enumerate_shapes(
    *, world: int, batch: int, num_blocks: int, fixed: dict[str, Any], max_tp: int
) -> list[Shape]:
    """Every shape the search prices (see the module docstring)."""
    out = []
    for tp in divisors(world):
        if ("tp" in fixed and tp != fixed["tp"]) or ("tp" not in fixed and tp > max_tp):
            continue
        for pp in divisors(world // tp):
            if "pp" in fixed and pp != fixed["pp"]:
                continue
            if pp > max(1, num_blocks):
                continue
            dp = world // (tp * pp)
            if "dp" in fixed and dp != fixed["dp"]:
                continue
            if batch % dp:
                continue
            per_replica = batch // dp
            if "micro_batch_size" in fixed:
                bs = (
                    [fixed["micro_batch_size"]]
                    if per_replica % fixed["micro_batch_size"] == 0
                    else []
                )
            elif "microbatches" in fixed:
                m = fixed["microbatches"]
                bs = [per_replica // m] if per_replica % m == 0 else []
            else:
                bs = _micro_batches(per_replica, MAX_MICRO_BATCH)
            for b in bs:
                if "microbatches" in fixed and per_replica // b != fixed["microbatches"]:
                    continue
                if pp > 1 and per_replica // b < pp:
                    # fewer microbatches than stages leaves stages idle; torch.distributed
                    # pipelining and Megatron-LM reject it
                    continue
                out.append(Shape(pp=pp, dp=dp, tp=tp, b=b))
    return out


def no_shapes_reason(
    *, world: int, batch: int, num_blocks: int, fixed: dict[str, Any], max_tp: int
) -> str:
    """Why ``enumerate_shapes`` came back empty: the first rule that removed every option."""
    tps = [t for t in divisors(world) if t == fixed.get("tp", t) and (t <= max_tp or "tp" in fixed)]
    if not tps:
        return f"tp={fixed.get('tp')} does not divide the {world} devices"
    layouts = [(tp, pp) for tp in tps for pp in divisors(world // tp) if pp == fixed.get("pp", pp)]
    if not layouts:
        return f"pp={fixed.get('pp')} does not divide {world} devices / tp (tp x pp x dp must equal the world size)"
    layouts = [(tp, pp) for tp, pp in layouts if pp <= max(1, num_blocks)]
    if not layouts:
        return f"pp={fixed.get('pp')} exceeds the model's {num_blocks} blocks (a stage needs one)"
    dps = [(tp, pp, world // (tp * pp)) for tp, pp in layouts]
    dps = [x for x in dps if x[2] == fixed.get("dp", x[2])]
    if not dps:
        return f"dp={fixed.get('dp')} x tp x pp cannot make {world} devices"
    if all(batch % dp for _, _, dp in dps):
        shown = sorted({dp for _, _, dp in dps})[:6]
        return f"no data-parallel degree {shown} divides the global batch {batch}"
    m = fixed.get("microbatches")
    if m is not None and all(m < pp for _, pp, _ in dps if pp > 1):
        pps = sorted({pp for _, pp, _ in dps if pp > 1})
        return (
            f"microbatches={m} with pp={pps[0] if len(pps) == 1 else pps}: fewer microbatches "
            "than stages (a pipeline needs at least one microbatch per stage)"
        )
    b = fixed.get("micro_batch_size")
    fits = [(pp, batch // dp // b) for _, pp, dp in dps if b and batch % dp == 0
            and (batch // dp) % b == 0]  # fmt: skip
    if fits and all(pp > 1 and mb < pp for pp, mb in fits):
        pp, mb = fits[0]
        return (
            f"micro_batch_size={b} leaves {mb} microbatch(es) per data-parallel replica with "
            f"pp={pp}: fewer microbatches than stages (a pipeline needs at least one per "
            "stage; raise the global batch or lower dp / the micro-batch size)"
        )
    if "micro_batch_size" in fixed or "microbatches" in fixed:
        return (
            f"micro_batch_size / microbatches {fixed.get('micro_batch_size')}/"
            f"{fixed.get('microbatches')} do not divide the per-replica batch evenly"
        )
    return (
        "every pipeline layout has fewer microbatches than stages "
        "(microbatches = global batch / (dp x micro-batch size) must be >= pp)"
    )
