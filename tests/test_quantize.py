"""Quantization: the error bound, unbiasedness, exact cases, the packing layout and bad input."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_runtime.errors import ConfigError, MalformedPayload, NonFinite
from edge_runtime.quantize import (
    SUPPORTED_BITS,
    QuantizedTensor,
    check_bits,
    dequantize,
    quantize,
    quantized_nbytes,
)

_F32_EPS = float(np.finfo(np.float32).eps)

# Mix ordinary values with tiny and huge ones so rows have very different ranges.
finite = st.one_of(
    st.floats(-10, 10, width=32),
    st.floats(-(2.0**100), 2.0**100, width=32),
)
arrays = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7), elements=finite
)


def _rows(x: np.ndarray) -> np.ndarray:
    """The groups that share an offset and a scale: rows, or columns when there are more rows."""
    n = x.shape[0] if x.ndim >= 2 else 1
    grid = x.reshape(n, -1) if x.size else np.zeros((n, 0))
    return grid.T if grid.shape[0] > grid.shape[1] > 0 else grid


@settings(max_examples=300, deadline=None)
@given(arrays, st.sampled_from([8, 4, 2]), st.integers(0, 2**32 - 1))
def test_error_is_below_one_scale_per_element(x: np.ndarray, bits: int, seed: int) -> None:
    q = quantize(x, bits, np.random.default_rng(seed))
    out = dequantize(q)
    assert out.shape == x.shape and out.dtype == np.float32
    assert q.lo.dtype == np.float32 and q.scale.dtype == np.float32 and len(q.scale) == q.rows
    rows, deq = _rows(x).astype(np.float64), _rows(out).astype(np.float64)
    err = np.abs(deq - rows)
    # one scale, plus the final rounding of the float64 result to float32
    bound = q.scale.astype(np.float64)[:, None] + _F32_EPS * np.maximum(np.abs(rows), np.abs(deq))
    assert np.all(err <= bound)
    assert len(q.data) + 8 * q.rows == quantized_nbytes(x.shape, bits)


@settings(max_examples=100, deadline=None)
@given(arrays)
def test_32_bits_are_exact_and_16_bits_close(x: np.ndarray) -> None:
    np.testing.assert_array_equal(dequantize(quantize(x, 32, np.random.default_rng(0))), x)
    small = np.clip(x, -6e4, 6e4)
    half = dequantize(quantize(small, 16, np.random.default_rng(0)))
    np.testing.assert_allclose(half, small, rtol=2**-10, atol=6e-8)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_stochastic_rounding_is_unbiased(bits: int) -> None:
    x = np.random.default_rng(3).standard_normal((4, 50)).astype(np.float32)
    rng = np.random.default_rng(4)
    trials = 3000
    total = np.zeros(x.shape)
    for _ in range(trials):
        total += dequantize(quantize(x, bits, rng))
    mean = total / trials
    scale = (x.max(axis=1) - x.min(axis=1)).astype(np.float64) / ((1 << bits) - 1)
    # One draw is off by at most one scale with std <= scale / 2, so the mean of n draws stays
    # within 5 standard errors; round-to-nearest would be off by up to scale / 2 and fail this.
    assert np.all(np.abs(mean - x) <= 5 * (scale[:, None] / 2) / np.sqrt(trials) + 1e-6)


def test_the_row_max_is_not_clipped_when_the_float32_scale_rounds_down() -> None:
    rng = np.random.default_rng(0)
    hits = 0
    for h in rng.uniform(0.5, 2.0, 200).astype(np.float32):
        if float(np.float32(float(h) / 3)) * 3 < float(h):  # float32 scale would round down
            q = quantize(np.array([0.0, h], np.float32), 2, rng)
            assert float(q.scale[0]) * 3 >= float(h)
            hits += 1
    assert hits > 10


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 0), (0, 5), (2, 1, 3)])
def test_constant_rows_and_odd_shapes_are_exact(bits: int, shape: tuple[int, ...]) -> None:
    x = np.full(shape, -2.75, np.float32)
    if x.ndim >= 2 and x.size:
        x += np.arange(shape[0], dtype=np.float32).reshape(-1, *([1] * (x.ndim - 1)))
    q = quantize(x, bits, np.random.default_rng(0))
    out = dequantize(q)
    assert out.shape == shape
    np.testing.assert_array_equal(out, x)
    assert len(q.data) + 8 * q.rows == quantized_nbytes(shape, bits)


def test_codes_are_packed_little_endian() -> None:
    rng = np.random.default_rng(0)
    # values on the grid quantize deterministically: (x - lo) / scale is an integer
    assert quantize(np.array([0, 1, 2, 3], np.float32), 2, rng).data == bytes([0b11_10_01_00])
    assert quantize(np.array([0, 15, 1, 2, 3], np.float32), 4, rng).data == bytes([0xF0, 0x21, 0x03])
    assert quantize(np.array([0, 255, 7], np.float32), 8, rng).data == bytes([0, 255, 7])


def test_four_bits_are_an_eighth_of_float32() -> None:
    x = np.random.default_rng(0).standard_normal((8, 384)).astype(np.float32)
    q = quantize(x, 4, np.random.default_rng(0))
    assert len(q.data) == x.size // 2 and q.rows == 8
    assert len(quantize(x, 2, np.random.default_rng(0)).data) == x.size // 4


def test_a_tall_tensor_takes_a_scale_per_column() -> None:
    # LoRA's B (hidden x rank): 8 offsets and scales, not 384, and every column keeps its own range
    x = np.random.default_rng(0).standard_normal((384, 8)).astype(np.float32) * np.arange(
        1, 9, dtype=np.float32
    )
    q = quantize(x, 4, np.random.default_rng(0))
    assert q.rows == 8 and quantized_nbytes(x.shape, 4) == x.size // 2 + 8 * 8
    np.testing.assert_allclose(q.scale, (x.max(axis=0) - x.min(axis=0)) / 15, rtol=1e-6)
    err = np.abs(dequantize(q) - x)
    assert np.all(err <= q.scale[None, :] * (1 + 1e-6))


def test_bad_input_is_refused() -> None:
    rng = np.random.default_rng(0)
    for bad in (np.array([1.0, np.nan]), np.array([np.inf]), np.array([1e300])):  # 1e300 -> inf
        for bits in SUPPORTED_BITS:
            with pytest.raises(NonFinite):
                quantize(bad, bits, rng)
    with pytest.raises(NonFinite, match="float16"):
        quantize(np.array([1e5]), 16, rng)
    bad_bits: list[Any] = [3, 0, 64, 8.0, True, "8", None]
    for bad in bad_bits:
        with pytest.raises(ConfigError):
            quantize(np.ones(3), bad, rng)
    with pytest.raises(ConfigError):
        quantize(np.ones(3, np.complex64), 8, rng)
    assert check_bits(np.int64(4)) == 4


def test_inconsistent_quantized_tensors_are_refused() -> None:
    good = quantize(np.ones((2, 3), np.float32), 8, np.random.default_rng(0))
    with pytest.raises(MalformedPayload):
        dequantize(QuantizedTensor(good.shape, 8, good.lo, good.scale, good.data[:-1]))
    with pytest.raises(MalformedPayload):
        dequantize(QuantizedTensor(good.shape, 8, good.lo[:1], good.scale[:1], good.data))
    with pytest.raises(ConfigError):
        dequantize(QuantizedTensor(good.shape, 5, good.lo, good.scale, good.data))


def test_a_100k_tensor_quantizes_in_a_few_milliseconds() -> None:
    x = np.random.default_rng(0).standard_normal((100, 1000)).astype(np.float32)
    rng = np.random.default_rng(1)
    for bits in (8, 4, 2):
        best = min(_timed(partial(quantize, x, bits, rng)) for _ in range(5))
        assert best < 0.05, f"{bits} bits took {best * 1e3:.1f} ms"  # ~1 ms here; generous for CI


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_the_whole_float32_range_stays_finite(bits: int) -> None:
    top = float(np.finfo(np.float32).max)
    x = np.array([[-top, 0.0, top], [top, top, np.nextafter(np.float32(top), np.float32(0))]], np.float32)
    for seed in range(20):
        q = quantize(x, bits, np.random.default_rng(seed))
        out = dequantize(q).astype(np.float64)
        assert np.isfinite(out).all()
        err = np.abs(out - x.astype(np.float64))
        assert np.all(err <= q.scale.astype(np.float64)[:, None] * (1 + 2 * _F32_EPS))
