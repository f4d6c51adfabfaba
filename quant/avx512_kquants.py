"""AVX-512 tiles for the K-quants on Q8_K activations (int8 per 256-block, float32 scale ``yd``,
int16 sums ``bsum`` of each 16 values): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Per 256-block and row the weights are unpacked into four 64-byte registers of unsigned quants
``q`` (register ``k`` holds values ``64k .. 64k + 63``, in value order) and the block's integer
sub-block scales are spread over the 32 int16 lanes of ``vpmaddwd`` (byte pair ``j`` of register
``k`` lies in 16-value sub-block ``4k + j/8`` or 32-value sub-block ``2k + j/16``)::

    main = Σ_k vpmaddwd(vpmaddubsw(q_k, y_k), scale_lanes_k)   16 × int32, exact (a byte pair
                                                               sums to ≤ 2·63·127: no saturation)
    aux  = vpmaddwd(coef[16] as int16, bsum[16])               8 × int32, exact

    format  bytes  q (unsigned)                         scales            coef       c
    Q2_K     84    2 bits of qs[64] @16                 sc & 15 per 16    sc >> 4    −dmin
    Q3_K    110    2 bits of qs[64] @32 | hmask bit<<2  6-bit − 32 per 16 = scale    −4·d
    Q4_K    144    nibble of qs[128] @16                6-bit per 32      min (×2)   −dmin
    Q5_K    176    nibble of qs[128] @48 | qh bit<<4    6-bit per 32      min (×2)   −dmin
    Q6_K    210    nibble of ql[128] | 2 bits of qh<<4  int8 per 16       = scale    (−32)

(value = d·scale·q − c-term: ``d·sc·q − dmin·m``, Q3_K ``d·sc·(q − 4)``, Q6_K ``d·sc·(q − 32)``;
a Q4_K/Q5_K min of a 32-block multiplies ``bsum[2s] + bsum[2s+1]``, so each is used twice.)
The float finish per block and token, ``dd = yd·d``:

* Q2_K, Q3_K, Q5_K: ``acc = fma(float(main), dd, acc)``, ``acc8 = fma(float(aux), yd·c, acc8)``,
  row = hsum(acc) + hsum(acc8) — the portable ``kquants._idot_<f>`` sums up to float order;
* Q4_K: one exact total per block, ``acc = fma(dd, float(Σ main), acc)`` and
  ``acc_m = fma(yd·c, float(Σ aux), acc_m)``, row = acc + acc_m;
* Q6_K: ggml's 8 lanes, ``sumi = fold(main) − 32·aux`` (lanes i and i + 8 of ``main`` are the
  same lane of two 32-byte steps), ``acc8 = fma(dd, float(sumi), acc8)``, row = hsum8(acc8);

the last two are :mod:`quant.avx2`'s Q4_K/Q6_K row dots bit for bit. Tiles are 4 rows × 4 tokens
(leftovers 1 row / 1 token), laid out by :func:`quant.avx512.rows_codegen`; the 4 × 4 tile's
16 accumulator sets spill, but it still doubles prompt throughput over 4 × 1 (Q4_K, 16 tokens:
27 → 48 G weights/s per core) because each block is unpacked once for 4 tokens.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils

from .avx2 import (_F32, _I8, _I16, _I32, _fn, _halves, _hsum8, _load, _splat, host_has, isum,
                   k4_scales_mins, words_to_bytes)
from .avx512 import (_V16F32, _V16I32, _V32I8, _V64I8, _byte_ptr, _mask, madd_pairs, rows_codegen,
                     rows_intrinsic)
from .jit import kernel

_V16I8, _V16I16, _V32I16 = ir.VectorType(_I8, 16), ir.VectorType(_I16, 16), ir.VectorType(_I16, 32)
_V8I32, _V8F32 = ir.VectorType(_I32, 8), ir.VectorType(_F32, 8)

HAVE_KTILES = host_has("avx2", "fma", "f16c")
"""Whether the compile target can run these tiles: AVX-512BW runs each 64-byte step as one
register, AVX2 as two 32-byte halves (same integers, same float operations: same bits)."""

_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"
_BLOCK = {_Q2_K: 84, _Q3_K: 110, _Q4_K: 144, _Q5_K: 176, _Q6_K: 210}
TILE_ROWS, TILE_TOKENS = 4, 4


def _c(v, ty=_I32):
    return ir.Constant(ty, v)


def _twice(builder, v32):
    """32 bytes → the same 32 bytes twice (64)."""
    return builder.shuffle_vector(v32, v32, _mask(list(range(32)) * 2))


def _bits(builder, v64, shift_lo, shift_hi, mask):
    """Per byte ``(v >> s) & mask`` with s = ``shift_lo`` for bytes 0..31, ``shift_hi`` for
    32..63 (16-bit shifts; ``mask`` drops the bits shifted in from the neighbouring byte)."""
    shifted = builder.lshr(builder.bitcast(v64, _V32I16),
                           ir.Constant(_V32I16, [shift_lo] * 16 + [shift_hi] * 16))
    return builder.and_(builder.bitcast(shifted, _V64I8), ir.Constant(_V64I8, [mask] * 64))


def _half(builder, w_ptr, off):
    return _halves(builder, w_ptr, off, 1)[0]


class _Block:
    """One row's 256-block ``b``: ``q(k)`` the k-th 64 quants, ``scale_lanes(k)`` their 32 int16
    scales, ``coef`` (16 × int16), ``d`` and ``c`` (float32) as in the module table."""

    def __init__(self, builder, kind, w_ptr, b):
        self.builder, self.kind, self.w = builder, kind, w_ptr
        intp = b.type
        self.o = builder.mul(b, ir.Constant(intp, _BLOCK[kind]))
        at = self._at
        if kind == _Q2_K:
            sc = _load(builder, w_ptr, at(0), _V16I8)
            self.scales = builder.zext(builder.and_(sc, ir.Constant(_V16I8, [15] * 16)), _V16I16)
            self.coef = builder.zext(builder.lshr(sc, ir.Constant(_V16I8, [4] * 16)), _V16I16)
            self.d = _half(builder, w_ptr, at(80))
            self.c = builder.fneg(_half(builder, w_ptr, at(82)))
            self.sub = 16
        elif kind == _Q3_K:
            aux = [_load(builder, w_ptr, at(96 + 4 * t), _I32) for t in range(3)]
            k1, k2 = _c(0x03030303), _c(0x0F0F0F0F)

            def part(word, shift_lo, tshift):
                lo = builder.and_(builder.lshr(word, _c(shift_lo)), k2)
                hi = builder.shl(builder.and_(builder.lshr(aux[2], _c(tshift)), k1), _c(4))
                return builder.or_(lo, hi)
            raw = words_to_bytes(builder, [part(aux[0], 0, 0), part(aux[1], 0, 2),
                                           part(aux[0], 4, 4), part(aux[1], 4, 6)])
            signed = builder.sub(raw, ir.Constant(_V16I8, [32] * 16))
            self.scales = builder.sext(signed, _V16I16)
            self.coef = builder.sext(signed, _V16I16)
            d = _half(builder, w_ptr, at(108))
            self.d = d
            self.c = builder.fmul(d, ir.Constant(_F32, -4.0))
            self.sub = 16
        elif kind == _Q6_K:
            sc = _load(builder, w_ptr, at(192), _V16I8)
            self.scales = builder.sext(sc, _V16I16)
            self.coef = builder.sext(sc, _V16I16)
            self.d = _half(builder, w_ptr, at(208))
            self.c = None                       # the −32 offset is taken in the int lanes
            self.sub = 16
        else:                                   # Q4_K/Q5_K: get_scale_min_k4
            sm = k4_scales_mins(builder, w_ptr, at(4))                # scales[8] ‖ mins[8]
            self.scales = builder.zext(sm, _V16I16)                   # lanes 0..7 used
            mins = builder.shuffle_vector(sm, sm, _mask([8 + i // 2 for i in range(16)]))
            self.coef = builder.zext(mins, _V16I16)
            self.d = _half(builder, w_ptr, at(0))
            self.c = builder.fneg(_half(builder, w_ptr, at(2)))
            self.sub = 32

    def _at(self, offset):
        return self.builder.add(self.o, ir.Constant(self.o.type, offset))

    def q(self, k):
        builder, w, at = self.builder, self.w, self._at
        if self.kind == _Q4_K:
            return _bits(builder, _twice(builder, _load(builder, w, at(16 + 32 * k), _V32I8)),
                         0, 4, 0x0F)
        if self.kind == _Q6_K:
            n, hi = k // 2, k % 2
            low = _bits(builder, _load(builder, w, at(64 * n), _V64I8), 4 * hi, 4 * hi, 0x0F)
            qh = _twice(builder, _load(builder, w, at(128 + 32 * n), _V32I8))
            high = _bits(builder, qh, 4 * hi, 4 * hi + 2, 3)
            return builder.or_(low, builder.shl(high, ir.Constant(_V64I8, [4] * 64)))
        if self.kind == _Q5_K:
            ql = _twice(builder, _load(builder, w, at(48 + 32 * k), _V32I8))
            qh = _twice(builder, _load(builder, w, at(16), _V32I8))
            low = _bits(builder, ql, 0, 4, 0x0F)
            high = _bits(builder, qh, 2 * k, 2 * k + 1, 1)
            return builder.or_(low, builder.shl(high, ir.Constant(_V64I8, [4] * 64)))
        n, j0 = k // 2, 2 * (k % 2)
        qs_at = 16 if self.kind == _Q2_K else 32
        qs = _twice(builder, _load(builder, w, at(qs_at + 32 * n), _V32I8))
        q = _bits(builder, qs, 2 * j0, 2 * j0 + 2, 3)
        if self.kind == _Q3_K:
            hm = _twice(builder, _load(builder, w, at(0), _V32I8))
            hb = _bits(builder, hm, 4 * n + j0, 4 * n + j0 + 1, 1)
            q = builder.or_(q, builder.shl(hb, ir.Constant(_V64I8, [2] * 64)))
        return q

    def scale_lanes(self, k):
        """The scales of register ``k``'s 32 byte pairs (int16 lanes of ``vpmaddwd``)."""
        if self.sub == 16:
            idx = [4 * k + j // 8 for j in range(32)]
        else:
            idx = [2 * k + j // 16 for j in range(32)]
        return self.builder.shuffle_vector(self.scales, self.scales, _mask(idx))


class _KToken:
    """Pointers of one token's Q8_K tables (rows of the 2-D ``xq``, ``xd``, ``xb``)."""

    def __init__(self, builder, arrays, t):
        xq, xd, xb = ((a.data, cgutils.unpack_tuple(builder, a.strides, 2)[0]) for a in arrays)
        self.x = _byte_ptr(builder, xq[0], builder.mul(t, xq[1]))
        self.xd = _byte_ptr(builder, xd[0], builder.mul(t, xd[1]))
        self.xb = _byte_ptr(builder, xb[0], builder.mul(t, xb[1]))


def _emit_ktile(builder, kind, w_rows, toks, nb):
    """One tile's block loop; returns ``results[i][t]``. The float finish per format is in the
    module docstring (Q4_K and Q6_K: as :mod:`quant.avx2`, bit for bit)."""
    intp = nb.type
    madd = madd_pairs(builder)
    maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
    fma16 = _fn(builder, "llvm.fma.v16f32", _V16F32, [_V16F32, _V16F32, _V16F32])
    fma8 = _fn(builder, "llvm.fma.v8f32", _V8F32, [_V8F32, _V8F32, _V8F32])
    fma1 = _fn(builder, "llvm.fma.f32", _F32, [_F32, _F32, _F32])
    zero = ir.Constant(_V16I32, [0] * 16)

    def fold8(v16):                             # lanes i + (i + 8): two 32-byte steps in one
        return builder.add(builder.shuffle_vector(v16, v16, _mask(range(8))),
                           builder.shuffle_vector(v16, v16, _mask(range(8, 16))))

    def acc_of(value):
        return [[cgutils.alloca_once_value(builder, value) for _ in toks] for _ in w_rows]

    accs, acc8s = acc_of(ir.Constant(_V16F32, [0.0] * 16)), acc_of(ir.Constant(_V8F32, [0.0] * 8))
    acc1s, accms = acc_of(ir.Constant(_F32, 0.0)), acc_of(ir.Constant(_F32, 0.0))
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        blocks = [_Block(builder, kind, w_ptr, b) for w_ptr in w_rows]
        mains = [[zero for _ in toks] for _ in w_rows]
        for k in range(4):
            ys = [_load(builder, tok.x, builder.add(builder.mul(b, ir.Constant(intp, 256)),
                                                    ir.Constant(intp, 64 * k)), _V64I8)
                  for tok in toks]
            for i, blk in enumerate(blocks):
                q = blk.q(k)
                lanes = blk.scale_lanes(k)
                for t, y in enumerate(ys):     # |q·y pair sum| ≤ 2·63·127: no saturation
                    p = madd(q, y, lanes)
                    mains[i][t] = builder.add(mains[i][t], p)
        for t, tok in enumerate(toks):
            yd = _load(builder, tok.xd, builder.mul(b, ir.Constant(intp, 4)), _F32)
            bsum = _load(builder, tok.xb, builder.mul(b, ir.Constant(intp, 32)), _V16I16)
            for i, blk in enumerate(blocks):
                aux = builder.call(maddwd, [blk.coef, bsum])
                dd = builder.fmul(yd, blk.d)
                main = mains[i][t]
                if kind == _Q4_K:               # one exact total per block, scalar chains
                    accm, acc1 = accms[i][t], acc1s[i][t]
                    summ = builder.sitofp(isum(builder, aux, 8), _F32)
                    total = builder.sitofp(isum(builder, fold8(main), 8), _F32)
                    builder.store(builder.call(fma1, [builder.fmul(yd, blk.c), summ,
                                                      builder.load(accm)]), accm)
                    builder.store(builder.call(fma1, [dd, total, builder.load(acc1)]), acc1)
                elif kind == _Q6_K:             # ggml's 8 lanes, the −32 offset from the bsums
                    sumi = builder.sub(fold8(main), builder.shl(aux, ir.Constant(_V8I32, [5] * 8)))
                    acc8 = acc8s[i][t]
                    builder.store(builder.call(fma8, [_splat(builder, dd, _V8F32),
                                                      builder.sitofp(sumi, _V8F32),
                                                      builder.load(acc8)]), acc8)
                else:
                    acc, acc8 = accs[i][t], acc8s[i][t]
                    cc = builder.fmul(yd, blk.c)
                    builder.store(builder.call(fma16, [builder.sitofp(main, _V16F32),
                                                       _splat(builder, dd, _V16F32),
                                                       builder.load(acc)]), acc)
                    builder.store(builder.call(fma8, [builder.sitofp(aux, _V8F32),
                                                      _splat(builder, cc, _V8F32),
                                                      builder.load(acc8)]), acc8)
    results = []
    for i in range(len(w_rows)):
        row = []
        for t in range(len(toks)):
            if kind == _Q4_K:
                row.append(builder.fadd(builder.load(acc1s[i][t]), builder.load(accms[i][t])))
            elif kind == _Q6_K:
                row.append(_hsum8(builder, builder.load(acc8s[i][t])))
            else:
                acc = builder.load(accs[i][t])
                lo = builder.shuffle_vector(acc, acc, _mask(range(8)))
                hi = builder.shuffle_vector(acc, acc, _mask(range(8, 16)))
                row.append(builder.fadd(_hsum8(builder, builder.fadd(lo, hi)),
                                        _hsum8(builder, builder.load(acc8s[i][t]))))
        results.append(row)
    return results


def _codegen(kind):
    return rows_codegen(lambda builder, w_rows, toks, nb: _emit_ktile(builder, kind, w_rows, toks, nb),
                        _KToken, TILE_ROWS, TILE_TOKENS)


_TABLES = (types.int8, types.float32, types.int16)            # xq, xd, xb
_rows_q2_k = rows_intrinsic("_rows_q2_k", _codegen(_Q2_K), _TABLES)
_rows_q3_k = rows_intrinsic("_rows_q3_k", _codegen(_Q3_K), _TABLES)
_rows_q4_k = rows_intrinsic("_rows_q4_k", _codegen(_Q4_K), _TABLES)
_rows_q5_k = rows_intrinsic("_rows_q5_k", _codegen(_Q5_K), _TABLES)
_rows_q6_k = rows_intrinsic("_rows_q6_k", _codegen(_Q6_K), _TABLES)


@kernel
def rows_q2_k_avx512(w, r0, r1, xq, xd, xb, out):
    """``out[t, r] = W[r] · x_t`` for Q2_K rows ``r0..r1`` and every token of the 2-D Q8_K
    tables (``quantize_act_q8k``); equals ``kquants._idot_q2_k`` up to float order."""
    _rows_q2_k(w, r0, r1, xq, xd, xb, out)


@kernel
def rows_q3_k_avx512(w, r0, r1, xq, xd, xb, out):
    """As :func:`rows_q2_k_avx512` for Q3_K."""
    _rows_q3_k(w, r0, r1, xq, xd, xb, out)


@kernel
def rows_q5_k_avx512(w, r0, r1, xq, xd, xb, out):
    """As :func:`rows_q2_k_avx512` for Q5_K."""
    _rows_q5_k(w, r0, r1, xq, xd, xb, out)


@kernel
def rows_q4_k_avx512(w, r0, r1, xq, xd, xb, out):
    """As :func:`rows_q2_k_avx512` for Q4_K; equals ``avx2.idot_q4_k_avx2`` bit for bit."""
    _rows_q4_k(w, r0, r1, xq, xd, xb, out)


@kernel
def rows_q6_k_avx512(w, r0, r1, xq, xd, xb, out):
    """As :func:`rows_q2_k_avx512` for Q6_K; equals ``avx2.idot_q6_k_avx2`` bit for bit."""
    _rows_q6_k(w, r0, r1, xq, xd, xb, out)
