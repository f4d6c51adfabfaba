"""AVX2 row dots for the hot legacy formats (Q8_0, Q4_0, Q4_1) with int8 activations.

numba never emits the unsigned-by-signed byte multiply-add (``vpmaddubsw``) on its own, so these
row loops are written in LLVM IR with the ``llvm.x86.avx2.*`` target intrinsics, following
llama.cpp's ``ggml_vec_dot_q4_0_q8_0`` and friends. Per 32-value block ``b``::

    q   = 32 weight bytes as unsigned     (Q4: low nibbles ‖ high nibbles of qs[16];
                                            Q8_0: |w|, with the signs moved onto the activations)
    p   = pmaddwd(pmaddubsw(q, xq_b), 1)   8 × int32 partial sums of q·xq
    acc = fma(float(p), d_w · xd[b], acc)  8 × float32, reduced once per row
    Q4_1: scalar += m_w · xs[b]            (Q4_0 uses q − 8 as signed bytes, like Q8_0)

so a block costs about ten vector instructions and no horizontal sum. The functions have the same
signature and meaning as :mod:`quant.legacy`'s portable ``_idot_<f>`` (which the tests compare
them with); :data:`HAVE_AVX2` says whether this CPU can run them. Block layouts: see
:mod:`quant.legacy`.
"""
from __future__ import annotations

import numba
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import kernel


def _host_has_avx2() -> bool:
    """True when numba compiles for a CPU with AVX2 (the host, unless NUMBA_CPU_NAME says else)."""
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        return "+avx2" in (numba.config.CPU_FEATURES or "")
    try:
        return bool(llvm.get_host_cpu_features().get("avx2", False))
    except Exception:
        return False


HAVE_AVX2 = _host_has_avx2()

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()
_V16I8, _V32I8 = ir.VectorType(_I8, 16), ir.VectorType(_I8, 32)
_V16I16, _V8I32, _V8F32 = ir.VectorType(_I16, 16), ir.VectorType(_I32, 8), ir.VectorType(_F32, 8)

# kind -> (block bytes, offset of the quants, has min m at byte 2)
_Q8_0, _Q4_0, _Q4_1 = "q8_0", "q4_0", "q4_1"
_LAYOUT = {_Q8_0: (34, 2), _Q4_0: (18, 2), _Q4_1: (20, 4)}


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _load(builder, base, offset, vtype):
    """Unaligned load of ``vtype`` from byte pointer ``base + offset``."""
    ptr = builder.bitcast(builder.gep(base, [offset]), vtype.as_pointer())
    return builder.load(ptr, align=1)


def _halves(builder, base, offset, count):
    """``count`` (1 or 2) little-endian halves at ``base + offset`` as float32 values.

    Loaded as one zero-extended 32-bit integer (``vmovd``), not as a 16-bit lane insert, which
    would carry a false dependency on whatever the target register held before.
    """
    bits = _load(builder, base, offset, ir.IntType(16 * count))
    if count == 1:
        bits = builder.zext(bits, _I32)
    pair = builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), 2)),
                         ir.VectorType(_F32, 2))
    return [builder.extract_element(pair, ir.Constant(_I32, i)) for i in range(count)]


def _half_splat(builder, base, offset):
    """The half at ``base + offset`` broadcast to 8 float32 lanes (``vpbroadcastw`` +
    ``vcvtph2ps``: no partial-register write, so no false dependency)."""
    v8i16 = ir.VectorType(_I16, 8)
    bits = _splat(builder, _load(builder, base, offset, _I16), v8i16)
    return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), 8)), _V8F32)


def _splat(builder, value, vtype):
    undef = ir.Constant(vtype, ir.Undefined)
    first = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(_I32, vtype.count),
                                                            [0] * vtype.count))


def _hsum8(builder, v):
    """Sum of 8 float lanes as a tree (3 dependent adds instead of 8)."""
    for width in (4, 2, 1):
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, width), list(range(width))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, width),
                                                      list(range(width, 2 * width))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _row_dot_codegen(kind):
    block_bytes, q_offset = _LAYOUT[kind]

    def codegen(context, builder, sig, args):
        row_t, xq_t, xd_t, xs_t = sig.args
        row = context.make_array(row_t)(context, builder, args[0])
        xq = context.make_array(xq_t)(context, builder, args[1])
        xd = context.make_array(xd_t)(context, builder, args[2])
        xs = context.make_array(xs_t)(context, builder, args[3])
        w_ptr = builder.bitcast(row.data, _I8.as_pointer())
        x_ptr = builder.bitcast(xq.data, _I8.as_pointer())
        nb = cgutils.unpack_tuple(builder, xd.shape, 1)[0]
        intp = nb.type

        maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8])
        maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
        sign = _fn(builder, "llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8])
        fma = _fn(builder, "llvm.fma.v8f32", _V8F32, [_V8F32, _V8F32, _V8F32])
        fma1 = _fn(builder, "llvm.fma.f32", _F32, [_F32, _F32, _F32])
        ones16 = ir.Constant(_V16I16, [1] * 16)
        low4 = ir.Constant(_V16I8, [0x0F] * 16)
        four = ir.Constant(_V16I8, [4] * 16)
        concat = ir.Constant(ir.VectorType(_I32, 32), list(range(32)))

        def block(b, acc_ptr, extra_ptr):
            """Accumulate block ``b`` into the vector / scalar accumulators."""
            wb = builder.mul(b, ir.Constant(intp, block_bytes))
            y = _load(builder, x_ptr, builder.mul(b, ir.Constant(intp, 32)), _V32I8)
            qpos = builder.add(wb, ir.Constant(intp, q_offset))
            if kind == _Q4_1:
                packed = _load(builder, w_ptr, qpos, _V16I8)
                q = builder.shuffle_vector(builder.and_(packed, low4), builder.lshr(packed, four),
                                           concat)                 # unsigned 0..15
            else:
                if kind == _Q8_0:
                    w = _load(builder, w_ptr, qpos, _V32I8)
                else:                                               # Q4_0: signed q - 8
                    packed = _load(builder, w_ptr, qpos, _V16I8)
                    w = builder.sub(builder.shuffle_vector(builder.and_(packed, low4),
                                                           builder.lshr(packed, four), concat),
                                    ir.Constant(_V32I8, [8] * 32))
                q = builder.call(sign, [w, w])            # |w| (-128 -> 128 as unsigned)
                y = builder.call(sign, [y, w])            # y * sign(w)
            p = builder.call(maddwd, [builder.call(maddubs, [q, y]), ones16])
            xdb = _splat(builder, builder.load(builder.gep(xd.data, [b])), _V8F32)
            if kind == _Q4_1:
                d, m = _halves(builder, w_ptr, wb, 2)
                scale = builder.fmul(_splat(builder, d, _V8F32), xdb)
                xsb = builder.load(builder.gep(xs.data, [b]))
                # ggml's scalar summs += m · s (both halves: the product is exact, fma or not)
                builder.store(builder.call(fma1, [m, xsb, builder.load(extra_ptr)]), extra_ptr)
            else:
                scale = builder.fmul(_half_splat(builder, w_ptr, wb), xdb)
            acc = builder.call(fma, [builder.sitofp(p, _V8F32), scale, builder.load(acc_ptr)])
            builder.store(acc, acc_ptr)

        # one accumulator in block order and ggml's hsum, so the row result is bit-identical to
        # ggml's AVX2 vec_dot (two chains would hide the fma latency but change the rounding)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_V8F32, [0.0] * 8))
        extra = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
        with cgutils.for_range(builder, nb) as loop:
            block(loop.index, acc, extra)
        return builder.fadd(_hsum8(builder, builder.load(acc)), builder.load(extra))

    return codegen


def _check_sig(row, xq, xd, xs):
    return (isinstance(row, types.Array) and row.dtype == types.uint8 and row.layout == "C"
            and isinstance(xq, types.Array) and xq.dtype == types.int8 and xq.layout == "C"
            and isinstance(xd, types.Array) and xd.dtype == types.float32 and xd.layout == "C"
            and isinstance(xs, types.Array) and xs.dtype == types.float32 and xs.layout == "C")


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
def idot_q8_0_avx2(row, xq, xd, xs):
    """Q8_0 row · int8 activations (AVX2); same contract as ``legacy._idot_q8_0``."""
    return _row_dot_q8_0(row, xq, xd, xs)


@kernel
def idot_q4_0_avx2(row, xq, xd, xs):
    """Q4_0 row · int8 activations (AVX2); same contract as ``legacy._idot_q4_0``."""
    return _row_dot_q4_0(row, xq, xd, xs)


@kernel
def idot_q4_1_avx2(row, xq, xd, xs):
    """Q4_1 row · int8 activations (AVX2); same contract as ``legacy._idot_q4_1``."""
    return _row_dot_q4_1(row, xq, xd, xs)
