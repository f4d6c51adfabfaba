"""Activation quantizers in vector code: the int8 tables every integer row dot reads, made once
per token and matrix input, bit-identical to the per-value references they replace —
:func:`quant.legacy.quantize_act_q8` (Q8_0 / Q8_1 blocks of 32) and
:func:`quant.kquants.quantize_act_q8k` (Q8_K blocks of 256), kept for the tests.

The references' loops have literal trip counts (32, 256, 16), which numba's pipeline unrolls
before LLVM's loop vectorizer sees them (and it runs no SLP vectorizer): scalar code at about
1 ns per value (Q8_K 1.7 ns) on a Zen 4 core, 14–24 µs for a 14336-value FFN input. That work is
serial — it runs before the parallel region of a one-token product — so at 16 threads it is a few
per cent of a 7B token. Here each run of 32 values (16 for Q8_K's sums) is two pieces of
portable LLVM vector IR (no target intrinsics: any CPU numba compiles for runs them):

* ``_absmax<n>(x, j)`` — ``max |x[j:j+n]|`` (``fabs``, then a ``maxnum`` tree);
* ``_round<n>(x, xq, j, scale)`` — ``xq[j+i] = int8(min(127, rint(scale · x[j+i])))`` (IEEE
  multiply, round half to even as ``np.rint``), returning the exact int32 sum of the n quants;

and the per-block scalar steps (the scale, its f16 rounding, the sums' format) are the
references' own statements. Rows whose values are not contiguous take the references. One Zen 4
core, 14336 values (a timing loop, best of 300): Q8 14.2 → 5.6 µs, Q8_K 24.0 → 6.2 µs.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .avx2 import _F32, _I8, _I32, _fn, _load, _splat, isum, reduce_halves
from .base import f32_to_half_bits, half_bits_to_f32
from .jit import kernel
from .kquants import QK_K, quantize_act_q8k as _q8k_reference
from .legacy import QK, quantize_act_q8 as _q8_reference


def _values(context, builder, arr_t, arr, j, n):
    """The ``n`` float32 values ``arr[j:j+n]`` of a 1-D array with unit stride, as one vector."""
    a = context.make_array(arr_t)(context, builder, arr)
    base = builder.bitcast(a.data, _I8.as_pointer())
    return _load(builder, base, builder.mul(j, ir.Constant(j.type, 4)), ir.VectorType(_F32, n))


def _is_row(a, dtype):
    return isinstance(a, types.Array) and a.ndim == 1 and a.dtype == dtype


def _absmax_intrinsic(n):
    """The intrinsic ``max |x[j:j+n]|`` for float32 ``x`` whose values are contiguous."""
    vn = ir.VectorType(_F32, n)

    def codegen(context, builder, sig, args):
        v = builder.call(_fn(builder, f"llvm.fabs.v{n}f32", vn, [vn]),
                         [_values(context, builder, sig.args[0], args[0], args[1], n)])

        def maxnum(lo, hi):
            vt = lo.type
            return builder.call(_fn(builder, f"llvm.maxnum.v{vt.count}f32", vt, [vt, vt]), [lo, hi])
        return reduce_halves(builder, v, n, maxnum)

    def typer(typingctx, x, j):
        if _is_row(x, types.float32) and isinstance(j, types.Integer):
            return types.float32(x, types.intp), codegen
    typer.__name__ = typer.__qualname__ = f"_absmax{n}"
    return intrinsic(typer)


def _round_intrinsic(n):
    """The intrinsic ``xq[j+i] = int8(min(127, rint(scale · x[j+i])))`` for i < n, returning the
    int32 sum of those n quants."""
    vn, vi, vb = ir.VectorType(_F32, n), ir.VectorType(_I32, n), ir.VectorType(_I8, n)

    def codegen(context, builder, sig, args):
        v = _values(context, builder, sig.args[0], args[0], args[2], n)
        s = context.cast(builder, args[3], sig.args[3], types.float32)
        r = builder.call(_fn(builder, f"llvm.rint.v{n}f32", vn, [vn]),
                         [builder.fmul(v, _splat(builder, s, vn))])
        r = builder.call(_fn(builder, f"llvm.minnum.v{n}f32", vn, [vn, vn]),
                         [r, ir.Constant(vn, [127.0] * n)])
        q = builder.fptosi(r, vi)
        out = context.make_array(sig.args[1])(context, builder, args[1])
        dst = builder.gep(builder.bitcast(out.data, _I8.as_pointer()), [args[2]])
        builder.store(builder.trunc(q, vb), builder.bitcast(dst, vb.as_pointer()), align=1)
        return isum(builder, q, n)

    def typer(typingctx, x, xq, j, scale):
        if (_is_row(x, types.float32) and _is_row(xq, types.int8) and isinstance(j, types.Integer)
                and isinstance(scale, types.Float)):
            return types.int32(x, xq, types.intp, scale), codegen
    typer.__name__ = typer.__qualname__ = f"_round{n}"
    return intrinsic(typer)


_absmax16, _absmax32 = _absmax_intrinsic(16), _absmax_intrinsic(32)
_round16, _round32 = _round_intrinsic(16), _round_intrinsic(32)


@kernel
def _contiguous(x, xq):
    return x.strides[0] == 4 and xq.strides[0] == 1


@kernel
def quantize_act_q8(x, xq, xd, xs, exact_sums=False):
    """:func:`quant.legacy.quantize_act_q8` (same arguments, same bits), in vector steps."""
    if not _contiguous(x, xq):
        _q8_reference(x, xq, xd, xs, exact_sums)
        return
    for b in range(xd.shape[0]):
        j = b * QK
        amax = _absmax32(x, j)
        # as ggml's quantize_row_q8_0: id = 127/max, round half to even, scale kept as f16
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        s = _round32(x, xq, j, inv)
        d = amax / np.float32(127.0)
        xd[b] = half_bits_to_f32(f32_to_half_bits(d))
        if exact_sums:
            xs[b] = np.float32(s)
        else:   # ggml's q8_1 sum: f16(d · Σq), d unrounded
            xs[b] = half_bits_to_f32(f32_to_half_bits(d * np.float32(s)))


@kernel
def quantize_act_q8k(x, xq, xd, xb):
    """:func:`quant.kquants.quantize_act_q8k` (same arguments, same bits), in vector steps."""
    if not _contiguous(x, xq):
        _q8k_reference(x, xq, xd, xb)
        return
    for b in range(xd.shape[0]):
        y = b * QK_K
        amax = np.float32(0.0)
        for j in range(y, y + QK_K, 32):
            amax = max(amax, _absmax32(x, j))
        if amax == 0:
            xd[b] = np.float32(0.0)
            xq[y:y + QK_K] = 0
            xb[b * 16:b * 16 + 16] = 0
            continue
        mx = amax                    # the first value of largest magnitude, with its sign
        for j in range(y, y + QK_K):
            if abs(x[j]) == amax:
                mx = x[j]
                break
        iscale = np.float32(-127.0) / mx
        for g in range(16):
            xb[b * 16 + g] = np.int16(_round16(x, xq, y + 16 * g, iscale))
        xd[b] = np.float32(1.0) / iscale
