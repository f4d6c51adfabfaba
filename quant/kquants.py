"""K-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (super-blocks of QK_K = 256 weights).

Block layouts, byte by byte as in ggml ``ggml-common.h`` (all scalars little-endian; ``f16`` is
IEEE half precision)::

    block_q2_K: scales (16) + qs (64) + d (f16, 2) + dmin (f16, 2)              =  84 bytes / 256
        scales[i]: low nibble = scale, high nibble = min of sub-block i (16 weights each)
        qs: 2-bit quants, 4 per byte; weight = d * scale * q - dmin * min
    block_q3_K: hmask (32) + qs (64) + scales (12) + d (f16, 2)                 = 110 bytes / 256
        16 signed 6-bit scales (16 weights each), stored minus 32: low 4 bits in bytes 0..7
        (two nibbles each), high 2 bits in bytes 8..11 (four pairs each)
        q = 2 low bits from qs - (0 if the hmask bit is set else 4);  weight = d * scale * q
    block_q4_K: d (f16, 2) + dmin (f16, 2) + scales (12) + qs (128)             = 144 bytes / 256
        8 sub-blocks of 32 with 6-bit scale and 6-bit min packed in 12 bytes (get_scale_min_k4)
        qs: 4-bit quants, 64 weights per 32 bytes (low nibbles first, then high nibbles)
        weight = d * scale * q - dmin * min
    block_q5_K: d (f16, 2) + dmin (f16, 2) + scales (12) + qh (32) + qs (128)   = 176 bytes / 256
        as Q4_K, plus a fifth bit per weight from qh (bit 2j for the low-nibble half of 64-group j,
        bit 2j+1 for the high-nibble half)
    block_q6_K: ql (128) + qh (64) + scales (16, int8) + d (f16, 2)             = 210 bytes / 256
        16 signed 8-bit scales (16 weights each); q = (4 bits of ql | 2 bits of qh << 4) - 32;
        weight = d * scale * q

Index arithmetic of the 2/3/6-bit formats (per 128-weight half ``n``, 32-weight group ``j`` in it,
lane ``l`` in 0..31): output ``128n + 32j + l`` reads byte ``32n + l`` of qs shifted by ``2j``, with
the 16-weight scale index ``8n + 2j + l // 16`` (Q6_K: see :func:`dequantize_q6_k`).

Per format ``f`` this module provides (the quant framework registers them via :data:`FORMATS`,
one :class:`quant.base.QuantFormat` per type; fp16 scales are read with :func:`quant.base.load_f16`):

* ``dequantize_f(blocks)`` — numpy reference, ``uint8 [n_blocks, type_size] -> float32
  [n_blocks, 256]``, bit-exact with ``gguf.quants.dequantize`` and ggml's ``dequantize_row_*``.
* ``_dequant_row_f(row, out)`` — compiled row dequantizer (same float operations as the reference,
  so bit-exact; used for embedding lookups and tests, never for whole weight matrices).
* ``_dot_f(row, x)`` — compiled dot of one quantized row with float32 activations, block by
  block without materialising the row (float reductions may be reassociated by LLVM).
"""
from __future__ import annotations

import numpy as np

from cpuinfer.errors import CpuinferError
from cpuinfer.gguf import GGMLType
from .base import QuantFormat, f16_scales, fma32, load_f16
from .jit import fast_kernel, kernel

QK_K = 256
K_SCALE_SIZE = 12  # packed 6-bit scales and mins of Q4_K / Q5_K

Q2_K_TYPE_SIZE = QK_K // 16 + QK_K // 4 + 2 + 2              # 84
Q3_K_TYPE_SIZE = QK_K // 8 + QK_K // 4 + 12 + 2               # 110
Q4_K_TYPE_SIZE = 2 + 2 + K_SCALE_SIZE + QK_K // 2             # 144
Q5_K_TYPE_SIZE = 2 + 2 + K_SCALE_SIZE + QK_K // 8 + QK_K // 2  # 176
Q6_K_TYPE_SIZE = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2       # 210


# --------------------------------------------------------------------------------------------
# numpy references (readable, vectorised over blocks only)
# --------------------------------------------------------------------------------------------

def _check_blocks(blocks: np.ndarray, type_size: int, name: str) -> np.ndarray:
    blocks = np.asarray(blocks)
    if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] != type_size:
        raise CpuinferError(f"{name} blocks: expected uint8 [n_blocks, {type_size}], "
                            f"got {blocks.dtype} {list(blocks.shape)}")
    return blocks


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K/Q5_K 12-byte scales into (scale, min), each uint8 [n_blocks, 8] (6 bits each).

    Sub-blocks 0..3: scale = byte j & 63, min = byte j+4 & 63.  Sub-blocks 4..7: the low 4 bits
    come from byte j+4 (scale: low nibble, min: high nibble), the top 2 bits from the top of
    byte j-4 (scale) and byte j (min).  (ggml's ``get_scale_min_k4``.)
    """
    sc = np.empty((scales.shape[0], 8), np.uint8)
    mn = np.empty((scales.shape[0], 8), np.uint8)
    for j in range(4):
        sc[:, j] = scales[:, j] & 63
        mn[:, j] = scales[:, j + 4] & 63
    for j in range(4, 8):
        sc[:, j] = (scales[:, j + 4] & 0xF) | ((scales[:, j - 4] >> 6) << 4)
        mn[:, j] = (scales[:, j + 4] >> 4) | ((scales[:, j] >> 6) << 4)
    return sc, mn


def dequantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    """Reference Q2_K dequantization: uint8 [n, 84] -> float32 [n, 256]."""
    blocks = _check_blocks(blocks, Q2_K_TYPE_SIZE, "Q2_K")
    scales, qs = blocks[:, 0:16], blocks[:, 16:80]
    d, dmin = f16_scales(blocks, 80), f16_scales(blocks, 82)
    out = np.empty((blocks.shape[0], QK_K), np.float32)
    for n in range(2):
        for j in range(4):
            for h in range(2):
                s = scales[:, 8 * n + 2 * j + h: 8 * n + 2 * j + h + 1]
                dl = d * (s & 0xF).astype(np.float32)
                ml = dmin * (s >> 4).astype(np.float32)
                q = (qs[:, 32 * n + 16 * h: 32 * n + 16 * h + 16] >> (2 * j)) & 3
                o = 128 * n + 32 * j + 16 * h
                out[:, o:o + 16] = dl * q.astype(np.float32) - ml
    return out


def _q3_k_scales(scales: np.ndarray) -> np.ndarray:
    """Unpack Q3_K's 12 bytes into 16 signed scales (int8 [n, 16], already minus 32)."""
    out = np.empty((scales.shape[0], 16), np.int8)
    for j in range(16):
        low = scales[:, j] & 0xF if j < 8 else scales[:, j - 8] >> 4
        high = (scales[:, 8 + j % 4] >> (2 * (j // 4))) & 3
        out[:, j] = (low | (high << 4)).astype(np.int8) - np.int8(32)
    return out


def dequantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """Reference Q3_K dequantization: uint8 [n, 110] -> float32 [n, 256]."""
    blocks = _check_blocks(blocks, Q3_K_TYPE_SIZE, "Q3_K")
    hmask, qs = blocks[:, 0:32], blocks[:, 32:96]
    scales = _q3_k_scales(blocks[:, 96:108])
    d = f16_scales(blocks, 108)
    out = np.empty((blocks.shape[0], QK_K), np.float32)
    for n in range(2):
        for j in range(4):
            hbit = 4 * n + j  # hmask bit of this 32-weight group
            for h in range(2):
                dl = d * scales[:, 8 * n + 2 * j + h: 8 * n + 2 * j + h + 1].astype(np.float32)
                lo = (qs[:, 32 * n + 16 * h: 32 * n + 16 * h + 16] >> (2 * j)) & 3
                hm = (hmask[:, 16 * h: 16 * h + 16] >> hbit) & 1
                q = lo.astype(np.int8) - np.where(hm == 1, 0, 4).astype(np.int8)
                o = 128 * n + 32 * j + 16 * h
                out[:, o:o + 16] = dl * q.astype(np.float32)
    return out


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """Reference Q4_K dequantization: uint8 [n, 144] -> float32 [n, 256]."""
    blocks = _check_blocks(blocks, Q4_K_TYPE_SIZE, "Q4_K")
    d, dmin = f16_scales(blocks, 0), f16_scales(blocks, 2)
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    qs = blocks[:, 16:144]
    out = np.empty((blocks.shape[0], QK_K), np.float32)
    for g in range(4):  # 64-weight group: 32 bytes, low nibbles then high nibbles
        q = qs[:, 32 * g: 32 * g + 32]
        for h, nib in enumerate((q & 0xF, q >> 4)):
            s = 2 * g + h
            d1 = d * sc[:, s:s + 1].astype(np.float32)
            m1 = dmin * mn[:, s:s + 1].astype(np.float32)
            out[:, 32 * s: 32 * s + 32] = d1 * nib.astype(np.float32) - m1
    return out


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """Reference Q5_K dequantization: uint8 [n, 176] -> float32 [n, 256]."""
    blocks = _check_blocks(blocks, Q5_K_TYPE_SIZE, "Q5_K")
    d, dmin = f16_scales(blocks, 0), f16_scales(blocks, 2)
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    qh, qs = blocks[:, 16:48], blocks[:, 48:176]
    out = np.empty((blocks.shape[0], QK_K), np.float32)
    for g in range(4):
        q = qs[:, 32 * g: 32 * g + 32]
        for h, nib in enumerate((q & 0xF, q >> 4)):
            s = 2 * g + h
            q5 = nib | (((qh >> s) & 1) << 4)
            d1 = d * sc[:, s:s + 1].astype(np.float32)
            m1 = dmin * mn[:, s:s + 1].astype(np.float32)
            out[:, 32 * s: 32 * s + 32] = d1 * q5.astype(np.float32) - m1
    return out


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Reference Q6_K dequantization: uint8 [n, 210] -> float32 [n, 256].

    Per 128-weight half ``n``, group ``k`` in 0..3, lane ``l`` in 0..31: output ``128n + 32k + l``
    takes nibble ``k // 2`` of ql byte ``64n + 32(k % 2) + l``, bits ``2k..2k+1`` of qh byte
    ``32n + l``, and scale ``8n + 2k + l // 16``.
    """
    blocks = _check_blocks(blocks, Q6_K_TYPE_SIZE, "Q6_K")
    ql, qh = blocks[:, 0:128], blocks[:, 128:192]
    scales = blocks[:, 192:208].view(np.int8)
    d = f16_scales(blocks, 208)
    out = np.empty((blocks.shape[0], QK_K), np.float32)
    for n in range(2):
        for k in range(4):
            lo = ql[:, 64 * n + 32 * (k % 2): 64 * n + 32 * (k % 2) + 32] >> (4 * (k // 2)) & 0xF
            hi = (qh[:, 32 * n: 32 * n + 32] >> (2 * k)) & 3
            q = (lo | (hi << 4)).astype(np.int8) - np.int8(32)
            for h in range(2):
                s = 8 * n + 2 * k + h
                dl = d * scales[:, s:s + 1].astype(np.float32)
                o = 128 * n + 32 * k + 16 * h
                out[:, o:o + 16] = dl * q[:, 16 * h: 16 * h + 16].astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------
# compiled helpers
# --------------------------------------------------------------------------------------------

@kernel
def _scale_min_at(row, so, j, stride=4):
    """6-bit (scale, min) of sub-block ``j`` from the 12 scale bytes at ``row[so:]`` (Q4_K/Q5_K);
    scale byte ``s`` is at ``so + (s // 4) · stride + s % 4`` (``stride`` 4: contiguous; the
    interleaved layout of :mod:`quant.interleaved` keeps them 4 at a time ``stride`` apart)."""
    b0 = so + j % 4                              # byte j % 4; + stride: byte j % 4 + 4; ...
    if j < 4:
        return np.uint32(row[b0] & 63), np.uint32(row[b0 + stride] & 63)
    b8 = b0 + 2 * stride                         # byte j + 4
    sc = (row[b8] & 0xF) | ((row[b0] >> 6) << 4)
    mn = (row[b8] >> 4) | ((row[b0 + stride] >> 6) << 4)
    return np.uint32(sc), np.uint32(mn)


@kernel
def _q3_scale_at(row, so, j, stride=4):
    """Signed scale (already minus 32) of 16-weight sub-block ``j`` from Q3_K bytes at ``row[so:]``;
    scale byte ``s`` at ``so + (s // 4) · stride + s % 4`` (as :func:`_scale_min_at`)."""
    i = j % 4
    if j < 8:
        low = np.int32(row[so + (j // 4) * stride + i] & 0xF)
    else:
        low = np.int32(row[so + (j // 4 - 2) * stride + i] >> 4)
    high = np.int32((row[so + 2 * stride + i] >> (2 * (j >> 2))) & 3)
    return (low | (high << 4)) - 32


@kernel
def _u8f(v):
    """The low byte of an integer as float32: keeps numba's 64-bit integer typing out of the
    vectorized loops (the conversion becomes byte zero-extension + ``cvtdq2ps``)."""
    return np.float32(np.uint8(v))


@kernel
def _i8_at(row, o):
    """The byte ``row[o]`` read as int8."""
    v = np.int32(row[o])
    return v - 256 if v >= 128 else v


# --------------------------------------------------------------------------------------------
# compiled row dequantizers (same float operations as the references: bit-exact)
# --------------------------------------------------------------------------------------------

@kernel
def _dequant_row_q2_k(row, out):
    """Dequantize one Q2_K row (``out.size // 256`` blocks) into ``out``, as :func:`dequantize_q2_k`."""
    for b in range(out.size // QK_K):
        o, y = b * Q2_K_TYPE_SIZE, b * QK_K
        d = load_f16(row, o + 80)
        dmin = load_f16(row, o + 82)
        for n in range(2):
            for j in range(4):
                shift = 2 * j
                for h in range(2):
                    s = row[o + 8 * n + 2 * j + h]
                    dl = d * np.float32(s & 0xF)
                    ml = dmin * np.float32(s >> 4)
                    qo = o + 16 + 32 * n + 16 * h
                    yo = y + 128 * n + 32 * j + 16 * h
                    for l in range(16):
                        out[yo + l] = dl * np.float32((row[qo + l] >> shift) & 3) - ml


@kernel
def _dequant_row_q3_k(row, out):
    """Dequantize one Q3_K row (``out.size // 256`` blocks) into ``out``, as :func:`dequantize_q3_k`."""
    for b in range(out.size // QK_K):
        o, y = b * Q3_K_TYPE_SIZE, b * QK_K
        d = load_f16(row, o + 108)
        for n in range(2):
            for j in range(4):
                shift = 2 * j
                hbit = 4 * n + j
                for h in range(2):
                    dl = d * np.float32(_q3_scale_at(row, o + 96, 8 * n + 2 * j + h))
                    qo = o + 32 + 32 * n + 16 * h
                    ho = o + 16 * h
                    yo = y + 128 * n + 32 * j + 16 * h
                    for l in range(16):
                        q = np.int32((row[qo + l] >> shift) & 3)
                        if not (row[ho + l] >> hbit) & 1:
                            q -= 4
                        out[yo + l] = dl * np.float32(q)


@kernel
def _dequant_row_q4_k(row, out):
    """Dequantize one Q4_K row (``out.size // 256`` blocks) into ``out``, as :func:`dequantize_q4_k`."""
    for b in range(out.size // QK_K):
        o, y = b * Q4_K_TYPE_SIZE, b * QK_K
        d = load_f16(row, o)
        dmin = load_f16(row, o + 2)
        for g in range(4):
            sc1, m1 = _scale_min_at(row, o + 4, 2 * g)
            sc2, m2 = _scale_min_at(row, o + 4, 2 * g + 1)
            d1, dm1 = d * np.float32(sc1), dmin * np.float32(m1)
            d2, dm2 = d * np.float32(sc2), dmin * np.float32(m2)
            qo = o + 16 + 32 * g
            yo = y + 64 * g
            for l in range(32):
                q = row[qo + l]
                out[yo + l] = d1 * np.float32(q & 0xF) - dm1
                out[yo + 32 + l] = d2 * np.float32(q >> 4) - dm2


@kernel
def _dequant_row_q5_k(row, out):
    """Dequantize one Q5_K row (``out.size // 256`` blocks) into ``out``, as :func:`dequantize_q5_k`."""
    for b in range(out.size // QK_K):
        o, y = b * Q5_K_TYPE_SIZE, b * QK_K
        d = load_f16(row, o)
        dmin = load_f16(row, o + 2)
        for g in range(4):
            sc1, m1 = _scale_min_at(row, o + 4, 2 * g)
            sc2, m2 = _scale_min_at(row, o + 4, 2 * g + 1)
            d1, dm1 = d * np.float32(sc1), dmin * np.float32(m1)
            d2, dm2 = d * np.float32(sc2), dmin * np.float32(m2)
            qo = o + 48 + 32 * g
            yo = y + 64 * g
            for l in range(32):
                q = row[qo + l]
                hb = row[o + 16 + l] >> (2 * g)
                out[yo + l] = d1 * np.float32((q & 0xF) | ((hb & 1) << 4)) - dm1
                out[yo + 32 + l] = d2 * np.float32((q >> 4) | ((hb & 2) << 3)) - dm2


@kernel
def _dequant_row_q6_k(row, out):
    """Dequantize one Q6_K row (``out.size // 256`` blocks) into ``out``, as :func:`dequantize_q6_k`."""
    for b in range(out.size // QK_K):
        o, y = b * Q6_K_TYPE_SIZE, b * QK_K
        d = load_f16(row, o + 208)
        for n in range(2):
            for k in range(4):
                lo_o = o + 64 * n + 32 * (k & 1)
                lo_shift = 4 * (k >> 1)
                hi_o = o + 128 + 32 * n
                for h in range(2):
                    dl = d * np.float32(_i8_at(row, o + 192 + 8 * n + 2 * k + h))
                    yo = y + 128 * n + 32 * k + 16 * h
                    for l in range(16 * h, 16 * h + 16):
                        q = np.int32(((row[lo_o + l] >> lo_shift) & 0xF)
                                     | (((row[hi_o + l] >> (2 * k)) & 3) << 4)) - 32
                        out[yo + l - 16 * h] = dl * np.float32(q)


# --------------------------------------------------------------------------------------------
# compiled dot products: one quantized row . float32 x, block by block
# --------------------------------------------------------------------------------------------

@kernel
def _q2_sub_scale(row, so, d, dmin):
    """(d·scale, dmin·min) for the Q2_K scale byte at ``row[so]``: weight = q·ds − dm."""
    s = row[so]
    return d * np.float32(s & 0xF), dmin * np.float32(s >> 4)


@fast_kernel
def _dot_q2_k(row, x):
    """Q2_K row · x.  Per 128-weight half the lane loop covers 16 lanes with all 8 sub-blocks of
    16 in its body (see :func:`_dot_q4_k`); group j of a qs byte is bits 2j..2j+1."""
    acc = np.float32(0.0)
    for b in range(x.size // QK_K):
        o, y = b * Q2_K_TYPE_SIZE, b * QK_K
        d = load_f16(row, o + 80)
        dmin = load_f16(row, o + 82)
        for n in range(2):
            so = o + 8 * n
            ds0, dm0 = _q2_sub_scale(row, so + 0, d, dmin)
            ds1, dm1 = _q2_sub_scale(row, so + 1, d, dmin)
            ds2, dm2 = _q2_sub_scale(row, so + 2, d, dmin)
            ds3, dm3 = _q2_sub_scale(row, so + 3, d, dmin)
            ds4, dm4 = _q2_sub_scale(row, so + 4, d, dmin)
            ds5, dm5 = _q2_sub_scale(row, so + 5, d, dmin)
            ds6, dm6 = _q2_sub_scale(row, so + 6, d, dmin)
            ds7, dm7 = _q2_sub_scale(row, so + 7, d, dmin)
            qo = o + 16 + 32 * n
            yo = y + 128 * n
            for l in range(16):
                a = row[qo + l]        # lanes 0..15 of groups 0..3
                c = row[qo + 16 + l]   # lanes 16..31 of groups 0..3
                acc += ((_u8f(a & 3) * ds0 - dm0) * x[yo + l]
                        + (_u8f(c & 3) * ds1 - dm1) * x[yo + 16 + l]
                        + (_u8f((a >> 2) & 3) * ds2 - dm2) * x[yo + 32 + l]
                        + (_u8f((c >> 2) & 3) * ds3 - dm3) * x[yo + 48 + l]
                        + (_u8f((a >> 4) & 3) * ds4 - dm4) * x[yo + 64 + l]
                        + (_u8f((c >> 4) & 3) * ds5 - dm5) * x[yo + 80 + l]
                        + (_u8f(a >> 6) * ds6 - dm6) * x[yo + 96 + l]
                        + (_u8f(c >> 6) * ds7 - dm7) * x[yo + 112 + l])
    return acc


@kernel
def _q3_sub_scale(row, so, j, d):
    """(d·scale, 4·d·scale) of Q3_K sub-block ``j``: with q = 2 low bits | hmask bit << 2 (0..7),
    the weight is q·ds − dm."""
    ds = d * np.float32(_q3_scale_at(row, so, j))
    return ds, np.float32(4.0) * ds


@fast_kernel
def _dot_q3_k(row, x):
    """Q3_K row · x, laid out like :func:`_dot_q2_k` plus the hmask bit (bit 4n + j of hmask byte
    ``lane``) as the third bit."""
    acc = np.float32(0.0)
    for b in range(x.size // QK_K):
        o, y = b * Q3_K_TYPE_SIZE, b * QK_K
        d = load_f16(row, o + 108)
        for n in range(2):
            ds0, dm0 = _q3_sub_scale(row, o + 96, 8 * n + 0, d)
            ds1, dm1 = _q3_sub_scale(row, o + 96, 8 * n + 1, d)
            ds2, dm2 = _q3_sub_scale(row, o + 96, 8 * n + 2, d)
            ds3, dm3 = _q3_sub_scale(row, o + 96, 8 * n + 3, d)
            ds4, dm4 = _q3_sub_scale(row, o + 96, 8 * n + 4, d)
            ds5, dm5 = _q3_sub_scale(row, o + 96, 8 * n + 5, d)
            ds6, dm6 = _q3_sub_scale(row, o + 96, 8 * n + 6, d)
            ds7, dm7 = _q3_sub_scale(row, o + 96, 8 * n + 7, d)
            qo = o + 32 + 32 * n
            yo = y + 128 * n
            hs = 4 * n
            for l in range(16):
                a = row[qo + l]                   # low bits, lanes 0..15 of groups 0..3
                c = row[qo + 16 + l]              # low bits, lanes 16..31
                ha = (row[o + l] >> hs) << 2      # hmask bits of groups 0..3 at bits 2..5
                hc = (row[o + 16 + l] >> hs) << 2
                acc += ((_u8f((a & 3) | (ha & 4)) * ds0 - dm0) * x[yo + l]
                        + (_u8f((c & 3) | (hc & 4)) * ds1 - dm1) * x[yo + 16 + l]
                        + (_u8f(((a >> 2) & 3) | ((ha >> 1) & 4)) * ds2 - dm2) * x[yo + 32 + l]
                        + (_u8f(((c >> 2) & 3) | ((hc >> 1) & 4)) * ds3 - dm3) * x[yo + 48 + l]
                        + (_u8f(((a >> 4) & 3) | ((ha >> 2) & 4)) * ds4 - dm4) * x[yo + 64 + l]
                        + (_u8f(((c >> 4) & 3) | ((hc >> 2) & 4)) * ds5 - dm5) * x[yo + 80 + l]
                        + (_u8f((a >> 6) | ((ha >> 3) & 4)) * ds6 - dm6) * x[yo + 96 + l]
                        + (_u8f((c >> 6) | ((hc >> 3) & 4)) * ds7 - dm7) * x[yo + 112 + l])
    return acc


@kernel
def _k4_sub_scale(row, o, j, d, dmin):
    """(d·scale, dmin·min) of sub-block ``j`` of the Q4_K/Q5_K block at ``row[o:]``."""
    sc, mn = _scale_min_at(row, o + 4, j)
    return d * np.float32(sc), dmin * np.float32(mn)


@fast_kernel
def _dot_q4_k(row, x):
    """Q4_K row · x.  Each weight is ``q·ds_s − dm_s`` (sub-block s of 32), so the lane loop runs
    over the 32 bytes of each quarter with all 8 sub-blocks in its body: LLVM vectorizes across
    lanes and reduces the vector accumulator once per block, not once per sub-block."""
    acc = np.float32(0.0)
    for b in range(x.size // QK_K):
        o, y = b * Q4_K_TYPE_SIZE, b * QK_K
        d = load_f16(row, o)
        dmin = load_f16(row, o + 2)
        ds0, dm0 = _k4_sub_scale(row, o, 0, d, dmin)
        ds1, dm1 = _k4_sub_scale(row, o, 1, d, dmin)
        ds2, dm2 = _k4_sub_scale(row, o, 2, d, dmin)
        ds3, dm3 = _k4_sub_scale(row, o, 3, d, dmin)
        ds4, dm4 = _k4_sub_scale(row, o, 4, d, dmin)
        ds5, dm5 = _k4_sub_scale(row, o, 5, d, dmin)
        ds6, dm6 = _k4_sub_scale(row, o, 6, d, dmin)
        ds7, dm7 = _k4_sub_scale(row, o, 7, d, dmin)
        qo = o + 16
        for l in range(32):
            q0 = row[qo + l]
            q1 = row[qo + 32 + l]
            q2 = row[qo + 64 + l]
            q3 = row[qo + 96 + l]
            acc += ((_u8f(q0 & 0xF) * ds0 - dm0) * x[y + l]
                    + (_u8f(q0 >> 4) * ds1 - dm1) * x[y + 32 + l]
                    + (_u8f(q1 & 0xF) * ds2 - dm2) * x[y + 64 + l]
                    + (_u8f(q1 >> 4) * ds3 - dm3) * x[y + 96 + l]
                    + (_u8f(q2 & 0xF) * ds4 - dm4) * x[y + 128 + l]
                    + (_u8f(q2 >> 4) * ds5 - dm5) * x[y + 160 + l]
                    + (_u8f(q3 & 0xF) * ds6 - dm6) * x[y + 192 + l]
                    + (_u8f(q3 >> 4) * ds7 - dm7) * x[y + 224 + l])
    return acc


@fast_kernel
def _dot_q5_k(row, x):
    """Q5_K row · x, laid out like :func:`_dot_q4_k`; the fifth bit of sub-block s is bit s of
    qh byte ``lane``."""
    acc = np.float32(0.0)
    for b in range(x.size // QK_K):
        o, y = b * Q5_K_TYPE_SIZE, b * QK_K
        d = load_f16(row, o)
        dmin = load_f16(row, o + 2)
        ds0, dm0 = _k4_sub_scale(row, o, 0, d, dmin)
        ds1, dm1 = _k4_sub_scale(row, o, 1, d, dmin)
        ds2, dm2 = _k4_sub_scale(row, o, 2, d, dmin)
        ds3, dm3 = _k4_sub_scale(row, o, 3, d, dmin)
        ds4, dm4 = _k4_sub_scale(row, o, 4, d, dmin)
        ds5, dm5 = _k4_sub_scale(row, o, 5, d, dmin)
        ds6, dm6 = _k4_sub_scale(row, o, 6, d, dmin)
        ds7, dm7 = _k4_sub_scale(row, o, 7, d, dmin)
        qo = o + 48
        for l in range(32):
            q0 = row[qo + l]
            q1 = row[qo + 32 + l]
            q2 = row[qo + 64 + l]
            q3 = row[qo + 96 + l]
            h = row[o + 16 + l]
            acc += ((_u8f((q0 & 0xF) | ((h & 1) << 4)) * ds0 - dm0) * x[y + l]
                    + (_u8f((q0 >> 4) | ((h & 2) << 3)) * ds1 - dm1) * x[y + 32 + l]
                    + (_u8f((q1 & 0xF) | ((h & 4) << 2)) * ds2 - dm2) * x[y + 64 + l]
                    + (_u8f((q1 >> 4) | ((h & 8) << 1)) * ds3 - dm3) * x[y + 96 + l]
                    + (_u8f((q2 & 0xF) | (h & 16)) * ds4 - dm4) * x[y + 128 + l]
                    + (_u8f((q2 >> 4) | ((h & 32) >> 1)) * ds5 - dm5) * x[y + 160 + l]
                    + (_u8f((q3 & 0xF) | ((h & 64) >> 2)) * ds6 - dm6) * x[y + 192 + l]
                    + (_u8f((q3 >> 4) | ((h & 128) >> 3)) * ds7 - dm7) * x[y + 224 + l])
    return acc


@kernel
def _q6_sub_scale(row, so, d):
    """(d·scale, 32·d·scale) for the Q6_K int8 scale at ``row[so]``: weight = q·ds − dm."""
    ds = d * np.float32(_i8_at(row, so))
    return ds, np.float32(32.0) * ds


@fast_kernel
def _dot_q6_k(row, x):
    """Q6_K row · x.  Weight ``q·ds − 32·ds`` (q = 0..63, ds = d·scale of its 16 weights); per
    128-weight half the lane loop covers 16 lanes with all 8 sub-blocks in its body (see
    :func:`_dot_q4_k`)."""
    acc = np.float32(0.0)
    for b in range(x.size // QK_K):
        o, y = b * Q6_K_TYPE_SIZE, b * QK_K
        d = load_f16(row, o + 208)
        for n in range(2):
            so = o + 192 + 8 * n
            ds0, dm0 = _q6_sub_scale(row, so + 0, d)
            ds1, dm1 = _q6_sub_scale(row, so + 1, d)
            ds2, dm2 = _q6_sub_scale(row, so + 2, d)
            ds3, dm3 = _q6_sub_scale(row, so + 3, d)
            ds4, dm4 = _q6_sub_scale(row, so + 4, d)
            ds5, dm5 = _q6_sub_scale(row, so + 5, d)
            ds6, dm6 = _q6_sub_scale(row, so + 6, d)
            ds7, dm7 = _q6_sub_scale(row, so + 7, d)
            lo_o = o + 64 * n
            hi_o = o + 128 + 32 * n
            yo = y + 128 * n
            for l in range(16):
                a0 = row[lo_o + l]        # lanes 0..15 of groups 0 (low nibble) and 2 (high)
                a1 = row[lo_o + 16 + l]   # lanes 16..31 of groups 0 and 2
                b0 = row[lo_o + 32 + l]   # lanes 0..15 of groups 1 and 3
                b1 = row[lo_o + 48 + l]   # lanes 16..31 of groups 1 and 3
                h0 = row[hi_o + l]        # 2 high bits of groups 0..3, lanes 0..15
                h1 = row[hi_o + 16 + l]   # same, lanes 16..31
                acc += ((_u8f((a0 & 0xF) | ((h0 & 3) << 4)) * ds0 - dm0) * x[yo + l]
                        + (_u8f((a1 & 0xF) | ((h1 & 3) << 4)) * ds1 - dm1) * x[yo + 16 + l]
                        + (_u8f((b0 & 0xF) | ((h0 & 12) << 2)) * ds2 - dm2) * x[yo + 32 + l]
                        + (_u8f((b1 & 0xF) | ((h1 & 12) << 2)) * ds3 - dm3) * x[yo + 48 + l]
                        + (_u8f((a0 >> 4) | (h0 & 48)) * ds4 - dm4) * x[yo + 64 + l]
                        + (_u8f((a1 >> 4) | (h1 & 48)) * ds5 - dm5) * x[yo + 80 + l]
                        + (_u8f((b0 >> 4) | ((h0 >> 6) << 4)) * ds6 - dm6) * x[yo + 96 + l]
                        + (_u8f((b1 >> 4) | ((h1 >> 6) << 4)) * ds7 - dm7) * x[yo + 112 + l])
    return acc


# --------------------------------------------------------------------------------------------
# registry data
# --------------------------------------------------------------------------------------------

def _format(qtype: GGMLType, type_size: int, ref, row, dot) -> QuantFormat:
    return QuantFormat(qtype, qtype.name, QK_K, type_size, ref, row, dot)


FORMATS: dict[GGMLType, QuantFormat] = {
    GGMLType.Q2_K: _format(GGMLType.Q2_K, Q2_K_TYPE_SIZE, dequantize_q2_k, _dequant_row_q2_k, _dot_q2_k),
    GGMLType.Q3_K: _format(GGMLType.Q3_K, Q3_K_TYPE_SIZE, dequantize_q3_k, _dequant_row_q3_k, _dot_q3_k),
    GGMLType.Q4_K: _format(GGMLType.Q4_K, Q4_K_TYPE_SIZE, dequantize_q4_k, _dequant_row_q4_k, _dot_q4_k),
    GGMLType.Q5_K: _format(GGMLType.Q5_K, Q5_K_TYPE_SIZE, dequantize_q5_k, _dequant_row_q5_k, _dot_q5_k),
    GGMLType.Q6_K: _format(GGMLType.Q6_K, Q6_K_TYPE_SIZE, dequantize_q6_k, _dequant_row_q6_k, _dot_q6_k),
}
KQUANT_FORMATS = FORMATS  # the name the quant registry imports


# --------------------------------------------------------------------------------------------
# Q8_K activations and the integer row dots (llama.cpp's vec_dot_q<n>_K_q8_K scheme)
# --------------------------------------------------------------------------------------------
#
# llama.cpp multiplies K-quant weights with activations quantized per 256-block to Q8_K
# (``quantize_row_q8_K_ref``, which the x86 CPU backend uses as is): with ``mx`` the value of
# largest magnitude (its sign kept), ``iscale = -127 / mx``, ``q = min(127, round(iscale · x))``
# (round half to even), the scale ``d = 1 / iscale`` kept as float32, and ``bsums[16]`` the sums
# of each 16 quants. The row dots below follow the AVX2 ``ggml_vec_dot_q<n>_K_q8_K`` per block:
# an exact int32 sum of ``scale · q · q8`` over the block, times ``d = d_x · f16(x.d)``, plus for
# the formats with mins the ``−d_x · f16(x.dmin) · Σ min · bsum`` term from the block sums.
# One exact integer total per block, one fma per block: that is also how llama.cpp runs Q4_K on
# AVX2 CPUs, whose Q4_K weights it repacks 8 rows at a time (``ggml_gemv/gemm_q4_K_8x8_q8_K``).
# ggml's plain AVX2 ``vec_dot`` kernels spread the sum over 8 float lanes instead, which rounds
# differently by a few ulps of the row result; :mod:`quant.avx2` reproduces those lanes for Q6_K.


@kernel
def quantize_act_q8k(x, xq, xd, xb):
    """Quantize float32 activations per 256-block like ggml's ``quantize_row_q8_K_ref``.

    ``x`` float32[k], ``xq`` int8[k], ``xd`` float32[k/256] (``1 / iscale``; 0 for an all-zero
    block), ``xb`` int16[k/16] (sum of each 16 quants). Each value is off by at most half a step
    ``|xd[b]|/2`` (the clamp to 127 only moves values already within that).
    """
    nb = xd.shape[0]
    for b in range(nb):
        y = b * QK_K
        amax = np.float32(0.0)
        mx = np.float32(0.0)
        for j in range(y, y + QK_K):
            ax = abs(x[j])
            if ax > amax:
                amax = ax
                mx = x[j]
        if amax == 0:
            xd[b] = np.float32(0.0)
            for j in range(y, y + QK_K):
                xq[j] = 0
            for g in range(b * 16, b * 16 + 16):
                xb[g] = 0
            continue
        iscale = np.float32(-127.0) / mx
        for j in range(y, y + QK_K):
            v = np.rint(iscale * x[j])           # float32 product, round half to even
            xq[j] = np.int8(min(np.float32(127.0), v))
        for g in range(16):
            s = np.int32(0)
            for j in range(y + 16 * g, y + 16 * g + 16):
                s += np.int32(xq[j])
            xb[b * 16 + g] = np.int16(s)
        xd[b] = np.float32(1.0) / iscale


@kernel
def _idot_q2_k(row, xq, xd, xb):
    """Q2_K row · Q8_K activations: per block ``d·Σ_s sc_s·Σ q·q8 − dmin·Σ_s m_s·bsum_s`` (the
    min term first, as ggml's AVX2 loop)."""
    nb = xd.shape[0]
    u16 = np.uint64(xq.shape[0] // nb) >> np.uint64(4)     # 16
    acc = np.float32(0.0)
    for b in range(nb):
        ub = np.uint64(b)
        o = ub * np.uint64(Q2_K_TYPE_SIZE)
        dy = xd[b]
        d = dy * load_f16(row, o + np.uint64(80))
        dmin = -(dy * load_f16(row, o + np.uint64(82)))
        summ = np.int32(0)
        for s in range(16):
            summ = np.int32(summ + np.int32(row[o + np.uint64(s)] >> 4) * np.int32(xb[b * 16 + s]))
        sumi = np.int32(0)
        for n in range(2):
            un = np.uint64(n)
            qo = o + np.uint64(16) + np.uint64(32) * un
            px = ub * np.uint64(QK_K) + np.uint64(128) * un
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.int32(0)
            for l in range(u16):
                a = row[qo + l]
                c = row[qo + u16 + l]
                s0 = np.int32(s0 + np.int32(a & np.uint8(3)) * np.int32(xq[px + l]))
                s1 = np.int32(s1 + np.int32(c & np.uint8(3)) * np.int32(xq[px + np.uint64(16) + l]))
                s2 = np.int32(s2 + np.int32((a >> np.uint8(2)) & np.uint8(3)) * np.int32(xq[px + np.uint64(32) + l]))
                s3 = np.int32(s3 + np.int32((c >> np.uint8(2)) & np.uint8(3)) * np.int32(xq[px + np.uint64(48) + l]))
                s4 = np.int32(s4 + np.int32((a >> np.uint8(4)) & np.uint8(3)) * np.int32(xq[px + np.uint64(64) + l]))
                s5 = np.int32(s5 + np.int32((c >> np.uint8(4)) & np.uint8(3)) * np.int32(xq[px + np.uint64(80) + l]))
                s6 = np.int32(s6 + np.int32(a >> np.uint8(6)) * np.int32(xq[px + np.uint64(96) + l]))
                s7 = np.int32(s7 + np.int32(c >> np.uint8(6)) * np.int32(xq[px + np.uint64(112) + l]))
            so = o + np.uint64(8) * un
            sumi = np.int32(sumi + np.int32(row[so] & np.uint8(15)) * s0 + np.int32(row[so + np.uint64(1)] & np.uint8(15)) * s1
                        + np.int32(row[so + np.uint64(2)] & np.uint8(15)) * s2 + np.int32(row[so + np.uint64(3)] & np.uint8(15)) * s3
                        + np.int32(row[so + np.uint64(4)] & np.uint8(15)) * s4 + np.int32(row[so + np.uint64(5)] & np.uint8(15)) * s5
                        + np.int32(row[so + np.uint64(6)] & np.uint8(15)) * s6 + np.int32(row[so + np.uint64(7)] & np.uint8(15)) * s7)
        acc = fma32(dmin, np.float32(summ), acc)
        acc = fma32(d, np.float32(sumi), acc)
    return acc


@kernel
def _idot_q3_k(row, xq, xd, xb):
    """Q3_K row · Q8_K activations: per block ``d·Σ_s sc_s·Σ q·q8`` with the signed 3-bit
    ``q = low 2 bits − (0 if the hmask bit is set else 4)``."""
    nb = xd.shape[0]
    u16 = np.uint64(xq.shape[0] // nb) >> np.uint64(4)     # 16
    acc = np.float32(0.0)
    for b in range(nb):
        ub = np.uint64(b)
        o = ub * np.uint64(Q3_K_TYPE_SIZE)
        d = xd[b] * load_f16(row, o + np.uint64(108))
        sumi = np.int32(0)
        for n in range(2):
            un = np.uint64(n)
            qo = o + np.uint64(32) + np.uint64(32) * un
            px = ub * np.uint64(QK_K) + np.uint64(128) * un
            hs = np.uint8(4 * n)
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.int32(0)
            for l in range(u16):
                a = row[qo + l]
                c = row[qo + u16 + l]
                ha = (row[o + l] >> hs) << np.uint8(2)          # hmask bits of groups 0..3 at 2..5
                hc = (row[o + u16 + l] >> hs) << np.uint8(2)
                s0 = np.int32(s0 + (np.int32((a & np.uint8(3)) | (ha & np.uint8(4))) - 4) * np.int32(xq[px + l]))
                s1 = np.int32(s1 + (np.int32((c & np.uint8(3)) | (hc & np.uint8(4))) - 4) * np.int32(xq[px + np.uint64(16) + l]))
                s2 = np.int32(s2 + (np.int32(((a >> np.uint8(2)) & np.uint8(3)) | ((ha >> np.uint8(1)) & np.uint8(4))) - 4)
                          * np.int32(xq[px + np.uint64(32) + l]))
                s3 = np.int32(s3 + (np.int32(((c >> np.uint8(2)) & np.uint8(3)) | ((hc >> np.uint8(1)) & np.uint8(4))) - 4)
                          * np.int32(xq[px + np.uint64(48) + l]))
                s4 = np.int32(s4 + (np.int32(((a >> np.uint8(4)) & np.uint8(3)) | ((ha >> np.uint8(2)) & np.uint8(4))) - 4)
                          * np.int32(xq[px + np.uint64(64) + l]))
                s5 = np.int32(s5 + (np.int32(((c >> np.uint8(4)) & np.uint8(3)) | ((hc >> np.uint8(2)) & np.uint8(4))) - 4)
                          * np.int32(xq[px + np.uint64(80) + l]))
                s6 = np.int32(s6 + (np.int32((a >> np.uint8(6)) | ((ha >> np.uint8(3)) & np.uint8(4))) - 4)
                          * np.int32(xq[px + np.uint64(96) + l]))
                s7 = np.int32(s7 + (np.int32((c >> np.uint8(6)) | ((hc >> np.uint8(3)) & np.uint8(4))) - 4)
                          * np.int32(xq[px + np.uint64(112) + l]))
            so = b * Q3_K_TYPE_SIZE + 96
            j = 8 * n
            sumi = np.int32(sumi + _q3_scale_at(row, so, j) * s0 + _q3_scale_at(row, so, j + 1) * s1
                        + _q3_scale_at(row, so, j + 2) * s2 + _q3_scale_at(row, so, j + 3) * s3
                        + _q3_scale_at(row, so, j + 4) * s4 + _q3_scale_at(row, so, j + 5) * s5
                        + _q3_scale_at(row, so, j + 6) * s6 + _q3_scale_at(row, so, j + 7) * s7)
        acc = fma32(d, np.float32(sumi), acc)
    return acc


@kernel
def _k4_min_term(row, so, xb, b):
    """``Σ_j min_j · (bsum[2j] + bsum[2j+1])`` of a Q4_K/Q5_K block (scales at ``row[so:]``)."""
    m = np.int32(0)
    for j in range(8):
        sc, mn = _scale_min_at(row, so, j)
        m += np.int32(mn) * (np.int32(xb[b * 16 + 2 * j]) + np.int32(xb[b * 16 + 2 * j + 1]))
    return m


@kernel
def _k4_sumi(row, qo, so, xq, px, u32, hq, hmask):
    """``Σ_j scale_j · Σ q·q8`` of one Q4_K or Q5_K block: ``qo``/``px`` the offsets of its quants
    and activations, ``so`` of its scales, ``hq`` of Q5_K's 32 high-bit bytes, read through
    ``hmask`` (255 for Q5_K; 0 for Q4_K, so any in-row offset will do)."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.int32(0)
    m4 = np.uint8(15)
    for l in range(u32):
        q0 = row[qo + l]
        q1 = row[qo + u32 + l]
        q2 = row[qo + np.uint64(64) + l]
        q3 = row[qo + np.uint64(96) + l]
        h = row[hq + l] & hmask
        s0 = np.int32(s0 + np.int32((q0 & m4) | ((h & np.uint8(1)) << np.uint8(4))) * np.int32(xq[px + l]))
        s1 = np.int32(s1 + np.int32((q0 >> np.uint8(4)) | ((h & np.uint8(2)) << np.uint8(3))) * np.int32(xq[px + u32 + l]))
        s2 = np.int32(s2 + np.int32((q1 & m4) | ((h & np.uint8(4)) << np.uint8(2))) * np.int32(xq[px + np.uint64(64) + l]))
        s3 = np.int32(s3 + np.int32((q1 >> np.uint8(4)) | ((h & np.uint8(8)) << np.uint8(1))) * np.int32(xq[px + np.uint64(96) + l]))
        s4 = np.int32(s4 + np.int32((q2 & m4) | (h & np.uint8(16))) * np.int32(xq[px + np.uint64(128) + l]))
        s5 = np.int32(s5 + np.int32((q2 >> np.uint8(4)) | ((h & np.uint8(32)) >> np.uint8(1))) * np.int32(xq[px + np.uint64(160) + l]))
        s6 = np.int32(s6 + np.int32((q3 & m4) | ((h & np.uint8(64)) >> np.uint8(2))) * np.int32(xq[px + np.uint64(192) + l]))
        s7 = np.int32(s7 + np.int32((q3 >> np.uint8(4)) | ((h & np.uint8(128)) >> np.uint8(3))) * np.int32(xq[px + np.uint64(224) + l]))
    return np.int32(np.int32(_scale_min_at(row, so, 0)[0]) * s0 + np.int32(_scale_min_at(row, so, 1)[0]) * s1
                + np.int32(_scale_min_at(row, so, 2)[0]) * s2 + np.int32(_scale_min_at(row, so, 3)[0]) * s3
                + np.int32(_scale_min_at(row, so, 4)[0]) * s4 + np.int32(_scale_min_at(row, so, 5)[0]) * s5
                + np.int32(_scale_min_at(row, so, 6)[0]) * s6 + np.int32(_scale_min_at(row, so, 7)[0]) * s7)


@kernel
def _k45_dot(row, xq, xd, xb, block_size, qs_at, qh_at, qh_mask):
    """Q4_K/Q5_K row · Q8_K activations: ``Σ_b d_b·sumi_b`` plus the min term
    ``Σ_b dmin_b·summ_b`` accumulated apart and added at the end (ggml's AVX2 ``acc`` and
    ``acc_m`` / ``summs``). Blocks of ``block_size`` bytes, quants at ``qs_at``; Q5_K's fifth
    bit from ``qh_at`` (``qh_mask`` 255; Q4_K: 0)."""
    nb = xd.shape[0]
    u32 = np.uint64(xq.shape[0] // nb) >> np.uint64(3)     # 32
    acc = np.float32(0.0)
    acc_m = np.float32(0.0)
    for b in range(nb):
        ub = np.uint64(b)
        o = ub * np.uint64(block_size)
        dy = xd[b]
        d = dy * load_f16(row, o)
        dmin = -(dy * load_f16(row, o + np.uint64(2)))
        so = b * block_size + 4
        acc_m = fma32(dmin, np.float32(_k4_min_term(row, so, xb, b)), acc_m)
        acc = fma32(d, np.float32(_k4_sumi(row, o + np.uint64(qs_at), so, xq, ub * np.uint64(QK_K),
                                           u32, o + np.uint64(qh_at), qh_mask)), acc)
    return acc + acc_m


@kernel
def _idot_q4_k(row, xq, xd, xb):
    """Q4_K row · Q8_K activations (:func:`_k45_dot`)."""
    return _k45_dot(row, xq, xd, xb, Q4_K_TYPE_SIZE, 16, 0, np.uint8(0))


@kernel
def _idot_q5_k(row, xq, xd, xb):
    """Q5_K row · Q8_K activations, as Q4_K with the fifth bit from qh (:func:`_k45_dot`)."""
    return _k45_dot(row, xq, xd, xb, Q5_K_TYPE_SIZE, 48, 16, np.uint8(255))


@kernel
def _idot_q6_k(row, xq, xd, xb):
    """Q6_K row · Q8_K activations: per block ``d·Σ_s sc_s·(Σ q6·q8 − 32·bsum_s)`` with
    ``q6 = 0..63`` (the −32 offset taken from the block sums)."""
    nb = xd.shape[0]
    u16 = np.uint64(xq.shape[0] // nb) >> np.uint64(4)     # 16
    m4 = np.uint8(15)
    acc = np.float32(0.0)
    for b in range(nb):
        ub = np.uint64(b)
        o = ub * np.uint64(Q6_K_TYPE_SIZE)
        d = xd[b] * load_f16(row, o + np.uint64(208))
        sumi = np.int32(0)
        for n in range(2):
            un = np.uint64(n)
            lo_o = o + np.uint64(64) * un
            hi_o = o + np.uint64(128) + np.uint64(32) * un
            px = ub * np.uint64(QK_K) + np.uint64(128) * un
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.int32(0)
            for l in range(u16):
                a0 = row[lo_o + l]
                a1 = row[lo_o + u16 + l]
                b0 = row[lo_o + np.uint64(32) + l]
                b1 = row[lo_o + np.uint64(48) + l]
                h0 = row[hi_o + l]
                h1 = row[hi_o + u16 + l]
                s0 = np.int32(s0 + np.int32((a0 & m4) | ((h0 & np.uint8(3)) << np.uint8(4))) * np.int32(xq[px + l]))
                s1 = np.int32(s1 + np.int32((a1 & m4) | ((h1 & np.uint8(3)) << np.uint8(4))) * np.int32(xq[px + np.uint64(16) + l]))
                s2 = np.int32(s2 + np.int32((b0 & m4) | ((h0 & np.uint8(12)) << np.uint8(2))) * np.int32(xq[px + np.uint64(32) + l]))
                s3 = np.int32(s3 + np.int32((b1 & m4) | ((h1 & np.uint8(12)) << np.uint8(2))) * np.int32(xq[px + np.uint64(48) + l]))
                s4 = np.int32(s4 + np.int32((a0 >> np.uint8(4)) | (h0 & np.uint8(48))) * np.int32(xq[px + np.uint64(64) + l]))
                s5 = np.int32(s5 + np.int32((a1 >> np.uint8(4)) | (h1 & np.uint8(48))) * np.int32(xq[px + np.uint64(80) + l]))
                s6 = np.int32(s6 + np.int32((b0 >> np.uint8(4)) | ((h0 >> np.uint8(6)) << np.uint8(4))) * np.int32(xq[px + np.uint64(96) + l]))
                s7 = np.int32(s7 + np.int32((b1 >> np.uint8(4)) | ((h1 >> np.uint8(6)) << np.uint8(4))) * np.int32(xq[px + np.uint64(112) + l]))
            so = o + np.uint64(192) + np.uint64(8) * un
            g = b * 16 + 8 * n
            sumi = np.int32(sumi + _i8_at(row, so) * (s0 - 32 * np.int32(xb[g]))
                        + _i8_at(row, so + np.uint64(1)) * (s1 - 32 * np.int32(xb[g + 1]))
                        + _i8_at(row, so + np.uint64(2)) * (s2 - 32 * np.int32(xb[g + 2]))
                        + _i8_at(row, so + np.uint64(3)) * (s3 - 32 * np.int32(xb[g + 3]))
                        + _i8_at(row, so + np.uint64(4)) * (s4 - 32 * np.int32(xb[g + 4]))
                        + _i8_at(row, so + np.uint64(5)) * (s5 - 32 * np.int32(xb[g + 5]))
                        + _i8_at(row, so + np.uint64(6)) * (s6 - 32 * np.int32(xb[g + 6]))
                        + _i8_at(row, so + np.uint64(7)) * (s7 - 32 * np.int32(xb[g + 7])))
        acc = fma32(d, np.float32(sumi), acc)
    return acc
