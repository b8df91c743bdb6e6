"""Bit-width quantization of tensors with unbiased stochastic rounding (numpy only).

* 32 bits: the raw float32 values.
* 16 bits: a float16 cast (round to nearest).
* 8, 4 and 2 bits: asymmetric per row. A row is the first axis of a tensor with two or more
  dimensions (the other axes flattened); a 0-d or 1-d tensor is one row. A tensor with more rows
  than columns (LoRA's B, hidden x rank) is quantized per *column* instead, its codes in column
  order: an offset and a scale for each of 384 rows of 8 values cost more than the codes. With L = 2**bits - 1
  levels, ``lo`` the row minimum and ``scale = (max - lo) / L``, each element becomes
  ``code = floor((x - lo) / scale + u)`` with u ~ U[0, 1), clipped to [0, L]. Then
  E[lo + code * scale] = x exactly and every element is off by less than one ``scale``. A
  constant row has scale 0, codes 0, and decodes to ``lo`` exactly. Codes are packed
  little-endian: the first code sits in the lowest bits of the first byte (2 codes a byte at
  4 bits, 4 codes a byte at 2 bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.errors import ConfigError, MalformedPayload, NonFinite

SUPPORTED_BITS = (32, 16, 8, 4, 2)

_F32_MAX = float(np.finfo(np.float32).max)
_F16_MAX = float(np.finfo(np.float16).max)
_EMPTY = np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor at a bit width: per-row offsets and scales (8, 4, 2 bits) and packed codes."""

    shape: tuple[int, ...]
    bits: int
    lo: np.ndarray  # float32[rows]; empty at 32 and 16 bits
    scale: np.ndarray  # float32[rows]; empty at 32 and 16 bits
    data: bytes

    @property
    def rows(self) -> int:
        """Rows that carry their own offset and scale (0 at 32 and 16 bits)."""
        return scale_rows(self.shape) if self.bits <= 8 else 0


def check_bits(bits: Any) -> int:
    """``bits`` as an int if it is a supported bit width, else :class:`ConfigError`."""
    # 8.0 == 8 and True == 1 would slip through a plain ``in`` test.
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in SUPPORTED_BITS:
        raise ConfigError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def scale_rows(shape: tuple[int, ...]) -> int:
    """How many (offset, scale) pairs a tensor of ``shape`` has at 8, 4 or 2 bits."""
    if len(shape) < 2:
        return 1
    rows, cols = int(shape[0]), math.prod(int(d) for d in shape[1:])
    return cols if _by_column(shape) else rows


def _by_column(shape: tuple[int, ...]) -> bool:
    """Whether a tensor is quantized per column (more rows than columns)."""
    return len(shape) >= 2 and int(shape[0]) > math.prod(int(d) for d in shape[1:]) > 0


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` values take at ``bits`` bits each (codes only, no scales)."""
    if bits == 32:
        return 4 * count
    if bits == 16:
        return 2 * count
    per_byte = 8 // bits
    return (count + per_byte - 1) // per_byte


def quantized_nbytes(shape: tuple[int, ...], bits: int) -> int:
    """Payload bytes of one tensor at ``bits``: packed codes plus per-row offsets and scales."""
    bits = check_bits(bits)
    count = 1
    for d in shape:
        count *= int(d)
    extra = 8 * scale_rows(tuple(shape)) if bits <= 8 else 0
    return packed_nbytes(count, bits) + extra


def quantize(x: np.ndarray, bits: int, rng: np.random.Generator) -> QuantizedTensor:
    """Quantize ``x`` to ``bits`` bits; below 16 bits the rounding is stochastic and unbiased."""
    bits = check_bits(bits)
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise ConfigError(f"cannot quantize a tensor of dtype {arr.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        arr32 = arr.astype(np.float32)
    # Checked after the float32 cast: a finite float64 beyond float32 range would become inf.
    if not np.isfinite(arr32).all():
        raise NonFinite("tensor holds NaN or infinity (or a value beyond float32 range)")
    shape = tuple(int(d) for d in arr32.shape)
    if bits == 32:
        return QuantizedTensor(shape, 32, _EMPTY, _EMPTY, arr32.astype("<f4").tobytes())
    if bits == 16:
        if arr32.size and float(np.abs(arr32).max()) > _F16_MAX:
            raise NonFinite(f"tensor holds a value beyond the float16 range ±{_F16_MAX:g}")
        return QuantizedTensor(shape, 16, _EMPTY, _EMPTY, arr32.astype("<f2").tobytes())
    levels = (1 << bits) - 1
    n_rows = scale_rows(shape)
    if _by_column(shape):
        rows = np.ascontiguousarray(arr32.reshape(shape[0], -1).T)
    else:
        rows = arr32.reshape(n_rows, -1) if arr32.size else np.zeros((n_rows, 0), np.float32)
    if rows.shape[1] == 0:
        zeros = np.zeros(n_rows, np.float32)
        return QuantizedTensor(shape, bits, zeros, zeros.copy(), b"")
    lo = rows.min(axis=1)  # float32, exact: it is one of the values
    lo64 = lo.astype(np.float64)
    span = rows.max(axis=1).astype(np.float64) - lo64
    scale = (span / levels).astype(np.float32)
    # The scale travels as float32. Rounded down, lo + L * scale would fall short of the row max,
    # its code would be clipped and it would be biased; so round such scales up one ulp, unless
    # that pushes the top level past the float32 range (only for values near float32 max).
    bumped = np.nextafter(scale, np.float32(np.inf))
    fits = lo64 + levels * bumped.astype(np.float64) <= _F32_MAX
    scale = np.where((scale.astype(np.float64) * levels < span) & fits, bumped, scale)
    s64 = scale.astype(np.float64)
    safe = np.where(s64 > 0, s64, 1.0)
    codes = np.floor((rows - lo64[:, None]) / safe[:, None] + rng.random(rows.shape))
    np.clip(codes, 0, levels, out=codes)
    codes[s64 == 0] = 0  # constant rows decode to lo exactly
    return QuantizedTensor(shape, bits, lo, scale, _pack(codes.astype(np.uint8).ravel(), bits))


def dequantize(q: QuantizedTensor) -> np.ndarray:
    """The float32 tensor, of the original shape, that a quantized tensor stands for."""
    bits = check_bits(q.bits)
    count = 1
    for d in q.shape:
        count *= int(d)
    if len(q.data) != packed_nbytes(count, bits):
        raise MalformedPayload(f"{len(q.data)} data bytes do not fit shape {q.shape} at {bits} bits")
    if bits == 32:
        return np.frombuffer(q.data, dtype="<f4").astype(np.float32).reshape(q.shape)
    if bits == 16:
        return np.frombuffer(q.data, dtype="<f2").astype(np.float32).reshape(q.shape)
    if len(q.lo) != q.rows or len(q.scale) != q.rows:
        raise MalformedPayload(f"{len(q.lo)} offsets and {len(q.scale)} scales for {q.rows} rows")
    codes = _unpack(q.data, bits, count).reshape(q.rows, -1 if count else 0)
    lo = np.asarray(q.lo, np.float64)[:, None]
    scale = np.asarray(q.scale, np.float64)[:, None]
    # Computed in float64 and rounded once, so the error bound loses only half a float32 ulp.
    with np.errstate(over="ignore", invalid="ignore"):
        values = (lo + codes * scale).astype(np.float32)
    if _by_column(q.shape):
        return np.ascontiguousarray(values.T).reshape(q.shape)
    return values.reshape(q.shape)


def _pack(codes: np.ndarray, bits: int) -> bytes:
    """Pack uint8 codes below 2**bits little-endian, the first code in the lowest bits."""
    if bits == 8:
        return codes.tobytes()
    per_byte = 8 // bits
    padded = np.zeros(packed_nbytes(len(codes), bits) * per_byte, np.uint8)
    padded[: len(codes)] = codes
    # One strided pass per slot in the byte: much faster than broadcasting over a tiny last axis.
    out = padded[0::per_byte].copy()
    for k in range(1, per_byte):
        out |= padded[k::per_byte] << np.uint8(k * bits)
    return out.tobytes()


def _unpack(data: bytes, bits: int, count: int) -> np.ndarray:
    """The first ``count`` codes of packed ``data``, as uint8."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw[:count]
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    codes = np.empty(len(raw) * per_byte, np.uint8)
    for k in range(per_byte):
        codes[k::per_byte] = (raw >> np.uint8(k * bits)) & mask
    return codes[:count]


__all__ = [
    "SUPPORTED_BITS",
    "QuantizedTensor",
    "check_bits",
    "dequantize",
    "packed_nbytes",
    "quantize",
    "quantized_nbytes",
]
