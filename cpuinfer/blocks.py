"""Compiled pieces shared by the architecture families' layers: products of matrices that read
the same input — as one product when the loader joined them (:meth:`TensorLoader.joined`), so a
decoded token pays one parallel region for q, k and v (one for gate and up) instead of one per
matrix — and the SwiGLU feed-forward.

A family passes a joint matrix as its raw rows and type code (:func:`matrix_args`), or
:data:`NO_MATRIX` and -1 when its parts could not be joined (types differ, no repacking, NUMA placement); the parts are always
passed too (row-slice views of the joint one when joined). Either way the outputs are the same
bits: every output row is the same row kernel over the same quantized activations.
"""
from __future__ import annotations

import numpy as np

from quant.jit import inline_kernel, kernel
from quant.kernels import matmul_kernel

from . import ops
from .weights import QTensor

NO_MATRIX = np.zeros((0, 1), np.uint8)   # stand-in for an absent matrix (never read)
NO_MATRIX.flags.writeable = False


def matrix_args(t: QTensor | None) -> tuple:
    """``(raw, type code)`` of a matrix as the compiled layers take it; ``(NO_MATRIX, -1)`` for
    an absent one (a joint matrix not built, a family's optional matrix)."""
    return (NO_MATRIX, -1) if t is None else (t.raw, t.qtype)


@kernel
def _copy_cols(src, c0, dst):
    """dst[t, :] = src[t, c0:c0 + dst.shape[1]]"""
    n, m = dst.shape
    for t in range(n):
        for i in range(m):
            dst[t, i] = src[t, c0 + i]


@kernel
def _pick(i, a, b, c):
    """a, b or c for i = 0, 1, 2 (arrays of one type: one variable, one call site below)."""
    if i == 0:
        return a
    if i == 1:
        return b
    return c


@inline_kernel
def matmul_parts(x, scratch, joint_flat, wj, tj, n_parts, a, wa, ta, b, wb, tb, c, wc, tc):
    """The first ``n_parts`` (2 or 3) of a, b, c = x·Waᵀ, x·Wbᵀ, x·Wcᵀ for x [n, k]: one
    product over the joint rows ``wj`` (Wa ‖ Wb ‖ Wc, into ``joint_flat`` viewed as
    [n, rows], then copied out) when present, else one product per matrix.

    Inlined into the caller, with one ``matmul_kernel`` call site for every product
    (:data:`quant.jit.inline_kernel`: each compiled function that calls the driver costs seconds
    of compile time)."""
    n = x.shape[0]
    joined = wj.shape[0] > 0
    joint = joint_flat[:n * wj.shape[0]].reshape((n, wj.shape[0]))
    for i in range(1 if joined else n_parts):
        matmul_kernel(tj if joined else _pick(i, ta, tb, tc), wj if joined else _pick(i, wa, wb, wc),
                      x, joint if joined else _pick(i, a, b, c), scratch)
    if joined:
        _copy_cols(joint, 0, a)
        _copy_cols(joint, a.shape[1], b)
        if n_parts == 3:
            _copy_cols(joint, a.shape[1] + b.shape[1], c)


@inline_kernel
def swiglu_ffn(x, out, ffn_flat, scratch, wgu, tgu, wg, tg, wu, tu, wd, td):
    """out = W_down · (silu(x·W_gateᵀ) ⊙ x·W_upᵀ) for x [n, d] (dense or shared-expert FFN).

    ``ffn_flat`` float32 of at least 3·n·ff values holds gate ‖ up (or their joint product
    [n, 2·ff] when ``wgu`` is present) and the hidden activations [n, ff]."""
    n = x.shape[0]
    ff = wg.shape[0]
    hidden = ffn_flat[2 * n * ff:3 * n * ff].reshape((n, ff))
    joined = wgu.shape[0] > 0
    gate = ffn_flat[:2 * n * ff].reshape((n, 2 * ff))                   # joint: [n, 2·ff] gate ‖ up
    u0 = ff
    if not joined:
        gate = ffn_flat[:n * ff].reshape((n, ff))                       # [n, ff] each
        u0 = 0
    up = gate if joined else ffn_flat[n * ff:2 * n * ff].reshape((n, ff))
    for i in range(1 if joined else 2):           # one matmul_kernel call site
        matmul_kernel(tgu if joined else _pick(i, tg, tu, tu), wgu if joined else _pick(i, wg, wu, wu),
                      x, gate if i == 0 else up, scratch)
    if n == 1:     # one token: on this thread (a parallel region costs more than the work)
        ops.swiglu_serial(gate, up, u0, hidden)
    else:
        ops.swiglu(gate, up, u0, hidden)
    matmul_kernel(td, wd, hidden, out, scratch)                         # [n, d]
