"""Compiled pieces shared by the architecture families' layers: products of matrices that read
the same input — as one product when the loader joined them (:meth:`TensorLoader.joined`), so a
decoded token pays one parallel region for q, k and v (one for gate and up) instead of one per
matrix — and the SwiGLU feed-forward.

A family passes a joint matrix as its raw rows and type code, or :data:`NO_MATRIX` and -1 when
its parts could not be joined (types differ, no repacking, NUMA placement); the parts are always
passed too (row-slice views of the joint one when joined). Either way the outputs are the same
bits: every output row is the same row kernel over the same quantized activations.
"""
from __future__ import annotations

import numpy as np

from quant.jit import kernel
from quant.kernels import matmul_kernel

from . import ops
from .weights import QTensor

NO_MATRIX = np.zeros((0, 1), np.uint8)   # stand-in for a joint matrix that is absent (never read)
NO_MATRIX.flags.writeable = False


def joint_args(t: QTensor | None) -> tuple:
    """``(raw, type code)`` of a joint matrix for the kernels below, placeholders when None."""
    return (NO_MATRIX, -1) if t is None else (t.raw, t.qtype)


@kernel
def _copy_cols(src, c0, dst):
    """dst[t, :] = src[t, c0:c0 + dst.shape[1]]"""
    n, m = dst.shape
    for t in range(n):
        for i in range(m):
            dst[t, i] = src[t, c0 + i]


@kernel
def _joint_product(x, scratch, joint_flat, wj, tj):
    """x·Wjᵀ into ``joint_flat`` viewed as [n, rows of wj]; returns that view."""
    n = x.shape[0]
    joint = joint_flat[:n * wj.shape[0]].reshape((n, wj.shape[0]))
    matmul_kernel(tj, wj, x, joint, scratch)
    return joint


@kernel
def matmul2(x, scratch, joint_flat, wj, tj, a, wa, ta, b, wb, tb):
    """a, b = x·Waᵀ, x·Wbᵀ for x [n, k]: one product over the joint rows ``wj`` (Wa ‖ Wb,
    into ``joint_flat``, then copied out) when present, else one product per matrix."""
    if wj.shape[0] == 0:
        matmul_kernel(ta, wa, x, a, scratch)
        matmul_kernel(tb, wb, x, b, scratch)
        return
    joint = _joint_product(x, scratch, joint_flat, wj, tj)              # [n, ra + rb]
    _copy_cols(joint, 0, a)
    _copy_cols(joint, a.shape[1], b)


@kernel
def matmul3(x, scratch, joint_flat, wj, tj, a, wa, ta, b, wb, tb, c, wc, tc):
    """a, b, c = x·Waᵀ, x·Wbᵀ, x·Wcᵀ: :func:`matmul2` for three matrices (q, k, v)."""
    if wj.shape[0] == 0:
        matmul_kernel(ta, wa, x, a, scratch)
        matmul_kernel(tb, wb, x, b, scratch)
        matmul_kernel(tc, wc, x, c, scratch)
        return
    joint = _joint_product(x, scratch, joint_flat, wj, tj)              # [n, ra + rb + rc]
    _copy_cols(joint, 0, a)
    _copy_cols(joint, a.shape[1], b)
    _copy_cols(joint, a.shape[1] + b.shape[1], c)


@kernel
def swiglu_ffn(x, out, ffn_flat, scratch, wgu, tgu, wg, tg, wu, tu, wd, td):
    """out = W_down · (silu(x·W_gateᵀ) ⊙ x·W_upᵀ) for x [n, d] (dense or shared-expert FFN).

    ``ffn_flat`` float32 of at least 3·n·ff values holds gate ‖ up (or their joint product
    [n, 2·ff] when ``wgu`` is present) and the hidden activations [n, ff]."""
    n = x.shape[0]
    ff = wg.shape[0]
    hidden = ffn_flat[2 * n * ff:3 * n * ff].reshape((n, ff))
    if wgu.shape[0]:
        gate = _joint_product(x, scratch, ffn_flat, wgu, tgu)           # [n, 2·ff]: gate ‖ up
        up = gate
        u0 = ff
    else:
        gate = ffn_flat[:n * ff].reshape((n, ff))
        up = ffn_flat[n * ff:2 * n * ff].reshape((n, ff))
        u0 = 0
        matmul_kernel(tg, wg, x, gate, scratch)                         # [n, ff]
        matmul_kernel(tu, wu, x, up, scratch)                           # [n, ff]
    if n == 1:     # one token: on this thread (a parallel region costs more than the work)
        ops.swiglu_serial(gate, up, u0, hidden)
    else:
        ops.swiglu(gate, up, u0, hidden)
    matmul_kernel(td, wd, hidden, out, scratch)                         # [n, d]
