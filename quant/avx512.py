"""AVX-512 (VNNI) tiles of row dots with int8 activations: Q8_0, Q4_0, Q4_1, each output
bit-identical to :mod:`quant.avx2`'s row dot on the same row and token.

A *tile* is ``R`` weight rows × ``T`` tokens (4 × 4, 4 × 1, 1 × 4 and 1 × 1 are emitted; which rows, see
:func:`_rows_codegen`): each
weight pair is loaded and unpacked once and used for ``T`` tokens, each activation pair once for
``R`` rows, and the ``R·T`` accumulator chains are independent, so the loop is bounded by
throughput, not by the 4-cycle latency of one ``fma`` chain (a single row dot is). Each loop step
handles two 32-value blocks ``b = 2j, 2j + 1`` in one 512-bit register: the 64 activation bytes
``xq[t, 64j : 64j + 64]`` are one load, and the weights are arranged to match (per 128-bit lane:
block 2j low | high, block 2j+1 low | high)::

    Q8_0  (qs of block 2j ‖ qs of block 2j+1) XOR 0x80   = w + 128 as unsigned bytes
          (block 34 bytes: d f16, qs[32] at +2)
    Q4_x  per block the 16 bytes of qs loaded twice, the second copy shifted right by 4,
          then & 0x0F: low nibbles ‖ high nibbles      (Q4_0 block 18 bytes, qs at +2;
                                                        Q4_1 block 20 bytes, qs at +4)
    p   = vpdpbusd(base, q, y)                         16 × int32: lane i of block half h is
                                                        the exact sum over bytes 4i..4i+3
          Q8_0: Σ (w + 128)·y − 128·Σ y = Σ w·y;   Q4_0: Σ q·y − 8·Σ y = Σ (q − 8)·y;
          Q4_1/Q5_1: base 0: Σ q·y
    acc = fma(float(p), [d_2j·xd[t, 2j]] × 8 ‖ [d_2j+1·xd[t, 2j+1]] × 8, acc)

``base`` = −c·Σ of each 4 activation bytes (c = 128 for Q8_0, 8 for Q4_0, 16 for Q5_0), one
``vpdpbusd`` with the constant bytes c per token and pair, shared by the tile's rows. (It was a
per-token table; at k ≥ 7168 the table and the 4 streaming rows no longer fit L1 together and
Q4_0 fell from 21 to 16 GB/s per core.)

The AVX2 kernel keeps two 8-lane chains, even blocks and odd blocks, and adds an odd last block
to the even chain; its ``vpmaddubsw``/``vpmaddwd`` pair yields the same 8 exact int32 lane sums
(the byte products never saturate: |q·xq| ≤ 128·127). Here the low 8 lanes of ``acc`` are the
even chain and the high 8 the odd chain, so every float operation — scale product, fma, the odd
tail (run by the AVX2 step on the low half), ``(e0 + e1) + hsum8(a0 + a1)`` — is the same
operation on the same values in the same order: results are equal bit for bit. Q4_1's
``m_w · xs[b]`` terms run as a 2-lane (even, odd) multiply-then-add.

:data:`HAVE_AVX512_VNNI` says whether the compile target has avx512f, avx512bw, avx512vl and
avx512vnni (``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` honoured as for AVX2).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .avx2 import _F32, _I8, _I16, _I32, _I64, _Q4_0, _Q4_1, _Q8_0, _fn, _load, finish_row, host_has
from .avx2 import _LAYOUT as _AVX2_LAYOUT
from .jit import kernel

HAVE_AVX512_VNNI = host_has("avx512f", "avx512bw", "avx512vl", "avx512vnni")
"""Whether the compile target has ``vpdpbusd`` (then every tile here uses it; Q8_0's needs it)."""
HAVE_TILES = host_has("avx2", "fma", "f16c")
"""Whether the compile target can run the Q4_0/Q4_1/Q5_0/Q5_1 tiles: without VNNI their byte
dot is ``vpmaddubsw`` + ``vpmaddwd`` (exact: their quants are ≤ 31, a byte pair sums to at most
2·31·127), on 64-byte registers with AVX-512BW or as two 32-byte halves with AVX2. Q8_0's
``w + 128`` would saturate ``vpmaddubsw``, so its tile needs VNNI."""
_WIDE = host_has("avx512f", "avx512bw")

_Q5_0, _Q5_1 = "q5_0", "q5_1"
_LAYOUT = {**_AVX2_LAYOUT, _Q5_0: (22, 6), _Q5_1: (24, 8)}   # kind -> (block bytes, qs offset)
_QH_OFFSET = {_Q5_0: 2, _Q5_1: 4}       # Q5: byte offset of the uint32 of high bits
_HAS_MIN = (_Q4_1, _Q5_1)               # x = d·q + m: the m·xs term

_OFFSET = {_Q8_0: 128, _Q4_0: 8, _Q5_0: 16, _Q4_1: 0, _Q5_1: 0}   # q − c is the signed quant

TILE_ROWS, TILE_TOKENS = 4, 4
"""The large tile; leftover rows and tokens run in 1-row / 1-token tiles."""

_V16I8, _V32I8, _V64I8 = (ir.VectorType(_I8, n) for n in (16, 32, 64))
_V16I32, _V16F32 = ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)
_V32I16 = ir.VectorType(_I16, 32)
_V2F32, _V2I16 = ir.VectorType(_F32, 2), ir.VectorType(_I16, 2)


def _mask(values):
    return ir.Constant(ir.VectorType(_I32, len(values)), list(values))


def _byte_ptr(builder, base, offset):
    return builder.gep(builder.bitcast(base, _I8.as_pointer()), [offset])


def _typed_ptr(builder, base, offset, ty):
    return builder.bitcast(_byte_ptr(builder, base, offset), ty.as_pointer())


def _half_pair(builder, w_ptr, off0, off1):
    """float32 × 2 from the f16 values at byte offsets ``off0``, ``off1`` of ``w_ptr`` (``off1``
    None: the second value is 0)."""
    d = ir.Constant(_V2I16, [0, 0])
    d = builder.insert_element(d, _load(builder, w_ptr, off0, _I16), ir.Constant(_I32, 0))
    if off1 is not None:
        d = builder.insert_element(d, _load(builder, w_ptr, off1, _I16), ir.Constant(_I32, 1))
    return builder.fpext(builder.bitcast(d, ir.VectorType(ir.HalfType(), 2)), _V2F32)


def _load_two(builder, base, offset, half_type, single):
    """Two consecutive ``half_type`` vectors at ``base + offset`` as one vector of twice the
    width; ``single``: only the first is loaded and the second half is zeros."""
    lo = _load(builder, base, offset, half_type)
    if not single:
        return _load(builder, base, offset, ir.VectorType(half_type.element, 2 * half_type.count))
    return builder.shuffle_vector(lo, ir.Constant(half_type, [0] * half_type.count),
                                  _mask(range(2 * half_type.count)))


def _unpack_pair(builder, kind, w_ptr, j, single=False):
    """(q, d, m) of weight blocks 2j, 2j+1: q as 64 unsigned bytes (layout above), d and the
    Q4_1/Q5_1 min m as float32 × 2 (m None for the other formats). ``single``: block 2j only,
    the second block's bytes and scales read as zeros (an odd row's last block)."""
    intp = j.type
    block_bytes, q_offset = _LAYOUT[kind]
    w0 = builder.mul(j, ir.Constant(intp, 2 * block_bytes))
    w1 = None if single else builder.add(w0, ir.Constant(intp, block_bytes))

    def both(offset, vtype):
        first = _load(builder, w_ptr, builder.add(w0, ir.Constant(intp, offset)), vtype)
        zero = ir.Constant(vtype, [0] * vtype.count if isinstance(vtype, ir.VectorType) else 0)
        second = (zero if single else
                  _load(builder, w_ptr, builder.add(w1, ir.Constant(intp, offset)), vtype))
        return first, second

    if kind == _Q8_0:
        q0, q1 = both(q_offset, _V32I8)
        flip = ir.Constant(_V32I8, [0x80] * 32)
        q1 = q1 if single else builder.xor(q1, flip)
        q = builder.shuffle_vector(builder.xor(q0, flip), q1, _mask(range(64)))
    else:
        p0, p1 = both(q_offset, _V16I8)
        twice = builder.shuffle_vector(p0, p1, _mask(list(range(16)) * 2 + list(range(16, 32)) * 2))
        v32i16 = ir.VectorType(_I16, 32)
        shifted = builder.lshr(builder.bitcast(twice, v32i16),
                               ir.Constant(v32i16, ([0] * 8 + [4] * 8) * 2))
        q = builder.and_(builder.bitcast(shifted, _V64I8), ir.Constant(_V64I8, [0x0F] * 64))
        if kind in _QH_OFFSET:              # bit b of qh (2j ‖ 2j+1) is bit 4 of byte b
            h0, h1 = both(_QH_OFFSET[kind], _I32)
            qh = builder.or_(builder.zext(h0, _I64),
                             builder.shl(builder.zext(h1, _I64), ir.Constant(_I64, 32)))
            high = builder.select(builder.bitcast(qh, ir.VectorType(ir.IntType(1), 64)),
                                  ir.Constant(_V64I8, [0x10] * 64), ir.Constant(_V64I8, [0] * 64))
            q = builder.or_(q, high)
    d = _half_pair(builder, w_ptr, w0, w1)
    m = None
    if kind in _HAS_MIN:
        two = ir.Constant(intp, 2)
        m = _half_pair(builder, w_ptr, builder.add(w0, two),
                       None if single else builder.add(w1, two))
    return builder.bitcast(q, _V16I32), d, m


class _Token:
    """Pointers of one token's activation tables (rows of the 2-D ``xq``, ``xd``, ``xs``)."""

    def __init__(self, builder, arrays, t):
        xq, xd, xs = ((a.data, cgutils.unpack_tuple(builder, a.strides, 2)[0]) for a in arrays)
        self.x = _byte_ptr(builder, xq[0], builder.mul(t, xq[1]))
        self.xd = _byte_ptr(builder, xd[0], builder.mul(t, xd[1]))
        self.xs = _byte_ptr(builder, xs[0], builder.mul(t, xs[1]))


def madd_pairs(builder):
    """``madd(q, y, lanes)`` = ``vpmaddwd(vpmaddubsw(q, y), lanes)`` on 64 bytes → 16 × int32:
    one AVX-512BW instruction each, or each 32-byte half through the AVX2 ones."""
    if _WIDE:
        maddubs = _fn(builder, "llvm.x86.avx512.pmaddubs.w.512", _V32I16, [_V64I8, _V64I8])
        maddwd = _fn(builder, "llvm.x86.avx512.pmaddw.d.512", _V16I32, [_V32I16, _V32I16])
        return lambda q, y, lanes: builder.call(maddwd, [builder.call(maddubs, [q, y]), lanes])
    maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(_I16, 16), [_V32I8, _V32I8])
    maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", ir.VectorType(_I32, 8),
                 [ir.VectorType(_I16, 16), ir.VectorType(_I16, 16)])

    def half(v, h, n):
        return builder.shuffle_vector(v, v, _mask(range(h * n, h * n + n)))

    def madd(q, y, lanes):
        parts = [builder.call(maddwd, [builder.call(maddubs, [half(q, h, 32), half(y, h, 32)]),
                                       half(lanes, h, 16)]) for h in range(2)]
        return builder.shuffle_vector(parts[0], parts[1], _mask(range(16)))
    return madd


def _byte_dot(builder):
    """``dot(base, q, y)`` = base + the 16 four-byte sums of unsigned ``q`` × signed ``y``
    (``vpdpbusd``; without VNNI :func:`madd_pairs` with unit lanes, exact for quants ≤ 31)."""
    if HAVE_AVX512_VNNI:
        dpbusd = _fn(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32, [_V16I32, _V16I32, _V16I32])
        return lambda base, q, y: builder.call(dpbusd, [base, q, y])
    madd = madd_pairs(builder)
    ones = ir.Constant(_V32I16, [1] * 32)
    return lambda base, q, y: builder.add(base, madd(builder.bitcast(q, _V64I8),
                                                     builder.bitcast(y, _V64I8), ones))


def _step(builder, kind, w_rows, toks, j, accs, extras, single=False):
    """Accumulate weight blocks 2j, 2j+1 (``single``: block 2j only) of every row into every
    token's accumulators ``accs[i][t]`` (16 × float32) and ``extras[i][t]`` (2 × float32)."""
    intp = j.type
    dot = _byte_dot(builder)
    fma = _fn(builder, "llvm.fma.v16f32", _V16F32, [_V16F32, _V16F32, _V16F32])
    b0 = builder.mul(j, ir.Constant(intp, 2))
    at64 = builder.mul(j, ir.Constant(intp, 64))
    weights = [_unpack_pair(builder, kind, w_ptr, j, single) for w_ptr in w_rows]
    for t, tok in enumerate(toks):
        y = builder.bitcast(_load_two(builder, tok.x, at64, _V32I8, single), _V16I32)
        base = ir.Constant(_V16I32, [0] * 16)
        if _OFFSET[kind]:                   # −c·Σ of each 4 activation bytes, once per token
            c_bytes = builder.bitcast(ir.Constant(_V64I8, [_OFFSET[kind]] * 64), _V16I32)
            base = builder.sub(base, dot(base, c_bytes, y))
        f4 = builder.mul(b0, ir.Constant(intp, 4))
        xd2 = _load_two(builder, tok.xd, f4, ir.VectorType(_F32, 1), single)
        xs2 = None
        if kind in _HAS_MIN:
            xs2 = _load_two(builder, tok.xs, f4, ir.VectorType(_F32, 1), single)
        for i, (q, d, m) in enumerate(weights):
            p = dot(base, q, y)
            s2 = builder.fmul(d, xd2)
            scale = builder.shuffle_vector(s2, s2, _mask([0] * 8 + [1] * 8))
            acc = accs[i][t]
            builder.store(builder.call(fma, [builder.sitofp(p, _V16F32), scale,
                                             builder.load(acc)]), acc)
            if xs2 is not None:
                extra = extras[i][t]
                builder.store(builder.fadd(builder.load(extra), builder.fmul(m, xs2)), extra)


def _emit_tile(builder, kind, w_rows, toks, nb):
    """Emit the pair loop and odd tail of one ``len(w_rows)`` × ``len(toks)`` tile; returns the
    results as ``results[i][t]`` (float32 values)."""
    intp = nb.type
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(_V16F32, [0.0] * 16)) for _ in toks]
            for _ in w_rows]
    extras = [[cgutils.alloca_once_value(builder, ir.Constant(_V2F32, [0.0] * 2)) for _ in toks]
              for _ in w_rows]
    pairs = builder.udiv(nb, ir.Constant(intp, 2))
    with cgutils.for_range(builder, pairs) as loop:
        _step(builder, kind, w_rows, toks, loop.index, accs, extras)
    odd = builder.icmp_unsigned("!=", builder.mul(pairs, ir.Constant(intp, 2)), nb)
    with builder.if_then(odd):              # the last odd block joins the even chain (lanes 0..7)
        _step(builder, kind, w_rows, toks, pairs, accs, extras, single=True)
    results = []
    for i in range(len(w_rows)):
        row = []
        for t in range(len(toks)):
            acc, extra = builder.load(accs[i][t]), builder.load(extras[i][t])
            halves = [cgutils.alloca_once_value(builder, builder.shuffle_vector(
                acc, acc, _mask(range(8 * h, 8 * h + 8)))) for h in range(2)]
            parts = [cgutils.alloca_once_value(builder, builder.extract_element(
                extra, ir.Constant(_I32, h))) for h in range(2)]
            row.append(finish_row(builder, halves, parts))
        results.append(row)
    return results


def _rows_codegen(kind):
    return rows_codegen(lambda builder, w_rows, toks, nb: _emit_tile(builder, kind, w_rows, toks, nb),
                        _Token, TILE_ROWS, TILE_TOKENS)


def rows_codegen(emit_tile, make_token, tile_rows, tile_tokens):
    """Codegen of ``(w, r0, r1, *tables, out)``: ``out[t, r] = W[r] · x_t`` for rows
    ``r0 <= r < r1`` and every token ``t`` of the 2-D activation ``tables`` (the second one is
    ``[n, blocks]``); ``emit_tile(builder, w_rows, toks, nb)`` emits one tile and returns its
    results ``[i][t]``, ``make_token(builder, tables, t)`` makes a tile's token.

    With ``q = (r1 − r0) // 4``, tile ``a`` takes rows ``r0 + a + i·q`` (i = 0..3): the four
    rows advance through four long sequential runs of memory, which the hardware prefetcher
    follows (four adjacent rows would be four 36-line streams restarted every tile: from DRAM
    that read 8.6 GB/s on one core against 22 in cache; adjacent rows plus a software prefetch
    of the next tile, one linear stream, measured 19–21 GB/s Q4_0 and 19–25 GB/s Q8_0 against
    22 and 23–26 strided on one core, 29–33 against 35 on two). Tokens go in 4-token tiles,
    then one by one; the last ``(r1 − r0) % 4`` rows in 1-row tiles.
    """
    def codegen(context, builder, sig, args):
        w_t, r0_t, r1_t, out_t = sig.args[0], sig.args[1], sig.args[2], sig.args[-1]
        w = context.make_array(w_t)(context, builder, args[0])
        arrays = [context.make_array(ty)(context, builder, a)
                  for ty, a in zip(sig.args[3:-1], args[3:-1])]
        out = context.make_array(out_t)(context, builder, args[-1])
        n, nb = cgutils.unpack_tuple(builder, arrays[1].shape, 2)
        intp = nb.type
        r0 = context.cast(builder, args[1], r0_t, types.intp)
        r1 = context.cast(builder, args[2], r1_t, types.intp)
        w_stride = cgutils.unpack_tuple(builder, w.strides, 2)[0]
        o_stride = cgutils.unpack_tuple(builder, out.strides, 2)[0]

        def c(v):
            return ir.Constant(intp, v)

        def run(rows, t, n_toks):
            w_rows = [_byte_ptr(builder, w.data, builder.mul(r, w_stride)) for r in rows]
            toks = [make_token(builder, arrays, builder.add(t, c(s))) for s in range(n_toks)]
            res = emit_tile(builder, w_rows, toks, nb)
            for i, r in enumerate(rows):
                for s in range(n_toks):
                    at = builder.add(builder.mul(builder.add(t, c(s)), o_stride),
                                     builder.mul(r, c(4)))
                    builder.store(res[i][s], _typed_ptr(builder, out.data, at, _F32))

        full_t = builder.udiv(n, c(tile_tokens))
        t_end = builder.mul(full_t, c(tile_tokens))

        def over_tokens(rows):
            with cgutils.for_range(builder, full_t) as lt:
                run(rows, builder.mul(lt.index, c(tile_tokens)), tile_tokens)
            with cgutils.for_range(builder, builder.sub(n, t_end)) as lt:
                run(rows, builder.add(t_end, lt.index), 1)

        q = builder.udiv(builder.sub(r1, r0), c(tile_rows))
        with cgutils.for_range(builder, q) as lr:
            first = builder.add(r0, lr.index)
            over_tokens([builder.add(first, builder.mul(q, c(i))) for i in range(tile_rows)])
        r_end = builder.add(r0, builder.mul(q, c(tile_rows)))
        with cgutils.for_range(builder, builder.sub(r1, r_end)) as lr:
            over_tokens([builder.add(r_end, lr.index)])
        return context.get_dummy_value()

    return codegen


def rows_intrinsic(name, codegen, table_dtypes):
    """The intrinsic ``name(w, r0, r1, t0, t1, t2, out) -> None`` that ``codegen`` (a
    :func:`rows_codegen`) emits, typed for uint8 rows ``w`` [rows, row_bytes], integer ``r0``,
    ``r1``, three 2-D activation tables of ``table_dtypes`` and float32 ``out`` [n, rows]."""
    def arr(a, dtype):
        return isinstance(a, types.Array) and a.dtype == dtype and a.ndim == 2

    def typer(typingctx, w, r0, r1, t0, t1, t2, out):
        tables = (t0, t1, t2)
        if (arr(w, types.uint8) and isinstance(r0, types.Integer) and isinstance(r1, types.Integer)
                and all(arr(a, d) for a, d in zip(tables, table_dtypes))
                and arr(out, types.float32)):
            return types.void(w, r0, r1, *tables, out), codegen
    typer.__name__ = typer.__qualname__ = name        # distinct symbols per format
    return intrinsic(typer)


_TABLES = (types.int8, types.float32, types.float32)          # xq, xd, xs
_rows_q8_0 = rows_intrinsic("_rows_q8_0", _rows_codegen(_Q8_0), _TABLES)
_rows_q4_0 = rows_intrinsic("_rows_q4_0", _rows_codegen(_Q4_0), _TABLES)
_rows_q4_1 = rows_intrinsic("_rows_q4_1", _rows_codegen(_Q4_1), _TABLES)
_rows_q5_0 = rows_intrinsic("_rows_q5_0", _rows_codegen(_Q5_0), _TABLES)
_rows_q5_1 = rows_intrinsic("_rows_q5_1", _rows_codegen(_Q5_1), _TABLES)


@kernel
def rows_q8_0_avx512(w, r0, r1, xq, xd, xs, out):
    """``out[t, r] = W[r] · x_t`` (Q8_0 rows ``r0..r1`` of ``w``, every token of the 2-D int8
    tables); each value equals
    ``avx2.idot_q8_0_avx2(w[r], xq[t], xd[t], xs[t])`` bit for bit."""
    _rows_q8_0(w, r0, r1, xq, xd, xs, out)


@kernel
def rows_q4_0_avx512(w, r0, r1, xq, xd, xs, out):
    """As :func:`rows_q8_0_avx512` for Q4_0."""
    _rows_q4_0(w, r0, r1, xq, xd, xs, out)


@kernel
def rows_q4_1_avx512(w, r0, r1, xq, xd, xs, out):
    """As :func:`rows_q8_0_avx512` for Q4_1."""
    _rows_q4_1(w, r0, r1, xq, xd, xs, out)


@kernel
def rows_q5_0_avx512(w, r0, r1, xq, xd, xs, out):
    """As :func:`rows_q8_0_avx512` for Q5_0 (the portable dot's sums, AVX2 float order)."""
    _rows_q5_0(w, r0, r1, xq, xd, xs, out)


@kernel
def rows_q5_1_avx512(w, r0, r1, xq, xd, xs, out):
    """As :func:`rows_q8_0_avx512` for Q5_1 (the portable dot's sums, AVX2 float order)."""
    _rows_q5_1(w, r0, r1, xq, xd, xs, out)
