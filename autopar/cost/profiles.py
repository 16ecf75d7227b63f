"""Hardware profiles read from ``cost_models/*.yaml``, and the one strict YAML reader autopar uses.

Profiles are data, not code: a device file states peak dense FLOP/s per dtype, memory capacity and
bandwidth; a link file states the per-direction bandwidth and latency of one interconnect
technology. Every number in the files carries its unit in the key (``peak_TFLOPs``,
``bandwidth_GBps``, ``memory_GiB``, ``latency_us``) and a source comment; it is converted once here
to SI (``_flop_per_s``, ``_bytes_per_s``, ``_bytes``, ``_s``) and never again.

Each file keeps the first-principles numbers (datasheet) apart from an ``achieved:`` section of
measured corrections (the fraction of datasheet bandwidth NCCL reaches, how GEMM efficiency falls
off for small matrices). ``autopar calibrate`` writes ``kind: calibration`` files with fitted
alpha/beta per level; those replace the achieved corrections, they never change code.

``YamlSection`` is shared with :mod:`autopar.topology.load`: every access names the file and the
dotted field, every bad value raises :class:`~autopar.errors.ConfigError` with the allowed values,
and unknown keys are rejected (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
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
    "LinkProfile",
    "CalibratedLevel",
    "CalibrationProfile",
    "load_device_profile",
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
    """Names of the profile files of ``kind`` (device | link | calibration) in the search dirs."""
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
@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    """One accelerator kind, in SI units, with its achieved-efficiency corrections."""

    name: str
    """Profile name (the file stem), e.g. ``"a100-sxm4-80gb"``."""
    model: str
    """Marketing name, e.g. ``"NVIDIA A100-SXM4-80GB"``."""
    peak_flops: tuple[tuple[str, float], ...]
    """Dense tensor-core peak per dtype key (bf16/fp16/fp32/...), FLOP/s."""
    vector_flop_per_s: float
    """Non-matrix (CUDA core fp32) peak, FLOP/s: the ceiling of elementwise and reduction ops."""
    memory_bytes: float
    memory_bandwidth_bytes_per_s: float
    matmul_efficiency: float
    """Fraction of tensor-core peak that large GEMMs reach in practice (achieved, not datasheet)."""
    matmul_half_size: float
    """Geometric-mean GEMM dim (m·n·k)^(1/3) at which the achieved efficiency is half of
    ``matmul_efficiency``: small matrices cannot fill the SMs (tiles, waves, launch)."""
    memory_efficiency: float
    """Fraction of datasheet memory bandwidth reached by streaming kernels."""
    kernel_overhead_s: float
    """Minimum device time of one kernel, added to every non-empty op."""
    source: str = ""

    def peak_flop_per_s(self, dtype: str) -> float:
        """Dense tensor-core peak for ``dtype`` (bf16/fp16/fp32 or torch names like bfloat16)."""
        key = DTYPE_ALIASES.get(dtype)
        for k, v in self.peak_flops:
            if k == key:
                return v
        raise ConfigError(
            f"device {self.name} has no peak for dtype {dtype!r}",
            field="dtype",
            allowed=[k for k, _ in self.peak_flops],
        )

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB


def load_device_profile(
    name: str, *, search_dirs: tuple[Path, ...] = (PROFILE_DIR,), file: str = "", field: str = ""
) -> DeviceProfile:
    """Read ``cost_models/<name>.yaml`` (kind: device) and convert it to SI once."""
    path = find_profile(name, "device", search_dirs=search_dirs, file=file, field=field)
    doc = read_yaml(path)
    _check_kind(doc, "device")
    model = doc.string("model")
    peaks_doc = doc.section("peak_TFLOPs")
    peaks = []
    for key in list(peaks_doc.data):
        if key not in ("bf16", "fp16", "fp32", "tf32", "fp8"):
            raise peaks_doc.error(
                key, "unknown dtype", allowed=("bf16", "fp16", "fp32", "tf32", "fp8")
            )
        peaks.append((key, peaks_doc.number(key, strict=True) * 1e12))
    peaks_doc.finish()
    vector = doc.number("vector_TFLOPs", strict=True) * 1e12
    memory = doc.number("memory_GiB", strict=True) * GiB
    mem_bw = doc.number("memory_bandwidth_GBps", strict=True) * 1e9
    ach = doc.section("achieved")
    prof = DeviceProfile(
        name=path.stem,
        model=model,
        peak_flops=tuple(peaks),
        vector_flop_per_s=vector,
        memory_bytes=memory,
        memory_bandwidth_bytes_per_s=mem_bw,
        matmul_efficiency=ach.number("matmul_peak_fraction", strict=True, maximum=1.0),
        matmul_half_size=ach.number("matmul_half_size", minimum=0.0),
        memory_efficiency=ach.number("memory_bandwidth_fraction", strict=True, maximum=1.0),
        kernel_overhead_s=ach.number("kernel_overhead_us", minimum=0.0) * 1e-6,
        source=str(path),
    )
    ach.finish()
    doc.finish()
    return prof


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
