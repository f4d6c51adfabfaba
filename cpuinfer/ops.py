"""Compiled per-token operations other than the weight mat-muls: RMSNorm, RoPE, causal
attention over the KV cache, SwiGLU. Each is a private ``@njit`` kernel over preallocated
arrays: nothing here allocates.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from quant.jit import fast_kernel, fast_parallel_kernel

from .arch import RopeType


@fast_parallel_kernel
def rmsnorm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]²) + eps) * w   for x, out: [n, d]; w: [d]."""
    n, d = x.shape
    for t in prange(n):
        ss = 0.0
        for i in range(d):
            ss += x[t, i] * x[t, i]
        inv = 1.0 / math.sqrt(ss / d + eps)
        for i in range(d):
            out[t, i] = x[t, i] * inv * w[i]


def rope_table(n_ctx: int, rope_dims: int, base: float, freq_scale: float = 1.0,
               freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of θ(p, i) = p · freq_scale · base^(−2i/rope_dims) / freq_factors[i]; each [n_ctx, rope_dims/2].

    Built once per model (positions × frequencies), like ggml's theta cache.
    """
    half = rope_dims // 2
    inv_freq = base ** (-np.arange(half, dtype=np.float64) * 2.0 / rope_dims)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors[:half].astype(np.float64)
    theta = np.arange(n_ctx, dtype=np.float64)[:, None] * (inv_freq[None, :] * freq_scale)
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


@fast_parallel_kernel
def _rope(x, cos, sin, p0, neox):
    n, n_heads, hd = x.shape
    half = cos.shape[1]
    for job in prange(n * n_heads):
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


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, p0: int, rope_type: RopeType) -> None:
    """Rotate the first ``2·cos.shape[1]`` dims of every head of x [n, heads, head_dim] in place,
    token t at position p0 + t."""
    _rope(x, cos, sin, p0, rope_type is RopeType.NEOX)


@fast_parallel_kernel
def attention(q, k_cache, v_cache, p0, scale, out):
    """Causal multi-head attention with grouped K/V heads, one pass with an online softmax.

    q: [n, n_head, hd_k] for tokens at positions p0..p0+n-1; k_cache: [ctx, n_kv, hd_k] and
    v_cache: [ctx, n_kv, hd_v] already hold positions 0..p0+n-1; out: [n, n_head, hd_v].
    Query head h reads K/V head h // (n_head / n_kv). No score buffer: running max and sum.
    """
    n, n_head, hd = q.shape
    n_kv = k_cache.shape[1]
    hdv = v_cache.shape[2]
    group = n_head // n_kv
    for job in prange(n * n_head):
        t = job // n_head
        h = job - t * n_head
        kvh = h // group
        for i in range(hdv):
            out[t, h, i] = 0.0
        m = -np.inf
        denom = 0.0
        for j in range(p0 + t + 1):
            s = 0.0
            for i in range(hd):
                s += q[t, h, i] * k_cache[j, kvh, i]
            s *= scale
            if s > m:
                c = math.exp(m - s)
                denom *= c
                for i in range(hdv):
                    out[t, h, i] *= c
                m = s
            p = math.exp(s - m)
            denom += p
            for i in range(hdv):
                out[t, h, i] += p * v_cache[j, kvh, i]
        inv = 1.0 / denom
        for i in range(hdv):
            out[t, h, i] *= inv


@fast_parallel_kernel
def swiglu(gate, up, out):
    """out = silu(gate) * up, elementwise over [n, ff]."""
    n, f = gate.shape
    for t in prange(n):
        for i in range(f):
            g = gate[t, i]
            out[t, i] = g / (1.0 + math.exp(-g)) * up[t, i]


@fast_kernel
def add_rows(x, bias):
    """x[t] += bias for x: [n, d]."""
    n, d = x.shape
    for t in range(n):
        for i in range(d):
            x[t, i] += bias[i]
