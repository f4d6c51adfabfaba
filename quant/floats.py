"""Unquantized formats: F32, F16 and BF16 (one value per "block").

Byte layout of one value (little-endian):

* ``F32``  — 4 bytes, IEEE binary32.
* ``F16``  — 2 bytes, IEEE binary16; converted with :func:`quant.base.half_bits_to_f32`.
* ``BF16`` — 2 bytes, the high half of a binary32: ``value = bits << 16`` reinterpreted.

``block_size = 1`` and ``type_size = itemsize``, so ``row_bytes = k * itemsize``.
"""
from __future__ import annotations

import numpy as np

from cpuinfer.gguf import GGMLType

from .base import QuantFormat, bits_to_f32, half_bits_to_f32
from .jit import fast_kernel, kernel


# --- numpy references ------------------------------------------------------------------------

def dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    """uint8 [n, 4] -> float32 [n, 1]."""
    return np.ascontiguousarray(blocks).view(np.float32).reshape(-1, 1).copy()


def dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    """uint8 [n, 2] -> float32 [n, 1]."""
    return np.ascontiguousarray(blocks).view(np.float16).astype(np.float32).reshape(-1, 1)


def dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    """uint8 [n, 2] -> float32 [n, 1]: the 16 bits become the top half of a float32."""
    bits = np.ascontiguousarray(blocks).view(np.uint16).astype(np.uint32) << np.uint32(16)
    return bits.view(np.float32).reshape(-1, 1)


# --- compiled row functions ------------------------------------------------------------------

@kernel
def _dequant_row_f32(row, out):
    w = row.view(np.float32)
    for i in range(out.shape[0]):
        out[i] = w[i]


@fast_kernel
def _dot_f32(row, x):
    w = row.view(np.float32)
    acc = np.float32(0.0)
    for i in range(x.shape[0]):
        acc += w[i] * x[i]
    return acc


@fast_kernel
def _dot4_f32(ra, rb, rc, rd, x):
    """Four rows' :func:`_dot_f32` in one pass over ``x``: four sequential streams in flight."""
    wa, wb, wc, wd = ra.view(np.float32), rb.view(np.float32), rc.view(np.float32), rd.view(np.float32)
    a = b = c = d = np.float32(0.0)
    for i in range(x.shape[0]):
        xi = x[i]
        a += wa[i] * xi
        b += wb[i] * xi
        c += wc[i] * xi
        d += wd[i] * xi
    return a, b, c, d


@fast_kernel
def dot_rows_f32(w, r0, r1, x, out):
    """``out[r] = W[r] · x`` for rows ``r0 <= r < r1``: four rows a quarter of the run apart at a
    time (one core streaming from DRAM needs several streams in flight, as
    :data:`quant.interleaved.TILE_GROUPS`), then the rest one by one."""
    q = (r1 - r0) // 4
    for i in range(q):
        r = r0 + i
        out[r], out[r + q], out[r + 2 * q], out[r + 3 * q] = _dot4_f32(w[r], w[r + q], w[r + 2 * q],
                                                                       w[r + 3 * q], x)
    for r in range(r0 + 4 * q, r1):
        out[r] = _dot_f32(w[r], x)


@kernel
def _dequant_row_f16(row, out):
    h = row.view(np.uint16)
    for i in range(out.shape[0]):
        out[i] = half_bits_to_f32(h[i])


@fast_kernel
def _dot_f16(row, x):
    h = row.view(np.uint16)
    acc = np.float32(0.0)
    for i in range(x.shape[0]):
        acc += half_bits_to_f32(h[i]) * x[i]
    return acc


@kernel
def _dequant_row_bf16(row, out):
    h = row.view(np.uint16)
    for i in range(out.shape[0]):
        out[i] = bits_to_f32(np.uint32(h[i]) << np.uint32(16))


@fast_kernel
def _dot_bf16(row, x):
    h = row.view(np.uint16)
    acc = np.float32(0.0)
    for i in range(x.shape[0]):
        acc += bits_to_f32(np.uint32(h[i]) << np.uint32(16)) * x[i]
    return acc


FORMATS: dict[GGMLType, QuantFormat] = {
    GGMLType.F32: QuantFormat(GGMLType.F32, "F32", 1, 4, dequantize_f32, _dequant_row_f32, _dot_f32),
    GGMLType.F16: QuantFormat(GGMLType.F16, "F16", 1, 2, dequantize_f16, _dequant_row_f16, _dot_f16),
    GGMLType.BF16: QuantFormat(GGMLType.BF16, "BF16", 1, 2, dequantize_bf16, _dequant_row_bf16,
                               _dot_bf16),
}
