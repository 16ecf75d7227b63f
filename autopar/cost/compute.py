"""Kernel time on one device, priced from what the kernel is.

Every number comes from the device profile (``cost_models/*.yaml``, optionally corrected by a
``kind: compute_calibration`` file); none lives here. Symbols below: ``P(dt)`` the datasheet
dense peak of dtype ``dt``, ``S`` the SM count, ``B`` the datasheet memory bandwidth, ``V`` the
vector (CUDA-core) peak, ``item`` the bytes per element.

Per-kernel overhead
    Each kernel costs ``L`` of device time beyond its work (launch latency, ramp-up, tail:
    ``launch_overhead_us``) and ``H`` of host time to be issued by PyTorch eager
    (``host_overhead_us``). On a GPU the host enqueues asynchronously, so a kernel doing
    ``w`` seconds of work takes ``max(H, L + w)``: tiny kernels are host bound, large ones hide
    the host. On a CPU (``host_overlap: false``) the two add: ``H + L + w``.
    :func:`kernel_overhead_s` is the time of a kernel with no work. (A caller pricing a whole
    stream of kernels may prefer ``max(sum H, sum (L + w))``; per kernel is what is priced here.)

GEMM ``C[m, n] = A[m, k] @ B[k, n]``, ``batch`` of them (:func:`gemm_time_s`)
    The library splits C into output tiles ``tm x tn`` (``kernels.gemm_tile``), one thread block
    per tile, one tile per SM at a time, in waves (NVIDIA "Matrix Multiplication Background"
    guide, tile and wave quantisation)::

        tiles   = batch * ceil(m / tm) * ceil(n / tn)
        waves   = ceil(tiles / S)
        q(m, n) = batch * m * n / (waves * S * tm * tn)        useful outputs / paid output slots

    (On a CPU, ``kernels.tile_padding: false``, a thread runs a tail block at its real size and
    ``q = tiles / (waves * S)``: only idle threads in the last wave are lost.)
    ``q`` is taken for the better orientation (tm x tn or tn x tm: the library may compute C^T),
    and along a dimension shorter than the tile a narrower tile is used (down to 16, the MMA
    width: cuBLASLt lists tiles from 8x8 up), so a skinny GEMM pays for at most 15 padding
    rows. Each tile loops over k with a fixed prologue/epilogue (pipeline fill, writing C)
    worth ``k_half`` iterations of the loop, so it runs at ``k / (k + k_half)`` of its speed.
    Large GEMMs reach the fraction ``f(dt)`` of peak (``gemm_peak_fraction``). Altogether::

        efficiency(m, n, k, dt) = f(dt) * q(m, n) * k / (k + k_half)
        t_gemm = overhead(max(2 batch m n k / (P(dt) * efficiency),
                              item * batch * (m k + k n + m n) / (B * f_mem)))

    A tensor-parallel split of n shrinks the tile count: m=2048, n=12288/8, k=12288 on an A100
    (108 SMs, 128x128 tiles) fills 192 of 216 slots (q = 0.89) where the full n fills
    1536 of 1620 (q = 0.95): the split GEMM is about 7 % slower per FLOP.

Fused attention (FlashAttention, :func:`attention_time_s` with ``kernel="flash"``)
    Forward FLOPs ``4 bh q kv d``, backward 2.5 times that (5 matmuls instead of 2, as the
    FlashAttention-2 paper counts them). Causal attention computes only the ``(q, kv)`` blocks
    (``kernels.flash_tile``: ``bq x bkv``) that hold a visible entry (PyTorch's top-left
    aligned ``is_causal``), about half of them for long sequences. The forward parallelises
    over ``bh * ceil(q / bq)`` thread blocks and loops over kv; the backward over
    ``bh * ceil(kv / bkv)`` and loops over q. With ``q_a`` the wave quantisation of those thread
    blocks (as for GEMM tiles) and ``loop`` the inner loop length::

        t = overhead(max(flops / (P(dt) * f_attn(phase) * q_a * loop / (loop + kv_half)),
                         bytes of Q, K, V, O (and their gradients) / (B * f_mem)))

    ``f_attn`` is the achieved fraction of peak (``flash_fwd/bwd_peak_fraction``: for
    FlashAttention-2 on A100 ~65 % forward, fitted to sustained-clock measurements, and ~56 %
    backward; the paper's maxima are 73 % and 63 %, arXiv 2307.08691).

Unfused attention (``kernel="unfused"``: the score tensor materialised)
    The two batched GEMMs ``S = Q K^T`` (m=q, n=kv, k=d) and ``O = P V`` (m=q, n=d, k=kv) priced
    by :func:`gemm_time_s`, plus the memory-bound passes over the ``[bh, q, kv]`` score tensor
    as Megatron-LM runs them (``FusedScaleMaskSoftmax``, megatron/model/fused_softmax.py, the
    ``scaled_upper_triang_masked_softmax`` / ``scaled_masked_softmax`` CUDA kernels used by
    every stack whose attention is ``unfused``): scale, causal mask and softmax are **one**
    kernel reading the scores and writing the probabilities (``softmax`` kind), then dropout
    (reads and writes them and a 1-byte mask). The backward prices four GEMMs (dV, dP, dQ, dK),
    the dropout gradient and one fused softmax backward that reads P and dP and writes dS with
    the scale applied. (Eager PyTorch without the fused kernel runs scale and mask as passes of
    their own; the stack presets that say ``unfused`` are Megatron's.)

Memory-bound kernels (:func:`memory_bound_time_s`)
    Elementwise, norm, softmax, reduction, cross-entropy kernels::

        t = overhead(max(bytes / (B * f_mem(kind)), flops / V), kernels)

    ``f_mem`` is the achieved fraction of datasheet bandwidth of streaming kernels
    (``memory_bandwidth_fraction``); norms and softmaxes (row reductions) may reach less, given
    per ``kind`` in ``memory_kind_fraction`` (measured by ``autopar calibrate --compute``).

:func:`compute_time_s` (FLOPs, bytes and optional matmul dims of a traced op) is kept for
callers that price ops generically: with ``matmul_dims`` it uses the GEMM efficiency above on
the op's own FLOP count, otherwise the memory-bound price.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

from autopar.cost.profiles import DTYPE_ALIASES, MEMORY_KINDS, DeviceProfile
from autopar.errors import ConfigError

__all__ = [
    "compute_time_s",
    "gemm_time_s",
    "gemm_efficiency",
    "attention_time_s",
    "causal_block_fraction",
    "memory_bound_time_s",
    "kernel_overhead_s",
    "ITEM_BYTES",
]

#: bytes per element of each dtype key
ITEM_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4, "fp8": 1}
#: narrowest tile side a library falls back to along a short dimension (the MMA width)
_MIN_TILE = 16
#: the FlashAttention-2 paper counts the backward as 2.5x the forward FLOPs (5 vs 2 matmuls)
_FLASH_BWD_FLOP_RATIO = 2.5


def _dtype(dtype: str) -> str:
    key = DTYPE_ALIASES.get(dtype)
    if key is None:
        raise ConfigError(f"unknown dtype {dtype!r}", field="dtype", allowed=tuple(DTYPE_ALIASES))
    return key


def _count(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}", field=name)
    return value


def _overhead(work_s: float, device: DeviceProfile, kernels: int = 1) -> float:
    """Time of ``kernels`` kernels doing ``work_s`` seconds of device work in total."""
    if kernels == 0:
        return work_s
    dev = kernels * device.launch_overhead_s + work_s
    host = kernels * device.host_overhead_s
    if device.host_overlap:
        return dev if dev > host else host
    return dev + host


def kernel_overhead_s(device: DeviceProfile) -> float:
    """Launch + framework (host) overhead of one kernel: the time of a kernel with no work."""
    return _overhead(0.0, device)


def _side(dim: int, tile: int) -> int:
    """Tile side used along a dimension: the profile's, or a narrower one for a short dim."""
    if dim >= tile:
        return tile
    return min(tile, max(_MIN_TILE, 1 << (dim - 1).bit_length()))


def _wave_fill(useful: float, tiles: int, slot: int, sms: int, padding: bool = True) -> float:
    """Useful work / (waves * SMs * work per tile slot). Without ``padding`` (a CPU thread runs
    a tail block at its real size) only the idle slots of the last wave are lost."""
    waves = -(-tiles // sms)
    if not padding:
        return tiles / (waves * sms)
    return useful / (waves * sms * slot)


@lru_cache(maxsize=65536)
def _gemm_quantization(
    m: int, n: int, batch: int, tm: int, tn: int, sms: int, padding: bool = True
) -> float:
    best = 0.0
    for a, b in ((tm, tn), (tn, tm)):
        sa, sb = _side(m, a), _side(n, b)
        tiles = batch * (-(-m // sa)) * (-(-n // sb))
        q = _wave_fill(float(batch) * m * n, tiles, sa * sb, sms, padding)
        if q > best:
            best = q
    return best


def gemm_efficiency(
    *, m: int, n: int, k: int, batch: int = 1, device: DeviceProfile, dtype: str
) -> float:
    """Fraction of ``dtype``'s peak a GEMM of this shape reaches (module docstring)."""
    key = _dtype(dtype)
    m, n, k, batch = (
        max(1, _count(x, v)) for x, v in (("m", m), ("n", n), ("k", k), ("batch", batch))
    )
    tm, tn = device.gemm_tile
    q = _gemm_quantization(m, n, batch, tm, tn, device.sm_count, device.tile_padding)
    return device.gemm_fraction(key) * q * k / (k + device.gemm_k_half)


def gemm_time_s(
    *, m: int, n: int, k: int, batch: int = 1, device: DeviceProfile, dtype: str
) -> float:
    """One (batched) GEMM C[m,n] = A[m,k] @ B[k,n]: launch/framework overhead +
    2*batch*m*n*k / (peak(dtype) * efficiency(m, n, k, dtype)), never faster than its memory
    traffic at achieved bandwidth. A GEMM with an empty dimension launches nothing: 0 s."""
    key = _dtype(dtype)
    for name, value in (("m", m), ("n", n), ("k", k), ("batch", batch)):
        _count(name, value)
    if m == 0 or n == 0 or k == 0 or batch == 0:
        return 0.0
    eff = gemm_efficiency(m=m, n=n, k=k, batch=batch, device=device, dtype=key)
    t_flop = 2.0 * batch * m * n * k / (device.peak_flop_per_s(key) * eff)
    nbytes = ITEM_BYTES[key] * batch * (m * k + k * n + m * n)
    t_mem = nbytes / device.achieved_memory_bandwidth_bytes_per_s
    return _overhead(t_flop if t_flop > t_mem else t_mem, device)


@lru_cache(maxsize=65536)
def causal_block_fraction(q_len: int, kv_len: int, block_q: int, block_kv: int) -> float:
    """Fraction of the ``(block_q x block_kv)`` blocks of a causal ``q x kv`` score matrix that
    hold a visible entry (query i sees keys 0..i, PyTorch's top-left aligned ``is_causal``)."""
    if q_len <= 0 or kv_len <= 0:
        return 0.0
    n_q, n_kv = -(-q_len // block_q), -(-kv_len // block_kv)
    visible = 0
    for i in range(n_q):
        last_row = min((i + 1) * block_q, q_len) - 1
        visible += min(last_row, kv_len - 1) // block_kv + 1
    return visible / (n_q * n_kv)


def _flash_time_s(
    *, bh: int, q: int, kv: int, d: int, causal: bool, device: DeviceProfile, key: str, phase: str
) -> float:
    bq, bkv = device.flash_tile
    frac = causal_block_fraction(q, kv, bq, bkv) if causal else 1.0
    flops = 4.0 * bh * q * kv * d * frac
    item = ITEM_BYTES[key]
    if phase == "fwd":
        par, par_block, loop, fraction = q, bq, kv, device.flash_fwd_fraction
        nbytes = item * bh * d * (2.0 * q + 2.0 * kv)  # read Q, K, V; write O
    else:
        flops *= _FLASH_BWD_FLOP_RATIO
        par, par_block, loop, fraction = kv, bkv, q, device.flash_bwd_fraction
        nbytes = item * bh * d * (4.0 * q + 4.0 * kv)  # Q, O, dO, dQ and K, V, dK, dV
    side = _side(par, par_block)
    quant = _wave_fill(
        float(bh) * par, bh * (-(-par // side)), side, device.sm_count, device.tile_padding
    )
    eff = fraction * quant * loop / (loop + device.flash_kv_half)
    t_flop = flops / (device.peak_flop_per_s(key) * eff)
    t_mem = nbytes / device.achieved_memory_bandwidth_bytes_per_s
    return _overhead(t_flop if t_flop > t_mem else t_mem, device)


def _unfused_time_s(
    *, bh: int, q: int, kv: int, d: int, causal: bool, dropout: bool, device: DeviceProfile,
    key: str, phase: str,
) -> float:  # fmt: skip
    scores = float(bh) * q * kv
    item = ITEM_BYTES[key]
    rw = 2.0 * item * scores  # one kernel reading and writing the score tensor

    def mem(nbytes: float, kind: str = "elementwise") -> float:
        return memory_bound_time_s(bytes_moved=nbytes, device=device, dtype=key, kind=kind)

    def gemm(mm: int, nn: int, kk: int) -> float:
        return gemm_time_s(m=mm, n=nn, k=kk, batch=bh, device=device, dtype=key)

    del causal  # the mask is applied inside the fused softmax kernel: no pass of its own
    if phase == "fwd":
        t = gemm(q, kv, d) + gemm(q, d, kv)  # S = Q K^T, O = P V
        t += mem(rw, "softmax")  # fused scale + mask + softmax: read S, write P
        if dropout:
            t += mem(rw + scores)  # read, write, 1-byte keep mask
        return t
    t = gemm(kv, d, q) + gemm(q, kv, d) + gemm(q, d, kv) + gemm(kv, d, q)  # dV, dP, dQ, dK
    if dropout:
        t += mem(rw + scores)  # read dP', the mask; write
    t += mem(1.5 * rw, "softmax")  # fused softmax backward with the scale: read P, dP; write dS
    return t


def attention_time_s(
    *,
    batch_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    causal: bool,
    device: DeviceProfile,
    dtype: str,
    phase: Literal["fwd", "bwd"],
    kernel: Literal["flash", "unfused"] = "flash",
    dropout: bool = False,
) -> float:
    """Fused (FlashAttention) forward or backward at its own achieved rate (causal halves the
    work), or unfused: the QK^T and PV batched GEMMs via gemm_time_s plus the memory-bound passes
    over the [b*heads, q, kv] score tensor (scale/mask/softmax/dropout; ``dropout`` adds its
    pass). ``batch_heads`` is batch x heads on this device. Empty attention costs nothing."""
    key = _dtype(dtype)
    if phase not in ("fwd", "bwd"):
        raise ConfigError(f"unknown phase {phase!r}", field="phase", allowed=("fwd", "bwd"))
    if kernel not in ("flash", "unfused"):
        raise ConfigError(f"unknown attention kernel {kernel!r}", field="kernel",
                          allowed=("flash", "unfused"))  # fmt: skip
    bh, q, kv, d = (
        _count(name, value)
        for name, value in (("batch_heads", batch_heads), ("q_len", q_len), ("kv_len", kv_len),
                            ("head_dim", head_dim))
    )  # fmt: skip
    if bh == 0 or q == 0 or kv == 0 or d == 0:
        return 0.0
    if kernel == "flash":
        return _flash_time_s(bh=bh, q=q, kv=kv, d=d, causal=bool(causal), device=device,
                             key=key, phase=phase)  # fmt: skip
    return _unfused_time_s(bh=bh, q=q, kv=kv, d=d, causal=bool(causal), dropout=bool(dropout),
                           device=device, key=key, phase=phase)  # fmt: skip


def memory_bound_time_s(
    *,
    bytes_moved: float,
    flops: float = 0.0,
    device: DeviceProfile,
    dtype: str,
    kernels: int = 1,
    kind: Literal["elementwise", "activation", "norm", "softmax"] = "elementwise",
) -> float:
    """Elementwise / norm / softmax / reduction / cross-entropy style kernels: per-kernel
    overhead * kernels + max(bytes / achieved bandwidth, flops / vector rate). ``kind`` selects
    the achieved bandwidth (norms and softmaxes are row reductions; cross-entropy is a softmax,
    a reduction a norm)."""
    _dtype(dtype)
    _count("kernels", kernels)
    if bytes_moved < 0 or flops < 0:
        raise ConfigError(
            f"bytes_moved and flops must be >= 0, got {bytes_moved!r} / {flops!r}",
            field="bytes_moved",
        )
    if kind not in MEMORY_KINDS:
        raise ConfigError(f"unknown memory-bound kernel kind {kind!r}", field="kind",
                          allowed=MEMORY_KINDS)  # fmt: skip
    t_mem = bytes_moved / (device.memory_bandwidth_bytes_per_s * device.memory_fraction(kind))
    t_flop = flops / device.vector_flop_per_s
    return _overhead(t_mem if t_mem > t_flop else t_flop, device, kernels)


def _matmul_shape(matmul_dims: Sequence[int]) -> tuple[int, int, int, int]:
    """(batch, m, n, k) from (m, n, k) or (batch, m, n, k)."""
    dims = tuple(matmul_dims)
    if len(dims) not in (3, 4):
        raise ConfigError(
            f"matmul_dims must be (m, n, k) or (batch, m, n, k), got {dims}", field="matmul_dims"
        )
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ConfigError(f"matmul dims must be integers >= 0, got {dims}", field="matmul_dims")
    if len(dims) == 3:
        dims = (1, *dims)
    b, m, n, k = (max(1, d) for d in dims)
    return b, m, n, k


def compute_time_s(
    *,
    flops: float,
    bytes_moved: float,
    device: DeviceProfile,
    dtype: str,
    matmul_dims: Sequence[int] | None = None,
) -> float:
    """Seconds one traced op takes on one device.

    ``flops`` counts 2 per multiply-add; ``bytes_moved`` is what the kernel reads and writes in
    device memory; ``dtype`` is "bf16"/"fp16"/"fp32" (torch names like "bfloat16" are accepted).
    With ``matmul_dims`` ((m, n, k) or (batch, m, n, k)) the op's FLOPs run at the GEMM
    efficiency of that shape (:func:`gemm_efficiency`); otherwise it is priced as one
    memory-bound kernel (:func:`memory_bound_time_s`). An op that does no work and moves
    nothing (a view) takes no time.
    """
    if flops < 0 or bytes_moved < 0:
        raise ConfigError(
            f"flops and bytes_moved must be >= 0, got {flops!r} / {bytes_moved!r}", field="flops"
        )
    key = _dtype(dtype)
    if matmul_dims is not None:
        b, m, n, k = _matmul_shape(matmul_dims)
    if flops == 0 and bytes_moved == 0:
        return 0.0
    if matmul_dims is None:
        return memory_bound_time_s(bytes_moved=bytes_moved, flops=flops, device=device, dtype=key)
    eff = gemm_efficiency(m=m, n=n, k=k, batch=b, device=device, dtype=key)
    t_flop = flops / (device.peak_flop_per_s(key) * eff) if flops else 0.0
    t_mem = bytes_moved / device.achieved_memory_bandwidth_bytes_per_s
    return _overhead(t_flop if t_flop > t_mem else t_mem, device)
