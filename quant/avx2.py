"""AVX2 row dots with int8 activations: Q8_0, Q4_0, Q4_1 (Q8_0/Q8_1 blocks of 32) and Q4_K,
Q6_K (Q8_K blocks of 256), each bit-identical to ggml's AVX2 ``ggml_vec_dot_*``.

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


def reduce_halves(builder, v, n, combine):
    """Lane 0 of the first ``n`` (a power of two) lanes of ``v`` folded as a tree: the upper half
    combined onto the lower, log2 n times (``combine(lo, hi)`` on vectors of n/2, n/4, ... lanes)."""
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
        v = combine(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _hsum8(builder, v):
    """Sum of 8 float lanes as a tree (3 dependent adds instead of 8)."""
    return reduce_halves(builder, v, 8, builder.fadd)


def host_has(*features: str) -> bool:
    """True when numba compiles for a CPU with all ``features`` (LLVM names such as ``"avx2"``):
    the host's, unless ``NUMBA_CPU_NAME`` names another target, then ``NUMBA_CPU_FEATURES``."""
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        given = [f.strip() for f in (numba.config.CPU_FEATURES or "").split(",")]
        return all(f"+{f}" in given for f in features)
    try:
        host = llvm.get_host_cpu_features()
        return all(bool(host.get(f, False)) for f in features)
    except Exception:
        return False


HAVE_AVX2 = host_has("avx2")
"""Whether the compile target can run this module's kernels."""


def row_args(context, builder, sig, args):
    """(w_ptr, x_ptr, xd_data, xs_data, nb) of a ``(row, xq, xd, xs)`` intrinsic call:
    byte pointers to the row and the int8 activations, float pointers to the per-block tables,
    and the block count (``xd.shape[0]``, an ``intp``)."""
    row_t, xq_t, xd_t, xs_t = sig.args
    row = context.make_array(row_t)(context, builder, args[0])
    xq = context.make_array(xq_t)(context, builder, args[1])
    xd = context.make_array(xd_t)(context, builder, args[2])
    xs = context.make_array(xs_t)(context, builder, args[3])
    nb = cgutils.unpack_tuple(builder, xd.shape, 1)[0]
    return (builder.bitcast(row.data, _I8.as_pointer()), builder.bitcast(xq.data, _I8.as_pointer()),
            xd.data, xs.data, nb)


def block_step(builder, kind, ptrs, b, acc_ptr, extra_ptr):
    """Accumulate 32-block ``b`` into the 8 × float32 ``*acc_ptr`` (and Q4_1's ``*extra_ptr``).

    ``ptrs`` is :func:`row_args`'s result. Exactly: ``acc = fma(float(p), d_w · xd[b], acc)``
    with ``p[i]`` the integer sum over block bytes ``4i..4i+3`` (Q4: of low nibbles ‖ high
    nibbles), and for Q4_1 ``extra = extra + m_w · xs[b]`` (multiply, then add).
    """
    w_ptr, x_ptr, xd_data, xs_data, nb = ptrs
    intp = nb.type
    block_bytes, q_offset = _LAYOUT[kind]
    maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8])
    maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
    sign = _fn(builder, "llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8])
    fma = _fn(builder, "llvm.fma.v8f32", _V8F32, [_V8F32, _V8F32, _V8F32])
    ones16 = ir.Constant(_V16I16, [1] * 16)
    low4 = ir.Constant(_V16I8, [0x0F] * 16)
    four = ir.Constant(_V16I8, [4] * 16)
    concat = ir.Constant(ir.VectorType(_I32, 32), list(range(32)))

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
    xdb = _splat(builder, builder.load(builder.gep(xd_data, [b])), _V8F32)
    if kind == _Q4_1:
        d, m = _halves(builder, w_ptr, wb, 2)
        scale = builder.fmul(_splat(builder, d, _V8F32), xdb)
        xsb = builder.load(builder.gep(xs_data, [b]))
        builder.store(builder.fadd(builder.load(extra_ptr), builder.fmul(m, xsb)), extra_ptr)
    else:
        scale = builder.fmul(_half_splat(builder, w_ptr, wb), xdb)
    acc = builder.call(fma, [builder.sitofp(p, _V8F32), scale, builder.load(acc_ptr)])
    builder.store(acc, acc_ptr)


def finish_row(builder, accs, extras):
    """The row's result from the even/odd-block accumulators: ``(e0 + e1) + hsum8(a0 + a1)``."""
    acc = builder.fadd(builder.load(accs[0]), builder.load(accs[1]))
    total = builder.fadd(builder.load(extras[0]), builder.load(extras[1]))
    return builder.fadd(total, _hsum8(builder, acc))


def _row_dot_codegen(kind):
    def codegen(context, builder, sig, args):
        ptrs = row_args(context, builder, sig, args)
        nb = ptrs[-1]
        intp = nb.type
        # two independent accumulator chains (even / odd blocks) hide the fma latency
        zero8 = ir.Constant(_V8F32, [0.0] * 8)
        accs = [cgutils.alloca_once_value(builder, zero8) for _ in range(2)]
        extras = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in range(2)]
        pairs = builder.udiv(nb, ir.Constant(intp, 2))
        with cgutils.for_range(builder, pairs) as loop:
            b0 = builder.mul(loop.index, ir.Constant(intp, 2))
            block_step(builder, kind, ptrs, b0, accs[0], extras[0])
            block_step(builder, kind, ptrs, builder.add(b0, ir.Constant(intp, 1)), accs[1],
                       extras[1])
        odd = builder.icmp_unsigned("!=", builder.mul(pairs, ir.Constant(intp, 2)), nb)
        with builder.if_then(odd):
            block_step(builder, kind, ptrs, builder.sub(nb, ir.Constant(intp, 1)), accs[0],
                       extras[0])
        return finish_row(builder, accs, extras)

    return codegen


# --- K-quants on Q8_K activations (ggml_vec_dot_q4_K_q8_K / q6_K_q8_K, AVX2 paths) ------------

_V4I32, _V4F32, _V8I16 = ir.VectorType(_I32, 4), ir.VectorType(_F32, 4), ir.VectorType(_I16, 8)


def _bsplat(builder, byte, vtype):
    return ir.Constant(vtype, [byte] * vtype.count)


def isum(builder, v, n):
    """Sum of the first ``n`` (a power of two) int32 lanes of ``v``: exact, so the order is free;
    a shuffle tree (log2 n adds)."""
    return reduce_halves(builder, v, n, builder.add)


def k4_scales_mins(builder, w_ptr, at):
    """The 6-bit scales and mins of a Q4_K/Q5_K block whose 12 scale bytes start at byte ``at``
    of ``w_ptr``, as 16 bytes: scales[0..7] ‖ mins[0..7] (ggml's ``utmp`` shuffle of
    ``get_scale_min_k4``)."""
    def c(v):
        return ir.Constant(_I32, v)
    u = [_load(builder, w_ptr, builder.add(at, ir.Constant(at.type, 4 * t)), _I32) for t in range(3)]
    k1, k2, k3 = c(0x3F3F3F3F), c(0x0F0F0F0F), c(0x03030303)
    u3 = builder.or_(builder.and_(builder.lshr(u[2], c(4)), k2),
                     builder.shl(builder.and_(builder.lshr(u[1], c(6)), k3), c(4)))
    uaux = builder.and_(u[1], k1)
    u1 = builder.or_(builder.and_(u[2], k2),
                     builder.shl(builder.and_(builder.lshr(u[0], c(6)), k3), c(4)))
    u0 = builder.and_(u[0], k1)
    return words_to_bytes(builder, [u0, u1, uaux, u3])


def words_to_bytes(builder, words):
    """Four int32 values → their 16 bytes (little-endian) as one vector."""
    vec = ir.Constant(_V4I32, [0] * 4)
    for t, w in enumerate(words):
        vec = builder.insert_element(vec, w, ir.Constant(_I32, t))
    return builder.bitcast(vec, _V16I8)


def _kquant_codegen(kind):
    """Row dot of Q4_K or Q6_K weights with Q8_K activations, following ggml's AVX2 loops.

    Per block an 8 × int32 ``sumi`` (lane i holds bytes 4i..4i+3 of every 32-byte step, times its
    sub-block scale). Q6_K, as ``ggml_vec_dot_q6_K_q8_K``: ``sumi`` minus the −32 offset from the
    block sums, ``acc = fma(d, float(sumi), acc)`` per lane, ``hsum_float_8`` at the end —
    bit-identical to ggml. Q4_K, as llama.cpp actually runs it on AVX2 (its Q4_K weights are
    repacked 8 rows at a time, ``ggml_gemv/gemm_q4_K_8x8_q8_K``, for rows divisible by 8): one
    exact int total per block, ``acc = fma(d, float(total), acc)`` and the min term
    ``acc_m = fma(−dmin, float(Σ min·bsum), acc_m)`` as scalars, result ``acc + acc_m``.
    """
    from .kquants import Q4_K_TYPE_SIZE, Q6_K_TYPE_SIZE, QK_K

    def codegen(context, builder, sig, args):
        row_t, xq_t, xd_t, xb_t = sig.args
        row = context.make_array(row_t)(context, builder, args[0])
        xq = context.make_array(xq_t)(context, builder, args[1])
        xd = context.make_array(xd_t)(context, builder, args[2])
        xb = context.make_array(xb_t)(context, builder, args[3])
        w_ptr = builder.bitcast(row.data, _I8.as_pointer())
        x_ptr = builder.bitcast(xq.data, _I8.as_pointer())
        b_ptr = builder.bitcast(xb.data, _I8.as_pointer())
        nb = cgutils.unpack_tuple(builder, xd.shape, 1)[0]
        intp = nb.type

        def c(v):
            return ir.Constant(intp, v)

        def i32c(v):
            return ir.Constant(_I32, v)

        maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8])
        maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
        maddwd128 = _fn(builder, "llvm.x86.sse2.pmadd.wd", _V4I32, [_V8I16, _V8I16])
        fma = _fn(builder, "llvm.fma.v8f32", _V8F32, [_V8F32, _V8F32, _V8F32])
        m4 = _bsplat(builder, 0x0F, _V32I8)
        fma1 = _fn(builder, "llvm.fma.f32", _F32, [_F32, _F32, _F32])
        acc_p = cgutils.alloca_once_value(builder, ir.Constant(_V8F32, [0.0] * 8))
        acc1_p = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
        accm_p = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))

        with cgutils.for_range(builder, nb) as loop:
            i = loop.index
            dy = builder.load(builder.gep(xd.data, [i]))
            xo = builder.mul(i, c(QK_K))
            sumi = ir.Constant(_V8I32, [0] * 8)
            if kind == "q4_k":
                wo = builder.mul(i, c(Q4_K_TYPE_SIZE))
                dw, dmw = _halves(builder, w_ptr, wo, 2)
                d = builder.fmul(dy, dw)
                dmin = builder.fneg(builder.fmul(dy, dmw))
                ms = builder.zext(k4_scales_mins(builder, w_ptr, builder.add(wo, c(4))),
                                  _V16I16)                                      # scales | mins
                mins = builder.shuffle_vector(ms, ms, ir.Constant(ir.VectorType(_I32, 8), list(range(8, 16))))
                bs = _load(builder, b_ptr, builder.mul(i, c(32)), _V16I16)   # bsums[16]
                ev = builder.shuffle_vector(bs, bs, ir.Constant(ir.VectorType(_I32, 8), list(range(0, 16, 2))))
                od = builder.shuffle_vector(bs, bs, ir.Constant(ir.VectorType(_I32, 8), list(range(1, 16, 2))))
                prod = builder.call(maddwd128, [mins, builder.add(ev, od)])     # hadd, madd
                summ = isum(builder, prod, 4)
                builder.store(builder.call(fma1, [dmin, builder.sitofp(summ, _F32),
                                                  builder.load(accm_p)]), accm_p)
                for j in range(4):
                    bits = _load(builder, w_ptr, builder.add(wo, c(16 + 32 * j)), _V32I8)
                    q4l = builder.and_(bits, m4)
                    q4h = builder.lshr(bits, _bsplat(builder, 4, _V32I8))
                    q8l = _load(builder, x_ptr, builder.add(xo, c(64 * j)), _V32I8)
                    q8h = _load(builder, x_ptr, builder.add(xo, c(64 * j + 32)), _V32I8)
                    sl = _splat(builder, builder.extract_element(ms, i32c(2 * j)), _V16I16)
                    sh = _splat(builder, builder.extract_element(ms, i32c(2 * j + 1)), _V16I16)
                    p16l = builder.call(maddwd, [sl, builder.call(maddubs, [q4l, q8l])])
                    p16h = builder.call(maddwd, [sh, builder.call(maddubs, [q4h, q8h])])
                    sumi = builder.add(sumi, builder.add(p16l, p16h))
            else:
                wo = builder.mul(i, c(Q6_K_TYPE_SIZE))
                d = builder.fmul(dy, _halves(builder, w_ptr, builder.add(wo, c(208)), 1)[0])
                scales = _load(builder, w_ptr, builder.add(wo, c(192)), _V16I8)
                m3 = _bsplat(builder, 3, _V32I8)
                # the −32 offset from the block sums, 32·(bsum[2u]·sc[2u] + bsum[2u+1]·sc[2u+1])
                # in lane u (current ggml; older builds subtracted maddubs(32, q8) per step, which
                # spreads the same integer total over the lanes differently)
                bs = _load(builder, b_ptr, builder.mul(i, c(32)), _V16I16)
                sclsub = builder.shl(builder.call(maddwd, [bs, builder.sext(scales, _V16I16)]),
                                     ir.Constant(_V8I32, [5] * 8))
                for j in range(2):
                    q4b1 = _load(builder, w_ptr, builder.add(wo, c(64 * j)), _V32I8)
                    q4b2 = _load(builder, w_ptr, builder.add(wo, c(64 * j + 32)), _V32I8)
                    hb = _load(builder, w_ptr, builder.add(wo, c(128 + 32 * j)), _V32I8)
                    four = _bsplat(builder, 4, _V32I8)
                    hs = [builder.shl(builder.and_(builder.lshr(hb, _bsplat(builder, 2 * t, _V32I8)), m3), four)
                          for t in range(4)]
                    qs = [builder.or_(builder.and_(q4b1, m4), hs[0]),
                          builder.or_(builder.and_(q4b2, m4), hs[1]),
                          builder.or_(builder.lshr(q4b1, four), hs[2]),
                          builder.or_(builder.lshr(q4b2, four), hs[3])]
                    p = []
                    for t in range(4):
                        q8 = _load(builder, x_ptr, builder.add(xo, c(128 * j + 32 * t)), _V32I8)
                        p16 = builder.call(maddubs, [qs[t], q8])
                        s = 8 * j + 2 * t              # scales s (lanes 0..7), s + 1 (8..15)
                        sc = builder.sext(builder.shuffle_vector(
                            scales, scales, ir.Constant(ir.VectorType(_I32, 16), [s] * 8 + [s + 1] * 8)),
                            _V16I16)
                        p.append(builder.call(maddwd, [sc, p16]))
                    sumi = builder.add(sumi, builder.add(p[0], p[1]))
                    sumi = builder.add(sumi, builder.add(p[2], p[3]))
                sumi = builder.sub(sumi, sclsub)
            if kind == "q4_k":       # one exact block total per row, as ggml's repacked Q4_K
                builder.store(builder.call(fma1, [d, builder.sitofp(isum(builder, sumi, 8), _F32),
                                                  builder.load(acc1_p)]), acc1_p)
            else:
                builder.store(builder.call(fma, [_splat(builder, d, _V8F32),
                                                 builder.sitofp(sumi, _V8F32),
                                                 builder.load(acc_p)]), acc_p)
        if kind == "q4_k":
            return builder.fadd(builder.load(acc1_p), builder.load(accm_p))
        return _hsum8(builder, builder.load(acc_p))

    return codegen


def row_dot_intrinsic(name, codegen, last_dtype):
    """The intrinsic ``name(row, xq, xd, x4) -> float32`` that ``codegen`` emits, typed for
    C-contiguous uint8 ``row``, int8 ``xq``, float32 ``xd`` and ``x4`` of ``last_dtype`` (the
    legacy formats' ``xs``, float32; the K-quants' ``xb``, int16)."""
    def ok(a, dtype):
        return isinstance(a, types.Array) and a.dtype == dtype and a.layout == "C"

    def typer(typingctx, row, xq, xd, x4):
        if (ok(row, types.uint8) and ok(xq, types.int8) and ok(xd, types.float32)
                and ok(x4, last_dtype)):
            return types.float32(row, xq, xd, x4), codegen
    typer.__name__ = typer.__qualname__ = name        # distinct symbols per format
    return intrinsic(typer)


_row_dot_q4_k = row_dot_intrinsic("_row_dot_q4_k", _kquant_codegen("q4_k"), types.int16)
_row_dot_q6_k = row_dot_intrinsic("_row_dot_q6_k", _kquant_codegen("q6_k"), types.int16)


@kernel
def idot_q4_k_avx2(row, xq, xd, xb):
    """Q4_K row · Q8_K activations (AVX2); same contract as ``kquants._idot_q4_k``."""
    return _row_dot_q4_k(row, xq, xd, xb)


@kernel
def idot_q6_k_avx2(row, xq, xd, xb):
    """Q6_K row · Q8_K activations (AVX2); same contract as ``kquants._idot_q6_k``."""
    return _row_dot_q6_k(row, xq, xd, xb)


_row_dot_q8_0 = row_dot_intrinsic("_row_dot_q8_0", _row_dot_codegen(_Q8_0), types.float32)
_row_dot_q4_0 = row_dot_intrinsic("_row_dot_q4_0", _row_dot_codegen(_Q4_0), types.float32)
_row_dot_q4_1 = row_dot_intrinsic("_row_dot_q4_1", _row_dot_codegen(_Q4_1), types.float32)


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
