"""Weights repacked at load 8 rows interleaved (``_X8``): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K.

A GGUF row keeps its blocks back to back, so a row dot has to reduce each block's 8 int32 lanes
to one number and splat per-row scales — about as much work per block as the multiply itself,
and on one Zen 4 core a Q4_0 row-tile kernel tops out near 22 GB/s, below what a core can read.
Interleaving 8 rows puts one *row* in each 32-bit lane: the 4-byte activation groups are
broadcast, ``vpdpbusd`` (or ``vpmaddubsw``/``vpmaddwd``) accumulates 8 rows at once, the 8 row
scales are one ``vcvtph2ps``, and the 8 results are one vector store — no horizontal sums at all
(llama.cpp's ``block_q4_0x8`` repacking, ``ggml-cpu/repack.cpp``, is the same idea with 8-byte
groups).

Layout: a matrix of ``rows`` (a multiple of 8) keeps its shape ``[rows, row_bytes]`` and byte
count; rows ``8g .. 8g + 7`` (bytes ``[8g·row_bytes, (8g + 8)·row_bytes)``) become group ``g``:
its blocks ``b = 0 .. nb − 1`` one after the other, ``8 · type_size`` bytes each::

    Q4_0  144 bytes = d[0:16]  (f16 × 8, row i at 2i)
                      qs[16:144] = chunk c (c = 0..3) at 16 + 32c:
                                   row i's qs[4c : 4c + 4] at 16 + 32c + 4i
    Q4_1  160 bytes = d[0:16] m[16:32] qs[32:160]     (chunks as Q4_0, at 32 + 32c)
    Q5_0  176 bytes = d[0:16] qh[16:48] qs[48:176]    (row i's 32-bit qh at 16 + 4i; qs
                                                       chunks as Q4_0, at 48 + 32c)
    Q5_1  192 bytes = d[0:16] m[16:32] qh[32:64] qs[64:192]
    Q8_0  272 bytes = d[0:16] qs[16:272]              (8 chunks, c = 0..7, at 16 + 32c)
    Q4_K 1152 bytes = d[0:16] dmin[16:32]             (f16 × 8 each)
                      scales[32:128] = row i's 12 scale bytes 4 at a time: [4s : 4s + 4] at
                                       32 + 32s + 4i (s = 0..2)
                      qs[128:1152] = chunk c (c = 0..31) at 128 + 32c: row i's qs[4c : 4c + 4]
    Q5_K 1408 bytes = as Q4_K, rest[32:1408] = its 12 scale bytes, qh[32], qs[128] 4 at a time
    Q2_K  672 bytes = d[0:16] dmin[16:32]             (f16 × 8 each; GGUF keeps them last)
                      rest[32:672] = chunk c (c = 0..19) at 32 + 32c: row i's scales[16]
                                     then qs[64], 4 bytes at a time
    Q3_K  880 bytes = d[0:16]                         (f16 × 8; GGUF keeps d last)
                      rest[16:880] = chunk c (c = 0..26) at 16 + 32c: row i's bytes
                                     [4·o : 4·o + 4], o = _Q3_K_ORDER[c] (as Q6_K)
    Q6_K 1680 bytes = d[0:16]                         (f16 × 8; GGUF keeps d last)
                      rest[16:1680] = chunk c (c = 0..51) at 16 + 32c: row i's bytes
                                      [4·o : 4·o + 4], o = _Q6_K_ORDER[c] (scales, then
                                      ql/qh in the tile's reading order)

so one 32-byte chunk load holds the same 4 quants of every row: for Q4, its low nibbles are
values ``4c .. 4c + 3`` and its high nibbles values ``16 + 4c .. 16 + 4c + 3`` (GGUF's nibble
order, :mod:`quant.legacy`), and for Q5 each byte of a chunk takes its fifth bit from its row's
qh lane (bit ``4c + b`` for byte ``b``'s low nibble, ``16 + 4c + b`` for its high one: one byte
shuffle, a mask and a compare); for Q8_0, values ``4c .. 4c + 3``; for Q4_K (``h = c // 8``,
``l = c % 8``), low nibbles values ``64h + 4l ..`` of sub-block ``2h``, high nibbles
``64h + 32 + 4l ..`` of sub-block ``2h + 1`` (:mod:`quant.kquants`).

Per block ``b`` and token ``t`` (``y_j`` = the int32 of activation bytes ``4j .. 4j + 3`` of the
block, broadcast to 8 lanes)::

    p    = Σ_j dot(q_j, y_j)               8 × int32, lane i = row i's exact Σ q · xq
    P    = float(p) − c · S                Q4_0: c = 8; Q5_0: c = 16; Q8_0 with VNNI: q = w + 128,
                                           c = 128 (AVX2: q = |w|, y_j · sign(w), c = 0);
                                           Q4_1, Q5_1: c = 0
    acc  = fma(P, d · xd, acc)             d = the 8 rows' scales, xd = the token's block scale
    Q4_1/Q5_1 acc_m = fma(m, xs, acc_m)    out[t, 8g : 8g + 8] = acc (+ acc_m)

``S = Σ xq`` of the block is the ``xs`` table for Q4_0/Q5_0/Q8_0 (``quantize_act_q8(...,
exact_sums=True)``; Q4_1/Q5_1 keep ggml's rounded ``s``); ``P`` is an integer below 2^24, exact
in float32.
So each block adds ``fma(exact integer dot, d · xd)`` as ggml's AVX2 row dots do; they split
the integer over 8 lanes and sum the lanes at the end, this sums whole blocks — the results
differ from theirs in float summation order only.

The K-quants run on Q8_K activations with one exact integer total per 256-block
(:func:`_emit_tile_k`): Q4_K/Q5_K with their own min term — Q4_K with the same float operations
as this project's Q4_K row dots, so repacked or not a Q4_K matrix gives the same bits; Q3_K/Q6_K
with their −4/−32 offset taken off the total; Q2_K with its min term per 16 values. Where the
row dots keep 8 float lanes (Q2_K, Q3_K, Q5_K, Q6_K) the results differ from them in float
rounding only.
Q3_K's and Q6_K's group blocks store their chunks in the order their tiles read them.

Repacking (:func:`pack`) needs AVX2, FMA and F16C (:data:`HAVE_X8`); :func:`pack_ref` /
:func:`unpack_ref` are the naive numpy references the tests compare with.
"""
from __future__ import annotations

import enum
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils

from cpuinfer.gguf import GGMLType

from .avx2 import _F32, _I8, _I16, _I32, _fn, _load, _splat, host_has
from .base import load_f16
from .avx512 import HAVE_AVX512_VNNI, _Token, _byte_ptr, _typed_ptr, rows_intrinsic
from .jit import kernel, parallel_kernel
from .kquants import _q3_scale_at, _scale_min_at
from .legacy import QK

GROUP = 8
"""Rows per interleaved group (one per 32-bit lane of a 256-bit register)."""

HAVE_X8 = host_has("avx2", "fma", "f16c")
"""Whether this CPU runs the interleaved kernels (and :func:`pack` repacks)."""


class PackedType(enum.IntEnum):
    """Kernel type codes of the repacked layouts: runtime only, never in a GGUF file. The code
    is ``0x100 | base`` so it cannot collide with a :class:`GGMLType`."""
    Q4_0_X8 = 0x100 | GGMLType.Q4_0
    Q4_1_X8 = 0x100 | GGMLType.Q4_1
    Q5_0_X8 = 0x100 | GGMLType.Q5_0
    Q5_1_X8 = 0x100 | GGMLType.Q5_1
    Q8_0_X8 = 0x100 | GGMLType.Q8_0
    Q4_K_X8 = 0x100 | GGMLType.Q4_K
    Q6_K_X8 = 0x100 | GGMLType.Q6_K
    Q3_K_X8 = 0x100 | GGMLType.Q3_K
    Q5_K_X8 = 0x100 | GGMLType.Q5_K
    Q2_K_X8 = 0x100 | GGMLType.Q2_K


class _Layout(NamedTuple):
    """A GGUF block as the repacking sees it: ``n_half`` f16 fields at byte ``half_at``, and
    ``rest`` other bytes (scales, quants), interleaved 4 at a time: chunk ``c`` of the group
    block holds the rest bytes ``[4·order[c], 4·order[c] + 4)`` of each row (block order when
    ``order`` is empty)."""
    type_size: int
    n_half: int
    rest: int
    half_at: int = 0
    order: tuple = ()

    def chunk_order(self) -> np.ndarray:
        return np.array(self.order or range(self.rest // 4), np.int64)

    def chunk_at(self, source: int) -> int:
        """The group-block chunk that holds rest chunk ``source``."""
        return self.order.index(source) if self.order else source

    def chunk_offset(self, source: int) -> int:
        """Byte offset in a group block of the chunk holding rest chunk ``source`` (after the
        ``n_half`` f16 fields of the 8 rows, 16 bytes each)."""
        return 16 * self.n_half + 32 * self.chunk_at(source)


# Q6_K in the order its kernel reads: the 16 scales, then per half n and r = 0, 1 the ql chunks
# 16n + 4r .. (+ 3), 16n + 8 + 4r .., qh chunks 32 + 8n + 4r .. (see _Q6KTile)
_Q6_K_ORDER = (48, 49, 50, 51) + tuple(
    first + j for n in range(2) for r in range(2)
    for first in (16 * n + 4 * r, 16 * n + 8 + 4 * r, 32 + 8 * n + 4 * r) for j in range(4))


_Q4_0, _Q4_1, _Q8_0 = GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0
_Q5_0, _Q5_1 = GGMLType.Q5_0, GGMLType.Q5_1
_Q2_K, _Q3_K, _Q4_K = GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K
_Q5_K, _Q6_K = GGMLType.Q5_K, GGMLType.Q6_K
# Q3_K likewise: its 3 scale chunks, then per half n and h = 0, 1 the hmask chunks 4h .. (first
# half only: the second reuses them) and qs chunks 8 + 8n + 4h .. (see _Q3KTile)
_Q3_K_ORDER = (24, 25, 26) + tuple(
    c for n in range(2) for h in range(2)
    for c in [*(range(4 * h, 4 * h + 4) if n == 0 else ()), *range(8 + 8 * n + 4 * h, 12 + 8 * n + 4 * h)])
_LAYOUTS = {_Q4_0: _Layout(18, 1, 16),
            _Q4_1: _Layout(20, 2, 16),
            _Q5_0: _Layout(22, 1, 20),              # qh[4], then 16 quant bytes
            _Q5_1: _Layout(24, 2, 20),
            _Q8_0: _Layout(34, 1, 32),
            _Q4_K: _Layout(144, 2, 140),            # 12 scale bytes, then 128 quant bytes
            _Q5_K: _Layout(176, 2, 172),            # 12 scale bytes, qh[32], qs[128]
            _Q2_K: _Layout(84, 2, 80, 80),          # scales[16] qs[64], then d, dmin
            _Q6_K: _Layout(210, 1, 208, 208, _Q6_K_ORDER),  # ql[128] qh[64] scales[16], d
            _Q3_K: _Layout(110, 1, 108, 108, _Q3_K_ORDER)}  # hmask[32] qs[64] scales[12], d
QK_K = 256
"""Values per K-quant block."""
PACKED = {base: PackedType(0x100 | base) for base in _LAYOUTS}
"""GGUF type -> its interleaved kernel type."""
BASE = {packed: base for base, packed in PACKED.items()}
"""Interleaved kernel type -> the GGUF type it was packed from."""

_V8I32, _V8F32, _V32I8 = ir.VectorType(_I32, 8), ir.VectorType(_F32, 8), ir.VectorType(_I8, 32)
_V16I16, _V8I16 = ir.VectorType(_I16, 16), ir.VectorType(_I16, 8)


# --- layout: numpy references and the compiled repacker --------------------------------------

def _geometry(base: GGMLType) -> _Layout:
    return _LAYOUTS[GGMLType(base)]


def pack_ref(raw: np.ndarray, base) -> np.ndarray:
    """Naive reference: GGUF rows ``[..., rows, row_bytes]`` -> the interleaved bytes (new array)."""
    type_size, n_half, qs_bytes, h0, _ = layout = _geometry(base)
    *lead, rows, rb = raw.shape
    nb = rb // type_size
    blocks = raw.reshape(*lead, rows // GROUP, GROUP, nb, type_size)
    blocks = np.moveaxis(blocks, -3, -2)                     # [..., g, b, row i, byte]
    halves = blocks[..., h0:h0 + 2 * n_half].reshape(*blocks.shape[:-1], n_half, 2)
    halves = np.moveaxis(halves, -3, -2)                     # [..., g, b, field, row i, 2]
    qs = np.concatenate([blocks[..., :h0], blocks[..., h0 + 2 * n_half:]], axis=-1)
    qs = qs.reshape(*blocks.shape[:-1], qs_bytes // 4, 4)[..., layout.chunk_order(), :]
    qs = np.moveaxis(qs, -3, -2)                             # [..., g, b, chunk c, row i, 4]
    flat = lambda a: a.reshape(*a.shape[:len(lead) + 2], -1)  # noqa: E731
    out = np.concatenate([flat(halves), flat(qs)], axis=-1)  # [..., g, b, 8·type_size]
    return np.ascontiguousarray(out.reshape(*lead, rows, rb))


def unpack_ref(packed: np.ndarray, base) -> np.ndarray:
    """Naive reference inverse of :func:`pack_ref`."""
    type_size, n_half, qs_bytes, h0, _ = layout = _geometry(base)
    *lead, rows, rb = packed.shape
    nb = rb // type_size
    g = packed.reshape(*lead, rows // GROUP, nb, GROUP * type_size)
    halves = g[..., :16 * n_half].reshape(*g.shape[:-1], n_half, GROUP, 2)
    qs = g[..., 16 * n_half:].reshape(*g.shape[:-1], qs_bytes // 4, GROUP, 4)
    qs = qs[..., np.argsort(layout.chunk_order()), :, :]
    halves = np.moveaxis(halves, -2, -3).reshape(*g.shape[:-1], GROUP, 2 * n_half)
    qs = np.moveaxis(qs, -2, -3).reshape(*g.shape[:-1], GROUP, qs_bytes)
    blocks = np.concatenate([qs[..., :h0], halves, qs[..., h0:]], axis=-1)   # [.., row i, byte]
    blocks = np.moveaxis(blocks, -2, -3)                     # [..., g, row i, b, type_size]
    return np.ascontiguousarray(blocks.reshape(*lead, rows, rb))


@parallel_kernel
def _pack_groups(src, dst, type_size, n_half, h0, order):
    """Interleave every group of ``src`` [groups, 8 · row_bytes] into ``dst`` (same shape;
    may be ``src`` itself: each group is copied aside first)."""
    n_groups, span = src.shape
    rb = span // GROUP
    nb = rb // type_size
    for g in prange(n_groups):
        s = src[g].copy()
        d = dst[g]
        for b in range(nb):
            o = b * GROUP * type_size
            for i in range(GROUP):
                at = i * rb + b * type_size
                for h in range(n_half):
                    d[o + 16 * h + 2 * i] = s[at + h0 + 2 * h]
                    d[o + 16 * h + 2 * i + 1] = s[at + h0 + 2 * h + 1]
                for c in range(order.shape[0]):
                    q = at + 4 * order[c] + (2 * n_half if 4 * order[c] >= h0 else 0)
                    for j in range(4):
                        d[o + 16 * n_half + 32 * c + 4 * i + j] = s[q + j]


def can_pack(base, rows: int) -> bool:
    """Whether matrices of ``base`` type and ``rows`` rows get an interleaved layout here."""
    try:
        base = GGMLType(int(base))
    except (ValueError, TypeError):
        return False
    return HAVE_X8 and base in _LAYOUTS and rows > 0 and rows % GROUP == 0


def pack(raw: np.ndarray, base, out: np.ndarray | None = None) -> np.ndarray:
    """Interleave GGUF rows ``raw`` uint8 ``[..., rows, row_bytes]`` (``can_pack`` must hold)
    into ``out`` (a new array when None; ``raw`` itself for in place), threads in parallel."""
    layout = _geometry(base)
    rb = raw.shape[-1]
    if out is None:
        out = np.empty(raw.shape, np.uint8)
    span = GROUP * rb
    _pack_groups(raw.reshape(-1, span), out.reshape(-1, span), layout.type_size, layout.n_half,
                 layout.half_at, layout.chunk_order())
    return out


# --- row lookup ------------------------------------------------------------------------------

def _chunk_positions(base) -> np.ndarray:
    """Byte offset in its group block of each rest chunk of ``base`` (for :func:`_rest_byte`)."""
    layout = _LAYOUTS[base]
    return np.array([layout.chunk_offset(c) for c in range(layout.rest // 4)], np.int64)


_Q2_K_AT, _Q3_K_AT, _Q6_K_AT = (_chunk_positions(b) for b in (_Q2_K, _Q3_K, _Q6_K))


@kernel
def _rest_byte(grp, o, i, r, chunk_offset):
    """Byte ``r`` of the rest (the bytes after the f16 fields) of row ``i``'s block at byte
    ``o`` of a group whose rest chunk ``c`` starts at byte ``chunk_offset[c]``."""
    return np.int32(grp[o + chunk_offset[r // 4] + 4 * i + r % 4])


@kernel
def dequant_row_x8(qtype, w, r, out):
    """Dequantize row ``r`` of interleaved ``w`` [rows, row_bytes] into ``out`` float32[k]."""
    n_half, chunks, five, shift = 1, 8, False, 0
    if qtype == PackedType.Q4_0_X8:
        n_half, chunks, shift = 1, 4, 8
    elif qtype == PackedType.Q4_1_X8:
        n_half, chunks = 2, 4
    elif qtype == PackedType.Q5_0_X8:
        n_half, chunks, five, shift = 1, 4, True, 16
    elif qtype == PackedType.Q5_1_X8:
        n_half, chunks, five = 2, 4, True
    g, i = r // GROUP, r % GROUP
    grp = w[g * GROUP:(g + 1) * GROUP].reshape(-1)
    if qtype == PackedType.Q4_K_X8 or qtype == PackedType.Q5_K_X8:
        # as kquants._dequant_row_q4_k / _q5_k, bytes regathered (Q5_K: qh chunks before qs)
        five = qtype == PackedType.Q5_K_X8
        size, qs_at = (176, 384) if five else (144, 128)
        for b in range(out.shape[0] // QK_K):
            o = b * GROUP * size
            d = load_f16(grp, o + 2 * i)
            dmin = load_f16(grp, o + 16 + 2 * i)
            for h in range(4):
                sc1, m1 = _scale_min_at(grp, o + 32 + 4 * i, 2 * h, 32)
                sc2, m2 = _scale_min_at(grp, o + 32 + 4 * i, 2 * h + 1, 32)
                d1, dm1 = d * np.float32(sc1), dmin * np.float32(m1)
                d2, dm2 = d * np.float32(sc2), dmin * np.float32(m2)
                y = out[b * QK_K + 64 * h:b * QK_K + 64 * h + 64]
                for l in range(32):
                    at = 32 * (l // 4) + 4 * i + l % 4
                    q = np.int32(grp[o + qs_at + 256 * h + at])
                    hb = np.int32(grp[o + 128 + at]) >> (2 * h) if five else np.int32(0)
                    y[l] = d1 * np.float32((q & 0xF) | ((hb & 1) << 4)) - dm1
                    y[32 + l] = d2 * np.float32((q >> 4) | ((hb & 2) << 3)) - dm2
        return
    if qtype == PackedType.Q2_K_X8:            # as kquants._dequant_row_q2_k, bytes regathered
        for b in range(out.shape[0] // QK_K):
            o = b * GROUP * 84
            d = load_f16(grp, o + 2 * i)
            dmin = load_f16(grp, o + 16 + 2 * i)
            for n in range(2):
                for j in range(4):
                    for h in range(2):
                        sc = _rest_byte(grp, o, i, 8 * n + 2 * j + h, _Q2_K_AT)
                        dl = d * np.float32(sc & 0xF)
                        ml = dmin * np.float32(sc >> 4)
                        y = out[b * QK_K + 128 * n + 32 * j + 16 * h:]
                        for l in range(16):
                            q = (_rest_byte(grp, o, i, 16 + 32 * n + 16 * h + l, _Q2_K_AT)
                                 >> (2 * j)) & 3
                            y[l] = dl * np.float32(q) - ml
        return
    if qtype == PackedType.Q3_K_X8:            # as kquants._dequant_row_q3_k, bytes regathered
        for b in range(out.shape[0] // QK_K):
            o = b * GROUP * 110
            d = load_f16(grp, o + 2 * i)
            for n in range(2):
                for j in range(4):
                    for h in range(2):
                        # scale chunks are stored first: byte s at 16 + 32 (s // 4) + 4i + s % 4
                        dl = d * np.float32(_q3_scale_at(grp, o + 16 + 4 * i, 8 * n + 2 * j + h, 32))
                        y = out[b * QK_K + 128 * n + 32 * j + 16 * h:]
                        for l in range(16):
                            q = (_rest_byte(grp, o, i, 32 + 32 * n + 16 * h + l, _Q3_K_AT)
                                 >> (2 * j)) & 3
                            if not (_rest_byte(grp, o, i, 16 * h + l, _Q3_K_AT) >> (4 * n + j)) & 1:
                                q -= 4
                            y[l] = dl * np.float32(q)
        return
    if qtype == PackedType.Q6_K_X8:            # as kquants._dequant_row_q6_k, bytes regathered
        for b in range(out.shape[0] // QK_K):
            o = b * GROUP * 210
            d = load_f16(grp, o + 2 * i)
            for n in range(2):
                for k in range(4):
                    for h in range(2):
                        sc = _rest_byte(grp, o, i, 192 + 8 * n + 2 * k + h, _Q6_K_AT)
                        dl = d * np.float32(sc - 256 if sc > 127 else sc)
                        y = out[b * QK_K + 128 * n + 32 * k + 16 * h:]
                        for l in range(16 * h, 16 * h + 16):
                            lo = _rest_byte(grp, o, i, 64 * n + 32 * (k & 1) + l, _Q6_K_AT)
                            hi = _rest_byte(grp, o, i, 128 + 32 * n + l, _Q6_K_AT)
                            q = (((lo >> (4 * (k >> 1))) & 0xF) | (((hi >> (2 * k)) & 3) << 4)) - 32
                            y[l - 16 * h] = dl * np.float32(q)
        return
    qh_bytes = 4 if five else 0
    block = GROUP * (2 * n_half + qh_bytes + 4 * chunks)
    for b in range(out.shape[0] // QK):
        o = b * block
        d = load_f16(grp, o + 2 * i)
        y = out[b * QK:(b + 1) * QK]
        if chunks == 8:
            for c in range(8):
                for j in range(4):
                    v = np.int32(grp[o + 16 + 32 * c + 4 * i + j])
                    y[4 * c + j] = d * np.float32(v - 256 if v > 127 else v)
            continue
        m = load_f16(grp, o + 16 + 2 * i) if n_half == 2 else np.float32(0.0)
        qh = np.int64(0)
        for j in range(qh_bytes):               # Q5: the row's 32-bit qh chunk, little-endian
            qh |= np.int64(grp[o + 16 * n_half + 4 * i + j]) << (8 * j)
        qs_at = o + 16 * n_half + 8 * qh_bytes
        for c in range(4):
            for j in range(4):
                v = np.int32(grp[qs_at + 32 * c + 4 * i + j])
                lo = (v & 15) | np.int32(((qh >> (4 * c + j)) & 1) << 4)
                hi = (v >> 4) | np.int32(((qh >> (16 + 4 * c + j)) & 1) << 4)
                y[4 * c + j] = d * np.float32(lo - shift) + m
                y[16 + 4 * c + j] = d * np.float32(hi - shift) + m


# --- the kernels -----------------------------------------------------------------------------

def _dots(builder):
    """``dots(pairs)`` -> 8 × int32: ``Σ`` over ``(q, y)`` pairs of the lane-wise 4-byte dots of
    unsigned ``q`` and signed ``y`` (32 bytes each), as independent short chains.

    With VNNI: ``vpdpbusd`` in chains of two. Without: ``vpmaddubsw`` per pair, the int16 sums of
    up to ``per16`` pairs added before one ``vpmaddwd`` (exact while ``per16 · 2 · max q · 127 <
    2^15``: Q4 quants ≤ 15 allow 8, Q5's ≤ 31 4, Q6_K's ≤ 63 2, Q8_0's 1).
    """
    if HAVE_AVX512_VNNI:
        dp = _fn(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32, [_V8I32, _V8I32, _V8I32])

        def dots(pairs, per16=8):
            chains = []
            for a in range(0, len(pairs), 2):
                acc = ir.Constant(_V8I32, [0] * 8)
                for q, y in pairs[a:a + 2]:
                    acc = builder.call(dp, [acc, builder.bitcast(q, _V8I32), y])
                chains.append(acc)
            return _tree(builder, chains)
        return dots
    maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8])
    maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
    ones = ir.Constant(_V16I16, [1] * 16)

    def dots(pairs, per16=8):
        parts = []
        for a in range(0, len(pairs), per16):
            p16 = _tree(builder, [builder.call(maddubs, [q, builder.bitcast(y, _V32I8)])
                                  for q, y in pairs[a:a + per16]])
            parts.append(builder.call(maddwd, [p16, ones]))
        return _tree(builder, parts)
    return dots


def _tree(builder, values):
    while len(values) > 1:
        values = [builder.add(values[i], values[i + 1]) if i + 1 < len(values) else values[i]
                  for i in range(0, len(values), 2)]
    return values[0]


def _f16x8(builder, ptr, at):
    bits = _load(builder, ptr, at, _V8I16)
    return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), 8)), _V8F32)


_FIVE = (_Q5_0, _Q5_1)


def _fifth_bits(builder, qh, j):
    """0x10 in byte ``b`` of each 32-bit lane where bit ``4j + b`` of that lane's ``qh`` (8 ×
    int32) is set, else 0: the fifth bits of Q5 chunk vector ``j`` (0-3: low nibbles of qs
    chunks 0-3, 4-7: their high nibbles). ``vpshufb`` spreads qh byte ``j // 2`` over the
    lane's 4 bytes, each byte keeps its own bit, a compare widens it (``vpcmpeqb``; with
    AVX-512 ``vptestnmb`` into a mask and a masked move)."""
    bit = [1 << (4 * (j % 2) + b) for _ in range(GROUP) for b in range(4)]
    mask = ir.Constant(_V32I8, bit)
    spread = builder.and_(_lane_bytes(builder, qh, [j // 2] * 4), mask)
    return builder.select(builder.icmp_unsigned("==", spread, mask),
                          ir.Constant(_V32I8, [0x10] * 32), ir.Constant(_V32I8, [0] * 32))


def _unpack_block(builder, base, g_ptr, at):
    """(d, m, quants) of the block at byte ``at`` of a group: the 8 row scales (and Q4_1/Q5_1
    mins) as 8 × float32, and ``(q, activation byte offset, sign)`` per 32-byte quant vector."""
    intp = at.type
    n_half = _LAYOUTS[base].n_half
    d8 = _f16x8(builder, g_ptr, at)
    m8 = _f16x8(builder, g_ptr, builder.add(at, ir.Constant(intp, 16))) if n_half == 2 else None
    q_at = builder.add(at, ir.Constant(intp, 16 * n_half))
    qh = None
    if base in _FIVE:                   # the 8 rows' qh, one per lane, before the quants
        qh = _load(builder, g_ptr, q_at, _V8I32)
        q_at = builder.add(q_at, ir.Constant(intp, 32))
    low = ir.Constant(_V32I8, [0x0F] * 32)
    quants = []
    for ch in range(8 if base == _Q8_0 else 4):
        v = _load(builder, g_ptr, builder.add(q_at, ir.Constant(intp, 32 * ch)), _V32I8)
        if base == _Q8_0:
            if HAVE_AVX512_VNNI:        # w + 128 as unsigned; P subtracts 128·S
                quants.append((builder.xor(v, ir.Constant(_V32I8, [0x80] * 32)), 4 * ch, None))
            else:                       # |w| · (sign(w) · y): vpmaddubsw without saturation
                quants.append((builder.call(_psign(builder), [v, v]), 4 * ch, v))
            continue
        hi = builder.bitcast(builder.lshr(builder.bitcast(v, _V16I16),
                                          ir.Constant(_V16I16, [4] * 16)), _V32I8)
        lo, hi = builder.and_(v, low), builder.and_(hi, low)
        if qh is not None:
            lo = builder.or_(lo, _fifth_bits(builder, qh, ch))
            hi = builder.or_(hi, _fifth_bits(builder, qh, 4 + ch))
        quants.append((lo, 4 * ch, None))
        quants.append((hi, 16 + 4 * ch, None))
    return d8, m8, quants


def _psign(builder):
    return _fn(builder, "llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8])


_OFFSET = {_Q4_0: -8.0, _Q8_0: -128.0 if HAVE_AVX512_VNNI else 0.0, _Q4_1: 0.0, _Q5_0: -16.0,
           _Q5_1: 0.0}
"""−c: the multiple of the block sum S to add when the dot ran on the quants plus c."""
_PER16 = {_Q4_0: 8, _Q4_1: 8, _Q8_0: 1, _Q5_0: 4, _Q5_1: 4}
"""Pairs whose ``vpmaddubsw`` int16 sums :func:`_dots` may add before widening (quants ≤ 15,
≤ 31, |w|)."""


def _emit_tile(builder, base, g_ptrs, toks, nb):
    """``len(g_ptrs)`` groups × ``len(toks)`` tokens over all ``nb`` blocks; returns the
    8 × float32 results ``[group][token]``."""
    intp = nb.type
    step = GROUP * _LAYOUTS[base].type_size
    dots = _dots(builder)
    fma = _fn(builder, "llvm.fma.v8f32", _V8F32, [_V8F32, _V8F32, _V8F32])
    zero = ir.Constant(_V8F32, [0.0] * 8)
    accs = [[cgutils.alloca_once_value(builder, zero) for _ in toks] for _ in g_ptrs]
    accms = [[cgutils.alloca_once_value(builder, zero) for _ in toks] for _ in g_ptrs]

    def c(v):
        return ir.Constant(intp, v)

    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        at = builder.mul(b, c(step))
        blocks = [_unpack_block(builder, base, g_ptr, at) for g_ptr in g_ptrs]
        x_at = builder.mul(b, c(QK))
        f_at = builder.mul(b, c(4))
        for t, tok in enumerate(toks):
            ys = {}                     # activation offset -> its 4 bytes in every lane
            xd = _splat(builder, _load(builder, tok.xd, f_at, _F32), _V8F32)
            xs = _splat(builder, _load(builder, tok.xs, f_at, _F32), _V8F32)
            for gi, (d8, m8, quants) in enumerate(blocks):
                pairs = []
                for q, off, sgn in quants:
                    if off not in ys:
                        ys[off] = _splat(builder, _load(builder, tok.x, builder.add(x_at, c(off)),
                                                        _I32), _V8I32)
                    y = ys[off]
                    if sgn is not None:
                        y = builder.bitcast(builder.call(_psign(builder), [
                            builder.bitcast(y, _V32I8), sgn]), _V8I32)
                    pairs.append((q, y))
                p = builder.sitofp(dots(pairs, _PER16[base]), _V8F32)
                if _OFFSET[base]:       # p − c·Σ xq: integers below 2^24, exact in float32
                    p = builder.call(fma, [xs, ir.Constant(_V8F32, [_OFFSET[base]] * 8), p])
                acc = accs[gi][t]
                builder.store(builder.call(fma, [p, builder.fmul(d8, xd), builder.load(acc)]), acc)
                if m8 is not None:
                    accm = accms[gi][t]
                    builder.store(builder.call(fma, [m8, xs, builder.load(accm)]), accm)
    res = [[builder.load(a) for a in row] for row in accs]
    if _LAYOUTS[base].n_half == 2:
        res = [[builder.fadd(r, builder.load(m)) for r, m in zip(rr, mm)]
               for rr, mm in zip(res, accms)]
    return res


def _lane_bytes(builder, v, picks):
    """Per 32-bit lane of ``v`` (8 × int32) the 4 bytes ``picks`` of that lane (``None``: zero),
    as one byte shuffle (``vpshufb``)."""
    zero = ir.Constant(_V32I8, [0] * 32)
    mask = [4 * i + b if b is not None else 32 for i in range(GROUP) for b in picks]
    return builder.shuffle_vector(builder.bitcast(v, _V32I8), zero,
                                  ir.Constant(ir.VectorType(_I32, 32), mask))


def _k_const(v, ty=_V8I32):
    return ir.Constant(ty, [v] * ty.count)


def _byte_shift(builder, v, by):
    """Bytes of ``v`` shifted left by ``by`` (right when negative) as 16-bit lanes: the caller
    masks off the bits that crossed from the neighbouring byte."""
    w = builder.bitcast(v, _V16I16)
    w = builder.shl(w, _k_const(by, _V16I16)) if by > 0 else \
        builder.lshr(w, _k_const(-by, _V16I16)) if by < 0 else w
    return builder.bitcast(w, _V32I8)


def _lane_u8(builder, vs, s):
    """Byte ``s`` of each lane's bytes held 4 per vector in ``vs``, zero-extended: 8 × int32."""
    return builder.bitcast(_lane_bytes(builder, vs[s // 4], (s % 4, None, None, None)), _V8I32)


def _lane_u8_pair(builder, vs, a, b):
    """Bytes ``a`` and ``b`` (in the same vector of ``vs``) of each lane as two zero-extended
    int16: 16 × int16, the pair ``vpmaddwd`` multiplies with a dword of the Q8_K block sums."""
    assert a // 4 == b // 4
    return builder.bitcast(_lane_bytes(builder, vs[a // 4], (a % 4, None, b % 4, None)), _V16I16)


class _KTile:
    """What every K-quant tile shares: its rest chunks addressed through the format's layout
    (after the ``n_half`` f16 fields of 8 rows, chunk ``c`` where its stored order puts it).
    Formats without mins (Q3_K, Q6_K) store their quants unsigned with a fixed offset ``2^k``
    (``offset_shift`` = k): ``offset · Σ_s sc_s · xb[s]`` is taken off the block total (the
    ``aux`` pair of dword ``u`` is ``(sc_2u, sc_2u+1)``)."""
    has_min = False

    @classmethod
    def chunk(cls, builder, g_ptr, at, c, vtype=_V32I8):
        off = _LAYOUTS[cls.base].chunk_offset(c)
        return _load(builder, g_ptr, builder.add(at, ir.Constant(at.type, off)), vtype)


class _Q4KTile(_KTile):
    """Q4_K in :func:`_emit_tile_k`: 8 sub-blocks of 32 (sub-block ``j``: nibbles ``j % 2`` of
    quant chunks ``8(j // 2) ..``), unsigned 6-bit scales, a separate min term (the ``aux`` pair
    of sub-block ``j`` is ``(m_j, m_j)``: ``Σ_j m_j · (xb[2j] + xb[2j+1])``)."""
    base, per16, has_min = _Q4_K, 8, True
    order = tuple(range(8))

    @classmethod
    def head(cls, builder, g_ptr, at):
        """The 6-bit scales and mins of every lane at once — ggml's ``utmp`` shuffle of
        ``get_scale_min_k4`` (as ``avx2.k4_scales_mins``): ``(scales 0..3, scales 4..7,
        mins 0..3, mins 4..7)``, 8 × int32 each, one byte per value."""
        u0, u1, u2 = (cls.chunk(builder, g_ptr, at, c, _V8I32) for c in range(3))
        k = _k_const
        high2 = [builder.shl(builder.and_(builder.lshr(u, k(6)), k(0x03030303)), k(4))
                 for u in (u0, u1)]
        return (builder.and_(u0, k(0x3F3F3F3F)),
                builder.or_(builder.and_(u2, k(0x0F0F0F0F)), high2[0]),
                builder.and_(u1, k(0x3F3F3F3F)),
                builder.or_(builder.and_(builder.lshr(u2, k(4)), k(0x0F0F0F0F)), high2[1]))

    @staticmethod
    def aux_pair(builder, head, j):
        return _lane_u8_pair(builder, head[2:], j, j)

    @staticmethod
    def scale(builder, head, j):
        return _lane_u8(builder, head, j)

    @classmethod
    def quants(cls, builder, g_ptr, at, j):
        """(8 quant vectors, their activation offsets) of sub-block ``j``."""
        h = j // 2
        qs = []
        for ch in range(8 * h, 8 * h + 8):
            v = cls.chunk(builder, g_ptr, at, 3 + ch)
            if j % 2:
                v = builder.bitcast(builder.lshr(builder.bitcast(v, _V16I16), _k_const(4, _V16I16)),
                                    _V32I8)
            qs.append(builder.and_(v, _k_const(0x0F, _V32I8)))
        return qs, [32 * j + 4 * l for l in range(8)]


class _Q5KTile(_Q4KTile):
    """Q5_K in :func:`_emit_tile_k`: Q4_K's scales, mins and nibbles (its 128 qs bytes after the
    32 qh bytes: rest chunks 11..42, qh 3..10), plus bit ``j`` of each qh byte as bit 4 of
    sub-block ``j``'s quants (0..31: four vpmaddubsw pairs fit an int16 without VNNI)."""
    base, per16 = _Q5_K, 4

    @classmethod
    def quants(cls, builder, g_ptr, at, j):
        h = j // 2
        qs = []
        for L in range(8):
            v = cls.chunk(builder, g_ptr, at, 11 + 8 * h + L)
            hb = cls.chunk(builder, g_ptr, at, 3 + L)
            low = builder.and_(_byte_shift(builder, v, -4 * (j % 2)), _k_const(0x0F, _V32I8))
            high = builder.and_(_byte_shift(builder, hb, 4 - j), _k_const(0x10, _V32I8))
            qs.append(builder.or_(low, high))
        return qs, [32 * j + 4 * l for l in range(8)]


class _Q2KTile(_KTile):
    """Q2_K in :func:`_emit_tile_k`: 16 sub-blocks of 16, 4-bit scales (low nibble of scale byte
    ``s``) and mins (high nibble; the ``aux`` pair of dword ``u`` is ``(m_2u, m_2u+1)``), a
    separate min term as Q4_K. Rest chunks in block order (the tile reads them in order):
    scales 0..3, qs 4..19; sub-block ``s = 8n + 2j + h`` takes bits ``2j`` of qs chunks
    ``4 + 8n + 4h + L`` (values ``128n + 32j + 16h + 4L ..``)."""
    base, per16, has_min = _Q2_K, 8, True
    order = tuple(8 * n + 2 * j + h for n in range(2) for h in range(2) for j in range(4))

    @classmethod
    def head(cls, builder, g_ptr, at):
        """Every lane's 16 scale bytes, 4 per 8 × int32."""
        return tuple(cls.chunk(builder, g_ptr, at, c, _V8I32) for c in range(4))

    @staticmethod
    def aux_pair(builder, head, u):
        return builder.lshr(_lane_u8_pair(builder, head, 2 * u, 2 * u + 1), _k_const(4, _V16I16))

    @staticmethod
    def scale(builder, head, s):
        return builder.and_(_lane_u8(builder, head, s), _k_const(15))

    @classmethod
    def quants(cls, builder, g_ptr, at, s):
        n, j, h = s // 8, s % 8 // 2, s % 2
        qs = [builder.and_(_byte_shift(builder, cls.chunk(builder, g_ptr, at, 4 + 8 * n + 4 * h + L),
                                       -2 * j), _k_const(3, _V32I8)) for L in range(4)]
        return qs, [128 * n + 32 * j + 16 * h + 4 * L for L in range(4)]


class _Q6KTile(_KTile):
    """Q6_K in :func:`_emit_tile_k`: 16 sub-blocks of 16 with signed 8-bit scales; the −32
    offset of the 6-bit quants is ``32 · Σ_s sc_s · xb[s]`` (the ``aux`` pair of dword ``u`` is
    ``(sc_2u, sc_2u+1)``), taken off the block total before its fma, as ggml does.

    Rest chunks (4 bytes of each row's 208 before ``d``): ql 0..31, qh 32..47, scales 48..51,
    stored in the order this tile reads them (``_Q6_K_ORDER``: a sequential stream; in block
    order the jumps between ql and qh defeated the hardware prefetcher, 12 against 26 GB/s).
    Sub-block ``s = 8n + 2m + r`` (values ``128n + 32m + 16r ..``) is quant ``m`` of ggml's
    loop for ``L = 4r .. 4r + 3`` (bytes ``4L ..`` of each 32)::

        A = ql chunk 16n + L,  B = ql chunk 16n + 8 + L,  H = qh chunk 32 + 8n + L
        m = 0: A & 15 | (H << 4) & 48      m = 1: B & 15 | (H << 2) & 48
        m = 2: A >> 4 | H & 48             m = 3: B >> 4 | (H >> 2) & 48
    """
    base, per16, offset_shift = _Q6_K, 2, 5                     # offset 32 = 1 << 5
    order = tuple(8 * n + 2 * m + r for n in range(2) for r in range(2) for m in range(4))

    @classmethod
    def head(cls, builder, g_ptr, at):
        """Every lane's 16 scale bytes, 4 per 8 × int32."""
        return tuple(cls.chunk(builder, g_ptr, at, c, _V8I32) for c in range(48, 52))

    @staticmethod
    def aux_pair(builder, head, u):
        b = 2 * u % 4
        pair = _lane_bytes(builder, head[u // 2], (None, b, None, b + 1))
        return builder.ashr(builder.bitcast(pair, _V16I16), _k_const(8, _V16I16))

    @staticmethod
    def scale(builder, head, s):
        top = _lane_bytes(builder, head[s // 4], (None, None, None, s % 4))
        return builder.ashr(builder.bitcast(top, _V8I32), _k_const(24))

    @classmethod
    def quants(cls, builder, g_ptr, at, s):
        n, m, r = s // 8, s % 8 // 2, s % 2

        def chunk(c):
            return cls.chunk(builder, g_ptr, at, c)
        qs = []
        for L in range(4 * r, 4 * r + 4):
            low = chunk(16 * n + 8 * (m % 2) + L)
            low = builder.and_(_byte_shift(builder, low, -4 * (m // 2)), _k_const(15, _V32I8))
            high = builder.and_(_byte_shift(builder, chunk(32 + 8 * n + L), 4 - 2 * m),
                                _k_const(48, _V32I8))
            qs.append(builder.or_(low, high))
        return qs, [128 * n + 32 * m + 4 * L for L in range(4 * r, 4 * r + 4)]


class _Q3KTile(_KTile):
    """Q3_K in :func:`_emit_tile_k`: 16 sub-blocks of 16, 6-bit scales minus 32, quants
    ``q' = q + 4`` in 0..7 (2 bits of qs, the hmask bit as bit 2; ggml subtracts 4 where the
    hmask bit is clear), the −4 offset taken off the block total as Q6_K's −32.

    Rest chunks: hmask 0..7, qs 8..23, scales 24..26, stored in reading order
    (``_Q3_K_ORDER``). Sub-block ``s = 8n + 2j + h`` (values ``128n + 32j + 16h ..``) takes
    bits ``2j`` of qs chunks ``8 + 8n + 4h + L`` and bit ``4n + j`` of hmask chunks ``4h + L``
    (``L = 0..3``). The 12 scale bytes ``A, B, C`` (3 × 4 per lane) unpack as ggml's ``aux``:
    scales ``4v ..`` = ``(A, B, A >> 4, B >> 4)[v] & 15 | ((C >> 2v) & 3) << 4``.
    """
    base, per16, offset_shift = _Q3_K, 8, 2                     # offset 4 = 1 << 2
    order = tuple(8 * n + 2 * j + h for n in range(2) for h in range(2) for j in range(4))

    @classmethod
    def head(cls, builder, g_ptr, at):
        """Every lane's 16 unsigned 6-bit scales, 4 per 8 × int32."""
        a, b, c = (cls.chunk(builder, g_ptr, at, ch, _V8I32) for ch in (24, 25, 26))
        k = _k_const
        lows = (a, b, builder.lshr(a, k(4)), builder.lshr(b, k(4)))
        return tuple(builder.or_(builder.and_(low, k(0x0F0F0F0F)),
                                 builder.shl(builder.and_(builder.lshr(c, k(2 * v)), k(0x03030303)),
                                             k(4)))
                     for v, low in enumerate(lows))

    @staticmethod
    def aux_pair(builder, head, u):
        return builder.sub(_lane_u8_pair(builder, head, 2 * u, 2 * u + 1), _k_const(32, _V16I16))

    @staticmethod
    def scale(builder, head, s):
        return builder.sub(_lane_u8(builder, head, s), _k_const(32))

    @classmethod
    def quants(cls, builder, g_ptr, at, s):
        n, j, h = s // 8, s % 8 // 2, s % 2
        qs = []
        for L in range(4):
            low = builder.and_(_byte_shift(builder, cls.chunk(builder, g_ptr, at, 8 + 8 * n + 4 * h + L),
                                         -2 * j), _k_const(3, _V32I8))
            high = builder.and_(_byte_shift(builder, cls.chunk(builder, g_ptr, at, 4 * h + L),
                                          2 - 4 * n - j), _k_const(4, _V32I8))
            qs.append(builder.or_(low, high))
        return qs, [128 * n + 32 * j + 16 * h + 4 * L for L in range(4)]


_K_TILES = {_Q2_K: _Q2KTile, _Q3_K: _Q3KTile, _Q4_K: _Q4KTile, _Q5_K: _Q5KTile,
            _Q6_K: _Q6KTile}


def _emit_tile_k(builder, base, g_ptrs, toks, nb):
    """:func:`_emit_tile` for the K-quants on Q8_K activations (``xq``, ``xd`` per 256-block,
    ``xb`` = int16 sums of each 16). Per block, row and token::

        p_s   = Σ q · xq over sub-block s           (lane-wise 4-byte dots, exact)
        aux   = Σ_u vpmaddwd(pair_u, (xb[2u], xb[2u+1]))       pair_u: the format's (see above)
        total = Σ_s sc_s · p_s                      Q6_K: minus 32 · aux
        acc   = fma(d · xd, float(total), acc)
        Q4_K: acc_m = fma(−(xd · dmin), float(aux), acc_m); result acc + acc_m

    Q4_K's operations are this project's Q4_K row dots' (:func:`quant.avx2.idot_q4_k_avx2`):
    the same bits. Q6_K sums one exact total per block where ggml's row dot keeps 8 float lanes:
    they differ in float rounding only. A sub-block's scale is picked out of its lane's bytes by
    one ``vpshufb`` where it is used, and multiplied as int32 (``vpmulld``)."""
    spec = _K_TILES[base]
    intp = nb.type
    step = GROUP * _LAYOUTS[base].type_size
    dots = _dots(builder)
    maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
    fma = _fn(builder, "llvm.fma.v8f32", _V8F32, [_V8F32, _V8F32, _V8F32])
    zero = ir.Constant(_V8F32, [0.0] * 8)
    accs = [[cgutils.alloca_once_value(builder, zero) for _ in toks] for _ in g_ptrs]
    accms = [[cgutils.alloca_once_value(builder, zero) for _ in toks] for _ in g_ptrs]

    def c(v):
        return ir.Constant(intp, v)

    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        at = builder.mul(b, c(step))
        heads = [spec.head(builder, g_ptr, at) for g_ptr in g_ptrs]
        x_at = builder.mul(b, c(QK_K))
        xds = [_splat(builder, _load(builder, tok.xd, builder.mul(b, c(4)), _F32), _V8F32)
               for tok in toks]
        aux = [[None] * len(toks) for _ in g_ptrs]
        for u in range(8):
            pairs = [builder.bitcast(_splat(builder, _load(builder, tok.xs, builder.add(
                builder.mul(b, c(32)), c(4 * u)), _I32), _V8I32), _V16I16) for tok in toks]
            for gi, head in enumerate(heads):
                mult = spec.aux_pair(builder, head, u)
                for t, pair in enumerate(pairs):
                    part = builder.call(maddwd, [mult, pair])
                    aux[gi][t] = part if u == 0 else builder.add(aux[gi][t], part)
        totals = [[None] * len(toks) for _ in g_ptrs]
        for gi, g_ptr in enumerate(g_ptrs):     # use aux first: fewer values live below
            if spec.has_min:
                dm8 = _f16x8(builder, g_ptr, builder.add(at, c(16)))
                for t, xd in enumerate(xds):
                    accm = accms[gi][t]
                    builder.store(builder.call(fma, [builder.fneg(builder.fmul(xd, dm8)),
                                                     builder.sitofp(aux[gi][t], _V8F32),
                                                     builder.load(accm)]), accm)
            else:
                totals[gi] = [builder.neg(builder.shl(a, _k_const(spec.offset_shift)))
                              for a in aux[gi]]
        for s in spec.order:
            quants = [(*spec.quants(builder, g_ptr, at, s), spec.scale(builder, head, s))
                      for g_ptr, head in zip(g_ptrs, heads)]
            for t, tok in enumerate(toks):
                ys = {}
                for gi, (qs, offs, sc) in enumerate(quants):
                    for off in offs:
                        if off not in ys:
                            ys[off] = _splat(builder, _load(builder, tok.x, builder.add(
                                x_at, c(off)), _I32), _V8I32)
                    part = builder.mul(dots([(q, ys[off]) for q, off in zip(qs, offs)],
                                            spec.per16), sc)
                    totals[gi][t] = part if totals[gi][t] is None else builder.add(
                        totals[gi][t], part)
        for gi, g_ptr in enumerate(g_ptrs):
            d8 = _f16x8(builder, g_ptr, at)                 # the 8 d lead every block
            for t, xd in enumerate(xds):
                acc = accs[gi][t]
                builder.store(builder.call(fma, [builder.fmul(xd, d8),
                                                 builder.sitofp(totals[gi][t], _V8F32),
                                                 builder.load(acc)]), acc)
    if not spec.has_min:
        return [[builder.load(a) for a in aa] for aa in accs]
    return [[builder.fadd(builder.load(a), builder.load(m)) for a, m in zip(aa, mm)]
            for aa, mm in zip(accs, accms)]


TILE_TOKENS = 4
"""Tokens of a prompt tile (one group)."""
WIDE_K = 8192
"""Row length from which a decoded token walks :data:`TILE_GROUPS`' wide count of groups."""
TILE_GROUPS = {_Q4_0: (2, 4), _Q4_1: (2, 4), _Q8_0: (2, 4), _Q5_0: (2, 2), _Q5_1: (2, 2),
               _Q2_K: (1, 1), _Q3_K: (1, 1),
               _Q4_K: (4, 4), _Q5_K: (1, 2), _Q6_K: (1, 2)}
"""Groups a decoded token walks at once, (rows of k < WIDE_K, wider rows): G sequential streams
a fraction of the thread's run apart, each activation load serving 8·G rows. One core streaming
from DRAM needs several streams in flight; measured per core on the dev machine (Zen 4, 1
thread, matrices of 235 MB, 2026-11-26; most figures first from a throwaway script over this
builder, then ``python -m tools.kernel_speed --rows 16384 --k 14336 --types ... --groups 2,4``
and ``--k`` 2048-18432 with as many bytes reproduce them): Q4_0 at k = 14336 reads 26.2-26.3 GB/s with 2
groups, 28.9-30.0 with 4 (k = 18432: 22.2 -> 27.2; k <= 7168: 29-31 either way); Q4_1 26-28 ->
29-30, Q8_0 30 -> 32; Q4_K 20.6-20.9 -> 25.7-26.0 at k = 14336, 22.1-22.2 (one group) -> 26.8-27.4
at k = 7168, equal at 2048-4096. The other K-quants unpack more per byte and spill registers
with more groups: Q6_K at k = 14336 reads 22.7-24.2 with 2 groups, 16.6-16.9 with 4; Q5_K 22 ->
21; Q3_K 21 (one group) -> 12.6; Q2_K 16.4 -> 14.8."""


MIN_STREAM_BYTES = 32 * 1024
"""Shortest stream for which a decoded token splits its run of rows into :data:`TILE_GROUPS`'
several: a run shorter than that many bytes per stream is one stream. DeepSeek's per-head
``wk_b``/``wv_b`` products are 128 runs of 36 KB, one per head, back to back in memory; two
18 KB streams per head restart the hardware prefetcher twice per head, one stream runs on into
the next head: 12.2 -> 16.5 GB/s (wk_b) and 11.6 -> 15.0 (wv_b) from DRAM on one Zen 4 core (a
timing loop over 24 copies of a V3 Q4_0 stack, 113 MB), the same bits. A thread's run of the
other 7B and DeepSeek matrices is hundreds of KB or more even at 16 threads; a small model's
small matrices at many threads (SmolLM2's q/k/v: 21 KB per thread at 16) now take one stream
too (not measured there)."""


def _rows_codegen(base, tile_groups=None, tile_tokens=TILE_TOKENS):
    """Codegen of ``(w, r0, r1, xq, xd, xs, out)``: ``out[t, r] = W[r] · x_t`` for the groups
    of rows ``r0 .. r1`` (multiples of 8) and every token. Tokens go 4 at a time through one
    group, the rest one at a time through G groups a fraction of the run apart (sequential
    streams, each activation load used for 8·G rows), then the odd groups; ``tile_groups`` =
    (G for rows shorter than :data:`WIDE_K`, G for the others), default :data:`TILE_GROUPS`."""
    tile_groups = tile_groups or TILE_GROUPS[base]

    def codegen(context, builder, sig, args):
        w = context.make_array(sig.args[0])(context, builder, args[0])
        arrays = [context.make_array(ty)(context, builder, a)
                  for ty, a in zip(sig.args[3:-1], args[3:-1])]
        out = context.make_array(sig.args[-1])(context, builder, args[-1])
        n, nb = cgutils.unpack_tuple(builder, arrays[1].shape, 2)
        intp = nb.type

        def c(v):
            return ir.Constant(intp, v)
        r0 = context.cast(builder, args[1], sig.args[1], types.intp)
        r1 = context.cast(builder, args[2], sig.args[2], types.intp)
        g_bytes = builder.mul(cgutils.unpack_tuple(builder, w.strides, 2)[0], c(GROUP))
        o_stride = cgutils.unpack_tuple(builder, out.strides, 2)[0]
        g0 = builder.udiv(r0, c(GROUP))
        n_groups = builder.udiv(builder.sub(r1, r0), c(GROUP))

        def run(groups, t, n_toks):
            g_ptrs = [_byte_ptr(builder, w.data, builder.mul(g, g_bytes)) for g in groups]
            toks = [_Token(builder, arrays, builder.add(t, c(s))) for s in range(n_toks)]
            if base in _K_TILES:
                res = _emit_tile_k(builder, base, g_ptrs, toks, nb)
            else:
                res = _emit_tile(builder, base, g_ptrs, toks, nb)
            for gi, g in enumerate(groups):
                for s in range(n_toks):
                    at = builder.add(builder.mul(builder.add(t, c(s)), o_stride),
                                     builder.mul(g, c(4 * GROUP)))
                    builder.store(res[gi][s], _typed_ptr(builder, out.data, at, _V8F32), align=4)

        full_t = builder.udiv(n, c(tile_tokens))
        t_end = builder.mul(full_t, c(tile_tokens))
        with cgutils.for_range(builder, n_groups) as lg:
            with cgutils.for_range(builder, full_t) as lt:
                run([builder.add(g0, lg.index)], builder.mul(lt.index, c(tile_tokens)),
                    tile_tokens)
        def decode(t, groups):
            """Token ``t`` through ``groups`` groups a fraction of the run apart, then the odd ones."""
            part = builder.udiv(n_groups, c(groups))
            with cgutils.for_range(builder, part) as lg:
                first = builder.add(g0, lg.index)
                run([builder.add(first, builder.mul(part, c(i))) for i in range(groups)], t, 1)
            g_last = builder.add(g0, builder.mul(part, c(groups)))
            with cgutils.for_range(builder, builder.sub(builder.add(g0, n_groups), g_last)) as lg:
                run([builder.add(g_last, lg.index)], t, 1)

        def decode_streams(t, groups):
            """:func:`decode` with ``groups`` streams where each is at least MIN_STREAM_BYTES
            long, else one stream."""
            if groups == 1:
                decode(t, 1)
                return
            long = builder.icmp_unsigned(">=", builder.mul(n_groups, g_bytes),
                                         c(groups * MIN_STREAM_BYTES))
            with builder.if_else(long) as (several, one):
                with several:
                    decode(t, groups)
                with one:
                    decode(t, 1)

        narrow, wide = tile_groups
        k = builder.mul(nb, c(QK_K if base in _K_TILES else QK))
        with cgutils.for_range(builder, builder.sub(n, t_end)) as lt:
            t = builder.add(t_end, lt.index)
            if narrow == wide:
                decode_streams(t, narrow)
            else:
                with builder.if_else(builder.icmp_signed(">=", k, c(WIDE_K))) as (is_wide, other):
                    with is_wide:
                        decode_streams(t, wide)
                    with other:
                        decode_streams(t, narrow)
        return context.get_dummy_value()

    return codegen


_TABLES = (types.int8, types.float32, types.float32)
_rows_q4_0_x8 = rows_intrinsic("_rows_q4_0_x8", _rows_codegen(_Q4_0), _TABLES)
_rows_q4_1_x8 = rows_intrinsic("_rows_q4_1_x8", _rows_codegen(_Q4_1), _TABLES)
_rows_q8_0_x8 = rows_intrinsic("_rows_q8_0_x8", _rows_codegen(_Q8_0), _TABLES)
_rows_q5_0_x8 = rows_intrinsic("_rows_q5_0_x8", _rows_codegen(_Q5_0), _TABLES)
_rows_q5_1_x8 = rows_intrinsic("_rows_q5_1_x8", _rows_codegen(_Q5_1), _TABLES)
_K_TABLES = (types.int8, types.float32, types.int16)
_rows_q4_k_x8 = rows_intrinsic("_rows_q4_k_x8", _rows_codegen(_Q4_K), _K_TABLES)
_rows_q6_k_x8 = rows_intrinsic("_rows_q6_k_x8", _rows_codegen(_Q6_K), _K_TABLES)
_rows_q3_k_x8 = rows_intrinsic("_rows_q3_k_x8", _rows_codegen(_Q3_K), _K_TABLES)
_rows_q5_k_x8 = rows_intrinsic("_rows_q5_k_x8", _rows_codegen(_Q5_K), _K_TABLES)
_rows_q2_k_x8 = rows_intrinsic("_rows_q2_k_x8", _rows_codegen(_Q2_K), _K_TABLES)


@kernel
def rows_x8(qtype, w, r0, r1, xq, xd, xs, out):
    """``out[t, r] = W[r] · x_t`` for interleaved ``w`` (rows ``r0 .. r1``, multiples of 8),
    every token of the 2-D int8 tables (Q4_0/Q5_0/Q8_0: ``xs`` the exact block sums,
    ``quantize_act_q8(..., exact_sums=True)``)."""
    if qtype == PackedType.Q4_0_X8:
        _rows_q4_0_x8(w, r0, r1, xq, xd, xs, out)
    elif qtype == PackedType.Q4_1_X8:
        _rows_q4_1_x8(w, r0, r1, xq, xd, xs, out)
    elif qtype == PackedType.Q8_0_X8:
        _rows_q8_0_x8(w, r0, r1, xq, xd, xs, out)
    elif qtype == PackedType.Q5_0_X8:
        _rows_q5_0_x8(w, r0, r1, xq, xd, xs, out)
    elif qtype == PackedType.Q5_1_X8:
        _rows_q5_1_x8(w, r0, r1, xq, xd, xs, out)


@kernel
def rows_x8_k(qtype, w, r0, r1, xq, xd, xb, out):
    """As :func:`rows_x8` for the interleaved K-quants, on Q8_K tables (``xb`` int16 sums of
    each 16, :func:`quant.kquants.quantize_act_q8k`)."""
    if qtype == PackedType.Q4_K_X8:
        _rows_q4_k_x8(w, r0, r1, xq, xd, xb, out)
    elif qtype == PackedType.Q6_K_X8:
        _rows_q6_k_x8(w, r0, r1, xq, xd, xb, out)
    elif qtype == PackedType.Q3_K_X8:
        _rows_q3_k_x8(w, r0, r1, xq, xd, xb, out)
    elif qtype == PackedType.Q5_K_X8:
        _rows_q5_k_x8(w, r0, r1, xq, xd, xb, out)
    elif qtype == PackedType.Q2_K_X8:
        _rows_q2_k_x8(w, r0, r1, xq, xd, xb, out)
