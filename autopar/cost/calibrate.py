"""``autopar calibrate``: measure collectives on the cluster at hand and fit alpha/beta per level.

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
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autopar.cost.profiles import PROFILE_DIR, CalibratedLevel, load_calibration_profile
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
