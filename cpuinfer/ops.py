"""Compiled per-token operations other than the weight mat-muls: RMSNorm, RoPE, causal
attention over the f16 KV cache (:mod:`cpuinfer.attention`), SwiGLU. Each is a private ``@njit``
kernel over preallocated arrays: nothing here allocates.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from quant.base import bits_to_f32, f32_to_half_bits
from quant.jit import fast_kernel, fast_parallel_kernel, kernel, parallel_kernel

from .arch import RopeType


# ggml_v_expf's constants (ggml-cpu/vec.h): e^x = 2^n · (1 + p(b)), b = x − n·ln 2
_LOG2E = np.float32(float.fromhex("0x1.715476p+0"))
_LN2_HI = np.float32(float.fromhex("0x1.62e4p-1"))
_LN2_LO = np.float32(float.fromhex("0x1.7f7d1cp-20"))
_C1 = np.float32(float.fromhex("0x1.ffffecp-1"))
_C2 = np.float32(float.fromhex("0x1.fffdb6p-2"))
_C3 = np.float32(float.fromhex("0x1.555e66p-3"))
_C4 = np.float32(float.fromhex("0x1.573e2ep-5"))
_C5 = np.float32(float.fromhex("0x1.0e4020p-7"))
_EXP_MIN = np.float32(-87.0)       # below: e^x < 2^-125 (attention's f16 p rounds it to 0)
_EXP_MAX = np.float32(88.0)        # above: 2^n leaves float32 (SiLU's g / (1 + e^-g) is ~0 there)


@fast_kernel
def v_expf(x):
    """e^x for float32 x, clamped to [−87, 88], relative error below 5e-7, in float ops LLVM
    vectorizes: ``ggml_v_expf``'s range reduction and polynomial, as llama.cpp's CPU softmax and
    SiLU compute it (n is rounded with floor, not ggml's magic constant, which fast-math
    reassociation would fold away; they differ only where x·log2(e) is a half-integer)."""
    x = min(max(x, _EXP_MIN), _EXP_MAX)
    n = np.float32(math.floor(x * _LOG2E + np.float32(0.5)))
    b = x - n * _LN2_HI - n * _LN2_LO
    k = bits_to_f32((np.int32(n) + np.int32(127)) << np.int32(23))       # 2^n
    u = b * b
    j = (_C5 * b + _C4) * u + (_C3 * b + _C2)
    j = j * u + _C1 * b
    return j * k + k


@fast_kernel
def _sum_squares(x):
    """Σ x[i]² with each square rounded to float32 and summed in float64, as ggml sums them (in
    vector lanes here: a float64 sum of d ≤ 2^20 such terms moves by a few float64 ulps, far
    below the float32 rounding of the mean; the serial sum took 4.4 µs of d = 4096)."""
    ss = 0.0
    for i in range(x.shape[0]):
        ss += np.float64(x[i] * x[i])
    return ss


@kernel
def _rmsnorm_row(x, w, eps, out):
    """out = x · 1/sqrt(mean(x²) + eps) · w for one token (x, out: [d]).

    Rounded as ggml does (squares summed in float64, the scale a float32, x·scale rounded
    before ·w); no fast-math here so the products are not reassociated.
    """
    d = x.shape[0]
    mean = np.float32(_sum_squares(x) / d)
    scale = np.float32(1.0) / np.float32(math.sqrt(mean + np.float32(eps)))
    for i in range(d):
        out[i] = (x[i] * scale) * w[i]


@parallel_kernel
def rmsnorm(x, w, eps, out):
    """out[t] = x[t] · 1/sqrt(mean(x[t]²) + eps) · w   for x, out: [n, d]; w: [d] (tokens in parallel)."""
    for t in prange(x.shape[0]):
        _rmsnorm_row(x[t], w, eps, out[t])


@kernel
def rmsnorm_serial(x, w, eps, out):
    """:func:`rmsnorm` on the calling thread: for one token, where a parallel region costs more
    than the work (same results)."""
    for t in range(x.shape[0]):
        _rmsnorm_row(x[t], w, eps, out[t])


def rope_table(n_ctx: int, rope_dims: int, base: float, freq_scale: float = 1.0,
               freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of θ(p, i) = freq_scale · p · base^(−2i/rope_dims) / freq_factors[i]; each [n_ctx, rope_dims/2].

    Built once per model, rounded as ggml's ``ggml_rope_cache_init`` computes it: θ starts at the
    position and is multiplied by the float32 ``theta_scale`` once per pair, in float32; cos/sin
    are the correctly rounded float32 values of that θ.
    """
    half = rope_dims // 2
    f32 = np.float32
    theta_scale = f32(np.power(np.float64(f32(base)), np.float64(f32(-2.0) / f32(rope_dims))))
    ff = np.ones(half, f32) if freq_factors is None else freq_factors[:half].astype(f32)
    theta = np.arange(n_ctx, dtype=f32)
    cos = np.empty((n_ctx, half), f32)
    sin = np.empty((n_ctx, half), f32)
    for i in range(half):                       # rope_dims/2 vector steps, once per model
        t = f32(freq_scale) * (theta / ff[i])
        cos[:, i] = np.cos(t.astype(np.float64))
        sin[:, i] = np.sin(t.astype(np.float64))
        theta = theta * theta_scale
    return cos, sin


@fast_kernel
def _rope_head(x, cos, sin, p0, neox, job):
    """Rotate head ``job % n_heads`` of token ``job // n_heads`` of x [n, heads, head_dim]."""
    n_heads = x.shape[1]
    half = cos.shape[1]
    t = job // n_heads
    h = job - t * n_heads
    p = p0 + t
    for i in range(half):
        c = cos[p, i]
        s = sin[p, i]
        if neox:
            a, b = i, i + half
        else:
            a, b = 2 * i, 2 * i + 1
        x0 = x[t, h, a]
        x1 = x[t, h, b]
        x[t, h, a] = x0 * c - x1 * s
        x[t, h, b] = x0 * s + x1 * c


@fast_parallel_kernel
def _rope(x, cos, sin, p0, neox):
    for job in prange(x.shape[0] * x.shape[1]):
        _rope_head(x, cos, sin, p0, neox, job)


@fast_kernel
def rope_serial(x, cos, sin, p0, neox):
    """``rope_kernel`` on the calling thread (for one token; same results)."""
    for job in range(x.shape[0] * x.shape[1]):
        _rope_head(x, cos, sin, p0, neox, job)


rope_kernel = _rope
"""``rope_kernel(x, cos, sin, p0, neox)``: :func:`rope` for compiled callers (``neox`` a bool)."""


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, p0: int, rope_type: RopeType) -> None:
    """Rotate the first ``2·cos.shape[1]`` dims of every head of x [n, heads, head_dim] in place,
    token t at position p0 + t."""
    _rope(x, cos, sin, p0, rope_type is RopeType.NEOX)


@fast_kernel
def store_f16(src, dst):
    """dst[...] = half(src[...]) for matching float32 / uint16 (IEEE half bits) arrays [n, heads, d]."""
    n, h, d = src.shape
    for t in range(n):
        for j in range(h):
            for i in range(d):
                dst[t, j, i] = f32_to_half_bits(src[t, j, i])


@fast_kernel
def _swiglu_row(gate, up, out):
    """out = silu(gate) · up with silu(g) = g / (1 + e^−g) as ggml's ``ggml_v_silu`` (e^−g from
    :func:`v_expf`; ``math.exp`` was a libm call per value and kept the loop scalar: 61 µs for a
    7B layer's 14336 values on a Zen 4 core)."""
    one = np.float32(1.0)
    for i in range(gate.shape[0]):
        g = gate[i]
        out[i] = g / (one + v_expf(-g)) * up[i]


@fast_parallel_kernel
def swiglu(gate, up, u0, out):
    """out[t, i] = silu(gate[t, i]) * up[t, u0 + i] over out [n, ff] (tokens in parallel).
    ``u0`` = 0 for separate gate and up arrays; ``gate`` = ``up`` = [n, 2·ff] and ``u0`` = ff
    for the two halves of one joint gate ‖ up product (:func:`cpuinfer.blocks.swiglu_ffn`)."""
    ff = out.shape[1]
    for t in prange(out.shape[0]):
        _swiglu_row(gate[t, :ff], up[t, u0:u0 + ff], out[t])


@fast_kernel
def swiglu_serial(gate, up, u0, out):
    """:func:`swiglu` on the calling thread (for one token; same results)."""
    ff = out.shape[1]
    for t in range(out.shape[0]):
        _swiglu_row(gate[t, :ff], up[t, u0:u0 + ff], out[t])


@kernel
def add_into(x, y):
    """x += y for [n, d] arrays (the residual connection; numpy's ``x += y``, same values)."""
    n, d = x.shape
    for t in range(n):
        for i in range(d):
            x[t, i] += y[t, i]


@fast_kernel
def add_rows(x, bias):
    """x[t] += bias for x: [n, d]."""
    n, d = x.shape
    for t in range(n):
        for i in range(d):
            x[t, i] += bias[i]
