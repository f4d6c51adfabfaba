"""Causal attention over the f16 KV cache, in tiles that keep the CPU's vector units busy.

One call handles ``n`` query tokens at positions p0..p0+n-1 and every query head; K/V head
``h // (n_head / n_kv)`` serves query head h (grouped-query attention; MLA is the case n_kv = 1
with 128 heads). Per token and head::

    qh     = half(q)                                   q rounded to f16, as ggml's f16 path
    s_j    = (qh · K_j) · scale                        j = 0 .. p0 + t   (causal)
    p_j    = half(exp(s_j − max s) / Σ exp(...))       f32 softmax, f64 sum, p rounded to f16
    out    = Σ_j p_j · V_j                             V_j = the first hdv values of v_cache[j]

Work: threads take contiguous runs of query heads (numba's static schedule), and each walks its
heads per K/V head, so heads that share a K/V row read it while it is in L1:

* ``q·K``: tiles of 4 heads × 2 positions (one f16→f32 conversion of a K vector feeds 8
  fused multiply-adds); 1 head × 4 positions where fewer than 4 heads of a K/V head are left.
* ``P·V``: tiles of 4 heads × 4 positions (each output vector is loaded and stored once per 4
  positions — stores, not multiplies, limit a plain ``out += p · V_j`` loop); 1 head × 4 positions.

Measured on one Zen 4 core (AVX-512), 128 heads of 576/512 dims (DeepSeek-V3's MLA) at 4096
positions: q·K 44 and P·V 42 G multiply-adds/s; the per-head loop it replaced ran 5.9, with P·V
over MLA's strided V view at 3. The f16 values are converted in the inner loops (``vcvtph2ps``),
never copied. The exponential is ggml's ``ggml_v_expf`` polynomial (vectorized like the rest;
``math.exp`` is a libm call per score).
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from quant.base import bits_to_f32, f32_to_half_bits, half_bits_to_f32
from quant.jit import fast_kernel, fast_parallel_kernel, num_threads
from quant.kernels import schedule_block

POS_BLOCK = 64     # positions per pass over a thread's heads (their K/V rows stay in L1/L2)

# ggml_v_expf's constants (ggml-cpu/vec.h): e^x = 2^n · (1 + p(b)), b = x − n·ln 2
_LOG2E = np.float32(float.fromhex("0x1.715476p+0"))
_LN2_HI = np.float32(float.fromhex("0x1.62e4p-1"))
_LN2_LO = np.float32(float.fromhex("0x1.7f7d1cp-20"))
_C1 = np.float32(float.fromhex("0x1.ffffecp-1"))
_C2 = np.float32(float.fromhex("0x1.fffdb6p-2"))
_C3 = np.float32(float.fromhex("0x1.555e66p-3"))
_C4 = np.float32(float.fromhex("0x1.573e2ep-5"))
_C5 = np.float32(float.fromhex("0x1.0e4020p-7"))
_EXP_MIN = np.float32(-87.0)       # below: e^x < 2^-125, 0 after the f16 rounding of p anyway


@fast_kernel
def exp_neg(x):
    """e^x for float32 x <= 0 (x < −87 gives e^−87), relative error below 5e-7, in float ops LLVM vectorizes
    (``ggml_v_expf``'s range reduction and polynomial; n is rounded with floor, not a magic
    constant, which fast-math reassociation would fold away)."""
    x = max(x, _EXP_MIN)
    n = np.float32(math.floor(x * _LOG2E + np.float32(0.5)))
    b = x - n * _LN2_HI - n * _LN2_LO
    k = bits_to_f32((np.int32(n) + np.int32(127)) << np.int32(23))       # 2^n
    u = b * b
    j = (_C5 * b + _C4) * u + (_C3 * b + _C2)
    j = j * u + _C1 * b
    return j * k + k


@fast_kernel
def _qk_1x1(qh, h, k_cache, kvh, j0, j1, scale, sc):
    """``sc[h, j] = (qh[h] · K_j) · scale`` for positions j0 <= j < j1, one at a time."""
    q0 = qh[h]
    for j in range(j0, j1):
        kr = k_cache[j, kvh]
        s = np.float32(0.0)
        for i in range(q0.shape[0]):
            s += q0[i] * half_bits_to_f32(kr[i])
        sc[h, j] = s * scale


@fast_kernel
def _qk_1x4(qh, h, k_cache, kvh, j0, j1, scale, sc):
    """:func:`_qk_1x1` 4 positions at a time (one query vector load feeds 4 rows)."""
    q0 = qh[h]
    j = j0
    while j + 4 <= j1:
        ka, kb, kc, kd = k_cache[j, kvh], k_cache[j + 1, kvh], k_cache[j + 2, kvh], k_cache[j + 3, kvh]
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for i in range(q0.shape[0]):
            x = q0[i]
            s0 += x * half_bits_to_f32(ka[i])
            s1 += x * half_bits_to_f32(kb[i])
            s2 += x * half_bits_to_f32(kc[i])
            s3 += x * half_bits_to_f32(kd[i])
        sc[h, j], sc[h, j + 1], sc[h, j + 2], sc[h, j + 3] = s0 * scale, s1 * scale, s2 * scale, s3 * scale
        j += 4
    _qk_1x1(qh, h, k_cache, kvh, j, j1, scale, sc)


@fast_kernel
def _qk_4x2(qh, h, k_cache, kvh, j0, j1, scale, sc):
    """:func:`_qk_1x1` for heads h..h+3, 2 positions at a time (one converted K vector feeds 4
    heads)."""
    q0, q1, q2, q3 = qh[h], qh[h + 1], qh[h + 2], qh[h + 3]
    j = j0
    while j + 2 <= j1:
        ka, kb = k_cache[j, kvh], k_cache[j + 1, kvh]
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
        for i in range(q0.shape[0]):
            x = half_bits_to_f32(ka[i])
            y = half_bits_to_f32(kb[i])
            a0 += q0[i] * x
            b0 += q0[i] * y
            a1 += q1[i] * x
            b1 += q1[i] * y
            a2 += q2[i] * x
            b2 += q2[i] * y
            a3 += q3[i] * x
            b3 += q3[i] * y
        sc[h, j], sc[h + 1, j], sc[h + 2, j], sc[h + 3, j] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
        sc[h, j + 1], sc[h + 1, j + 1], sc[h + 2, j + 1], sc[h + 3, j + 1] = (
            b0 * scale, b1 * scale, b2 * scale, b3 * scale)
        j += 2
    for g in range(h, h + 4):
        _qk_1x1(qh, g, k_cache, kvh, j, j1, scale, sc)


@fast_kernel
def _pv_1x1(sc, h, v_cache, kvh, j0, j1, out):
    """``out[h] += Σ_j sc[h, j] · V_j`` (first ``out.shape[1]`` values of each row), j0 <= j < j1."""
    o = out[h]
    for j in range(j0, j1):
        p = sc[h, j]
        vr = v_cache[j, kvh]
        for i in range(o.shape[0]):
            o[i] += p * half_bits_to_f32(vr[i])


@fast_kernel
def _pv_1x4(sc, h, v_cache, kvh, j0, j1, out):
    """:func:`_pv_1x1` 4 positions at a time (one load and store of ``out`` per 4 rows)."""
    o = out[h]
    s = sc[h]
    j = j0
    while j + 4 <= j1:
        va, vb, vc, vd = v_cache[j, kvh], v_cache[j + 1, kvh], v_cache[j + 2, kvh], v_cache[j + 3, kvh]
        pa, pb, pc, pd = s[j], s[j + 1], s[j + 2], s[j + 3]
        for i in range(o.shape[0]):
            o[i] += (pa * half_bits_to_f32(va[i]) + pb * half_bits_to_f32(vb[i])
                     + pc * half_bits_to_f32(vc[i]) + pd * half_bits_to_f32(vd[i]))
        j += 4
    _pv_1x1(sc, h, v_cache, kvh, j, j1, out)


@fast_kernel
def _pv_4x4(sc, h, v_cache, kvh, j0, j1, out):
    """:func:`_pv_1x1` for heads h..h+3, 4 positions at a time (4 converted V vectors feed 16
    multiply-adds into 4 outputs)."""
    o0, o1, o2, o3 = out[h], out[h + 1], out[h + 2], out[h + 3]
    s0, s1, s2, s3 = sc[h], sc[h + 1], sc[h + 2], sc[h + 3]
    j = j0
    while j + 4 <= j1:
        va, vb, vc, vd = v_cache[j, kvh], v_cache[j + 1, kvh], v_cache[j + 2, kvh], v_cache[j + 3, kvh]
        a0, a1, a2, a3 = s0[j], s0[j + 1], s0[j + 2], s0[j + 3]
        b0, b1, b2, b3 = s1[j], s1[j + 1], s1[j + 2], s1[j + 3]
        c0, c1, c2, c3 = s2[j], s2[j + 1], s2[j + 2], s2[j + 3]
        d0, d1, d2, d3 = s3[j], s3[j + 1], s3[j + 2], s3[j + 3]
        for i in range(o0.shape[0]):
            x0 = half_bits_to_f32(va[i])
            x1 = half_bits_to_f32(vb[i])
            x2 = half_bits_to_f32(vc[i])
            x3 = half_bits_to_f32(vd[i])
            o0[i] += a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
            o1[i] += b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
            o2[i] += c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3
            o3[i] += d0 * x0 + d1 * x1 + d2 * x2 + d3 * x3
        j += 4
    for g in range(h, h + 4):
        _pv_1x1(sc, g, v_cache, kvh, j, j1, out)


@fast_kernel
def _softmax_half(s, n_keys):
    """s[:n_keys] = half(softmax(s[:n_keys])): max, e^(s − max) summed in float64, rounded to f16."""
    mx = -np.inf
    for j in range(n_keys):
        mx = max(mx, s[j])
    total = 0.0
    for j in range(n_keys):
        e = exp_neg(s[j] - mx)
        s[j] = e
        total += np.float64(e)
    inv = np.float32(1.0 / total)
    for j in range(n_keys):
        s[j] = half_bits_to_f32(f32_to_half_bits(s[j] * inv))


@fast_kernel
def _head_run(q, k_cache, v_cache, p0, scale, scores, qh, out, h0, h1, group):
    """Query heads h0 <= h < h1 of every token (see the module docstring), one thread."""
    n = q.shape[0]
    for t in range(n):
        n_keys = p0 + t + 1
        ot = out[t]
        for h in range(h0, h1):
            for i in range(q.shape[2]):
                qh[h, i] = half_bits_to_f32(f32_to_half_bits(q[t, h, i]))
            for i in range(ot.shape[1]):
                ot[h, i] = 0.0
        a = h0
        while a < h1:                                  # the heads of one K/V head at a time
            kvh = a // group
            b = min(h1, (kvh + 1) * group)
            for j0 in range(0, n_keys, POS_BLOCK):
                j1 = min(n_keys, j0 + POS_BLOCK)
                h = a
                while h + 4 <= b:
                    _qk_4x2(qh, h, k_cache, kvh, j0, j1, scale, scores)
                    h += 4
                for g in range(h, b):
                    _qk_1x4(qh, g, k_cache, kvh, j0, j1, scale, scores)
            for h in range(a, b):
                _softmax_half(scores[h], n_keys)
            for j0 in range(0, n_keys, POS_BLOCK):
                j1 = min(n_keys, j0 + POS_BLOCK)
                h = a
                while h + 4 <= b:
                    _pv_4x4(scores, h, v_cache, kvh, j0, j1, ot)
                    h += 4
                for g in range(h, b):
                    _pv_1x4(scores, g, v_cache, kvh, j0, j1, ot)
            a = b


@fast_parallel_kernel
def attention(q, k_cache, v_cache, p0, scale, scores, qh, out):
    """Causal multi-head attention over an f16 KV cache, with grouped K/V heads (module docstring).

    q: [n, n_head, hd] float32 for tokens at positions p0..p0+n-1; k_cache [ctx, n_kv, hd] and
    v_cache [ctx, n_kv, ≥ hdv] hold IEEE-half bits (uint16) of positions 0..p0+n-1, V being the
    first hdv = ``out.shape[2]`` values of each v_cache row (MLA passes its one latent cache as
    both); out: [n, n_head, hdv]. Scratch: scores [n_head, ≥ p0+n], qh [n_head, hd] (float32).
    Threads take contiguous runs of heads."""
    n_head = q.shape[1]
    group = n_head // k_cache.shape[1]
    parts = min(num_threads(), n_head)
    for p in prange(parts):
        h0, h1 = schedule_block(n_head, parts, p)
        _head_run(q, k_cache, v_cache, p0, scale, scores, qh, out, h0, h1, group)


def attention_reference(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, p0: int,
                        scale: float, hdv: int) -> np.ndarray:
    """Naive numpy :func:`attention` in float64 on the same f16 roundings, for tests."""
    n, n_head, _ = q.shape
    group = n_head // k_cache.shape[1]
    kf = k_cache.view(np.float16).astype(np.float64)
    vf = v_cache.view(np.float16).astype(np.float64)[..., :hdv]
    out = np.zeros((n, n_head, hdv))
    for t in range(n):
        m = p0 + t + 1
        for h in range(n_head):
            qh = q[t, h].astype(np.float16).astype(np.float64)
            s = (kf[:m, h // group] @ qh) * scale
            e = np.exp(s - s.max())
            p = (e / e.sum()).astype(np.float32).astype(np.float16).astype(np.float64)
            out[t, h] = p @ vf[:m, h // group]
    return out
