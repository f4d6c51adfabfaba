"""Causal attention over the f16 KV cache, in tiles that keep the CPU's vector units busy.

One call handles ``n`` query tokens at positions p0..p0+n-1 and every query head; K/V head
``h // (n_head / n_kv)`` serves query head h (grouped-query attention; MLA is the case n_kv = 1
with 128 heads). Per token and head::

    qh     = half(q)                                   q rounded to f16, as ggml's f16 path
    s_j    = (qh · K_j) · scale                        j = 0 .. p0 + t   (causal)
    p_j    = half(exp(s_j − max s) / Σ exp(...))       f32 softmax, f64 sum, p rounded to f16
    out    = Σ_j p_j · V_j                             V_j = the first hdv values of v_cache[j]

Work: threads take contiguous runs of query heads (numba's static schedule); each walks the
positions in blocks of POS_BLOCK and, within a block, its heads per K/V head, so heads that share
a K/V row read it while it is in L1 and the block's rows (all K/V heads side by side in the
cache) are read front to back — walking one K/V head's strided slice of every row at a time
instead was 1.6–1.9× slower at 16384 positions (llama-7b, qwen2-7b shapes):

* ``q·K``: tiles of 4 heads × 2 positions (one f16→f32 conversion of a K vector feeds 8
  fused multiply-adds); 1 head × 4 positions where fewer than 4 heads of a K/V head are left.
  Where the CPU has AVX-512 (32 vector registers) and the head size is a multiple of 8, pairs
  of heads run :func:`_qk_2x8` instead: 2 heads × 8 positions with 16 vector accumulators,
  written in LLVM IR so that the 8 positions' sums end in one transposing reduction (three
  rounds of shuffles and adds give 8 scores in one vector) — the numba tiles end every score
  in its own horizontal sum, which costs about as much as a 64–128-value dot. One Zen 4 core,
  q·K alone: llama-7b shape (hd 128) 28 → 45, hd 64 21 → 37, MLA 49 → 54 G multiply-adds/s.
  With 16 AVX2 registers the 16 accumulators spill and it was no faster than the numba tiles
  (24 vs 24, MLA 28 vs 38), so AVX2-only CPUs keep those.
* ``P·V``: tiles of 4 heads × 4 positions (each output vector is loaded and stored once per 4
  positions — stores, not multiplies, limit a plain ``out += p · V_j`` loop); 1 head × 4 positions.

Measured on one Zen 4 core (AVX-512), 128 heads of 576/512 dims (DeepSeek-V3's MLA) at 4096
positions: q·K 44 and P·V 42 G multiply-adds/s; the per-head loop it replaced ran 5.9, with P·V
over MLA's strided V view at 3. The f16 values are converted in the inner loops (``vcvtph2ps``),
never copied. The exponential is ggml's ``ggml_v_expf`` polynomial (vectorized like the rest;
``math.exp`` is a libm call per score).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from quant.avx2 import _F32, _I8, _I16, _I32, _fn, _load, _splat, host_has
from quant.base import f32_to_half_bits, half_bits_to_f32
from quant.jit import fast_kernel, fast_parallel_kernel, num_threads
from quant.kernels import schedule_block

from .ops import v_expf

POS_BLOCK = 64     # positions per pass over a thread's heads (their K/V rows stay in L1/L2)

_V8F32, _V8I32 = ir.VectorType(_F32, 8), ir.VectorType(_I32, 8)
_V8HALF_BITS, _V8HALF = ir.VectorType(_I16, 8), ir.VectorType(ir.HalfType(), 8)

HAVE_QK_2X8 = host_has("avx512f", "f16c")
"""Whether :func:`_qk_block` runs head pairs through :func:`_qk_2x8` (head size a multiple of 8,
at most :data:`QK_2X8_MAX_DIMS`)."""
QK_2X8_MAX_DIMS = 256   # MLA's 576-dim heads: the 4 × 2 numba tile was as fast or faster in place


def _pair_sums(builder, a, b, lo, hi):
    return builder.fadd(builder.shuffle_vector(a, b, ir.Constant(_V8I32, lo)),
                        builder.shuffle_vector(a, b, ir.Constant(_V8I32, hi)))


def _sum_8_vectors(builder, acc):
    """[Σ acc[0], ..., Σ acc[7]] in one vector: adjacent lanes of vector pairs, then pairs of
    pairs, then halves (7 + 2 + 1 shuffle pairs and adds for 8 sums)."""
    t = [_pair_sums(builder, acc[2 * p], acc[2 * p + 1], [0, 8, 2, 10, 4, 12, 6, 14],
                    [1, 9, 3, 11, 5, 13, 7, 15]) for p in range(4)]
    u = [_pair_sums(builder, t[2 * p], t[2 * p + 1], [0, 1, 8, 9, 4, 5, 12, 13],
                    [2, 3, 10, 11, 6, 7, 14, 15]) for p in range(2)]
    return _pair_sums(builder, u[0], u[1], [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])


@intrinsic
def _qk_2x8(typingctx, qh, h, k_cache, kvh, j, scale, sc):
    """``sc[h + x, j + r] = (qh[h + x] · K[j + r, kvh]) · scale`` for x < 2, r < 8 (qh float32
    [heads, hd], hd a multiple of 8; k_cache uint16 half bits [ctx, n_kv, hd]; sc float32
    [heads, ctx]). Per 8 dims: one q vector load per head, and per position one 8-half load,
    one ``vcvtph2ps`` feeding both heads' fused multiply-adds."""
    def codegen(context, builder, sig, args):
        q = context.make_array(sig.args[0])(context, builder, args[0])
        k = context.make_array(sig.args[2])(context, builder, args[2])
        s = context.make_array(sig.args[6])(context, builder, args[6])
        hv, kvh_v, jv = args[1], args[3], args[4]
        scale_v = context.cast(builder, args[5], sig.args[5], types.float32)
        intp = jv.type

        def c(v):
            return ir.Constant(intp, v)

        def byte_ptr(arr):
            return builder.bitcast(arr.data, _I8.as_pointer())

        hd = cgutils.unpack_tuple(builder, q.shape, 2)[1]
        q_row = cgutils.unpack_tuple(builder, q.strides, 2)[0]
        s_row = cgutils.unpack_tuple(builder, s.strides, 2)[0]
        k_pos, k_head, _ = cgutils.unpack_tuple(builder, k.strides, 3)
        k0 = builder.add(builder.mul(jv, k_pos), builder.mul(kvh_v, k_head))   # byte offsets
        k_rows = [builder.add(k0, builder.mul(c(r), k_pos)) for r in range(8)]
        q_rows = [builder.mul(builder.add(hv, c(x)), q_row) for x in range(2)]
        qb, kb, sb = byte_ptr(q), byte_ptr(k), byte_ptr(s)
        zero = ir.Constant(_V8F32, [0.0] * 8)
        acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(8)] for _ in range(2)]
        fma = _fn(builder, "llvm.fma.v8f32", _V8F32, [_V8F32] * 3)
        with cgutils.for_range(builder, builder.udiv(hd, c(8))) as loop:
            i = builder.mul(loop.index, c(8))
            qs = [_load(builder, qb, builder.add(r, builder.mul(i, c(4))), _V8F32) for r in q_rows]
            for r in range(8):
                bits = _load(builder, kb, builder.add(k_rows[r], builder.mul(i, c(2))), _V8HALF_BITS)
                kf = builder.fpext(builder.bitcast(bits, _V8HALF), _V8F32)
                for x in range(2):
                    builder.store(builder.call(fma, [qs[x], kf, builder.load(acc[x][r])]), acc[x][r])
        splat = _splat(builder, scale_v, _V8F32)
        for x in range(2):
            tot = builder.fmul(_sum_8_vectors(builder, [builder.load(a) for a in acc[x]]), splat)
            dst = builder.add(builder.mul(builder.add(hv, c(x)), s_row), builder.mul(jv, c(4)))
            builder.store(tot, builder.bitcast(builder.gep(sb, [dst]), _V8F32.as_pointer()), align=1)
        return context.get_dummy_value()

    ok = (isinstance(qh, types.Array) and qh.ndim == 2 and qh.dtype == types.float32
          and isinstance(k_cache, types.Array) and k_cache.ndim == 3 and k_cache.dtype == types.uint16
          and isinstance(sc, types.Array) and sc.ndim == 2 and sc.dtype == types.float32
          and isinstance(scale, types.Float))
    return (types.void(qh, h, k_cache, kvh, j, scale, sc), codegen) if ok else None


@fast_kernel
def _qk_pairs(qh, h, k_cache, kvh, j0, j1, scale, sc):
    """Heads h, h+1 for positions j0 <= j < j1: :func:`_qk_2x8`, the last < 8 positions one by one."""
    j = j0
    while j + 8 <= j1:
        _qk_2x8(qh, h, k_cache, kvh, j, scale, sc)
        j += 8
    _qk_1x1(qh, h, k_cache, kvh, j, j1, scale, sc)
    _qk_1x1(qh, h + 1, k_cache, kvh, j, j1, scale, sc)


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
        e = v_expf(s[j] - mx)
        s[j] = e
        total += np.float64(e)
    inv = np.float32(1.0 / total)
    for j in range(n_keys):
        s[j] = half_bits_to_f32(f32_to_half_bits(s[j] * inv))


@fast_kernel
def _kv_span(a, h1, group):
    """(K/V head of query head a, end of that K/V head's query heads within a..h1)."""
    kvh = a // group
    return kvh, min(h1, (kvh + 1) * group)


@fast_kernel
def _qk_block(qh, k_cache, h0, h1, group, j0, j1, scale, scores):
    """Scores of heads h0 <= h < h1 for positions j0 <= j < j1, the heads of one K/V head at a
    time (head pairs where :data:`HAVE_QK_2X8`, else 4-head tiles; then single heads)."""
    a = h0
    while a < h1:
        kvh, b = _kv_span(a, h1, group)
        h = a
        if HAVE_QK_2X8 and qh.shape[1] % 8 == 0 and qh.shape[1] <= QK_2X8_MAX_DIMS:
            while h + 2 <= b:
                _qk_pairs(qh, h, k_cache, kvh, j0, j1, scale, scores)
                h += 2
        while h + 4 <= b:
            _qk_4x2(qh, h, k_cache, kvh, j0, j1, scale, scores)
            h += 4
        for g in range(h, b):
            _qk_1x4(qh, g, k_cache, kvh, j0, j1, scale, scores)
        a = b


@fast_kernel
def _pv_block(scores, v_cache, h0, h1, group, j0, j1, out):
    """``out[h] += Σ_j p[h, j] · V_j`` for heads h0 <= h < h1 and positions j0 <= j < j1, as
    :func:`_qk_block` walks them."""
    a = h0
    while a < h1:
        kvh, b = _kv_span(a, h1, group)
        h = a
        while h + 4 <= b:
            _pv_4x4(scores, h, v_cache, kvh, j0, j1, out)
            h += 4
        for g in range(h, b):
            _pv_1x4(scores, g, v_cache, kvh, j0, j1, out)
        a = b


@fast_kernel
def _head_run(q, k_cache, v_cache, p0, scale, scores, qh, out, h0, h1, group):
    """Query heads h0 <= h < h1 of every token (see the module docstring), one thread: per block
    of positions all the run's K/V heads, so the block's cache rows are read front to back."""
    n = q.shape[0]
    for t in range(n):
        n_keys = p0 + t + 1
        ot = out[t]
        for h in range(h0, h1):
            for i in range(q.shape[2]):
                qh[h, i] = half_bits_to_f32(f32_to_half_bits(q[t, h, i]))
            for i in range(ot.shape[1]):
                ot[h, i] = 0.0
        for j0 in range(0, n_keys, POS_BLOCK):
            _qk_block(qh, k_cache, h0, h1, group, j0, min(n_keys, j0 + POS_BLOCK), scale, scores)
        for h in range(h0, h1):
            _softmax_half(scores[h], n_keys)
        for j0 in range(0, n_keys, POS_BLOCK):
            _pv_block(scores, v_cache, h0, h1, group, j0, min(n_keys, j0 + POS_BLOCK), ot)


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
