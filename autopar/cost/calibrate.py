"""``autopar calibrate``: measure collectives (and, with ``--compute``, kernels) and fit the cost
model's corrections to them.

What it does, in order:

1. Inside an initialised process group (torchrun: NCCL on GPUs, gloo on CPU) every rank joins
   one *intra-host* group (the ranks of its host) and one *inter-host* group (the ranks with its
   local index on every host). All groups of a level run at once, which is exactly what the cost
   model assumes (a host's NICs are shared by all its devices).
2. For each level, collective kind and growing buffer size it times ``iters`` calls after
   ``warmup`` calls; the median call of the slowest rank is the measurement.
3. It fits ``t = alpha·steps + beta·volume`` per level with numpy least squares in relative
   error (ring steps and bytes on the wire per device as in :mod:`autopar.cost.collectives`), so
   alpha is the latency per ring step and 1/beta the bus bandwidth per device.
4. Rank 0 writes ``cost_models/<name>.yaml`` (``kind: calibration``) with the fitted levels and
   their provenance. ``load_cluster(topology, calibration=<name>)`` (or ``calibration: <name>``
   in a topology file) then prices those levels with the measured numbers. Data, never code.

Entry point for the CLI: :func:`run_calibration` (works both under torchrun and standalone, where
it spawns ``nprocs`` local processes on gloo).

``autopar calibrate --compute`` (:func:`calibrate_compute_main`) does the same for one device's
kernels:

1. :func:`time_kernels` times a grid (:data:`CUDA_GRID` on a GPU, :data:`CPU_GRID` otherwise) of
   GEMMs (large, tensor-parallel split, skinny, small-k), ``F.scaled_dot_product_attention``
   forward and backward (causal and not, FlashAttention backend) and memory-bound kernels (add,
   gelu, layer norm, softmax), plus a one-element op for the host cost of a launch: median of
   repeats after warm-up, the repeats round-robin over the grid.
2. :func:`fit_compute` fits the device profile's achieved corrections (large-GEMM fraction per
   dtype, GEMM tile and ``k_half``, FlashAttention fractions and ``kv_half``, bandwidth fraction
   per kernel kind, launch and host overhead) with numpy least squares over the model written
   out in :mod:`autopar.cost.compute`.
3. :func:`write_compute_calibration` writes ``kind: compute_calibration`` with its provenance
   (date, host, torch version, command) and the raw timings. A topology's host group names it
   (``compute_calibration: <name>``), or ``load_cluster(..., compute_calibration=...)`` /
   ``load_device_profile(..., compute_calibration=...)`` apply it over the device datasheet.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from autopar.cost.compute import ITEM_BYTES
from autopar.cost.profiles import (
    DTYPE_ALIASES,
    PROFILE_DIR,
    CalibratedLevel,
    ComputeCalibration,
    DeviceProfile,
    apply_compute_calibration,
    list_profiles,
    load_calibration_profile,
    load_compute_calibration,
    load_device_profile,
)
from autopar.errors import AutoparError, ConfigError

__all__ = [
    "Measurement",
    "CalibrationResult",
    "DEFAULT_SIZES_BYTES",
    "DEFAULT_KINDS",
    "measure_collectives",
    "fit_level",
    "write_calibration",
    "run_calibration",
    "calibrate_main",
    "sizes_up_to",
    "KernelTiming",
    "ComputeGrid",
    "ComputeFit",
    "CPU_GRID",
    "CUDA_GRID",
    "time_kernels",
    "fit_compute",
    "predict_timing",
    "write_compute_calibration",
    "local_device_profile",
    "run_compute_calibration",
    "calibrate_compute_main",
]

DEFAULT_SIZES_BYTES: tuple[int, ...] = (4 * 2**10, 64 * 2**10, 2**20, 4 * 2**20, 16 * 2**20)
DEFAULT_KINDS: tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
LEVELS = ("intra_host", "inter_host")


@dataclass(frozen=True, slots=True, kw_only=True)
class Measurement:
    level: str
    kind: str
    group_size: int
    nbytes: int
    """Full buffer per device, as in ``collective_time_s``."""
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationResult:
    path: Path | None
    """Written profile (None on ranks other than 0 under torchrun)."""
    levels: dict[str, CalibratedLevel]
    measurements: tuple[Measurement, ...]
    skipped: tuple[str, ...] = ()
    """``level/kind`` pairs the backend could not run (e.g. reduce_scatter on some gloo builds)."""


def _ring_terms(kind: str, n: int, nbytes: float) -> tuple[float, float]:
    """(steps, bytes per device on the wire) of the ring algorithm, as priced by the model."""
    if kind == "all_reduce":
        return 2.0 * (n - 1), 2.0 * (n - 1) / n * nbytes
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return float(n - 1), (n - 1) / n * nbytes
    if kind == "broadcast":
        return float(n - 1), float(nbytes)
    raise ConfigError(
        f"cannot calibrate {kind!r}", field="kinds", allowed=DEFAULT_KINDS + ("all_to_all",)
    )


def fit_level(measurements: Sequence[Measurement]) -> CalibratedLevel:
    """Least-squares alpha (s per ring step) and bandwidth (bytes/s) of one level.

    Rows are scaled by 1/t so small and large messages weigh alike (relative error); a negative
    alpha (noise on tiny messages) is clamped to zero and beta refitted.
    """
    if len(measurements) < 2:
        raise AutoparError(
            f"need at least 2 measurements to fit alpha and beta, got {len(measurements)}"
        )
    rows = np.array(
        [_ring_terms(m.kind, m.group_size, m.nbytes) for m in measurements], dtype=float
    )
    t = np.array([m.seconds for m in measurements], dtype=float)
    if np.any(t <= 0):
        raise AutoparError("non-positive collective time measured; clock too coarse?")
    w = 1.0 / t
    (alpha, beta), *_ = np.linalg.lstsq(rows * w[:, None], t * w, rcond=None)
    if alpha < 0:
        alpha = 0.0
        (beta,), *_ = np.linalg.lstsq(rows[:, 1:] * w[:, None], t * w, rcond=None)
    if beta <= 0:
        raise AutoparError(
            "fitted inverse bandwidth is not positive: measurements do not grow with size "
            "(use larger sizes_bytes)"
        )
    pred = alpha * rows[:, 0] + beta * rows[:, 1]
    rel = float(np.sqrt(np.mean(((pred - t) / t) ** 2)))
    return CalibratedLevel(
        alpha_s=float(alpha),
        bandwidth_bytes_per_s=float(1.0 / beta),
        points=len(t),
        rel_residual=rel,
    )


def measure_collectives(
    *,
    kinds: Sequence[str] = DEFAULT_KINDS,
    sizes_bytes: Sequence[int] = DEFAULT_SIZES_BYTES,
    iters: int = 5,
    warmup: int = 2,
    devices_per_host: int | None = None,
) -> tuple[list[Measurement], list[str]]:
    """Time collectives per level in the current (initialised) process group.

    ``devices_per_host`` defaults to ``LOCAL_WORLD_SIZE`` (torchrun) or the world size.
    Returns the measurements (identical on every rank) and the skipped ``level/kind`` pairs.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        raise AutoparError(
            "measure_collectives needs an initialised torch.distributed process group"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    dph = devices_per_host or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % dph:
        raise ConfigError(
            f"world size {world} is not a multiple of devices_per_host {dph}",
            field="devices_per_host",
        )
    hosts = world // dph
    backend = dist.get_backend()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % dph)))
        torch.cuda.set_device(device)
    # every rank creates every group, in the same order (torch.distributed requirement)
    intra = [dist.new_group(list(range(h * dph, (h + 1) * dph))) for h in range(hosts)]
    inter = [dist.new_group([h * dph + j for h in range(hosts)]) for j in range(dph)]
    levels = []
    if dph > 1:
        levels.append(("intra_host", intra[rank // dph], dph))
    if hosts > 1:
        levels.append(("inter_host", inter[rank % dph], hosts))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out: list[Measurement] = []
    skipped: list[str] = []
    for level, group, n in levels:
        for kind in kinds:
            _ring_terms(kind, n, 1)  # validates the kind
            ok = True
            for nbytes in sizes_bytes:
                numel = max(n, int(nbytes) // 4 // n * n)
                full = torch.ones(numel, dtype=torch.float32, device=device)
                shard = torch.ones(numel // n, dtype=torch.float32, device=device)
                parts = [torch.empty_like(shard) for _ in range(n)]
                src = dist.get_global_rank(group, 0)

                bufs = (full, shard, parts, src)
                try:
                    for _ in range(warmup):
                        _call(dist, kind, group, n, bufs)
                except (RuntimeError, NotImplementedError, ValueError):
                    ok = False
                flag = torch.tensor([1.0 if ok else 0.0], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                if flag.item() < 1.0:
                    skipped.append(f"{level}/{kind}")
                    break
                sync()
                dist.barrier()
                times = []
                for _ in range(iters):
                    start = time.perf_counter()
                    _call(dist, kind, group, n, bufs)
                    sync()
                    times.append(time.perf_counter() - start)
                # median per rank (robust to scheduler noise), then the slowest rank
                elapsed = torch.tensor([float(np.median(times))], device=device)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                out.append(
                    Measurement(
                        level=level,
                        kind=kind,
                        group_size=n,
                        nbytes=numel * 4,
                        seconds=float(elapsed.item()),
                    )
                )
    return out, skipped


def _call(dist, kind: str, group, n: int, bufs: tuple) -> None:
    """One collective call on preallocated buffers (full buffer, shard, gather list, root)."""
    full, shard, parts, src = bufs
    if kind == "all_reduce":
        dist.all_reduce(full, group=group)
    elif kind == "all_gather":
        dist.all_gather(parts, shard, group=group)
    elif kind == "reduce_scatter":
        dist.reduce_scatter(shard, list(full.chunk(n)), group=group)
    elif kind == "all_to_all":
        dist.all_to_all_single(full.clone(), full, group=group)
    else:
        dist.broadcast(full, src=src, group=group)


def write_calibration(
    path: Path,
    levels: dict[str, CalibratedLevel],
    *,
    backend: str,
    world_size: int,
    devices_per_host: int,
    kinds: Sequence[str],
    sizes_bytes: Sequence[int],
) -> Path:
    """Write a ``kind: calibration`` profile (with provenance comments) and check it loads."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [
        "# Fitted by `autopar calibrate` (autopar.cost.calibrate.run_calibration): ring alpha-beta",
        "# least squares per level, t = alpha*steps + volume/bandwidth, relative error.",
        "# Source: measurements on the cluster named below; re-run to refresh. Do not hand-edit.",
        "kind: calibration",
        f"backend: {backend}",
        f"world_size: {world_size}",
        f"devices_per_host: {devices_per_host}",
        f"measured_at: '{now}'",
        f"kinds: [{', '.join(kinds)}]",
        f"sizes_bytes: [{', '.join(str(int(s)) for s in sizes_bytes)}]",
        "levels:",
    ]
    for name, lv in levels.items():
        lines += [
            f"  {name}:",
            f"    alpha_us: {lv.alpha_s * 1e6:.6g}          # fitted latency per ring step",
            f"    bandwidth_GBps: {lv.bandwidth_bytes_per_s / 1e9:.6g}   # fitted bus bandwidth per device",
            f"    points: {lv.points}",
            f"    rel_residual: {lv.rel_residual:.4g}",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    load_calibration_profile(str(path))  # a file we cannot read back is a bug, fail here
    return path


def _fit_and_write(
    measurements: list[Measurement],
    skipped: list[str],
    *,
    path: Path | None,
    backend: str,
    world_size: int,
    devices_per_host: int,
    kinds: Sequence[str],
    sizes_bytes: Sequence[int],
) -> CalibrationResult:
    levels = {
        lv: fit_level([m for m in measurements if m.level == lv])
        for lv in LEVELS
        if sum(1 for m in measurements if m.level == lv) >= 2
    }
    if not levels:
        raise AutoparError(
            "nothing to fit: need >= 2 devices per host (intra_host) or >= 2 hosts (inter_host)"
        )
    if path is not None:
        write_calibration(
            path, levels, backend=backend, world_size=world_size, devices_per_host=devices_per_host,
            kinds=kinds, sizes_bytes=sizes_bytes,
        )  # fmt: skip
    return CalibrationResult(
        path=path, levels=levels, measurements=tuple(measurements), skipped=tuple(skipped)
    )


def _spawned(
    rank: int,
    nprocs: int,
    init_file: str,
    backend: str,
    kwargs: dict,
    result_file: str,
) -> None:
    import pickle

    import torch.distributed as dist

    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=nprocs
    )
    try:
        meas, skipped = measure_collectives(**kwargs)
        if rank == 0:
            with open(result_file, "wb") as f:
                pickle.dump((meas, skipped), f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_calibration(
    *,
    name: str = "calibrated",
    output_dir: Path | str = PROFILE_DIR,
    nprocs: int = 2,
    devices_per_host: int | None = None,
    backend: str | None = None,
    kinds: Sequence[str] = DEFAULT_KINDS,
    sizes_bytes: Sequence[int] = DEFAULT_SIZES_BYTES,
    iters: int = 5,
    warmup: int = 2,
) -> CalibrationResult:
    """Measure, fit and write ``<output_dir>/<name>.yaml``; the CLI's ``autopar calibrate``.

    Under torchrun (``WORLD_SIZE`` set, or a process group already initialised) it runs in this
    process with the launcher's ranks and ``nprocs`` is ignored; otherwise it spawns ``nprocs``
    local processes (gloo unless CUDA is available). ``devices_per_host`` defaults to torchrun's
    ``LOCAL_WORLD_SIZE``; pass 1 to treat local processes as separate hosts (CPU testing).
    """
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not name or "/" in name:
        raise ConfigError(f"bad profile name {name!r}", field="name")
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 2:
        raise ConfigError(f"nprocs must be an integer >= 2, got {nprocs!r}", field="nprocs")
    if iters < 1 or warmup < 0:
        raise ConfigError("iters must be >= 1 and warmup >= 0", field="iters")
    path = Path(output_dir) / f"{name}.yaml"
    kw = dict(kinds=tuple(kinds), sizes_bytes=tuple(sizes_bytes), iters=iters, warmup=warmup,
              devices_per_host=devices_per_host)  # fmt: skip
    under_launcher = dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if under_launcher:
        if not dist.is_initialized():
            dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        world = dist.get_world_size()
        dph = devices_per_host or int(os.environ.get("LOCAL_WORLD_SIZE", world))
        meas, skipped = measure_collectives(**kw)
        return _fit_and_write(
            meas, skipped, path=path if dist.get_rank() == 0 else None, backend=dist.get_backend(),
            world_size=world, devices_per_host=dph, kinds=kinds, sizes_bytes=sizes_bytes,
        )  # fmt: skip
    backend = backend or ("nccl" if torch.cuda.device_count() >= nprocs else "gloo")
    dph = devices_per_host or nprocs
    with tempfile.TemporaryDirectory(prefix="autopar-calibrate-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        result_file = os.path.join(tmp, "result.pkl")
        mp.start_processes(
            _spawned,
            args=(nprocs, init_file, backend, kw, result_file),
            nprocs=nprocs,
            join=True,
            start_method="spawn",
        )
        import pickle

        with open(result_file, "rb") as f:
            meas, skipped = pickle.load(f)
    return _fit_and_write(
        meas, skipped, path=path, backend=backend, world_size=nprocs, devices_per_host=dph,
        kinds=kinds, sizes_bytes=sizes_bytes,
    )  # fmt: skip


def sizes_up_to(max_bytes: int, *, min_bytes: int = 4 * 2**10, factor: int = 4) -> tuple[int, ...]:
    """Geometric message sizes min_bytes, min_bytes·factor, ... up to and including max_bytes."""
    if max_bytes < min_bytes:
        raise ConfigError(f"max_bytes must be >= {min_bytes}, got {max_bytes}", field="max_bytes")
    sizes = [min_bytes]
    while sizes[-1] * factor <= max_bytes:
        sizes.append(sizes[-1] * factor)
    if sizes[-1] != max_bytes:
        sizes.append(max_bytes)
    return tuple(sizes)


def calibrate_main(
    *,
    output: Path | str | None = None,
    max_bytes: int = 1 << 24,
    repeats: int = 5,
    nprocs: int = 2,
    devices_per_host: int | None = None,
) -> int:
    """``autopar calibrate``: measure, fit, write, print a summary; returns the exit code.

    ``output`` is the profile path (default ``cost_models/calibrated.yaml``); its stem is the
    profile name to pass as ``load_cluster(..., calibration=NAME_OR_PATH)``. Under torchrun the
    launcher's ranks are measured; standalone, ``nprocs`` local processes are spawned.
    """
    path = Path(output) if output is not None else PROFILE_DIR / "calibrated.yaml"
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"output must be a .yaml file, got {str(path)!r}", field="output")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be a positive integer, got {repeats!r}", field="repeats")
    res = run_calibration(
        name=path.stem, output_dir=path.parent, nprocs=nprocs, devices_per_host=devices_per_host,
        sizes_bytes=sizes_up_to(max_bytes), iters=repeats,
    )  # fmt: skip
    if res.path is not None:
        print(f"wrote {res.path} ({len(res.measurements)} measurements)")
        for name, lv in res.levels.items():
            print(
                f"  {name:<11} alpha {lv.alpha_s * 1e6:8.2f} us/step   bandwidth "
                f"{lv.bandwidth_bytes_per_s / 1e9:8.3f} GB/s   rel. residual {lv.rel_residual:.2f}"
            )
        for s in res.skipped:
            print(f"  skipped {s} (not supported by the backend)")
        print(f"use it with: load_cluster(<topology>, calibration={str(res.path)!r})")
    return 0


# ============================================================================================
# compute calibration: `autopar calibrate --compute`
# ============================================================================================
TimingKind = Literal["gemm", "attention", "memory", "launch"]
#: ops timed for each memory-bound kernel kind: (kind, bytes per element moved in item units)
MEMORY_OPS: dict[str, tuple[str, float]] = {
    "add": ("elementwise", 3.0),  # in place a += b: read a, b; write a
    "gelu": ("activation", 2.0),
    "layer_norm": ("norm", 2.0),
    "softmax": ("softmax", 2.0),
}
#: output tiles the fit tries (the profile's own first); the best relative residual wins
TILE_CANDIDATES: tuple[tuple[int, int], ...] = (
    (16, 16), (32, 32), (64, 64), (128, 64), (128, 128), (256, 128),
)  # fmt: skip
#: k_half / kv_half values the fit tries (a 1-D grid each; everything else is linear)
HALF_GRID: tuple[float, ...] = (
    0, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048,
)  # fmt: skip
_ROW_WIDTH = 1024
"""Last-dimension size of the norm / softmax inputs (a hidden size)."""
_HUBER = 0.05
"""Relative residual beyond which ``fit_compute`` weighs a timing linearly, not quadratically."""
_PREEMPTED = 0.05
"""A CPU repeat whose wall time exceeds the thread's CPU time by more than this share was
preempted by another process (``time_kernels`` times it again)."""
_FAULTS_PER_CALL = 8
"""More minor page faults per call than this: the allocator re-faulted its memory."""


def _page_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` does not exist)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelTiming:
    """One timed kernel: what it was and the median seconds per call.

    ``gemm``: m, n, k, batch. ``attention``: batch_heads, q_len, kv_len, head_dim, causal,
    phase (fused SDPA). ``memory``: op, memory_kind, numel, bytes_moved. ``launch``: a
    one-element op, the host cost of issuing a kernel.
    """

    kind: TimingKind
    dtype: str
    seconds: float
    m: int = 0
    n: int = 0
    k: int = 0
    batch: int = 1
    batch_heads: int = 0
    q_len: int = 0
    kv_len: int = 0
    head_dim: int = 0
    causal: bool = False
    phase: str = "fwd"
    op: str = ""
    memory_kind: str = "elementwise"
    numel: int = 0
    bytes_moved: float = 0.0

    @property
    def label(self) -> str:
        if self.kind == "gemm":
            return f"gemm {self.dtype} b{self.batch} {self.m}x{self.n}x{self.k}"
        if self.kind == "attention":
            c = " causal" if self.causal else ""
            return (
                f"attention {self.phase} {self.dtype} bh{self.batch_heads} q{self.q_len} "
                f"kv{self.kv_len} d{self.head_dim}{c}"
            )
        if self.kind == "memory":
            return f"{self.op} {self.dtype} n{self.numel}"
        return f"launch {self.dtype}"

    def as_yaml(self) -> dict:
        keys = {
            "gemm": ("m", "n", "k", "batch"),
            "attention": ("batch_heads", "q_len", "kv_len", "head_dim", "causal", "phase"),
            "memory": ("op", "memory_kind", "numel", "bytes_moved"),
            "launch": (),
        }[self.kind]
        out: dict = {"kind": self.kind, "dtype": self.dtype}
        out.update({k: getattr(self, k) for k in keys})
        out["seconds"] = float(f"{self.seconds:.6g}")
        return out


def predict_timing(t: KernelTiming, device: DeviceProfile) -> float:
    """What the compute model (:mod:`autopar.cost.compute`) prices the timed kernel at."""
    from autopar.cost import compute

    if t.kind == "gemm":
        return compute.gemm_time_s(m=t.m, n=t.n, k=t.k, batch=t.batch, device=device,
                                   dtype=t.dtype)  # fmt: skip
    if t.kind == "attention":
        return compute.attention_time_s(
            batch_heads=t.batch_heads, q_len=t.q_len, kv_len=t.kv_len, head_dim=t.head_dim,
            causal=t.causal, device=device, dtype=t.dtype, phase=t.phase,  # type: ignore[arg-type]
        )  # fmt: skip
    if t.kind == "memory":
        return compute.memory_bound_time_s(bytes_moved=t.bytes_moved, device=device,
                                           dtype=t.dtype, kind=t.memory_kind)  # type: ignore[arg-type]  # fmt: skip
    return compute.kernel_overhead_s(device)


@dataclass(frozen=True, slots=True, kw_only=True)
class ComputeGrid:
    """What ``autopar calibrate --compute`` times (defaults: :data:`CPU_GRID`, :data:`CUDA_GRID`)."""

    gemm: tuple[tuple[int, int, int, int], ...]
    """(batch, m, n, k), large to skinny and small-k."""
    attention: tuple[tuple[int, int, int, bool], ...]
    """(batch_heads, seq_len, head_dim, causal); each timed forward and backward."""
    memory: tuple[tuple[str, int], ...]
    """(op, numel) with op in :data:`MEMORY_OPS`."""
    gemm_dtypes: tuple[str, ...]
    attention_dtype: str
    memory_dtype: str


#: CPU grid: GEMM outputs stay below 32 MB (glibc serves larger blocks with fresh pages from the
#: OS on every call, which would time page faults, not the kernel); memory-bound inputs beyond a
#: typical L3. About 5 s with 5 repeats on one thread.
CPU_GRID = ComputeGrid(
    gemm=((1, 1024, 1024, 1024), (1, 512, 512, 512), (1, 256, 1024, 1024), (1, 1024, 256, 1024),
          (1, 1024, 1024, 64), (1, 64, 1024, 1024), (8, 256, 256, 256)),
    attention=((8, 1024, 64, False), (8, 1024, 64, True), (16, 512, 64, False)),
    memory=(("add", 8 << 20), ("add", 12 << 20), ("gelu", 4 << 20), ("gelu", 6 << 20),
            ("layer_norm", 2 << 20), ("layer_norm", 4 << 20), ("softmax", 4 << 20),
            ("softmax", 6 << 20)),
    gemm_dtypes=("fp32",),
    attention_dtype="fp32",
    memory_dtype="fp32",
)  # fmt: skip
#: CUDA grid: large and tensor-parallel-split GEMMs, skinny and small-k ones; FlashAttention at
#: short and long sequences; memory-bound kernels of 64M-128M elements (well beyond L2).
CUDA_GRID = ComputeGrid(
    gemm=((1, 8192, 8192, 8192), (1, 4096, 4096, 4096), (1, 2048, 2048, 2048),
          (1, 1024, 1024, 1024), (1, 2048, 1536, 12288), (1, 2048, 12288, 12288),
          (1, 8192, 8192, 256), (1, 256, 8192, 8192), (32, 1024, 1024, 128)),
    attention=((16, 4096, 128, False), (16, 4096, 128, True), (256, 512, 128, False),
               (256, 512, 128, True), (64, 2048, 64, False)),
    memory=(("add", 1 << 26), ("add", 1 << 27), ("gelu", 1 << 26), ("gelu", 1 << 27),
            ("layer_norm", 1 << 26), ("layer_norm", 1 << 27), ("softmax", 1 << 26),
            ("softmax", 1 << 27)),
    gemm_dtypes=("bf16", "fp32"),
    attention_dtype="bf16",
    memory_dtype="bf16",
)  # fmt: skip

_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "tf32": "float32"}


def time_kernels(
    grid: ComputeGrid,
    *,
    device: str = "cpu",
    repeats: int = 5,
    min_time_s: float = 0.02,
    warmup: int = 2,
    seed: int = 0,
) -> list[KernelTiming]:
    """Time every kernel of ``grid`` on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Each kernel runs back to back for about ``min_time_s`` (``time.perf_counter``, the device
    synchronised at the end) after ``warmup`` calls; that is repeated ``repeats`` times
    **round-robin over the grid**, so a burst of background load hits every kernel alike, and
    the median of the repeats is kept. On a CPU, repeats preempted by another process or taking
    page faults are timed again (see the loop). Attention is ``F.scaled_dot_product_attention`` on the
    FlashAttention backend (on CPU: PyTorch's flash kernel), the backward timed alone with
    ``autograd.grad`` on a retained graph. Memory-bound kernels write preallocated outputs where
    the fast kernel allows it (``add`` in place; gelu and softmax through their aten ``out=``
    overloads; layer norm allocates): on a CPU, glibc hands large blocks back to the OS, and
    re-faulting them would be timed instead of the kernel.
    ``fp32`` GEMMs on CUDA run without TF32, ``tf32`` with it.
    """
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be a positive integer, got {repeats!r}", field="repeats")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine", field="device",
                          allowed=("cpu",))  # fmt: skip
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!r}", field="device", allowed=("cpu", "cuda"))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int, dt: str, grad: bool = False):
        x = torch.randn(*shape, generator=gen, dtype=torch.float32)
        x = x.to(device=dev, dtype=getattr(torch, _TORCH_DTYPES[dt]))
        return x.requires_grad_(grad)

    def tf32(on: bool):
        def setup() -> None:
            torch.backends.cuda.matmul.allow_tf32 = on

        return setup

    # (what was timed, the call, what to set before timing it)
    jobs: list[tuple[KernelTiming, object, object]] = []
    for dt in grid.gemm_dtypes:
        _dtype_key(dt)
        for batch, m, n, k in grid.gemm:
            if batch == 1:
                a, b = randn(m, k, dt=dt), randn(k, n, dt=dt)
                fn = lambda a=a, b=b: torch.mm(a, b)  # noqa: E731
            else:
                a, b = randn(batch, m, k, dt=dt), randn(batch, k, n, dt=dt)
                fn = lambda a=a, b=b: torch.bmm(a, b)  # noqa: E731
            what = KernelTiming(kind="gemm", dtype=dt, seconds=0.0, m=m, n=n, k=k, batch=batch)
            jobs.append((what, fn, tf32(dt == "tf32")))
    dt = _dtype_key(grid.attention_dtype)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        for bh, s_len, d, causal in grid.attention:
            q, k_, v = (randn(1, bh, s_len, d, dt=dt, grad=True) for _ in range(3))
            o = F.scaled_dot_product_attention(q, k_, v, is_causal=causal)
            g = torch.randn_like(o)
            fwd = lambda q=q, k_=k_, v=v, c=causal: F.scaled_dot_product_attention(  # noqa: E731
                q, k_, v, is_causal=c
            )
            bwd = lambda o=o, q=q, k_=k_, v=v, g=g: torch.autograd.grad(  # noqa: E731
                o, (q, k_, v), g, retain_graph=True
            )
            for phase, fn in (("fwd", fwd), ("bwd", bwd)):
                what = KernelTiming(kind="attention", dtype=dt, seconds=0.0, batch_heads=bh,
                                    q_len=s_len, kv_len=s_len, head_dim=d, causal=causal,
                                    phase=phase)  # fmt: skip
                jobs.append((what, fn, None))
    dt = _dtype_key(grid.memory_dtype)
    item = ITEM_BYTES[dt]
    for op, numel in grid.memory:
        if op not in MEMORY_OPS:
            raise ConfigError(f"unknown memory op {op!r}", field="memory",
                              allowed=tuple(MEMORY_OPS))  # fmt: skip
        x = randn(numel // _ROW_WIDTH, _ROW_WIDTH, dt=dt)
        y = torch.empty_like(x)  # preallocated output: the kernel is timed, not the allocator
        if op == "add":
            fn = lambda x=x, y=y: x.add_(y, alpha=1e-3)  # noqa: E731
        elif op == "gelu":
            fn = lambda x=x, y=y, a=torch.ops.aten: a.gelu.out(x, out=y)  # noqa: E731
        elif op == "layer_norm":  # the out= overload is a slower path on CPU: allocate
            w = torch.ones(_ROW_WIDTH, device=dev, dtype=x.dtype)
            fn = lambda x=x, w=w: F.layer_norm(x, (_ROW_WIDTH,), w, w)  # noqa: E731
        else:
            fn = lambda x=x, y=y, a=torch.ops.aten: a._softmax.out(x, -1, False, out=y)  # noqa: E731
        kind, per_elem = MEMORY_OPS[op]
        n_eff = (numel // _ROW_WIDTH) * _ROW_WIDTH
        what = KernelTiming(kind="memory", dtype=dt, seconds=0.0, op=op, memory_kind=kind,
                            numel=n_eff, bytes_moved=per_elem * item * n_eff)  # fmt: skip
        jobs.append((what, fn, None))
    one = randn(1, dt=dt)
    jobs.append((KernelTiming(kind="launch", dtype=dt, seconds=0.0),
                 lambda: torch.add(one, one), None))  # fmt: skip

    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    per_call: list[list[float]] = [[] for _ in jobs]
    iters: list[int] = []
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            for _, fn, setup in jobs:
                if setup is not None:
                    setup()
                for _ in range(warmup):
                    fn()
                sync()
                start = time.perf_counter()
                fn()
                sync()
                one_s = max(time.perf_counter() - start, 1e-7)
                iters.append(max(1, math.ceil(min_time_s / one_s)))
            # On a CPU the calling thread does the work. A repeat is disturbed when its wall
            # time exceeds the thread's CPU time (another process preempted it) or when it took
            # page faults (the allocator had handed memory back to the OS): it is timed again,
            # up to 4x repeats rounds, so a busy machine shifts every kernel less than it would.
            check = dev.type == "cpu"
            clean = [0] * len(jobs)
            for _ in range(4 * repeats if check else repeats):
                todo = [i for i in range(len(jobs)) if clean[i] < repeats]
                if not todo:
                    break
                for i in todo:
                    _, fn, setup = jobs[i]
                    if setup is not None:
                        setup()
                    faults0 = _page_faults() if check else 0
                    cpu0, start = time.thread_time(), time.perf_counter()
                    for _ in range(iters[i]):
                        fn()
                    sync()
                    wall = time.perf_counter() - start
                    cpu = time.thread_time() - cpu0
                    disturbed = 0.0
                    if check:
                        disturbed = (wall - cpu) / wall
                        if _page_faults() - faults0 > _FAULTS_PER_CALL * iters[i]:
                            disturbed += 1.0
                    per_call[i].append((wall / iters[i], disturbed))
                    clean[i] += disturbed <= _PREEMPTED
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    out = []
    for (what, _, _), samples in zip(jobs, per_call):
        # the least disturbed repeats (all of them on a GPU), their median
        best = sorted(samples, key=lambda s: s[1])[:repeats]
        out.append(replace(what, seconds=float(np.median([s[0] for s in best]))))
    return out


def _dtype_key(dtype: str) -> str:
    key = DTYPE_ALIASES.get(dtype)
    if key is None or key not in ITEM_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}", field="dtype", allowed=tuple(ITEM_BYTES))
    return key


@dataclass(frozen=True, slots=True, kw_only=True)
class ComputeFit:
    """Result of :func:`fit_compute`: the fitted values and how well they explain the data."""

    calibration: ComputeCalibration
    residuals: dict[str, float]
    """RMS relative error of the model's prediction per timing kind (gemm, attention, memory)."""
    used: int
    """Timings the linear fit used (host-bound ones on an asynchronous device are left out)."""
    capped: tuple[str, ...] = ()
    """Fractions that came out above the datasheet and were capped at 1 (``cap_at_peak``)."""


def _gemm_feature(
    t: KernelTiming, dev: DeviceProfile, tile: tuple[int, int], k_half: float
) -> float:
    """Seconds the GEMM takes at 100 % of the large-GEMM rate, given quantisation and k_half."""
    from autopar.cost import compute

    q = compute._gemm_quantization(
        max(1, t.m), max(1, t.n), max(1, t.batch), tile[0], tile[1], dev.sm_count,
        dev.tile_padding,
    )  # fmt: skip
    flops = 2.0 * t.batch * t.m * t.n * t.k
    return flops / (dev.peak_flop_per_s(t.dtype) * q) * (t.k + k_half) / t.k


def _attention_feature(t: KernelTiming, dev: DeviceProfile, kv_half: float) -> float:
    """Seconds the fused attention takes at 100 % of peak, given quantisation and kv_half."""
    from autopar.cost import compute

    bq, bkv = dev.flash_tile
    frac = compute.causal_block_fraction(t.q_len, t.kv_len, bq, bkv) if t.causal else 1.0
    flops = 4.0 * t.batch_heads * t.q_len * t.kv_len * t.head_dim * frac
    if t.phase == "fwd":
        par, block, loop = t.q_len, bq, t.kv_len
    else:
        flops *= 2.5
        par, block, loop = t.kv_len, bkv, t.q_len
    side = compute._side(par, block)
    quant = compute._wave_fill(
        float(t.batch_heads) * par, t.batch_heads * (-(-par // side)), side, dev.sm_count,
        dev.tile_padding,
    )  # fmt: skip
    return flops / (dev.peak_flop_per_s(t.dtype) * quant) * (loop + kv_half) / loop


def fit_compute(
    timings: Sequence[KernelTiming],
    *,
    base: DeviceProfile,
    name: str = "compute-calibrated",
    sm_count: int | None = None,
    fit_overhead: bool = True,
    tiles: Sequence[tuple[int, int]] = TILE_CANDIDATES,
    k_halves: Sequence[float] = HALF_GRID,
    kv_halves: Sequence[float] = HALF_GRID,
    cap_at_peak: bool = False,
) -> ComputeFit:
    """Fit the device's kernel-efficiency numbers to ``timings`` (numpy least squares).

    For each candidate GEMM tile, ``k_half`` and ``kv_half`` on a grid, every other parameter is
    linear in the time and solved by least squares in relative error (rows scaled by 1/t)::

        gemm       t = c0 + (1/f(dt))   * x,  x = 2 b m n k / (P(dt) q(m, n)) * (k + k_half) / k
        attention  t = c0 + (1/f_attn)  * x,  x = flops / (P(dt) q_a) * (loop + kv_half) / loop
        memory     t = c0 + (1/f_mem)   * x,  x = bytes / B            (one unknown per kind)

    ``c0`` is the per-kernel overhead (device launch on an asynchronous device, whose host-bound
    timings, those under twice the host cost of a one-element op, are left out; host + launch on
    a CPU). Each solve is reweighted twice with Huber weights (relative residuals beyond 5 %
    count linearly), so one disturbed timing cannot drag the fit. The candidate with the
    smallest loss wins; GEMM and attention timings that the
    fitted bandwidth says are memory bound are dropped and the fit repeated once. With
    ``fit_overhead=False`` (published kernel-only figures) ``c0`` is zero. ``tiles``,
    ``k_halves`` and ``kv_halves`` are the candidates tried (one value fixes it). A fitted rate
    above the datasheet figure raises :class:`ConfigError` (the timings are from another device)
    unless ``cap_at_peak`` (a card that boosts above its datasheet clock), which caps it at 1.
    """
    if not timings:
        raise AutoparError("nothing to fit: no timings")
    if any(t.seconds <= 0 for t in timings):
        raise AutoparError("non-positive kernel time measured; clock too coarse?")
    dev = base if sm_count is None else replace(base, sm_count=sm_count)
    launches = [t.seconds for t in timings if t.kind == "launch"]
    host = float(np.median(launches)) if launches else None
    rows = [t for t in timings if t.kind != "launch"]
    if dev.host_overlap and host is not None:
        rows = [t for t in rows if t.seconds >= 2.0 * host]
    gemm_dts = sorted({t.dtype for t in rows if t.kind == "gemm"})
    phases = sorted({t.phase for t in rows if t.kind == "attention"})
    kinds = sorted({t.memory_kind for t in rows if t.kind == "memory"})
    cols = (["c0"] if fit_overhead else []) + [f"gemm:{d}" for d in gemm_dts]
    cols += [f"attn:{p}" for p in phases] + [f"mem:{k}" for k in kinds]
    index = {c: i for i, c in enumerate(cols)}
    t_all = np.array([t.seconds for t in rows])
    has_gemm = bool(gemm_dts)
    has_attn = bool(phases)
    tile_list = [tuple(t) for t in tiles] if has_gemm else [dev.gemm_tile]
    kh_list = tuple(k_halves) if has_gemm else (dev.gemm_k_half,)
    kvh_list = tuple(kv_halves) if has_attn else (dev.flash_kv_half,)
    if not rows or len(rows) < len(cols):
        raise AutoparError(
            f"need at least {len(cols)} device-bound timings to fit {cols}, got {len(rows)}"
        )

    def design(tile, kh, kvh, keep):
        a = np.zeros((int(keep.sum()), len(cols)))
        r = 0
        for t, k in zip(rows, keep):
            if not k:
                continue
            if fit_overhead:
                a[r, 0] = 1.0
            if t.kind == "gemm":
                a[r, index[f"gemm:{t.dtype}"]] = _gemm_feature(t, dev, tile, kh)
            elif t.kind == "attention":
                a[r, index[f"attn:{t.phase}"]] = _attention_feature(t, dev, kvh)
            else:
                bw = dev.memory_bandwidth_bytes_per_s
                a[r, index[f"mem:{t.memory_kind}"]] = t.bytes_moved / bw
            r += 1
        return a

    def solve(tile, kh, kvh, keep):
        """Least squares in relative error, reweighted twice with Huber weights so that one
        disturbed timing cannot drag the fit (iteratively reweighted least squares)."""
        a = design(tile, kh, kvh, keep)
        t = t_all[keep]
        huber = np.ones(len(t))
        for _ in range(3):
            w = np.sqrt(huber) / t
            coef, *_ = np.linalg.lstsq(a * w[:, None], t * w, rcond=None)
            if fit_overhead and coef[0] < 0:  # noise on tiny kernels: no negative overhead
                sub, *_ = np.linalg.lstsq(a[:, 1:] * w[:, None], t * w, rcond=None)
                coef = np.concatenate([[0.0], sub])
            rel = np.abs(a @ coef - t) / t
            huber = np.minimum(1.0, _HUBER / np.maximum(rel, 1e-12))
        loss = np.where(rel <= _HUBER, 0.5 * rel**2, _HUBER * (rel - 0.5 * _HUBER))
        return coef, float(np.sum(loss))

    keep = np.ones(len(rows), dtype=bool)
    best = None
    for _round in range(2):
        best = None
        for tile in tile_list:
            for kh in kh_list:
                for kvh in kvh_list:
                    coef, rss = solve(tile, kh, kvh, keep)
                    if np.any(coef[1 if fit_overhead else 0 :] <= 0):
                        continue
                    if best is None or rss < best[0] - 1e-12:
                        best = (rss, tile, kh, kvh, coef)
        if best is None:
            raise AutoparError(
                "no candidate fits with positive rates: the timings do not grow with the work "
                "(use larger shapes)"
            )
        if "mem:elementwise" not in index:
            break
        bw = dev.memory_bandwidth_bytes_per_s / best[4][index["mem:elementwise"]]
        c0 = best[4][0] if fit_overhead else 0.0
        new_keep = keep.copy()
        for i, t in enumerate(rows):
            if t.kind in ("gemm", "attention") and keep[i]:
                floor = _traffic_bytes(t) / bw
                if floor > t.seconds - c0:
                    new_keep[i] = False
        if (new_keep == keep).all():
            break
        keep = new_keep
    _, tile, kh, kvh, coef = best
    c0 = float(coef[0]) if fit_overhead else 0.0

    capped: list[str] = []

    def fraction(col: str) -> float:
        f = 1.0 / float(coef[index[col]])
        if f > 1.0 and cap_at_peak:
            capped.append(f"{col} {f:.3g}")
            return 1.0
        if f > 1.0:
            raise ConfigError(
                f"fitted {col} rate is {f:.3g}x the datasheet figure of device {base.name}: the "
                "timings come from another device, or the profile's datasheet is wrong",
                file=base.source or None,
                field=col,
            )
        return f

    gemm_fr = tuple((d, fraction(f"gemm:{d}")) for d in gemm_dts)
    kind_fr = tuple((k, fraction(f"mem:{k}")) for k in kinds if k != "elementwise")
    if not fit_overhead:
        launch = host_s = None
    elif dev.host_overlap:
        launch, host_s = c0, host
    else:
        host_s = host if host is not None else 0.0
        launch = max(0.0, c0 - host_s)
    cal = ComputeCalibration(
        name=name,
        device=base.name,
        sm_count=sm_count,
        gemm_tile=tuple(tile) if has_gemm else None,  # type: ignore[arg-type]
        gemm_fractions=gemm_fr,
        gemm_k_half=float(kh) if has_gemm else None,
        flash_fwd_fraction=fraction("attn:fwd") if "attn:fwd" in index else None,
        flash_bwd_fraction=fraction("attn:bwd") if "attn:bwd" in index else None,
        flash_kv_half=float(kvh) if has_attn else None,
        memory_efficiency=fraction("mem:elementwise") if "mem:elementwise" in index else None,
        memory_kind_fractions=kind_fr,
        launch_overhead_s=launch,
        host_overhead_s=host_s,
    )
    fitted = apply_compute_calibration(base, cal)
    if not fit_overhead:  # kernel-only figures: compare without per-kernel overheads
        fitted = replace(fitted, launch_overhead_s=0.0, host_overhead_s=0.0)
    residuals: dict[str, float] = {}
    for kind in ("gemm", "attention", "memory"):
        rel = [
            (predict_timing(t, fitted) - t.seconds) / t.seconds for t in timings if t.kind == kind
        ]
        if rel:
            residuals[kind] = float(np.sqrt(np.mean(np.square(rel))))
    return ComputeFit(
        calibration=cal, residuals=residuals, used=int(keep.sum()), capped=tuple(capped)
    )


def _traffic_bytes(t: KernelTiming) -> float:
    item = ITEM_BYTES[t.dtype]
    if t.kind == "gemm":
        return item * t.batch * (t.m * t.k + t.k * t.n + t.m * t.n)
    if t.kind == "attention":
        per = 2.0 if t.phase == "fwd" else 4.0
        return item * t.batch_heads * t.head_dim * per * (t.q_len + t.kv_len)
    return t.bytes_moved


def write_compute_calibration(
    path: Path,
    fit: ComputeFit,
    timings: Sequence[KernelTiming],
    *,
    torch_device: str,
    command: str,
    threads: int | None = None,
) -> Path:
    """Write a ``kind: compute_calibration`` profile (provenance + raw timings) and reload it."""
    import platform

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        torch_version = "unknown"
    cal = fit.calibration
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [
        "# Fitted by `autopar calibrate --compute` (autopar.cost.calibrate.fit_compute): kernel",
        "# timings on the device below, least squares in relative error over the compute model of",
        "# autopar.cost.compute. Values replace the `achieved:` section of the device profile",
        f"# {cal.device}.yaml (fractions are of its datasheet peaks). Re-run to refresh; do not",
        "# hand-edit.",
        "kind: compute_calibration",
        f"device: {cal.device}",
        f"measured_at: '{now}'",
        f"host: {platform.node() or 'unknown'}",
        f"torch_version: '{torch_version}'",
        f"torch_device: {torch_device}",
    ]
    if threads is not None:
        lines.append(f"threads: {threads}")
    lines.append(f"command: '{command}'")
    if cal.sm_count is not None:
        lines += ["measured:", f"  sm_count: {cal.sm_count}   # multiprocessors / threads used"]
    lines.append("fitted:")
    if cal.gemm_tile is not None:
        lines.append(f"  gemm_tile: [{cal.gemm_tile[0]}, {cal.gemm_tile[1]}]")
    if cal.gemm_fractions:
        lines.append("  gemm_peak_fraction:")
        lines += [f"    {d}: {f:.4g}" for d, f in cal.gemm_fractions]
    scalars = (
        ("gemm_k_half", cal.gemm_k_half, 1.0),
        ("flash_fwd_peak_fraction", cal.flash_fwd_fraction, 1.0),
        ("flash_bwd_peak_fraction", cal.flash_bwd_fraction, 1.0),
        ("flash_kv_half", cal.flash_kv_half, 1.0),
        ("memory_bandwidth_fraction", cal.memory_efficiency, 1.0),
        ("launch_overhead_us", cal.launch_overhead_s, 1e6),
        ("host_overhead_us", cal.host_overhead_s, 1e6),
    )
    lines += [f"  {k}: {v * s:.4g}" for k, v, s in scalars if v is not None]
    if cal.memory_kind_fractions:
        lines.append("  memory_kind_fraction:")
        lines += [f"    {k}: {f:.4g}" for k, f in cal.memory_kind_fractions]
    lines.append("residuals:            # RMS relative error of the fitted model per kernel kind")
    lines += [f"  {k}: {v:.3g}" for k, v in fit.residuals.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "\n".join(lines) + "\n"
    body += yaml.safe_dump({"measurements": [t.as_yaml() for t in timings]}, sort_keys=False,
                           width=100)  # fmt: skip
    path.write_text(body)
    load_compute_calibration(str(path))  # a file we cannot read back is a bug, fail here
    return path


def local_device_profile(device: str, *, search_dirs: tuple[Path, ...] = (PROFILE_DIR,)) -> str:
    """The device profile whose datasheet a calibration on torch ``device`` corrects.

    CUDA: the profile whose ``torch_names`` lists ``torch.cuda.get_device_name()``; CPU:
    ``cpu-host``.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cpu":
        return "cpu-host"
    gpu = torch.cuda.get_device_name(dev)
    for name in list_profiles("device", search_dirs=search_dirs):
        if gpu in load_device_profile(name, search_dirs=search_dirs).torch_names:
            return name
    raise ConfigError(
        f"no device profile lists {gpu!r} in its torch_names: add the GPU to a cost_models/ "
        "file or pass profile=NAME",
        field="profile",
        allowed=list_profiles("device", search_dirs=search_dirs),
    )


def run_compute_calibration(
    *,
    output: Path | str | None = None,
    device: str | None = None,
    profile: str | None = None,
    repeats: int = 5,
    grid: ComputeGrid | None = None,
    min_time_s: float = 0.02,
    command: str = "autopar calibrate --compute",
) -> tuple[Path | None, ComputeFit, list[KernelTiming]]:
    """Time ``grid`` on ``device`` (CUDA when present, else CPU), fit, write ``output``.

    ``profile`` is the device profile the fit corrects (default: :func:`local_device_profile`);
    ``output=None`` fits without writing.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    base = load_device_profile(profile or local_device_profile(device))
    if grid is None:
        grid = CUDA_GRID if dev.type == "cuda" else CPU_GRID
    timings = time_kernels(grid, device=device, repeats=repeats, min_time_s=min_time_s)
    if dev.type == "cuda":
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        threads = None
    else:
        sms = threads = torch.get_num_threads()
    path = Path(output) if output is not None else None
    name = path.stem if path is not None else "compute-calibrated"
    fit = fit_compute(timings, base=base, name=name, sm_count=sms)
    if path is not None:
        write_compute_calibration(path, fit, timings, torch_device=str(dev), command=command,
                                  threads=threads)  # fmt: skip
    return path, fit, timings


def calibrate_compute_main(
    output: Path | str | None = None, device: str | None = None, repeats: int = 5
) -> int:
    """``autopar calibrate --compute``: time, fit, write, print a summary; returns the exit code.

    ``output`` is the profile path (default ``cost_models/compute-calibrated.yaml``); its stem
    is the name to pass as ``load_cluster(..., compute_calibration=NAME_OR_PATH)`` or to write as
    ``compute_calibration:`` in a topology's host group. ``device`` is the torch device to time
    (default CUDA when present, else CPU).
    """
    path = Path(output) if output is not None else PROFILE_DIR / "compute-calibrated.yaml"
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"output must be a .yaml file, got {str(path)!r}", field="output")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be a positive integer, got {repeats!r}", field="repeats")
    cmd = f"autopar calibrate --compute --output {path}" + (f" --device {device}" if device else "")
    path, fit, timings = run_compute_calibration(output=path, device=device, repeats=repeats,
                                                 command=cmd + f" --repeats {repeats}")  # fmt: skip
    cal = fit.calibration
    print(f"wrote {path} ({len(timings)} kernels timed, device profile {cal.device})")
    for d, f in cal.gemm_fractions:
        print(
            f"  large GEMM {d:<5} {f:6.1%} of peak   (tile {cal.gemm_tile}, k_half {cal.gemm_k_half:g})"
        )
    if cal.flash_fwd_fraction is not None and cal.flash_bwd_fraction is not None:
        print(
            f"  attention   fwd {cal.flash_fwd_fraction:6.1%}  bwd {cal.flash_bwd_fraction:6.1%} of peak"
        )
    if cal.memory_efficiency is not None:
        print(f"  bandwidth   {cal.memory_efficiency:6.1%} of datasheet")
    if cal.launch_overhead_s is not None:
        print(f"  overhead    launch {cal.launch_overhead_s * 1e6:.2f} us, host "
              f"{(cal.host_overhead_s or 0.0) * 1e6:.2f} us per kernel")  # fmt: skip
    for kind, r in fit.residuals.items():
        print(f"  residual    {kind:<9} {r:.1%}")
    print(f"use it with: load_cluster(<topology>, compute_calibration={str(path)!r})")
    return 0
