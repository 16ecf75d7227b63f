"""Hardware profiles read from ``cost_models/*.yaml``, and the one strict YAML reader autopar uses.

Profiles are data, not code: a device file states peak dense FLOP/s per dtype, memory capacity and
bandwidth; a link file states the per-direction bandwidth and latency of one interconnect
technology. Every number in the files carries its unit in the key (``peak_TFLOPs``,
``bandwidth_GBps``, ``memory_GiB``, ``latency_us``) and a source comment; it is converted once here
to SI (``_flop_per_s``, ``_bytes_per_s``, ``_bytes``, ``_s``) and never again.

Each file keeps the first-principles numbers (datasheet) apart from an ``achieved:`` section of
measured corrections (the fraction of datasheet bandwidth NCCL reaches, the fraction of peak large
GEMMs and FlashAttention reach, per-kernel overheads). A device file also states the structure of
the kernels the compute model prices (``kernels:``: GEMM output tile, FlashAttention blocks) and
the SM count they are spread over; :mod:`autopar.cost.compute` writes out the model.

``autopar calibrate`` writes ``kind: calibration`` files with fitted alpha/beta per level, and
``autopar calibrate --compute`` writes ``kind: compute_calibration`` files with fitted kernel
efficiencies of one device; both replace the achieved corrections, they never change code.

``YamlSection`` is shared with :mod:`autopar.topology.load`: every access names the file and the
dotted field, every bad value raises :class:`~autopar.errors.ConfigError` with the allowed values,
and unknown keys are rejected (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from autopar.errors import ConfigError

__all__ = [
    "REPO_ROOT",
    "PROFILE_DIR",
    "YamlSection",
    "read_yaml",
    "DeviceProfile",
    "ComputeCalibration",
    "LinkProfile",
    "CalibratedLevel",
    "CalibrationProfile",
    "load_device_profile",
    "load_compute_calibration",
    "apply_compute_calibration",
    "PEAK_DTYPES",
    "MEMORY_KINDS",
    "load_link_profile",
    "load_calibration_profile",
    "find_profile",
    "list_profiles",
    "DTYPE_ALIASES",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILE_DIR = REPO_ROOT / "cost_models"

GiB = 1024**3
#: dtype spellings accepted by cost functions -> the profile key
DTYPE_ALIASES: dict[str, str] = {
    "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "tf32": "tf32",
    "fp8": "fp8", "float8_e4m3fn": "fp8",
}  # fmt: skip
_NO_DEFAULT = object()


# --------------------------------------------------------------------------------------------
# strict YAML reading
# --------------------------------------------------------------------------------------------
class YamlSection:
    """A mapping read from a YAML file that knows where it came from.

    Why a class: every error must name file and field; passing (file, prefix) through every
    helper by hand is how error messages lose them. ``finish()`` rejects keys nobody read.
    """

    __slots__ = ("data", "file", "path", "_read")

    def __init__(self, data: Any, *, file: str, path: str = "") -> None:
        if not isinstance(data, dict):
            raise ConfigError(
                f"expected a mapping, got {type(data).__name__}", file=file, field=path or None
            )
        self.data = data
        self.file = file
        self.path = path
        self._read: set[str] = set()

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str, allowed: Iterable[object] | None = None) -> ConfigError:
        return ConfigError(message, file=self.file, field=self.field(key), allowed=allowed)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = _NO_DEFAULT) -> Any:
        self._read.add(key)
        if key not in self.data:
            if default is _NO_DEFAULT:
                raise self.error(key, "missing required field")
            return default
        return self.data[key]

    def string(self, key: str, default: Any = _NO_DEFAULT) -> str:
        value = self.raw(key, default)
        if value is default and default is not _NO_DEFAULT:
            return value
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        return value

    def choice(self, key: str, allowed: Iterable[str], default: Any = _NO_DEFAULT) -> str:
        allowed = tuple(allowed)
        value = self.raw(key, default)
        if value not in allowed:
            raise self.error(key, f"unknown value {value!r}", allowed=allowed)
        return value

    def number(
        self,
        key: str,
        default: Any = _NO_DEFAULT,
        *,
        minimum: float = 0.0,
        strict: bool = False,
        maximum: float | None = None,
    ) -> float:
        """A real number >= minimum (> minimum when ``strict``); bandwidths are never negative."""
        value = self.raw(key, default)
        if value is default and default is not _NO_DEFAULT:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, got {value!r}")
        bad = value <= minimum if strict else value < minimum
        if bad or (maximum is not None and value > maximum):
            rel = ">" if strict else ">="
            upper = f" and <= {maximum:g}" if maximum is not None else ""
            raise self.error(key, f"must be {rel} {minimum:g}{upper}, got {value!r}")
        return float(value)

    def integer(self, key: str, default: Any = _NO_DEFAULT, *, minimum: int = 1) -> int:
        value = self.raw(key, default)
        if value is default and default is not _NO_DEFAULT:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def boolean(self, key: str, default: Any = _NO_DEFAULT) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}", allowed=(True, False))
        return value

    def section(self, key: str, default: Any = _NO_DEFAULT) -> YamlSection:
        value = self.raw(key, default)
        if value is default and default is not _NO_DEFAULT:
            return YamlSection({}, file=self.file, path=self.field(key)) if value is None else value
        return YamlSection(value, file=self.file, path=self.field(key))

    def sections(self, key: str) -> list[YamlSection]:
        value = self.raw(key)
        if not isinstance(value, list) or not value:
            raise self.error(key, "must be a non-empty list of mappings")
        return [
            YamlSection(item, file=self.file, path=f"{self.field(key)}[{i}]")
            for i, item in enumerate(value)
        ]

    def finish(self) -> None:
        """Reject keys that were never read: a misspelt key must not fall back to a default."""
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            raise self.error(unknown[0], "unknown field", allowed=sorted(self._read))


def read_yaml(path: Path | str) -> YamlSection:
    """Parse a YAML file into a :class:`YamlSection`; parse errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read file: {exc.strerror}", file=str(path)) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=str(path)) from exc
    return YamlSection(data if data is not None else {}, file=str(path))


def list_profiles(kind: str, *, search_dirs: tuple[Path, ...] = (PROFILE_DIR,)) -> list[str]:
    """Names of the profile files of ``kind`` (device | link | calibration | compute_calibration)
    in the search dirs."""
    names: set[str] = set()
    for d in search_dirs:
        for p in sorted(Path(d).glob("*.yaml")):
            try:
                data = yaml.safe_load(p.read_text())
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(data, dict) and data.get("kind") == kind:
                names.add(p.stem)
    return sorted(names)


def find_profile(
    name: str, kind: str, *, search_dirs: tuple[Path, ...] = (PROFILE_DIR,), file: str, field: str
) -> Path:
    """The file of profile ``name``: a path, or ``<dir>/<name>.yaml`` in the first dir holding it."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    for d in search_dirs:
        p = Path(d) / f"{name}.yaml"
        if p.is_file():
            return p
    raise ConfigError(
        f"unknown {kind} profile {name!r}",
        file=file,
        field=field,
        allowed=list_profiles(kind, search_dirs=search_dirs),
    )


def _check_kind(doc: YamlSection, kind: str) -> None:
    doc.choice("kind", (kind,))


# --------------------------------------------------------------------------------------------
# device profiles
# --------------------------------------------------------------------------------------------
#: dtype keys a device file may give a peak for
PEAK_DTYPES = ("bf16", "fp16", "fp32", "tf32", "fp8")
#: classes of memory-bound kernel with their own achieved bandwidth (see autopar.cost.compute)
MEMORY_KINDS = ("elementwise", "activation", "norm", "softmax")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    """One accelerator kind, in SI units: datasheet numbers, kernel structure, achieved fractions.

    The model that uses these numbers is written out in :mod:`autopar.cost.compute`.
    """

    name: str
    """Profile name (the file stem), e.g. ``"a100-sxm4-80gb"``."""
    model: str
    """Marketing name, e.g. ``"NVIDIA A100-SXM4-80GB"``."""
    peak_flops: tuple[tuple[str, float], ...]
    """Dense tensor-core peak per dtype key (bf16/fp16/fp32/...), FLOP/s (datasheet)."""
    vector_flop_per_s: float
    """Non-matrix (CUDA core fp32) peak, FLOP/s: the ceiling of elementwise and reduction ops."""
    memory_bytes: float
    memory_bandwidth_bytes_per_s: float
    """Datasheet memory bandwidth."""
    sm_count: int
    """Streaming multiprocessors (CPU: cores used): the width of one wave of GEMM tiles."""
    host_overlap: bool
    """True when the host enqueues kernels asynchronously (CUDA streams): a kernel then costs
    ``max(host, launch + work)``; False (CPU) adds them."""
    gemm_tile: tuple[int, int]
    """Output tile (rows, cols) of the library's large-GEMM kernels (tile/wave quantisation)."""
    flash_tile: tuple[int, int]
    """FlashAttention blocks (query rows, key/value columns) per thread block."""
    tile_padding: bool
    """True when a partial tile costs a whole one (GPU thread blocks); False when a tail block
    runs at its real size (CPU threads)."""
    gemm_fractions: tuple[tuple[str, float], ...]
    """Achieved fraction of the dtype's peak for large, well-shaped GEMMs (the asymptote)."""
    gemm_k_half: float
    """Reduction depth at which a tile's efficiency halves: fixed per-tile prologue/epilogue
    cost expressed in units of k."""
    flash_fwd_fraction: float
    """Achieved fraction of the dtype's peak of fused attention forward (long sequences)."""
    flash_bwd_fraction: float
    """Same for the fused backward (counted as 2.5x the forward FLOPs)."""
    flash_kv_half: float
    """Length of a fused-attention inner loop at which its efficiency halves."""
    memory_efficiency: float
    """Fraction of datasheet memory bandwidth reached by streaming (elementwise) kernels."""
    memory_kind_fractions: tuple[tuple[str, float], ...] = ()
    """Achieved bandwidth fraction of other memory-bound kernel kinds (norm, softmax, ...);
    a kind not listed streams like elementwise kernels (``memory_efficiency``)."""
    launch_overhead_s: float
    """Device-side time of one kernel beyond its work (launch latency, ramp-up, tail)."""
    host_overhead_s: float
    """Host (framework + driver) time to issue one kernel in PyTorch eager mode."""
    torch_names: tuple[str, ...] = ()
    """Names ``torch.cuda.get_device_name()`` reports for this device (calibration lookup)."""
    compute_calibration: str = ""
    """Source of the ``kind: compute_calibration`` file applied on top of the file, if any."""
    source: str = ""

    def peak_flop_per_s(self, dtype: str) -> float:
        """Dense tensor-core peak for ``dtype`` (bf16/fp16/fp32 or torch names like bfloat16)."""
        return self._per_dtype(self.peak_flops, dtype, "peak")

    def gemm_fraction(self, dtype: str) -> float:
        """Achieved fraction of ``dtype``'s peak that large GEMMs reach."""
        return self._per_dtype(self.gemm_fractions, dtype, "GEMM efficiency")

    def _per_dtype(self, table: tuple[tuple[str, float], ...], dtype: str, what: str) -> float:
        key = DTYPE_ALIASES.get(dtype)
        for k, v in table:
            if k == key:
                return v
        raise ConfigError(
            f"device {self.name} has no {what} for dtype {dtype!r}",
            field="dtype",
            allowed=[k for k, _ in table],
        )

    def memory_fraction(self, kind: str = "elementwise") -> float:
        """Achieved fraction of datasheet bandwidth of a memory-bound kernel of ``kind``."""
        if kind not in MEMORY_KINDS:
            raise ConfigError(f"unknown memory-bound kernel kind {kind!r}", field="kind",
                              allowed=MEMORY_KINDS)  # fmt: skip
        for k, v in self.memory_kind_fractions:
            if k == kind:
                return v
        return self.memory_efficiency

    @property
    def achieved_memory_bandwidth_bytes_per_s(self) -> float:
        """Streaming (elementwise) bandwidth the model assumes."""
        return self.memory_bandwidth_bytes_per_s * self.memory_efficiency

    @property
    def matmul_efficiency(self) -> float:
        """Large-GEMM fraction of the first listed dtype (bf16 on GPUs); kept for old callers."""
        return self.gemm_fractions[0][1]

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB


def _tile(sec: YamlSection, key: str) -> tuple[int, int]:
    """A ``[rows, cols]`` pair of positive integers."""
    value = sec.raw(key)
    if (
        not isinstance(value, list)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise sec.error(key, f"must be [rows, cols], two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _fractions(
    sec: YamlSection, key: str, allowed: tuple[str, ...]
) -> tuple[tuple[str, float], ...]:
    """A mapping {name: fraction in (0, 1]} whose keys are in ``allowed``."""
    doc = sec.section(key)
    out = []
    for k in list(doc.data):
        if k not in allowed:
            raise doc.error(k, "unknown key", allowed=allowed)
        out.append((k, doc.number(k, strict=True, maximum=1.0)))
    doc.finish()
    return tuple(out)


def load_device_profile(
    name: str,
    *,
    search_dirs: tuple[Path, ...] = (PROFILE_DIR,),
    file: str = "",
    field: str = "",
    compute_calibration: str | Path | None = None,
) -> DeviceProfile:
    """Read ``cost_models/<name>.yaml`` (kind: device) and convert it to SI once.

    ``compute_calibration`` names a ``kind: compute_calibration`` profile (or its path) whose
    fitted values replace the file's ``achieved:`` corrections (see
    :func:`apply_compute_calibration`).
    """
    path = find_profile(name, "device", search_dirs=search_dirs, file=file, field=field)
    doc = read_yaml(path)
    _check_kind(doc, "device")
    model = doc.string("model")
    names = doc.raw("torch_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise doc.error("torch_names", f"must be a list of strings, got {names!r}")
    peaks_doc = doc.section("peak_TFLOPs")
    peaks = []
    for key in list(peaks_doc.data):
        if key not in PEAK_DTYPES:
            raise peaks_doc.error(key, "unknown dtype", allowed=PEAK_DTYPES)
        peaks.append((key, peaks_doc.number(key, strict=True) * 1e12))
    peaks_doc.finish()
    vector = doc.number("vector_TFLOPs", strict=True) * 1e12
    memory = doc.number("memory_GiB", strict=True) * GiB
    mem_bw = doc.number("memory_bandwidth_GBps", strict=True) * 1e9
    sm_count = doc.integer("sm_count")
    overlap = doc.boolean("host_overlap")
    kern = doc.section("kernels")
    gemm_tile = _tile(kern, "gemm_tile")
    flash_tile = _tile(kern, "flash_tile")
    padding = kern.boolean("tile_padding")
    kern.finish()
    ach = doc.section("achieved")
    gemm = _fractions(ach, "gemm_peak_fraction", PEAK_DTYPES)
    missing = sorted({k for k, _ in peaks} - {k for k, _ in gemm})
    if missing:
        raise ach.error(
            "gemm_peak_fraction",
            f"every dtype with a peak needs a GEMM fraction; missing {missing}",
            allowed=[k for k, _ in peaks],
        )
    kinds = ()
    if ach.has("memory_kind_fraction"):
        kinds = _fractions(ach, "memory_kind_fraction", MEMORY_KINDS[1:])
    prof = DeviceProfile(
        name=path.stem,
        model=model,
        peak_flops=tuple(peaks),
        vector_flop_per_s=vector,
        memory_bytes=memory,
        memory_bandwidth_bytes_per_s=mem_bw,
        sm_count=sm_count,
        host_overlap=overlap,
        gemm_tile=gemm_tile,
        flash_tile=flash_tile,
        tile_padding=padding,
        gemm_fractions=gemm,
        gemm_k_half=ach.number("gemm_k_half", minimum=0.0),
        flash_fwd_fraction=ach.number("flash_fwd_peak_fraction", strict=True, maximum=1.0),
        flash_bwd_fraction=ach.number("flash_bwd_peak_fraction", strict=True, maximum=1.0),
        flash_kv_half=ach.number("flash_kv_half", minimum=0.0),
        memory_efficiency=ach.number("memory_bandwidth_fraction", strict=True, maximum=1.0),
        memory_kind_fractions=kinds,
        launch_overhead_s=ach.number("launch_overhead_us", minimum=0.0) * 1e-6,
        host_overhead_s=ach.number("host_overhead_us", minimum=0.0) * 1e-6,
        torch_names=tuple(names),
        source=str(path),
    )
    ach.finish()
    doc.finish()
    if compute_calibration is not None:
        cal = load_compute_calibration(
            str(compute_calibration), search_dirs=search_dirs, file=file or str(path),
            field=field or "compute_calibration",
        )  # fmt: skip
        prof = apply_compute_calibration(prof, cal)
    return prof


# --------------------------------------------------------------------------------------------
# compute calibration profiles (written by autopar calibrate --compute)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class ComputeCalibration:
    """Fitted kernel-efficiency numbers of one device; ``None`` = not fitted, keep the file's.

    Every field mirrors one of :class:`DeviceProfile`'s achieved corrections (plus the local
    device's SM/thread count and the best-fitting GEMM tile, which the fit measures).
    """

    name: str
    device: str
    """The device profile (datasheet) the fractions are relative to."""
    sm_count: int | None = None
    gemm_tile: tuple[int, int] | None = None
    gemm_fractions: tuple[tuple[str, float], ...] = ()
    gemm_k_half: float | None = None
    flash_fwd_fraction: float | None = None
    flash_bwd_fraction: float | None = None
    flash_kv_half: float | None = None
    memory_efficiency: float | None = None
    memory_kind_fractions: tuple[tuple[str, float], ...] = ()
    launch_overhead_s: float | None = None
    host_overhead_s: float | None = None
    source: str = ""


def apply_compute_calibration(profile: DeviceProfile, cal: ComputeCalibration) -> DeviceProfile:
    """``profile`` with the calibration's fitted values in place of its achieved corrections.

    The calibration must have been fitted against this profile's datasheet (same ``device``
    name): a fraction is only meaningful relative to the peak it was divided by.
    """
    if cal.device != profile.name:
        raise ConfigError(
            f"compute calibration {cal.name!r} was fitted against device {cal.device!r}, "
            f"not {profile.name!r}",
            file=cal.source or None,
            field="device",
            allowed=(profile.name,),
        )
    changes: dict[str, object] = {"compute_calibration": cal.source or cal.name}
    for attr in (
        "sm_count", "gemm_tile", "gemm_k_half", "flash_fwd_fraction", "flash_bwd_fraction",
        "flash_kv_half", "memory_efficiency", "launch_overhead_s", "host_overhead_s",
    ):  # fmt: skip
        value = getattr(cal, attr)
        if value is not None:
            changes[attr] = value
    if cal.gemm_fractions:
        merged = dict(profile.gemm_fractions)
        merged.update(cal.gemm_fractions)
        changes["gemm_fractions"] = tuple(merged.items())
    if cal.memory_kind_fractions:
        merged = dict(profile.memory_kind_fractions)
        merged.update(cal.memory_kind_fractions)
        changes["memory_kind_fractions"] = tuple(merged.items())
    return replace(profile, **changes)


#: provenance keys of a compute calibration file, kept for humans and not interpreted
_COMPUTE_PROVENANCE = (
    "measured_at", "host", "torch_version", "torch_device", "threads", "command", "residuals",
    "measurements",
)  # fmt: skip


def load_compute_calibration(
    name: str, *, search_dirs: tuple[Path, ...] = (PROFILE_DIR,), file: str = "", field: str = ""
) -> ComputeCalibration:
    """Read a ``kind: compute_calibration`` file (see :mod:`autopar.cost.calibrate`)."""
    path = find_profile(
        name, "compute_calibration", search_dirs=search_dirs, file=file, field=field
    )
    doc = read_yaml(path)
    _check_kind(doc, "compute_calibration")
    device = doc.string("device")
    for key in _COMPUTE_PROVENANCE:
        doc.raw(key, None)
    meas = doc.section("measured", None)
    sm_count = meas.integer("sm_count", None)
    meas.finish()
    fit = doc.section("fitted")

    def opt(key: str, *, fraction: bool = False, scale: float = 1.0) -> float | None:
        if not fit.has(key):
            return None
        if fraction:
            return fit.number(key, strict=True, maximum=1.0)
        return fit.number(key, minimum=0.0) * scale

    cal = ComputeCalibration(
        name=path.stem,
        device=device,
        sm_count=sm_count,
        gemm_tile=_tile(fit, "gemm_tile") if fit.has("gemm_tile") else None,
        gemm_fractions=_fractions(fit, "gemm_peak_fraction", PEAK_DTYPES)
        if fit.has("gemm_peak_fraction")
        else (),
        gemm_k_half=opt("gemm_k_half"),
        flash_fwd_fraction=opt("flash_fwd_peak_fraction", fraction=True),
        flash_bwd_fraction=opt("flash_bwd_peak_fraction", fraction=True),
        flash_kv_half=opt("flash_kv_half"),
        memory_efficiency=opt("memory_bandwidth_fraction", fraction=True),
        memory_kind_fractions=_fractions(fit, "memory_kind_fraction", MEMORY_KINDS[1:])
        if fit.has("memory_kind_fraction")
        else (),
        launch_overhead_s=opt("launch_overhead_us", scale=1e-6),
        host_overhead_s=opt("host_overhead_us", scale=1e-6),
        source=str(path),
    )
    fit.finish()
    doc.finish()
    return cal


# --------------------------------------------------------------------------------------------
# link profiles
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class LinkProfile:
    """One interconnect technology: datasheet alpha/beta plus achieved corrections, SI units."""

    name: str
    description: str
    bandwidth_bytes_per_s: float
    """Datasheet bandwidth per direction of one port (one GPU's NVLink, one NIC, one x16 slot)."""
    latency_s: float
    """First-principles one-hop latency of the hardware."""
    bandwidth_fraction: float
    """Achieved (measured) fraction of ``bandwidth_bytes_per_s`` a collective reaches."""
    step_overhead_s: float
    """Achieved extra latency per collective step (software: NCCL protocol, kernel, proxy)."""
    source: str = ""

    @property
    def effective_bandwidth_bytes_per_s(self) -> float:
        return self.bandwidth_bytes_per_s * self.bandwidth_fraction

    @property
    def effective_latency_s(self) -> float:
        return self.latency_s + self.step_overhead_s


def load_link_profile(
    name: str, *, search_dirs: tuple[Path, ...] = (PROFILE_DIR,), file: str = "", field: str = ""
) -> LinkProfile:
    """Read ``cost_models/<name>.yaml`` (kind: link)."""
    path = find_profile(name, "link", search_dirs=search_dirs, file=file, field=field)
    doc = read_yaml(path)
    _check_kind(doc, "link")
    desc = doc.string("description")
    bw = doc.number("bandwidth_GBps", strict=True) * 1e9
    lat = doc.number("latency_us") * 1e-6
    ach = doc.section("achieved")
    prof = LinkProfile(
        name=path.stem,
        description=desc,
        bandwidth_bytes_per_s=bw,
        latency_s=lat,
        bandwidth_fraction=ach.number("bandwidth_fraction", strict=True, maximum=1.0),
        step_overhead_s=ach.number("step_overhead_us") * 1e-6,
        source=str(path),
    )
    ach.finish()
    doc.finish()
    return prof


# --------------------------------------------------------------------------------------------
# calibration profiles (written by autopar calibrate)
# --------------------------------------------------------------------------------------------
CALIBRATION_LEVELS = ("intra_host", "inter_host")


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibratedLevel:
    """Fitted alpha (per ring step) and bus bandwidth per device of one level of the hierarchy."""

    alpha_s: float
    bandwidth_bytes_per_s: float
    points: int = 0
    rel_residual: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationProfile:
    """Measured levels; a level present here replaces the datasheet x achieved-fraction price."""

    name: str
    levels: tuple[tuple[str, CalibratedLevel], ...]
    source: str = ""

    def level(self, name: str) -> CalibratedLevel | None:
        for k, v in self.levels:
            if k == name:
                return v
        return None


def load_calibration_profile(
    name: str, *, search_dirs: tuple[Path, ...] = (PROFILE_DIR,), file: str = "", field: str = ""
) -> CalibrationProfile:
    """Read a ``kind: calibration`` file written by :func:`autopar.cost.calibrate.run_calibration`."""
    path = find_profile(name, "calibration", search_dirs=search_dirs, file=file, field=field)
    doc = read_yaml(path)
    _check_kind(doc, "calibration")
    for key in ("backend", "world_size", "devices_per_host", "measured_at", "kinds", "sizes_bytes"):
        doc.raw(key, None)  # provenance, kept for humans
    levels_doc = doc.section("levels")
    levels = []
    for key in list(levels_doc.data):
        if key not in CALIBRATION_LEVELS:
            raise levels_doc.error(key, "unknown level", allowed=CALIBRATION_LEVELS)
        lv = levels_doc.section(key)
        levels.append(
            (
                key,
                CalibratedLevel(
                    alpha_s=lv.number("alpha_us") * 1e-6,
                    bandwidth_bytes_per_s=lv.number("bandwidth_GBps", strict=True) * 1e9,
                    points=lv.integer("points", 0, minimum=0),
                    rel_residual=lv.number("rel_residual", 0.0),
                ),
            )
        )
        lv.finish()
    levels_doc.finish()
    doc.finish()
    return CalibrationProfile(name=path.stem, levels=tuple(levels), source=str(path))
