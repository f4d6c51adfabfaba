"""Compiled drivers: mat-vec / mat-mat over quantized rows, row lookup, one format switch.

Formats are dispatched inside compiled code by an integer type code (``int(GGMLType.X)``) in the
three switch functions below (``dot_rows``, ``idot_rows``, ``dequant_row``) — the single place
that knows which row function serves which format. The dot switches run a whole range of rows
per dispatch, so the switch and call costs are paid per run of rows, not per row. (Passing compiled functions as arguments, or closing over them in factory-made kernels,
defeats numba's on-disk cache; a plain integer switch caches.)

Everything here is callable from other compiled code, so a whole layer can later run in one
compiled call::

    matmul_kernel(qtype, w, x, out, scratch)   # out[n, rows] = x[n, k] @ W.T  (parallel)
    matmul_serial(qtype, w, x, out, scratch)   # the same on the calling thread
    matvec_stack(qtype, ws, sel, x, out, scratch)  # out[j] = ws[sel[j]] · x[j], one region
    get_rows_kernel(qtype, w, ids, out)        # out[i] = dequant(W[ids[i]])
    dot_rows(qtype, w, r0, r1, x, out)         # serial pieces of the above, for fused kernels
    idot_rows(qtype, w, r0, r1, xq, xd, xs, out)    # 2-D tables: all tokens
    idot_rows_k(qtype, w, r0, r1, xq, xd, xb, out)
    act_tables(scratch, n, k) / quantize_act_q8(x, xq, xd, xs)    # (quant.acts)
    act_tables_k(scratch, n, k) / quantize_act_q8k(x, xq, xd, xb)

The legacy block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) multiply with int8 activations: each
token's activations are quantized once per call into ``scratch`` (see :func:`act_scratch_bytes`),
then every row is an integer dot product (llama.cpp's ``vec_dot_q4_1_q8_1`` scheme). The K-quants
(Q2_K..Q6_K) multiply with Q8_K activations (int8 per 256-block, float32 scale, int16 sums of
each 16), as llama.cpp's ``vec_dot_q<n>_K_q8_K``. Where the CPU has AVX-512 VNNI both run in
tiles of 4 rows (× 4 tokens for the legacy formats) — :mod:`quant.avx512`,
:mod:`quant.avx512_kquants` — else Q8_0/Q4_0/Q4_1/Q4_K/Q6_K in the AVX2 row dots of
:mod:`quant.avx2` (the tiles give their bits) and the rest in portable numba loops. The float
formats use the ``_dot_<f>`` row functions. Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q2_K..Q6_K matrices
repacked at load 8 rows interleaved (:mod:`quant.interleaved`, type codes
:class:`~quant.interleaved.PackedType`) run :data:`rows_x8` / :data:`rows_x8_k` on the same
activation tables (Q4_0/Q5_0/Q8_0 with ``xs`` = the exact block sums).

Scratch layout (bytes, ``n`` tokens, ``nb = k / 32``), three row-major tables back to back::

    [0, n·k)                 xq  int8    [n, k]   quantized activations
    [n·k, n·k + 4·n·nb)      xd  float32 [n, nb]  per-block scale
    [n·k + 4·n·nb, +4·n·nb)  xs  float32 [n, nb]  per-block scale · Σ xq

and for the K-quants (``nk = k / 256``)::

    [0, n·k)                 xq  int8    [n, k]      Q8_K quants
    [n·k, n·k + 4·n·nk)      xd  float32 [n, nk]     per-block scale
    [.., + 2·n·k/16)         xb  int16   [n, k/16]   sum of each 16 quants

numba's cache normally tracks only a function's own file; :mod:`quant.jit` widens the stamp to all
compiled project modules, so these kernels recompile when a format module they call changes.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from cpuinfer.gguf import GGMLType

from . import avx2, avx512, avx512_kquants, floats, interleaved, kquants, legacy
from .acts import quantize_act_q8, quantize_act_q8k
from .jit import inline_kernel, kernel, num_threads, parallel_kernel
from .kquants import QK_K
from .legacy import QK

# Int8-activation row work: tiles of 4 rows × 4 tokens (quant.avx512, quant.avx512_kquants) where
# the CPU has AVX2 (Q8_0's tile only with AVX-512 VNNI), else row dots: AVX2 (vpmaddubsw) for the
# hot formats, portable numba loops for the rest. Chosen once at import; numba's cache is keyed
# per CPU.
HAVE_TILES = avx512.HAVE_TILES
HAVE_Q8_0_TILE = avx512.HAVE_AVX512_VNNI
if avx2.HAVE_AVX2:
    _idot_q8_0, _idot_q4_0, _idot_q4_1 = (avx2.idot_q8_0_avx2, avx2.idot_q4_0_avx2,
                                          avx2.idot_q4_1_avx2)
    _idot_q4_k, _idot_q6_k = avx2.idot_q4_k_avx2, avx2.idot_q6_k_avx2
else:
    _idot_q8_0, _idot_q4_0, _idot_q4_1 = legacy._idot_q8_0, legacy._idot_q4_0, legacy._idot_q4_1
    _idot_q4_k, _idot_q6_k = kquants._idot_q4_k, kquants._idot_q6_k

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
_Q4_0_X8 = int(interleaved.PackedType.Q4_0_X8)
_Q4_1_X8 = int(interleaved.PackedType.Q4_1_X8)
_Q8_0_X8 = int(interleaved.PackedType.Q8_0_X8)
_Q5_0_X8 = int(interleaved.PackedType.Q5_0_X8)
_Q5_1_X8 = int(interleaved.PackedType.Q5_1_X8)
_Q4_K_X8 = int(interleaved.PackedType.Q4_K_X8)
_Q6_K_X8 = int(interleaved.PackedType.Q6_K_X8)
_Q3_K_X8 = int(interleaved.PackedType.Q3_K_X8)
_Q5_K_X8 = int(interleaved.PackedType.Q5_K_X8)
_Q2_K_X8 = int(interleaved.PackedType.Q2_K_X8)

KERNEL_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0,
                GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q2_K, GGMLType.Q3_K,
                GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)
"""Types the switches below handle."""

Q8_ACT_TYPES = (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1)
"""Types whose matmul quantizes activations to int8 per 32-block."""

Q8K_ACT_TYPES = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)
"""Types whose matmul quantizes activations to Q8_K (int8 per 256-block, float32 scale)."""


# --- the format switch -----------------------------------------------------------------------

@kernel
def is_packed(qtype):
    """True for the interleaved layouts of :mod:`quant.interleaved`."""
    return (qtype == _Q4_0_X8 or qtype == _Q4_1_X8 or qtype == _Q8_0_X8 or qtype == _Q5_0_X8
            or qtype == _Q5_1_X8 or qtype == _Q4_K_X8 or qtype == _Q6_K_X8 or qtype == _Q3_K_X8
            or qtype == _Q5_K_X8 or qtype == _Q2_K_X8)


@kernel
def uses_q8_act(qtype):
    """True when ``matmul_kernel`` runs this type on int8-quantized activations."""
    return (qtype == _Q8_0 or qtype == _Q4_0 or qtype == _Q4_1 or qtype == _Q5_0
            or qtype == _Q5_1 or qtype == _Q4_0_X8 or qtype == _Q4_1_X8 or qtype == _Q8_0_X8
            or qtype == _Q5_0_X8 or qtype == _Q5_1_X8)


@kernel
def uses_q8k_act(qtype):
    """True when ``matmul_kernel`` runs this type on Q8_K-quantized activations."""
    return (qtype == _Q2_K or qtype == _Q3_K or qtype == _Q4_K or qtype == _Q5_K
            or qtype == _Q6_K or qtype == _Q4_K_X8 or qtype == _Q6_K_X8 or qtype == _Q3_K_X8
            or qtype == _Q5_K_X8 or qtype == _Q2_K_X8)


@kernel
def dot_rows(qtype, w, r0, r1, x, out):
    """``out[r] = W[r] · x`` for rows ``r0 <= r < r1`` of ``w`` (float32 activations ``x``).

    The switch sits outside the row loop, so it costs once per run of rows, not per row.
    """
    if qtype == _F32:
        floats.dot_rows_f32(w, r0, r1, x, out)
    elif qtype == _F16:
        for r in range(r0, r1):
            out[r] = floats._dot_f16(w[r], x)
    elif qtype == _BF16:
        for r in range(r0, r1):
            out[r] = floats._dot_bf16(w[r], x)
    elif qtype == _Q8_0:
        for r in range(r0, r1):
            out[r] = legacy._dot_q8_0(w[r], x)
    elif qtype == _Q4_0:
        for r in range(r0, r1):
            out[r] = legacy._dot_q4_0(w[r], x)
    elif qtype == _Q4_1:
        for r in range(r0, r1):
            out[r] = legacy._dot_q4_1(w[r], x)
    elif qtype == _Q5_0:
        for r in range(r0, r1):
            out[r] = legacy._dot_q5_0(w[r], x)
    elif qtype == _Q5_1:
        for r in range(r0, r1):
            out[r] = legacy._dot_q5_1(w[r], x)
    elif qtype == _Q2_K:
        for r in range(r0, r1):
            out[r] = kquants._dot_q2_k(w[r], x)
    elif qtype == _Q3_K:
        for r in range(r0, r1):
            out[r] = kquants._dot_q3_k(w[r], x)
    elif qtype == _Q4_K:
        for r in range(r0, r1):
            out[r] = kquants._dot_q4_k(w[r], x)
    elif qtype == _Q5_K:
        for r in range(r0, r1):
            out[r] = kquants._dot_q5_k(w[r], x)
    elif qtype == _Q6_K:
        for r in range(r0, r1):
            out[r] = kquants._dot_q6_k(w[r], x)


@kernel
def _idot_rows_rowwise(qtype, w, r0, r1, xq, xd, xs, out):
    """``out[t, r] = W[r] · x_t`` for rows ``r0 <= r < r1`` and every token ``t``, legacy
    formats, int8 activations (2-D tables as made by :func:`quant.legacy.quantize_act_q8`), one
    row dot at a time."""
    for t in range(xq.shape[0]):
        xq_t, xd_t, xs_t, out_t = xq[t], xd[t], xs[t], out[t]
        if qtype == _Q8_0:
            for r in range(r0, r1):
                out_t[r] = _idot_q8_0(w[r], xq_t, xd_t, xs_t)
        elif qtype == _Q4_0:
            for r in range(r0, r1):
                out_t[r] = _idot_q4_0(w[r], xq_t, xd_t, xs_t)
        elif qtype == _Q4_1:
            for r in range(r0, r1):
                out_t[r] = _idot_q4_1(w[r], xq_t, xd_t, xs_t)
        elif qtype == _Q5_0:
            for r in range(r0, r1):
                out_t[r] = legacy._idot_q5_0(w[r], xq_t, xd_t, xs_t)
        elif qtype == _Q5_1:
            for r in range(r0, r1):
                out_t[r] = legacy._idot_q5_1(w[r], xq_t, xd_t, xs_t)


@kernel
def _q8_0_rowwise(w, r0, r1, xq, xd, xs, out):
    """Q8_0 where its tile cannot run (no VNNI): the row dots."""
    _idot_rows_rowwise(_Q8_0, w, r0, r1, xq, xd, xs, out)


_q8_0_rows = avx512.rows_q8_0_avx512 if HAVE_Q8_0_TILE else _q8_0_rowwise


@kernel
def _idot_rows_tiled(qtype, w, r0, r1, xq, xd, xs, out):
    """As :func:`_idot_rows_rowwise`, in tiles: Q8_0/Q4_0/Q4_1
    give the same bits as the AVX2 row dots, Q5_0/Q5_1 (portable row dots there) the same sums
    in the AVX2 kernels' float order."""
    if qtype == _Q8_0:
        _q8_0_rows(w, r0, r1, xq, xd, xs, out)
    elif qtype == _Q4_0:
        avx512.rows_q4_0_avx512(w, r0, r1, xq, xd, xs, out)
    elif qtype == _Q4_1:
        avx512.rows_q4_1_avx512(w, r0, r1, xq, xd, xs, out)
    elif qtype == _Q5_0:
        avx512.rows_q5_0_avx512(w, r0, r1, xq, xd, xs, out)
    elif qtype == _Q5_1:
        avx512.rows_q5_1_avx512(w, r0, r1, xq, xd, xs, out)


idot_rows = _idot_rows_tiled if HAVE_TILES else _idot_rows_rowwise
"""``idot_rows(qtype, w, r0, r1, xq, xd, xs, out)``: ``out[t, r] = W[r] · x_t`` for rows
``r0 <= r < r1`` and every token of the 2-D int8 activation tables (:func:`act_tables`)."""


@kernel
def _krows_tiled(qtype, w, r0, r1, xq, xd, xb, out):
    """``out[t, r] = W[r] · x_t`` in AVX-512 tiles for the K-quants (Q4_K/Q6_K: the bits of the
    AVX2 row dots)."""
    if qtype == _Q2_K:
        avx512_kquants.rows_q2_k_avx512(w, r0, r1, xq, xd, xb, out)
    elif qtype == _Q3_K:
        avx512_kquants.rows_q3_k_avx512(w, r0, r1, xq, xd, xb, out)
    elif qtype == _Q4_K:
        avx512_kquants.rows_q4_k_avx512(w, r0, r1, xq, xd, xb, out)
    elif qtype == _Q5_K:
        avx512_kquants.rows_q5_k_avx512(w, r0, r1, xq, xd, xb, out)
    elif qtype == _Q6_K:
        avx512_kquants.rows_q6_k_avx512(w, r0, r1, xq, xd, xb, out)


@kernel
def _krows_none(qtype, w, r0, r1, xq, xd, xb, out):
    """Stand-in where the CPU has no AVX2 (:func:`has_ktile` is then always False)."""


@kernel
def _rows_x8_none(qtype, w, r0, r1, xq, xd, xs, out):
    """Stand-in where the CPU cannot run the interleaved kernels (nothing is packed there)."""


HAVE_X8 = interleaved.HAVE_X8
rows_x8 = interleaved.rows_x8 if HAVE_X8 else _rows_x8_none
"""``rows_x8(qtype, w, r0, r1, xq, xd, xs, out)``: as :data:`idot_rows` for the interleaved
legacy layouts (``r0``, ``r1`` multiples of 8)."""
rows_x8_k = interleaved.rows_x8_k if HAVE_X8 else _rows_x8_none
"""``rows_x8_k(qtype, w, r0, r1, xq, xd, xb, out)``: the same for interleaved Q4_K/Q6_K on
Q8_K tables."""

HAVE_KTILES = avx512_kquants.HAVE_KTILES
krows_tiled = _krows_tiled if HAVE_KTILES else _krows_none


@kernel
def has_ktile(qtype):
    """Whether :data:`krows_tiled` runs this K-quant (with AVX2 or AVX-512: all of them)."""
    return HAVE_KTILES and uses_q8k_act(qtype)


@kernel
def idot_rows_k(qtype, w, r0, r1, xq, xd, xb, out):
    """``out[r] = W[r] · x`` for rows ``r0 <= r < r1``, K-quant formats, Q8_K activations
    (``xq``, ``xd``, ``xb`` as made by :func:`quant.kquants.quantize_act_q8k`)."""
    if qtype == _Q2_K:
        for r in range(r0, r1):
            out[r] = kquants._idot_q2_k(w[r], xq, xd, xb)
    elif qtype == _Q3_K:
        for r in range(r0, r1):
            out[r] = kquants._idot_q3_k(w[r], xq, xd, xb)
    elif qtype == _Q4_K:
        for r in range(r0, r1):
            out[r] = _idot_q4_k(w[r], xq, xd, xb)
    elif qtype == _Q5_K:
        for r in range(r0, r1):
            out[r] = kquants._idot_q5_k(w[r], xq, xd, xb)
    elif qtype == _Q6_K:
        for r in range(r0, r1):
            out[r] = _idot_q6_k(w[r], xq, xd, xb)


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
    if uses_q8k_act(qtype):
        return n * (k + 4 * (k // QK_K) + 2 * (k // 16))
    return 0


@kernel
def act_tables(scratch, n, k):
    """(xq int8[n, k], xd float32[n, k/32], xs float32[n, k/32]) laid out in ``scratch``."""
    nb = k // QK
    q_end = n * k
    d_end = q_end + 4 * n * nb
    xq = scratch[:q_end].view(np.int8).reshape((n, k))
    xd = scratch[q_end:d_end].view(np.float32).reshape((n, nb))
    xs = scratch[d_end:d_end + 4 * n * nb].view(np.float32).reshape((n, nb))
    return xq, xd, xs


@kernel
def act_tables_k(scratch, n, k):
    """(xq int8[n, k], xd float32[n, k/256], xb int16[n, k/16]) laid out in ``scratch`` (Q8_K)."""
    nb = k // QK_K
    q_end = n * k
    d_end = q_end + 4 * n * nb
    xq = scratch[:q_end].view(np.int8).reshape((n, k))
    xd = scratch[q_end:d_end].view(np.float32).reshape((n, nb))
    xb = scratch[d_end:d_end + 2 * n * (k // 16)].view(np.int16).reshape((n, k // 16))
    return xq, xd, xb


# --- drivers ---------------------------------------------------------------------------------

ROW_TILE = 16      # rows per unit of work; threads get contiguous runs of units
TOKEN_BLOCK = 16   # tokens per pass of a thread over its rows (their int8 tables stay in L2)


@kernel
def schedule_block(n_iter, n_parts, p):
    """``(i0, i1)``: the half-open range of ``n_iter`` iterations that part ``p`` of ``n_parts``
    gets — numba's static ``prange`` schedule (``gufunc_scheduler.cpp``, ``create_schedule``):
    part ``i`` takes ``ceil(left / parts_left)`` iterations in turn."""
    cur = 0
    for i in range(p):
        cur += (n_iter - cur - 1) // (n_parts - i) + 1
    return cur, cur + (n_iter - cur - 1) // (n_parts - p) + 1


@kernel
def prepare_acts(qtype, x, scratch, t):
    """Quantize token ``t`` of ``x`` [n, k] into ``scratch``'s tables, as the format's row dots
    read them (:func:`act_tables` / :func:`act_tables_k`; nothing for the float formats)."""
    n, k = x.shape
    if uses_q8_act(qtype):
        xq, xd, xs = act_tables(scratch, n, k)
        quantize_act_q8(x[t], xq[t], xd[t], xs[t],
                        qtype == _Q4_0_X8 or qtype == _Q5_0_X8 or qtype == _Q8_0_X8)
    elif uses_q8k_act(qtype):
        kq, kd, kb = act_tables_k(scratch, n, k)
        quantize_act_q8k(x[t], kq[t], kd[t], kb[t])


@kernel
def mul_chunks(qtype, w, c0, c1, x, out, scratch):
    """``out[t, r]`` for the rows of chunks ``c0 <= c < c1`` (ROW_TILE rows each) and every token,
    on the calling thread, the activations already prepared (:func:`prepare_acts`).

    Int8-activation formats (and, with VNNI, the K-quants) run the whole run of rows per
    TOKEN_BLOCK tokens in tiles (:func:`idot_rows`, :data:`krows_tiled`); the others multiply
    every token with a chunk while its bytes are in L1.
    """
    n, k = x.shape
    rows = w.shape[0]
    r0, r1 = c0 * ROW_TILE, min(rows, c1 * ROW_TILE)
    if uses_q8_act(qtype):
        xq, xd, xs = act_tables(scratch, n, k)
        for t0 in range(0, n, TOKEN_BLOCK):
            t1 = min(n, t0 + TOKEN_BLOCK)
            if is_packed(qtype):
                rows_x8(qtype, w, r0, r1, xq[t0:t1], xd[t0:t1], xs[t0:t1], out[t0:t1])
            else:
                idot_rows(qtype, w, r0, r1, xq[t0:t1], xd[t0:t1], xs[t0:t1], out[t0:t1])
        return
    q8k = uses_q8k_act(qtype)
    kq, kd, kb = act_tables_k(scratch, n if q8k else 0, k)
    if q8k and is_packed(qtype):
        for t0 in range(0, n, TOKEN_BLOCK):
            t1 = min(n, t0 + TOKEN_BLOCK)
            rows_x8_k(qtype, w, r0, r1, kq[t0:t1], kd[t0:t1], kb[t0:t1], out[t0:t1])
        return
    if q8k and has_ktile(qtype):
        for t0 in range(0, n, TOKEN_BLOCK):
            t1 = min(n, t0 + TOKEN_BLOCK)
            krows_tiled(qtype, w, r0, r1, kq[t0:t1], kd[t0:t1], kb[t0:t1], out[t0:t1])
        return
    if n == 1 and not q8k:              # one token: the thread's whole run in one pass
        dot_rows(qtype, w, r0, r1, x[0], out[0])
        return
    for c in range(c0, c1):
        a = c * ROW_TILE
        b = min(rows, a + ROW_TILE)
        for t in range(n):
            if q8k:
                idot_rows_k(qtype, w, a, b, kq[t], kd[t], kb[t], out[t])
            else:
                dot_rows(qtype, w, a, b, x[t], out[t])


@parallel_kernel
def matmul_kernel(qtype, w, x, out, scratch):
    """``out[t, r] = Σ_j x[t, j] · W[r, j]`` for uint8 rows ``w[rows, row_bytes]``.

    ``x`` float32[n, k], ``out`` float32[n, rows], ``scratch`` uint8 of at least
    ``act_scratch_bytes(qtype, n, k)`` bytes (unused for float-activation formats). Rows are cut
    into chunks of ROW_TILE and each thread takes the contiguous run of chunks numba's static
    schedule would give it (:func:`schedule_block`; :mod:`numa.plan` places rows by the same
    rule) in one task (:func:`mul_chunks`), so a thread's weights are one sequential read.
    """
    n = x.shape[0]
    if n < 4:
        for t in range(n):
            prepare_acts(qtype, x, scratch, t)
    else:
        for t in prange(n):
            prepare_acts(qtype, x, scratch, t)
    n_chunks = (w.shape[0] + ROW_TILE - 1) // ROW_TILE
    parts = min(num_threads(), n_chunks)
    for p in prange(parts):         # one contiguous run of chunks per thread
        c0, c1 = schedule_block(n_chunks, parts, p)
        mul_chunks(qtype, w, c0, c1, x, out, scratch)


@parallel_kernel
def matvec_stack(qtype, ws, sel, x, out, scratch):
    """``out[j] = W_{sel[j]} · x_j`` for the matrices ``sel`` of a stacked ``ws`` [E, rows,
    row_bytes] (one token each: ``x`` [m, k], or [1, k] shared by all) in one parallel region.

    Each thread runs its static-schedule run of chunks (as :func:`matmul_kernel`) in every
    selected matrix, so rows stay on the threads :mod:`numa.plan` placed them for, while the
    region's fork/join is paid once instead of once per matrix. ``scratch`` holds one activation
    table set per row of ``x`` (``act_scratch_bytes(qtype, len(x), k)`` bytes).
    """
    m = sel.shape[0]
    k = x.shape[1]
    n_x = x.shape[0]
    per = act_scratch_bytes(qtype, 1, k)
    for j in range(n_x):
        prepare_acts(qtype, x[j:j + 1], scratch[j * per:(j + 1) * per], 0)
    n_chunks = (ws.shape[1] + ROW_TILE - 1) // ROW_TILE
    parts = min(num_threads(), n_chunks)
    for p in prange(parts):
        c0, c1 = schedule_block(n_chunks, parts, p)
        for j in range(m):
            xj = j if n_x > 1 else 0
            mul_chunks(qtype, ws[sel[j]], c0, c1, x[xj:xj + 1], out[j:j + 1],
                       scratch[xj * per:(xj + 1) * per])


@inline_kernel
def matmul_serial(qtype, w, x, out, scratch):
    """:func:`matmul_kernel` on the calling thread only (same results), for callers that are
    parallel over something else (e.g. one attention head per thread)."""
    for t in range(x.shape[0]):
        prepare_acts(qtype, x, scratch, t)
    mul_chunks(qtype, w, 0, (w.shape[0] + ROW_TILE - 1) // ROW_TILE, x, out, scratch)


@kernel
def get_rows_kernel(qtype, w, ids, out):
    """``out[i] = dequant(w[ids[i]])`` (ids already bounds-checked by the caller)."""
    for i in range(ids.shape[0]):
        if is_packed(qtype):
            interleaved.dequant_row_x8(qtype, w, ids[i], out[i])
        else:
            dequant_row(qtype, w[ids[i]], out[i])
