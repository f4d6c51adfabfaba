"""The legacy 32-value block formats: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (ggml-common.h).

Block layouts, byte arithmetic (``d``, ``m`` are IEEE halves; ``QK = 32`` values per block)::

    Q8_0  34 bytes = d[0:2]                 qs[2:34]  int8       x_j = d * qs[j]
    Q4_0  18 bytes = d[0:2]                 qs[2:18]  nibbles    x_j = d * (q_j - 8)
    Q4_1  20 bytes = d[0:2] m[2:4]          qs[4:20]  nibbles    x_j = d * q_j + m
    Q5_0  22 bytes = d[0:2] qh[2:6]         qs[6:22]  nibbles    x_j = d * (q_j - 16)
    Q5_1  24 bytes = d[0:2] m[2:4] qh[4:8]  qs[8:24]  nibbles    x_j = d * q_j + m

Nibble order: byte ``qs[i]`` (i < 16) holds value ``i`` in its low 4 bits and value ``i + 16`` in
its high 4 bits. Q5: ``qh`` is a little-endian uint32 whose bit ``j`` is bit 4 of value ``j``.

Three kinds of functions per format ``<f>``:

* ``dequantize_<f>`` — naive numpy reference (bit-exact against ``gguf.quants.dequantize``);
* ``_dequant_row_<f>(row, out)`` and ``_dot_<f>(row, x)`` — compiled, float32 activations;
* ``_idot_<f>(row, xq, xd, xs)`` — the fast integer dot used by the mat-vec driver. The
  activations are first quantized per 32-block by :func:`quantize_act_q8`: ``x ≈ xd[b] * xq``
  with int8 ``xq`` (|xq| ≤ 127), ``xd[b] = max|x| / 127`` (rounded to f16, as ggml's
  ``quantize_row_q8_0``) and ``xs[b] = f16(max|x|/127 · Σ xq)`` (ggml's ``block_q8_1.s``, used by
  ``vec_dot_q4_1_q8_1``). Each block then costs one int32 dot product:
  ``Q4_0: d·xd·Σ (q−8)·xq``, ``Q4_1: d·xd·Σ q·xq + m·xs`` (the Q4_1/Q5_1 min term comes from the
  per-block sum, rounded as ggml rounds it). The error against float activations is at
  most ``Σ_blocks D·(1/2 + 127·2^-11) · Σ|w|`` with ``D = max|x_block| / 127``.

Vectorization notes (see ``inspect_asm``): block and element indices are ``uint64`` so numba
emits no negative-index wraparound code, the inner trip count comes from array shapes rather than
a literal 32 (a literal trip count is fully unrolled before LLVM's loop vectorizer runs), and the
int32 accumulator is truncated explicitly each step so LLVM keeps 16/32-bit lanes
(``vpmaddwd``) instead of numba's default int64 products.
"""
from __future__ import annotations

import numpy as np

from cpuinfer.gguf import GGMLType

from .base import QuantFormat, f16_scales, f32_to_half_bits, half_bits_to_f32, load_f16
from .jit import fast_kernel, kernel

QK = 32
Q8_0_SIZE = 2 + QK           # 34
Q4_0_SIZE = 2 + QK // 2      # 18
Q4_1_SIZE = 4 + QK // 2      # 20
Q5_0_SIZE = 6 + QK // 2      # 22
Q5_1_SIZE = 8 + QK // 2      # 24


# --- numpy references ------------------------------------------------------------------------

def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] -> uint8 [n, 32]: low nibbles are values 0..15, high nibbles 16..31."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """uint8 [n, 4] (little-endian uint32) -> uint8 [n, 32]: bit j of the word, moved to bit 4."""
    word = qh.copy().view(np.uint32)                     # [n, 1]
    bits = (word >> np.arange(QK, dtype=np.uint32)) & np.uint32(1)
    return (bits << np.uint32(4)).astype(np.uint8)


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """uint8 [n, 34] -> float32 [n, 32]."""
    d = f16_scales(blocks, 0)
    q = blocks[:, 2:34].view(np.int8).astype(np.float32)
    return d * q


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """uint8 [n, 18] -> float32 [n, 32]."""
    d = f16_scales(blocks, 0)
    q = _nibbles(blocks[:, 2:18]).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """uint8 [n, 20] -> float32 [n, 32]."""
    d, m = f16_scales(blocks, 0), f16_scales(blocks, 2)
    q = _nibbles(blocks[:, 4:20]).astype(np.float32)
    return d * q + m


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """uint8 [n, 22] -> float32 [n, 32]."""
    d = f16_scales(blocks, 0)
    q = (_nibbles(blocks[:, 6:22]) | _high_bits(blocks[:, 2:6])).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    """uint8 [n, 24] -> float32 [n, 32]."""
    d, m = f16_scales(blocks, 0), f16_scales(blocks, 2)
    q = (_nibbles(blocks[:, 8:24]) | _high_bits(blocks[:, 4:8])).astype(np.float32)
    return d * q + m


# --- compiled helpers ------------------------------------------------------------------------

@kernel
def _load_u32(row, pos):
    """Little-endian uint32 at ``row[pos:pos + 4]``."""
    return (np.uint32(row[pos]) | (np.uint32(row[pos + 1]) << np.uint32(8))
            | (np.uint32(row[pos + 2]) << np.uint32(16)) | (np.uint32(row[pos + 3]) << np.uint32(24)))


@kernel
def quantize_act_q8(x, xq, xd, xs, exact_sums=False):
    """Quantize float32 activations per 32-block: ``x ≈ xd[b] * xq[32b:32b+32]``.

    ``xq`` int8[k], ``xd`` float32[k/32] (scale, rounded to f16 as ggml stores it),
    ``xs`` float32[k/32] (``f16(max|x|/127 · Σ xq)``, ggml's q8_1 sum; with ``exact_sums``
    the integer ``Σ xq`` itself, exact in float32, as :mod:`quant.interleaved`'s Q4_0/Q8_0
    kernels take it). With ``D = max|x_block| / 127`` each value is off by at
    most ``D · (1/2 + 127 · 2^-11)``: half a step plus the half-precision rounding of the scale.
    """
    nb = xd.shape[0]
    for b in range(nb):
        amax = np.float32(0.0)
        for j in range(b * QK, b * QK + QK):
            amax = max(amax, abs(x[j]))
        # as ggml's quantize_row_q8_0: id = 127/max, round half to even, scale kept as f16
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        d = half_bits_to_f32(f32_to_half_bits(amax / np.float32(127.0)))
        s = 0
        for j in range(b * QK, b * QK + QK):
            q = np.int32(np.rint(x[j] * inv))
            xq[j] = q
            s += q
        xd[b] = d
        if exact_sums:
            xs[b] = np.float32(s)
        else:   # ggml's q8_1 sum, used by Q4_1/Q5_1 for their min term: f16(d · Σq), d unrounded
            xs[b] = half_bits_to_f32(f32_to_half_bits(amax / np.float32(127.0) * np.float32(s)))


# Q8_0 ----------------------------------------------------------------------------------------

@kernel
def _dequant_row_q8_0(row, out):
    for b in range(out.shape[0] // QK):
        o = b * Q8_0_SIZE
        d = load_f16(row, o)
        for j in range(QK):
            out[b * QK + j] = d * np.float32(np.int8(row[o + 2 + j]))


@fast_kernel
def _dot_q8_0(row, x):
    acc = np.float32(0.0)
    for b in range(x.shape[0] // QK):
        o = b * Q8_0_SIZE
        s = np.float32(0.0)
        for j in range(QK):
            s += np.float32(np.int8(row[o + 2 + j])) * x[b * QK + j]
        acc += load_f16(row, o) * s
    return acc


@fast_kernel
def _idot_q8_0(row, xq, xd, xs):
    nb = xd.shape[0]
    ubs = np.uint64(xq.shape[0] // nb)       # 32, unknown to the compiler: no full unroll
    acc = np.float32(0.0)
    for b in range(nb):
        ub = np.uint64(b)
        o = ub * np.uint64(Q8_0_SIZE)
        po = o + np.uint64(2)
        px = ub * ubs
        s = np.int32(0)
        for j in range(ubs):
            s = np.int32(s + np.int32(np.int8(row[po + j])) * np.int32(xq[px + j]))
        acc += load_f16(row, o) * xd[b] * np.float32(s)
    return acc


# Q4_0 ----------------------------------------------------------------------------------------

@kernel
def _dequant_row_q4_0(row, out):
    for b in range(out.shape[0] // QK):
        o = b * Q4_0_SIZE
        d = load_f16(row, o)
        for j in range(QK // 2):
            v = row[o + 2 + j]
            out[b * QK + j] = d * np.float32(np.int32(v & 15) - 8)
            out[b * QK + j + QK // 2] = d * np.float32(np.int32(v >> 4) - 8)


@fast_kernel
def _dot_q4_0(row, x):
    acc = np.float32(0.0)
    for b in range(x.shape[0] // QK):
        o = b * Q4_0_SIZE
        s = np.float32(0.0)
        for j in range(QK // 2):
            v = row[o + 2 + j]
            s += (np.float32(np.int32(v & 15) - 8) * x[b * QK + j]
                  + np.float32(np.int32(v >> 4) - 8) * x[b * QK + j + QK // 2])
        acc += load_f16(row, o) * s
    return acc


@fast_kernel
def _isum_q4(row, po, xq, px, hb, bias):
    """Σ (nibble − bias)·xq over one block: low nibbles of ``row[po:po+hb]`` are elements
    0..hb−1, high nibbles hb..2hb−1 (exact int32)."""
    s = np.int32(0)
    for j in range(hb):
        v = row[po + j]
        s = np.int32(s + (np.int32(v & np.uint8(15)) - bias) * np.int32(xq[px + j])
                     + (np.int32(v >> np.uint8(4)) - bias) * np.int32(xq[px + hb + j]))
    return s


@fast_kernel
def _idot_q4_0(row, xq, xd, xs):
    nb = xd.shape[0]
    ubs = np.uint64(xq.shape[0] // nb)
    hb = ubs >> np.uint64(1)
    acc = np.float32(0.0)
    for b in range(nb):
        ub = np.uint64(b)
        o = ub * np.uint64(Q4_0_SIZE)
        s = _isum_q4(row, o + np.uint64(2), xq, ub * ubs, hb, np.int32(8))
        acc += load_f16(row, o) * xd[b] * np.float32(s)
    return acc


# Q4_1 ----------------------------------------------------------------------------------------

@kernel
def _dequant_row_q4_1(row, out):
    for b in range(out.shape[0] // QK):
        o = b * Q4_1_SIZE
        d = load_f16(row, o)
        m = load_f16(row, o + 2)
        for j in range(QK // 2):
            v = row[o + 4 + j]
            out[b * QK + j] = d * np.float32(v & 15) + m
            out[b * QK + j + QK // 2] = d * np.float32(v >> 4) + m


@fast_kernel
def _dot_q4_1(row, x):
    acc = np.float32(0.0)
    for b in range(x.shape[0] // QK):
        o = b * Q4_1_SIZE
        s = np.float32(0.0)
        sx = np.float32(0.0)
        for j in range(QK // 2):
            v = row[o + 4 + j]
            x0 = x[b * QK + j]
            x1 = x[b * QK + j + QK // 2]
            s += np.float32(v & 15) * x0 + np.float32(v >> 4) * x1
            sx += x0 + x1
        acc += load_f16(row, o) * s + load_f16(row, o + 2) * sx
    return acc


@fast_kernel
def _idot_q4_1(row, xq, xd, xs):
    nb = xd.shape[0]
    ubs = np.uint64(xq.shape[0] // nb)
    hb = ubs >> np.uint64(1)
    acc = np.float32(0.0)
    for b in range(nb):
        ub = np.uint64(b)
        o = ub * np.uint64(Q4_1_SIZE)
        s = _isum_q4(row, o + np.uint64(4), xq, ub * ubs, hb, np.int32(0))
        acc += load_f16(row, o) * xd[b] * np.float32(s) + load_f16(row, o + np.uint64(2)) * xs[b]
    return acc


# Q5_0 ----------------------------------------------------------------------------------------

@kernel
def _dequant_row_q5_0(row, out):
    for b in range(out.shape[0] // QK):
        o = b * Q5_0_SIZE
        d = load_f16(row, o)
        qh = _load_u32(row, o + 2)
        for j in range(QK // 2):
            v = row[o + 6 + j]
            lo = np.int32(v & 15) | np.int32(((qh >> j) & 1) << 4)
            hi = np.int32(v >> 4) | np.int32(((qh >> (j + QK // 2)) & 1) << 4)
            out[b * QK + j] = d * np.float32(lo - 16)
            out[b * QK + j + QK // 2] = d * np.float32(hi - 16)


@fast_kernel
def _dot_q5_0(row, x):
    acc = np.float32(0.0)
    for b in range(x.shape[0] // QK):
        o = b * Q5_0_SIZE
        qh = _load_u32(row, o + 2)
        s = np.float32(0.0)
        for j in range(QK // 2):
            v = row[o + 6 + j]
            lo = np.int32(v & 15) | np.int32(((qh >> j) & 1) << 4)
            hi = np.int32(v >> 4) | np.int32(((qh >> (j + QK // 2)) & 1) << 4)
            s += np.float32(lo - 16) * x[b * QK + j] + np.float32(hi - 16) * x[b * QK + j + QK // 2]
        acc += load_f16(row, o) * s
    return acc


@fast_kernel
def _isum_q5(row, po, qh, xq, px, hb, bias):
    """Σ (q5 − bias)·xq over one block: nibbles of ``row[po:po+hb]`` plus bit j / j+hb of the
    32-bit ``qh`` as the fifth bit (exact int32)."""
    one = np.uint64(1)
    four = np.uint64(4)
    s = np.int32(0)
    for j in range(hb):
        v = np.uint64(row[po + j])
        lo = (v & np.uint64(15)) | (((qh >> j) & one) << four)
        hi = (v >> four) | (((qh >> (j + hb)) & one) << four)
        s = np.int32(s + (np.int32(lo) - bias) * np.int32(xq[px + j])
                     + (np.int32(hi) - bias) * np.int32(xq[px + hb + j]))
    return s


@fast_kernel
def _idot_q5_0(row, xq, xd, xs):
    nb = xd.shape[0]
    ubs = np.uint64(xq.shape[0] // nb)
    hb = ubs >> np.uint64(1)
    acc = np.float32(0.0)
    for b in range(nb):
        ub = np.uint64(b)
        o = ub * np.uint64(Q5_0_SIZE)
        qh = np.uint64(_load_u32(row, o + np.uint64(2)))
        s = _isum_q5(row, o + np.uint64(6), qh, xq, ub * ubs, hb, np.int32(16))
        acc += load_f16(row, o) * xd[b] * np.float32(s)
    return acc


# Q5_1 ----------------------------------------------------------------------------------------

@kernel
def _dequant_row_q5_1(row, out):
    for b in range(out.shape[0] // QK):
        o = b * Q5_1_SIZE
        d = load_f16(row, o)
        m = load_f16(row, o + 2)
        qh = _load_u32(row, o + 4)
        for j in range(QK // 2):
            v = row[o + 8 + j]
            lo = np.int32(v & 15) | np.int32(((qh >> j) & 1) << 4)
            hi = np.int32(v >> 4) | np.int32(((qh >> (j + QK // 2)) & 1) << 4)
            out[b * QK + j] = d * np.float32(lo) + m
            out[b * QK + j + QK // 2] = d * np.float32(hi) + m


@fast_kernel
def _dot_q5_1(row, x):
    acc = np.float32(0.0)
    for b in range(x.shape[0] // QK):
        o = b * Q5_1_SIZE
        qh = _load_u32(row, o + 4)
        s = np.float32(0.0)
        sx = np.float32(0.0)
        for j in range(QK // 2):
            v = row[o + 8 + j]
            lo = np.int32(v & 15) | np.int32(((qh >> j) & 1) << 4)
            hi = np.int32(v >> 4) | np.int32(((qh >> (j + QK // 2)) & 1) << 4)
            x0 = x[b * QK + j]
            x1 = x[b * QK + j + QK // 2]
            s += np.float32(lo) * x0 + np.float32(hi) * x1
            sx += x0 + x1
        acc += load_f16(row, o) * s + load_f16(row, o + 2) * sx
    return acc


@fast_kernel
def _idot_q5_1(row, xq, xd, xs):
    nb = xd.shape[0]
    ubs = np.uint64(xq.shape[0] // nb)
    hb = ubs >> np.uint64(1)
    acc = np.float32(0.0)
    for b in range(nb):
        ub = np.uint64(b)
        o = ub * np.uint64(Q5_1_SIZE)
        qh = np.uint64(_load_u32(row, o + np.uint64(4)))
        s = _isum_q5(row, o + np.uint64(8), qh, xq, ub * ubs, hb, np.int32(0))
        acc += load_f16(row, o) * xd[b] * np.float32(s) + load_f16(row, o + np.uint64(2)) * xs[b]
    return acc


FORMATS: dict[GGMLType, QuantFormat] = {
    GGMLType.Q8_0: QuantFormat(GGMLType.Q8_0, "Q8_0", QK, Q8_0_SIZE, dequantize_q8_0,
                               _dequant_row_q8_0, _dot_q8_0),
    GGMLType.Q4_0: QuantFormat(GGMLType.Q4_0, "Q4_0", QK, Q4_0_SIZE, dequantize_q4_0,
                               _dequant_row_q4_0, _dot_q4_0),
    GGMLType.Q4_1: QuantFormat(GGMLType.Q4_1, "Q4_1", QK, Q4_1_SIZE, dequantize_q4_1,
                               _dequant_row_q4_1, _dot_q4_1),
    GGMLType.Q5_0: QuantFormat(GGMLType.Q5_0, "Q5_0", QK, Q5_0_SIZE, dequantize_q5_0,
                               _dequant_row_q5_0, _dot_q5_0),
    GGMLType.Q5_1: QuantFormat(GGMLType.Q5_1, "Q5_1", QK, Q5_1_SIZE, dequantize_q5_1,
                               _dequant_row_q5_1, _dot_q5_1),
}
"""Registry entries; matmul uses the ``_idot_<f>`` kernels (int8 activations) for all five."""
