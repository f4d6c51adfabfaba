"""AVX-512 (VNNI) row dots with int8 activations: Q8_0, Q4_0, Q4_1, bit-identical to
:mod:`quant.avx2`'s kernels.

Each loop step handles two 32-value blocks ``b = 2j, 2j + 1`` in one 512-bit register: the 64
activation bytes ``xq[64j : 64j + 64]`` are one load, and the weights are arranged to match
(per 128-bit lane: block 2j low | high, block 2j+1 low | high)::

    Q8_0  qs of block 2j ‖ qs of block 2j+1          (bytes 68j+2 .. +34, 68j+36 .. +68)
    Q4_x  per block the 16 bytes of qs loaded twice, the second copy shifted right by 4,
          then & 0x0F: low nibbles ‖ high nibbles     (Q4_0 block 18 bytes, qs at +2;
                                                       Q4_1 block 20 bytes, qs at +4)
    p   = vpdpbusd(0, q, xq)                           16 × int32: lane i of block half h is
                                                       the exact sum over bytes 4i..4i+3
          Q8_0: q = |w|, xq negated where w < 0;  Q4_0: minus vpdpbusd(0, 8, xq)
    acc = fma(float(p), [d_2j·xd[2j]] × 8 ‖ [d_2j+1·xd[2j+1]] × 8, acc)

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

from .avx2 import (_F32, _I8, _I16, _I32, _LAYOUT, _Q4_0, _Q4_1, _Q8_0, _V8F32, _check_sig, _fn,
                   _load, block_step, finish_row, host_has, row_args)
from .jit import kernel

HAVE_AVX512_VNNI = host_has("avx512f", "avx512bw", "avx512vl", "avx512vnni")
"""Whether the compile target can run this module's kernels."""

_V16I8, _V32I8, _V64I8 = (ir.VectorType(_I8, n) for n in (16, 32, 64))
_V16I32, _V16F32 = ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)


def _mask(values):
    return ir.Constant(ir.VectorType(_I32, len(values)), list(values))


def _pair_step(builder, kind, ptrs, j, acc_ptr, extra_ptr):
    """Accumulate blocks ``2j`` (lanes 0..7) and ``2j + 1`` (lanes 8..15) into ``*acc_ptr``
    (16 × float32) and, for Q4_1, their ``m_w · xs`` into ``*extra_ptr`` (2 × float32)."""
    w_ptr, x_ptr, xd_data, xs_data, nb = ptrs
    intp = nb.type
    block_bytes, q_offset = _LAYOUT[kind]
    dpbusd = _fn(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32, [_V16I32, _V16I32, _V16I32])
    fma = _fn(builder, "llvm.fma.v16f32", _V16F32, [_V16F32, _V16F32, _V16F32])
    zero = ir.Constant(_V16I32, [0] * 16)

    def dot(q, y):
        return builder.call(dpbusd, [zero, builder.bitcast(q, _V16I32), builder.bitcast(y, _V16I32)])

    b0 = builder.mul(j, ir.Constant(intp, 2))
    w0 = builder.mul(b0, ir.Constant(intp, block_bytes))
    w1 = builder.add(w0, ir.Constant(intp, block_bytes))
    y = _load(builder, x_ptr, builder.mul(j, ir.Constant(intp, 64)), _V64I8)
    if kind == _Q8_0:
        q0 = _load(builder, w_ptr, builder.add(w0, ir.Constant(intp, q_offset)), _V32I8)
        q1 = _load(builder, w_ptr, builder.add(w1, ir.Constant(intp, q_offset)), _V32I8)
        w = builder.shuffle_vector(q0, q1, _mask(range(64)))
        absb = _fn(builder, "llvm.abs.v64i8", _V64I8, [_V64I8, ir.IntType(1)])
        q = builder.call(absb, [w, ir.Constant(ir.IntType(1), 0)])   # -128 -> 128 unsigned
        neg = builder.icmp_signed("<", w, ir.Constant(_V64I8, [0] * 64))
        y = builder.select(neg, builder.sub(ir.Constant(_V64I8, [0] * 64), y), y)
        p = dot(q, y)
    else:
        p0 = _load(builder, w_ptr, builder.add(w0, ir.Constant(intp, q_offset)), _V16I8)
        p1 = _load(builder, w_ptr, builder.add(w1, ir.Constant(intp, q_offset)), _V16I8)
        twice = builder.shuffle_vector(p0, p1, _mask(list(range(16)) * 2 + list(range(16, 32)) * 2))
        v32i16 = ir.VectorType(_I16, 32)
        shifted = builder.lshr(builder.bitcast(twice, v32i16),
                               ir.Constant(v32i16, ([0] * 8 + [4] * 8) * 2))
        q = builder.and_(builder.bitcast(shifted, _V64I8), ir.Constant(_V64I8, [0x0F] * 64))
        p = dot(q, y)
        if kind == _Q4_0:                   # Σ (q − 8)·xq = Σ q·xq − Σ 8·xq, per 4-byte lane
            p = builder.sub(p, dot(ir.Constant(_V64I8, [8] * 64), y))
    # d_w · xd of both blocks as 2 lanes (the same single-rounding products), then each
    # broadcast to its 8 lanes
    v2i16, v2f32 = ir.VectorType(_I16, 2), ir.VectorType(_F32, 2)
    d = ir.Constant(v2i16, ir.Undefined)
    d = builder.insert_element(d, _load(builder, w_ptr, w0, _I16), ir.Constant(_I32, 0))
    d = builder.insert_element(d, _load(builder, w_ptr, w1, _I16), ir.Constant(_I32, 1))
    dw = builder.fpext(builder.bitcast(d, ir.VectorType(ir.HalfType(), 2)), v2f32)
    xd2 = builder.load(builder.bitcast(builder.gep(xd_data, [b0]), v2f32.as_pointer()), align=4)
    s2 = builder.fmul(dw, xd2)
    scale = builder.shuffle_vector(s2, s2, _mask([0] * 8 + [1] * 8))
    if kind == _Q4_1:
        m = ir.Constant(v2i16, ir.Undefined)
        m = builder.insert_element(m, _load(builder, w_ptr, builder.add(w0, ir.Constant(intp, 2)),
                                            _I16), ir.Constant(_I32, 0))
        m = builder.insert_element(m, _load(builder, w_ptr, builder.add(w1, ir.Constant(intp, 2)),
                                            _I16), ir.Constant(_I32, 1))
        mf = builder.fpext(builder.bitcast(m, ir.VectorType(ir.HalfType(), 2)), v2f32)
        xs2 = builder.load(builder.bitcast(builder.gep(xs_data, [b0]), v2f32.as_pointer()), align=4)
        builder.store(builder.fadd(builder.load(extra_ptr), builder.fmul(mf, xs2)), extra_ptr)
    builder.store(builder.call(fma, [builder.sitofp(p, _V16F32), scale, builder.load(acc_ptr)]),
                  acc_ptr)


def _row_dot_codegen(kind):
    def codegen(context, builder, sig, args):
        ptrs = row_args(context, builder, sig, args)
        nb = ptrs[-1]
        intp = nb.type
        acc_p = cgutils.alloca_once_value(builder, ir.Constant(_V16F32, [0.0] * 16))
        extra_p = cgutils.alloca_once_value(builder, ir.Constant(ir.VectorType(_F32, 2), [0.0] * 2))
        pairs = builder.udiv(nb, ir.Constant(intp, 2))
        with cgutils.for_range(builder, pairs) as loop:
            _pair_step(builder, kind, ptrs, loop.index, acc_p, extra_p)
        acc, extra = builder.load(acc_p), builder.load(extra_p)
        accs = [cgutils.alloca_once_value(builder, builder.shuffle_vector(
            acc, acc, _mask(range(8 * h, 8 * h + 8)))) for h in range(2)]
        extras = [cgutils.alloca_once_value(builder, builder.extract_element(
            extra, ir.Constant(_I32, h))) for h in range(2)]
        odd = builder.icmp_unsigned("!=", builder.mul(pairs, ir.Constant(intp, 2)), nb)
        with builder.if_then(odd):          # the AVX2 kernel adds a last odd block to chain 0
            block_step(builder, kind, ptrs, builder.sub(nb, ir.Constant(intp, 1)), accs[0],
                       extras[0])
        return finish_row(builder, accs, extras)

    return codegen


@intrinsic
def _row_dot_q8_0(typingctx, row, xq, xd, xs):
    if _check_sig(row, xq, xd, xs):
        return types.float32(row, xq, xd, xs), _row_dot_codegen(_Q8_0)


@intrinsic
def _row_dot_q4_0(typingctx, row, xq, xd, xs):
    if _check_sig(row, xq, xd, xs):
        return types.float32(row, xq, xd, xs), _row_dot_codegen(_Q4_0)


@intrinsic
def _row_dot_q4_1(typingctx, row, xq, xd, xs):
    if _check_sig(row, xq, xd, xs):
        return types.float32(row, xq, xd, xs), _row_dot_codegen(_Q4_1)


@kernel
def idot_q8_0_avx512(row, xq, xd, xs):
    """Q8_0 row · int8 activations (AVX-512 VNNI); equals ``avx2.idot_q8_0_avx2`` bit for bit."""
    return _row_dot_q8_0(row, xq, xd, xs)


@kernel
def idot_q4_0_avx512(row, xq, xd, xs):
    """Q4_0 row · int8 activations (AVX-512 VNNI); equals ``avx2.idot_q4_0_avx2`` bit for bit."""
    return _row_dot_q4_0(row, xq, xd, xs)


@kernel
def idot_q4_1_avx512(row, xq, xd, xs):
    """Q4_1 row · int8 activations (AVX-512 VNNI); equals ``avx2.idot_q4_1_avx2`` bit for bit."""
    return _row_dot_q4_1(row, xq, xd, xs)
