"""Compiled drivers: mat-vec / mat-mat over quantized rows, row lookup, one format switch.

Formats are dispatched inside compiled code by an integer type code (``int(GGMLType.X)``) in the
three switch functions below — the single place that knows which row function serves which
format. (Passing compiled functions as arguments, or closing over them in factory-made kernels,
defeats numba's on-disk cache; a plain integer switch caches.)

Everything here is callable from other compiled code, so a whole layer can later run in one
compiled call::

    matmul_kernel(qtype, w, x, out, scratch)   # out[n, rows] = x[n, k] @ W.T  (parallel)
    get_rows_kernel(qtype, w, ids, out)        # out[i] = dequant(W[ids[i]])

The legacy block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) multiply with int8 activations: each
token's activations are quantized once per call into ``scratch`` (see :func:`act_scratch_bytes`),
then every row is an integer dot product (llama.cpp's ``vec_dot_q4_1_q8_1`` scheme; Q8_0, Q4_0 and
Q4_1 use the AVX2 kernels of :mod:`quant.avx2` when the CPU has AVX2). The other
formats use the float-activation ``_dot_<f>`` row functions.

Scratch layout per token (bytes, ``nb = k / 32``)::

    [0, k)            xq  int8     quantized activations
    [k, k + 4nb)      xd  float32  per-block scale
    [k + 4nb, k + 8nb) xs float32  per-block scale · Σ xq

Note on numba's cache: a cached kernel here is not recompiled when only a module it calls
(``legacy``, ``kquants``, ``floats``) changes; delete ``quant/__pycache__/*.nb[ic]`` after
editing those.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from cpuinfer.gguf import GGMLType

from . import avx2, floats, kquants, legacy
from .jit import kernel, parallel_kernel
from .legacy import QK, quantize_act_q8

# Row dots on int8 activations for the hot formats: AVX2 (vpmaddubsw) where the CPU has it,
# else the portable numba loops. Chosen once at import; numba's cache is keyed per CPU.
if avx2.HAVE_AVX2:
    _idot_q8_0, _idot_q4_0, _idot_q4_1 = (avx2.idot_q8_0_avx2, avx2.idot_q4_0_avx2,
                                          avx2.idot_q4_1_avx2)
else:
    _idot_q8_0, _idot_q4_0, _idot_q4_1 = legacy._idot_q8_0, legacy._idot_q4_0, legacy._idot_q4_1

_F32 = int(GGMLType.F32)
_F16 = int(GGMLType.F16)
_BF16 = int(GGMLType.BF16)
_Q8_0 = int(GGMLType.Q8_0)
_Q4_0 = int(GGMLType.Q4_0)
_Q4_1 = int(GGMLType.Q4_1)
_Q5_0 = int(GGMLType.Q5_0)
_Q5_1 = int(GGMLType.Q5_1)
_Q2_K = int(GGMLType.Q2_K)
_Q3_K = int(GGMLType.Q3_K)
_Q4_K = int(GGMLType.Q4_K)
_Q5_K = int(GGMLType.Q5_K)
_Q6_K = int(GGMLType.Q6_K)

KERNEL_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0,
                GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q2_K, GGMLType.Q3_K,
                GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)
"""Types the switches below handle."""

Q8_ACT_TYPES = (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1)
"""Types whose matmul quantizes activations to int8 per 32-block."""


# --- the format switch -----------------------------------------------------------------------

@kernel
def uses_q8_act(qtype):
    """True when ``matmul_kernel`` runs this type on int8-quantized activations."""
    return (qtype == _Q8_0 or qtype == _Q4_0 or qtype == _Q4_1 or qtype == _Q5_0
            or qtype == _Q5_1)


@kernel
def dot_row(qtype, row, x):
    """Dot of one quantized row (uint8[::1]) with float32 activations ``x`` (float32[::1])."""
    if qtype == _F32:
        return floats._dot_f32(row, x)
    if qtype == _F16:
        return floats._dot_f16(row, x)
    if qtype == _BF16:
        return floats._dot_bf16(row, x)
    if qtype == _Q8_0:
        return legacy._dot_q8_0(row, x)
    if qtype == _Q4_0:
        return legacy._dot_q4_0(row, x)
    if qtype == _Q4_1:
        return legacy._dot_q4_1(row, x)
    if qtype == _Q5_0:
        return legacy._dot_q5_0(row, x)
    if qtype == _Q5_1:
        return legacy._dot_q5_1(row, x)
    if qtype == _Q2_K:
        return kquants._dot_q2_k(row, x)
    if qtype == _Q3_K:
        return kquants._dot_q3_k(row, x)
    if qtype == _Q4_K:
        return kquants._dot_q4_k(row, x)
    if qtype == _Q5_K:
        return kquants._dot_q5_k(row, x)
    if qtype == _Q6_K:
        return kquants._dot_q6_k(row, x)
    return np.float32(np.nan)   # unreachable behind the validating wrappers


@kernel
def idot_row(qtype, row, xq, xd, xs):
    """Dot of one legacy-format row with int8 activations (see :func:`quantize_act_q8`)."""
    if qtype == _Q8_0:
        return _idot_q8_0(row, xq, xd, xs)
    if qtype == _Q4_0:
        return _idot_q4_0(row, xq, xd, xs)
    if qtype == _Q4_1:
        return _idot_q4_1(row, xq, xd, xs)
    if qtype == _Q5_0:
        return legacy._idot_q5_0(row, xq, xd, xs)
    if qtype == _Q5_1:
        return legacy._idot_q5_1(row, xq, xd, xs)
    return np.float32(np.nan)   # unreachable: uses_q8_act(qtype) is checked first


@kernel
def dequant_row(qtype, row, out):
    """Dequantize one row (uint8[::1]) into ``out`` (float32[::1] of k values)."""
    if qtype == _F32:
        floats._dequant_row_f32(row, out)
    elif qtype == _F16:
        floats._dequant_row_f16(row, out)
    elif qtype == _BF16:
        floats._dequant_row_bf16(row, out)
    elif qtype == _Q8_0:
        legacy._dequant_row_q8_0(row, out)
    elif qtype == _Q4_0:
        legacy._dequant_row_q4_0(row, out)
    elif qtype == _Q4_1:
        legacy._dequant_row_q4_1(row, out)
    elif qtype == _Q5_0:
        legacy._dequant_row_q5_0(row, out)
    elif qtype == _Q5_1:
        legacy._dequant_row_q5_1(row, out)
    elif qtype == _Q2_K:
        kquants._dequant_row_q2_k(row, out)
    elif qtype == _Q3_K:
        kquants._dequant_row_q3_k(row, out)
    elif qtype == _Q4_K:
        kquants._dequant_row_q4_k(row, out)
    elif qtype == _Q5_K:
        kquants._dequant_row_q5_k(row, out)
    elif qtype == _Q6_K:
        kquants._dequant_row_q6_k(row, out)


# --- activation scratch ----------------------------------------------------------------------

@kernel
def act_scratch_bytes(qtype, n, k):
    """Bytes of scratch ``matmul_kernel`` needs for ``n`` tokens of ``k`` values (0 if none)."""
    if uses_q8_act(qtype):
        return n * (k + 8 * (k // QK))
    return 0


@kernel
def act_views(scratch, t, k):
    """(xq int8[k], xd float32[k/32], xs float32[k/32]) of token ``t`` inside ``scratch``."""
    nb = k // QK
    base = t * (k + 8 * nb)
    xq = scratch[base:base + k].view(np.int8)
    xd = scratch[base + k:base + k + 4 * nb].view(np.float32)
    xs = scratch[base + k + 4 * nb:base + k + 8 * nb].view(np.float32)
    return xq, xd, xs


# --- drivers ---------------------------------------------------------------------------------

ROW_TILE = 16      # rows per task in the mat-mat loop: their bytes stay in L1/L2 ...
TOKEN_TILE = 8     # ... while this many tokens' activations are multiplied against them


@parallel_kernel
def matmul_kernel(qtype, w, x, out, scratch):
    """``out[t, r] = Σ_j x[t, j] · W[r, j]`` for uint8 rows ``w[rows, row_bytes]``.

    ``x`` float32[n, k], ``out`` float32[n, rows], ``scratch`` uint8 of at least
    ``act_scratch_bytes(qtype, n, k)`` bytes (unused for float-activation formats). n == 1 is a
    mat-vec parallel over rows; n > 1 walks tiles of ROW_TILE rows × TOKEN_TILE tokens so each
    weight row is fetched from memory once per tile of tokens.
    """
    n, k = x.shape
    rows = w.shape[0]
    q8 = uses_q8_act(qtype)
    if q8:
        if n < 4:
            for t in range(n):
                xq, xd, xs = act_views(scratch, t, k)
                quantize_act_q8(x[t], xq, xd, xs)
        else:
            for t in prange(n):
                xq, xd, xs = act_views(scratch, t, k)
                quantize_act_q8(x[t], xq, xd, xs)
    if n == 1:
        if q8:
            xq, xd, xs = act_views(scratch, 0, k)
            for r in prange(rows):
                out[0, r] = idot_row(qtype, w[r], xq, xd, xs)
        else:
            x0 = x[0]
            for r in prange(rows):
                out[0, r] = dot_row(qtype, w[r], x0)
        return
    n_tiles = (rows + ROW_TILE - 1) // ROW_TILE
    for tile in prange(n_tiles):
        r0 = tile * ROW_TILE
        r1 = min(rows, r0 + ROW_TILE)
        for t0 in range(0, n, TOKEN_TILE):
            t1 = min(n, t0 + TOKEN_TILE)
            for r in range(r0, r1):
                wr = w[r]
                for t in range(t0, t1):
                    if q8:
                        xq, xd, xs = act_views(scratch, t, k)
                        out[t, r] = idot_row(qtype, wr, xq, xd, xs)
                    else:
                        out[t, r] = dot_row(qtype, wr, x[t])


@kernel
def get_rows_kernel(qtype, w, ids, out):
    """``out[i] = dequant(w[ids[i]])`` (ids already bounds-checked by the caller)."""
    for i in range(ids.shape[0]):
        dequant_row(qtype, w[ids[i]], out[i])
