"""The portable weight generator: (seed, parameter name, flat index) -> a float32 weight, bit-exact forever.

An artifact stores no weights, only the seed, so this file *is* the weight format. The rules that make
it portable (see docs/FORMAT.md, which specifies every step):

* Raw bits come from SplitMix64 (a fixed, published integer mixer) keyed by SHA-256 of the seed and the
  parameter name, so each tensor is independent of every other and of layer order. We never use
  torch/NumPy random streams, which differ between devices and releases.
* Floating point is limited to + - * / and sqrt, each correctly rounded by IEEE-754 and evaluated one
  NumPy ufunc at a time in a fixed order (no fused multiply-add, no library log/exp/cos, whose last bit
  varies between CPUs). The Gaussian therefore uses our own log built from those operations.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np

from .errors import MaskforgeError

GENERATOR_ID = "maskforge-splitmix64"
GENERATOR_VERSION = 1
DISTRIBUTIONS = ("signed_constant", "unsigned_constant", "kaiming_normal")

#: SplitMix64's increment and multipliers (docs/FORMAT.md section 1); the ONNX graph (export/regen_graph.py)
#: computes the same stream from these.
SPLITMIX64_GAMMA, SPLITMIX64_MIX1, SPLITMIX64_MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_GAMMA, _MIX1, _MIX2 = (np.uint64(c) for c in (SPLITMIX64_GAMMA, SPLITMIX64_MIX1, SPLITMIX64_MIX2))
_KEY_DOMAIN = b"maskforge/regen/v1"


def stream_key(seed: int, name: str) -> int:
    """The 64-bit key of one tensor: the first 8 bytes (little-endian) of SHA-256(domain 0 seed 0 name)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise MaskforgeError(f"seed must be a non-negative integer, got {seed!r}")
    payload = _KEY_DOMAIN + b"\x00" + str(seed).encode("ascii") + b"\x00" + name.encode("utf-8")
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")


def raw_blocks(seed: int, name: str, count: int) -> np.ndarray:
    """Blocks 0..count-1 of the tensor's stream: block j = SplitMix64 output j+1 from state key."""
    return _splitmix_range(np.uint64(stream_key(seed, name)), 0, count)


def _splitmix_range(key: np.uint64, start: int, stop: int) -> np.ndarray:
    """Blocks start..stop-1 of the stream with state `key` (each block depends on its index alone)."""
    with np.errstate(over="ignore"):
        counter = np.arange(start + 1, stop + 1, dtype=np.uint64)
        z = counter * _GAMMA
        z += key
        z ^= z >> np.uint64(30)
        z *= _MIX1
        z ^= z >> np.uint64(27)
        z *= _MIX2
        z ^= z >> np.uint64(31)
    return z


def fan_in(shape: Sequence[int]) -> int:
    """Inputs feeding one output unit: in_features for linear, in_channels * kh * kw for conv."""
    if len(shape) < 2:
        raise MaskforgeError(f"cannot compute fan-in of a tensor of shape {tuple(shape)}")
    return int(math.prod(shape[1:]))


def weight_std(shape: Sequence[int], k: float, scale_fan: bool) -> float:
    """Kaiming's sigma for ReLU, sqrt(2/fan_in), or sqrt(2/(k*fan_in)) for the subnetwork's fan-in."""
    fan = float(fan_in(shape))
    if scale_fan:
        fan = float(k) * fan  # one correctly rounded multiply, then one divide and one sqrt
    return math.sqrt(2.0 / fan)


def generate(
    seed: int,
    name: str,
    shape: Sequence[int],
    distribution: str = "signed_constant",
    *,
    k: float = 1.0,
    scale_fan: bool = False,
) -> np.ndarray:
    """Regenerate one weight tensor as a float32 array of `shape`.

    >>> w = generate(0, "features.0.weight", (64, 3, 3, 3))
    >>> w.dtype, w.shape, sorted(set(np.abs(w).ravel().tolist())) == [np.float32(np.sqrt(2 / 27))]
    (dtype('float32'), (64, 3, 3, 3), True)
    """
    shape = tuple(int(s) for s in shape)
    count = int(math.prod(shape))
    sigma = weight_std(shape, k, scale_fan)
    if distribution == "signed_constant":
        values = _signed_constant(seed, name, count, sigma)
    elif distribution == "unsigned_constant":
        values = np.full(count, np.float32(sigma), dtype=np.float32)
    elif distribution == "kaiming_normal":
        values = _kaiming_normal(seed, name, count, sigma)
    else:
        raise MaskforgeError(f"unknown weight distribution {distribution!r}; choose from {', '.join(DISTRIBUTIONS)}")
    return values.reshape(shape)


def uniform(seed: int, name: str, shape: Sequence[int], bound: float) -> np.ndarray:
    """float32 values in [-bound, bound), from the stream of `name` (used for the initial scores)."""
    count = int(math.prod(shape))
    unit = (raw_blocks(seed, name, count) >> np.uint64(11)).astype(np.float64) * (2.0**-53)
    return ((unit * 2.0 - 1.0) * bound).astype(np.float32).reshape(tuple(shape))


def normal(seed: int, name: str, shape: Sequence[int], std: float) -> np.ndarray:
    """float32 N(0, std^2) values from the stream of `name`: kaiming_normal's rule with sigma = std (a
    converted model's regenerated embeddings, docs/FORMAT.md section 2.6)."""
    shape = tuple(int(s) for s in shape)
    return _kaiming_normal(seed, name, int(math.prod(shape)), float(std)).reshape(shape)


# _BYTE_BITS[b, j] is bit j (least significant first) of byte value b.
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(bool)


def _signed_constant(seed: int, name: str, count: int, sigma: float) -> np.ndarray:
    # One 64-bit block gives 64 signs: weight i uses bit (i mod 64) of block (i div 64), least
    # significant bit first; a set bit is +sigma. Expanding whole bytes through a 256-entry table is
    # what makes regeneration as fast as reading dense weights from disk.
    blocks = raw_blocks(seed, name, (count + 63) // 64)
    magnitude = np.float32(sigma)
    sign_table = np.where(_BYTE_BITS, magnitude, -magnitude)  # [256, 8] float32: the 8 weights of a byte
    # Speed only (the values are those of sign_table[byte]): `take` of one opaque 32-byte row per byte
    # is a plain copy loop, about 4x faster than NumPy's general fancy indexing of a 2-D table.
    rows = sign_table.view(np.dtype((np.void, sign_table.itemsize * 8))).reshape(256)
    data = np.take(rows, blocks.astype("<u8", copy=False).view(np.uint8))
    return data.view(np.float32)[:count]


_NORMAL_CHUNK = 1 << 15  # weights per chunk: the float64 temporaries stay in cache (speed only)


def _kaiming_normal(seed: int, name: str, count: int, sigma: float) -> np.ndarray:
    # Weight i = float32(standard_normal(block i) * sigma). Every weight goes through the same sequence of
    # correctly rounded operations whatever the chunking, so chunks change the speed, never a bit.
    key = np.uint64(stream_key(seed, name))
    values = np.empty(count, dtype=np.float32)
    for start in range(0, count, _NORMAL_CHUNK):
        stop = min(count, start + _NORMAL_CHUNK)
        normal = standard_normal(_splitmix_range(key, start, stop))
        values[start:stop] = (normal * sigma).astype(np.float32)
    return values


# --- the Gaussian: inverse normal CDF (Acklam's rational approximation, |rel. error| < 1.2e-9) ---------

_A = (
    -3.969683028665376e01,
    2.209460984245205e02,
    -2.759285104469687e02,
    1.383577518672690e02,
    -3.066479806614716e01,
    2.506628277459239e00,
)
_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01, -1.328068155288572e01)
_C = (
    -7.784894002430293e-03,
    -3.223964580411365e-01,
    -2.400758277161838e00,
    -2.549732539343734e00,
    4.374664141464968e00,
    2.938163982698783e00,
)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
_P_LOW = 0.02425
_LN2 = 0.6931471805599453
_SQRT2 = 1.4142135623730951
# 2/(2j+1) for the atanh series of log; Python's float division is correctly rounded everywhere.
_LOG_SERIES = tuple(2.0 / (2 * j + 1) for j in range(12))


def _horner(coefficients: Sequence[float], x: np.ndarray) -> np.ndarray:
    # ((c0*x + c1)*x + c2)... as separate multiply and add ufuncs, so no fused multiply-add can occur.
    result = np.full_like(x, coefficients[0])
    for coefficient in coefficients[1:]:
        result = result * x
        result = result + coefficient
    return result


def portable_log(x: np.ndarray) -> np.ndarray:
    """Natural log of positive normal float64 values from integer ops and + - * / only.

    x = 2^e * m with m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(t), t = (m-1)/(m+1), |t| < 0.1716, whose
    series converges to double precision in 12 terms.
    """
    bits = x.astype("<f8").view(np.uint64)
    exponent = ((bits >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64) - 1023
    mantissa = ((bits & np.uint64(0x000FFFFFFFFFFFFF)) | np.uint64(0x3FF0000000000000)).view(np.float64)
    high = mantissa > _SQRT2
    mantissa = np.where(high, mantissa / 2.0, mantissa)
    exponent = exponent + high
    t = (mantissa - 1.0) / (mantissa + 1.0)
    series = _horner(_LOG_SERIES[::-1], t * t) * t
    return exponent.astype(np.float64) * _LN2 + series


def standard_normal(blocks: np.ndarray) -> np.ndarray:
    """Map 64-bit blocks to N(0, 1) float64: u = (top 53 bits + 0.5) / 2^53 in (0, 1), z = Phi^-1(u)."""
    u = ((blocks >> np.uint64(11)).astype(np.float64) + 0.5) * (2.0**-53)
    z = np.empty_like(u)
    low, high = u < _P_LOW, u > 1.0 - _P_LOW
    middle = ~(low | high)
    q = u[middle] - 0.5
    r = q * q
    z[middle] = _horner(_A, r) * q / _horner(_B + (1.0,), r)
    for region, tail_p, sign in ((low, u[low], 1.0), (high, 1.0 - u[high], -1.0)):
        # 1 - u is exact for u >= 1/2 (Sterbenz), so both tails see the same arithmetic.
        q = np.sqrt(-2.0 * portable_log(tail_p))
        z[region] = sign * _horner(_C, q) / _horner(_D + (1.0,), q)
    return z


def weight_digest(weights: np.ndarray) -> str:
    """SHA-256 of a weight tensor's float32 little-endian bytes in C order (what artifacts record)."""
    data = np.ascontiguousarray(weights, dtype="<f4")
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def default_threads() -> int:
    """Worker threads for regeneration and hashing: the CPU count, capped (the work is memory-bound)."""
    return max(1, min(8, os.cpu_count() or 1))


def generate_many(
    seed: int,
    shapes: Mapping[str, Sequence[int]],
    distribution: str = "signed_constant",
    *,
    k: float = 1.0,
    scale_fan: bool = False,
    digests: bool = False,
    keep: bool = True,
    threads: int | None = None,
) -> dict[str, tuple[np.ndarray | None, str | None]]:
    """Regenerate several tensors in worker threads: `{name: (float32 array or None, digest or None)}`.

    NumPy and hashlib release the GIL, so tensors are generated (and, with `digests`, hashed) in
    parallel; that is what makes regenerating and verifying a network as fast as loading it. With
    `keep=False` only the digests are returned and each array is freed at once (pure verification needs
    no 275 MB of weights held). The largest tensors are scheduled first so the pool's tail is short; the
    result keeps `shapes`' order.
    """

    def one(name: str) -> tuple[np.ndarray | None, str | None]:
        weight = generate(seed, name, shapes[name], distribution, k=k, scale_fan=scale_fan)
        return weight if keep else None, weight_digest(weight) if digests else None

    largest_first = sorted(shapes, key=lambda name: -math.prod(shapes[name]))
    with ThreadPoolExecutor(max_workers=threads or default_threads()) as pool:
        results = dict(zip(largest_first, pool.map(one, largest_first)))
    return {name: results[name] for name in shapes}
