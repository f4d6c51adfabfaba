"""quant.interleaved: rows repacked 8 at a time — the layout against a numpy reference, the
kernels against the documented arithmetic (bit for bit) and the dequantized weights, every
driver (mat-vec, prompt tiles, threads, stacks, row lookup) and the errors."""
from __future__ import annotations

import re

import numpy as np
import pytest

import quant
from cpuinfer.errors import CpuinferError
from cpuinfer.gguf import GGMLType
from quant import interleaved as il
from quant import kernels, kquants, legacy
from quant_helpers import asm_of, random_matrix, run_for_avx2_only

pytestmark = pytest.mark.skipif(not il.HAVE_X8, reason="this CPU has no AVX2/FMA/F16C")

TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
         GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)


def _k(t: GGMLType, k32: int) -> int:
    """A row length for ``t`` as many blocks long as ``k32`` is for the 32-value formats."""
    return k32 * quant.FORMATS[t].block_size // 32


def _halves(a: np.ndarray) -> np.ndarray:
    return a.copy().view(np.float16).astype(np.float32)


def _fma_chain(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``acc = fma(a[..., j], float32(b[..., j]), acc)`` over the last axis in float32 (float64
    holds a product of two float32 values exactly, so one rounding is the fma's)."""
    acc = np.zeros(np.broadcast_shapes(a.shape, b.shape)[:-1], np.float32)
    for j in range(a.shape[-1]):
        acc = (a[..., j].astype(np.float64) * b[..., j].astype(np.float32) + acc).astype(np.float32)
    return acc


def _q6_k_quants(blocks: np.ndarray) -> np.ndarray:
    """The unsigned 6-bit quants of Q6_K blocks [n, 210] in value order (ggml's loop)."""
    ql, qh = blocks[:, :128].astype(np.int64), blocks[:, 128:192].astype(np.int64)
    q = np.empty((blocks.shape[0], 256), np.int64)
    for n in range(2):
        a, b, h = ql[:, 64 * n:64 * n + 32], ql[:, 64 * n + 32:64 * n + 64], qh[:, 32 * n:32 * n + 32]
        for m, low in enumerate((a & 15, b & 15, a >> 4, b >> 4)):
            q[:, 128 * n + 32 * m:128 * n + 32 * m + 32] = low | (((h >> 2 * m) & 3) << 4)
    return q


def _q3_k_quants(blocks: np.ndarray) -> np.ndarray:
    """The signed quants (−4..3) of Q3_K blocks [n, 110] in value order (ggml's loop)."""
    hmask, qs = blocks[:, :32].astype(np.int64), blocks[:, 32:96].astype(np.int64)
    q = np.empty((blocks.shape[0], 256), np.int64)
    for n in range(2):
        for j in range(4):
            for h in range(2):
                low = (qs[:, 32 * n + 16 * h:32 * n + 16 * h + 16] >> 2 * j) & 3
                high = (hmask[:, 16 * h:16 * h + 16] >> (4 * n + j)) & 1
                q[:, 128 * n + 32 * j + 16 * h:][:, :16] = low - 4 * (1 - high)
    return q


def _emulated_k(w: np.ndarray, t: GGMLType, x: np.ndarray) -> np.ndarray:
    """The K-quant arithmetic of ``_emit_tile_k`` in numpy on GGUF rows: per 256-block the exact
    ``total = Σ_s sc_s · Σ q · xq`` (signed quants) in an fma chain with ``f32(xd · d)``;
    Q4_K plus the chain of ``f32(−(xd · dmin))`` and the exact ``Σ_j m_j · bsum_j``."""
    n, k = x.shape
    nb = k // 256
    xq = np.zeros((n, k), np.int8)
    xd = np.zeros((n, nb), np.float32)
    xb = np.zeros((n, k // 16), np.int16)
    for i in range(n):
        kquants.quantize_act_q8k(x[i], xq[i], xd[i], xb[i])
    blocks = w.reshape(-1, quant.FORMATS[t].type_size)
    if t in (GGMLType.Q4_K, GGMLType.Q5_K):
        d = _halves(blocks[:, 0:2])[:, 0].reshape(-1, nb)
        sc, mn = (a.astype(np.int64).reshape(-1, nb, 8) for a in kquants._scale_min_k4(blocks[:, 4:16]))
        qs = blocks[:, -128:].reshape(-1, 4, 32)
        q = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, nb, 8, 32).astype(np.int64)
        if t == GGMLType.Q5_K:                       # bit j of qh byte l: bit 4 of value 32j + l
            qh = blocks[:, 16:48].astype(np.int64)
            q += np.stack([(qh >> j) & 1 for j in range(8)], axis=1).reshape(-1, nb, 8, 32) << 4
    elif t == GGMLType.Q2_K:
        d = _halves(blocks[:, 80:82])[:, 0].reshape(-1, nb)
        sc = (blocks[:, :16] & 15).astype(np.int64).reshape(-1, nb, 16)
        mn = (blocks[:, :16] >> 4).astype(np.int64).reshape(-1, nb, 16)
        qs = blocks[:, 16:80].astype(np.int64)
        q = np.empty((blocks.shape[0], 256), np.int64)
        for half in range(2):
            for j in range(4):
                for h in range(2):
                    o, at = 128 * half + 32 * j + 16 * h, 32 * half + 16 * h
                    q[:, o:o + 16] = (qs[:, at:at + 16] >> 2 * j) & 3
        q = q.reshape(-1, nb, 16, 16)
    elif t == GGMLType.Q6_K:
        d = _halves(blocks[:, 208:210])[:, 0].reshape(-1, nb)
        sc = blocks[:, 192:208].view(np.int8).astype(np.int64).reshape(-1, nb, 16)
        q = (_q6_k_quants(blocks) - 32).reshape(-1, nb, 16, 16)
    else:
        d = _halves(blocks[:, 108:110])[:, 0].reshape(-1, nb)
        sc = kquants._q3_k_scales(blocks[:, 96:108]).astype(np.int64).reshape(-1, nb, 16)
        q = _q3_k_quants(blocks).reshape(-1, nb, 16, 16)
    y = xq.reshape(n, nb, sc.shape[-1], -1).astype(np.int64)
    total = np.einsum("rbs,rbsj,tbsj->trb", sc, q, y)
    acc = _fma_chain((xd[:, None, :] * d[None]).astype(np.float32), total)
    if t in (GGMLType.Q3_K, GGMLType.Q6_K):
        return acc
    if t == GGMLType.Q2_K:                          # mins per 16 values: xb as it is
        dmin = _halves(blocks[:, 82:84])[:, 0].reshape(-1, nb)
        mins = np.einsum("rbs,tbs->trb", mn, xb.reshape(n, nb, 16).astype(np.int64))
    else:                                           # per 32: pairs of xb
        dmin = _halves(blocks[:, 2:4])[:, 0].reshape(-1, nb)
        mins = np.einsum("rbs,tbs->trb", mn, xb.reshape(n, nb, 8, 2).astype(np.int64).sum(axis=3))
    return acc + _fma_chain(-(xd[:, None, :] * dmin[None]).astype(np.float32), mins)


def _emulated(w: np.ndarray, t: GGMLType, x: np.ndarray) -> np.ndarray:
    """The module docstring's arithmetic in numpy, on GGUF rows: per block the exact integer dot
    P, ``acc = fma(P, f32(d · xd), acc)`` in block order (float64 holds P · s exactly, so one
    rounding to float32 is the fma's), plus Q4_1's ``fma(m, xs, acc_m)`` chain."""
    if quant.FORMATS[t].block_size == 256:
        return _emulated_k(w, t, x)
    n, k = x.shape
    nb = k // 32
    xq = np.zeros((n, k), np.int8)
    xd = np.zeros((n, nb), np.float32)
    xs = np.zeros((n, nb), np.float32)
    for i in range(n):
        legacy.quantize_act_q8(x[i], xq[i], xd[i], xs[i])
    size = quant.FORMATS[t].type_size
    blocks = w.reshape(w.shape[0], nb, size)
    d = _halves(blocks[:, :, 0:2])[..., 0]                                   # [rows, nb]
    with_min = t in (GGMLType.Q4_1, GGMLType.Q5_1)
    if t == GGMLType.Q8_0:
        q = blocks[:, :, 2:].view(np.int8).astype(np.int64)
    else:
        qs = blocks[:, :, -16:]
        q = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.int64)
        if t in (GGMLType.Q5_0, GGMLType.Q5_1):     # qh bit j: bit 4 of value j (ggml's order)
            at = 4 if with_min else 2
            qh = blocks[:, :, at:at + 4].copy().view(np.uint32).astype(np.int64)     # [rows, nb, 1]
            q |= ((qh >> np.arange(32)) & 1) << 4
        q -= {GGMLType.Q4_0: 8, GGMLType.Q5_0: 16}.get(t, 0)
    y = xq.reshape(n, nb, 32).astype(np.int64)
    P = np.einsum("rbj,tbj->trb", q, y)                                      # exact integers
    scale = (d[None, :, :] * xd[:, None, :]).astype(np.float32)              # f32(d · xd)
    acc = _fma_chain(scale, P)
    if with_min:
        m = _halves(blocks[:, :, 2:4])[..., 0]
        acc = acc + _fma_chain(m[None], xs[:, None, :])
    return acc


def test_exact_block_sums_for_the_offset_formats():
    """Q4_0/Q8_0 take ``Σ xq`` per block as an exact float instead of ggml's rounded q8_1 sum;
    the quants and scales are the same either way."""
    x = np.random.default_rng(0).standard_normal(256).astype(np.float32) * 3
    tables = [(np.zeros(256, np.int8), np.zeros(8, np.float32), np.zeros(8, np.float32))
              for _ in range(2)]
    legacy.quantize_act_q8(x, *tables[0])
    legacy.quantize_act_q8(x, *tables[1], True)
    (q0, d0, _), (q1, d1, s1) = tables
    np.testing.assert_array_equal(q0, q1)
    np.testing.assert_array_equal(d0, d1)
    np.testing.assert_array_equal(s1, q1.reshape(8, 32).sum(axis=1).astype(np.float32))


def _packed_matmul(p, code, x, rows):
    out = np.full((x.shape[0], rows), np.nan, np.float32)
    quant.matmul(p, code, x, out)
    return out


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_layout_matches_reference_and_round_trips(t):
    rng = np.random.default_rng(1)
    for rows, k in ((8, 32), (24, 96), (40, 576)):
        k = _k(t, k)
        w = random_matrix(rng, t, rows, k)
        ref = il.pack_ref(w, t)
        assert ref.shape == w.shape and not np.array_equal(ref, w)
        np.testing.assert_array_equal(il.unpack_ref(ref, t), w)
        p, code = quant.pack(w, t)
        assert code == il.PACKED[t] and np.array_equal(p, ref)
        # group 0, block 0: the 8 row scales first, then row i's other bytes 4 at a time
        # (Q6_K: in its kernel's reading order, its 16 scales first)
        flat = p.reshape(-1)
        layout = il._LAYOUTS[t]
        h0 = layout.half_at                                         # Q6_K: d is last
        np.testing.assert_array_equal(flat[0:16].reshape(8, 2), w[:8, h0:h0 + 2])
        first_q = 4 * layout.chunk_order()[0] + (2 * layout.n_half if h0 == 0 else 0)
        head = 16 * layout.n_half
        np.testing.assert_array_equal(flat[head:head + 32].reshape(8, 4), w[:8, first_q:first_q + 4])
        inplace = w.copy()
        quant.pack(inplace, t, out=inplace)
        np.testing.assert_array_equal(inplace, ref)
        stack = np.stack([w, w[::-1].copy()])                       # experts: each packed alone
        ps, _ = quant.pack(stack, t)
        np.testing.assert_array_equal(ps[1], il.pack_ref(stack[1], t))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_kernels_give_the_documented_arithmetic_bit_for_bit(t):
    """Decode (1 token: TILE_GROUPS' groups a fraction of the run apart, then the odd groups;
    the narrow count below WIDE_K values per row, the wide one from there), prompt tiles (4
    tokens through one group, then singles), token blocks of 16, 1 and 2 threads, row counts
    that leave odd groups per thread; runs shorter than MIN_STREAM_BYTES per stream as one
    stream (264 x 576: the legacy formats' ~85-160 KB take both paths over the thread counts)."""
    assert _k(GGMLType.Q4_K, 1024) >= il.WIDE_K > _k(GGMLType.Q4_K, 576)
    assert 264 * quant.row_bytes(GGMLType.Q4_0, 576) >= 2 * il.MIN_STREAM_BYTES
    rng = np.random.default_rng(2)
    for rows, k in ((8, 32), (24, 64), (56, 96), (136, 576), (264, 576), (24, 1024), (200, 0)):
        k = _k(t, k) if k else il.WIDE_K                # the last two: rows >= WIDE_K
        w = random_matrix(rng, t, rows, k)
        p, code = quant.pack(w, t)
        for n in (1, 2, 3, 4, 5, 9, 17):
            x = rng.standard_normal((n, k)).astype(np.float32)
            want = _emulated(w, t, x)
            for threads in (1, 2):
                quant.set_threads(threads)
                got = _packed_matmul(p, code, x, rows)
                np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32),
                                              err_msg=f"{t.name} {rows}x{k} n={n} t={threads}")
    quant.set_threads(2)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_kernels_match_dequantized_weights_and_row_kernels(t):
    rng = np.random.default_rng(3)
    rows, k, n = 64, _k(t, 1024), 6
    w = random_matrix(rng, t, rows, k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    x[:, 5] = 30.0                                                  # an outlier channel
    p, code = quant.pack(w, t)
    got = _packed_matmul(p, code, x, rows)
    rows_out = np.empty_like(got)
    quant.matmul(w, t, x, rows_out)
    if t == GGMLType.Q4_K:                                          # same float operations
        np.testing.assert_array_equal(got.view(np.uint32), rows_out.view(np.uint32))
    np.testing.assert_allclose(got, rows_out, rtol=1e-5, atol=1e-5 * np.abs(rows_out).max())
    W = quant.dequantize(w, t, k).astype(np.float64)
    exact = x.astype(np.float64) @ W.T                              # float activations
    group = quant.FORMATS[t].block_size                             # activations' block
    bound = np.abs(x).reshape(n, -1, group).max(axis=2) / 127 * (0.5 + 127 * 2.0 ** -11)
    bound = bound @ np.abs(W).reshape(rows, -1, group).sum(axis=2).T + 1e-4
    assert (np.abs(got - exact) <= bound).all()


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_row_lookup_and_dequantize_read_the_interleaved_layout(t):
    rng = np.random.default_rng(4)
    rows, k = 48, _k(t, 128)
    w = random_matrix(rng, t, rows, k)
    p, code = quant.pack(w, t)
    W = quant.dequantize(w, t, k)
    np.testing.assert_array_equal(quant.dequantize(p, code, k), W)
    ids = np.array([0, 7, 8, 47, 19, 19])
    out = np.empty((len(ids), k), np.float32)
    quant.get_rows(p, code, ids, out)
    np.testing.assert_array_equal(out, W[ids])


def test_packed_stack_runs_in_one_region():
    """matvec_stack (one token's experts) over a packed [E, rows, row_bytes] stack."""
    rng = np.random.default_rng(5)
    t, E, rows, k = GGMLType.Q4_0, 4, 40, 256
    ws = np.stack([random_matrix(rng, t, rows, k) for _ in range(E)])
    ps, code = quant.pack(ws, t)
    x = rng.standard_normal((2, k)).astype(np.float32)
    sel = np.array([3, 1])
    out = np.empty((2, rows), np.float32)
    scratch = np.empty(quant.scratch_size(code, 2, k), np.uint8)
    kernels.matvec_stack(int(code), ps, sel, x, out, scratch)
    for j, e in enumerate(sel):
        np.testing.assert_array_equal(out[j].view(np.uint32),
                                      _emulated(ws[e], t, x[j:j + 1])[0].view(np.uint32))


def test_bad_packing_requests_raise_one_line_errors():
    rng = np.random.default_rng(6)
    w = random_matrix(rng, GGMLType.Q4_0, 12, 64)
    assert not quant.can_pack(GGMLType.Q4_0, 12) and not quant.can_pack(GGMLType.F16, 16)
    assert not quant.can_pack(9999, 16) and quant.can_pack(GGMLType.Q8_0, 16)
    with pytest.raises(CpuinferError, match=r"pack: cannot interleave Q4_0 uint8 \[12, 36\]"):
        quant.pack(w, GGMLType.Q4_0)
    with pytest.raises(CpuinferError, match="cannot interleave F16"):
        quant.pack(np.zeros((16, 512), np.uint8), GGMLType.F16)
    x = np.zeros((1, 64), np.float32)
    with pytest.raises(CpuinferError, match="Q4_0_X8 needs a multiple of 8 rows, w has 12"):
        quant.matmul(w, quant.PackedType.Q4_0_X8, x, np.zeros((1, 12), np.float32))
    good = random_matrix(rng, GGMLType.Q4_0, 16, 64)
    with pytest.raises(CpuinferError, match="out must be a writable"):
        quant.pack(good, GGMLType.Q4_0, out=np.zeros((16, 35), np.uint8))


def _fresh_asm(name: str) -> str:
    """Assembly of an uncached copy of an interleaved driver (numba cannot inspect code loaded
    from its cache), for one group of 8 rows and 2 blocks."""
    code = quant.PackedType[name]
    base = il.BASE[code]
    k = 2 * quant.FORMATS[base].block_size
    w = np.zeros((8, quant.row_bytes(base, k)), np.uint8)
    xq, xd = np.zeros((1, k), np.int8), np.ones((1, 2), np.float32)
    if base == GGMLType.Q4_K:
        return asm_of(kernels.rows_x8_k, int(code), w, 0, 8, xq, xd,
                      np.zeros((1, k // 16), np.int16), np.zeros((1, 8), np.float32))
    return asm_of(kernels.rows_x8, int(code), w, 0, 8, xq, xd, np.zeros((1, 2), np.float32),
                  np.zeros((1, 8), np.float32))


@pytest.mark.parametrize("name", ["Q4_0_X8", "Q5_0_X8", "Q4_K_X8"])
def test_interleaved_kernels_are_vector_code(name):
    asm = _fresh_asm(name)
    dot = r"\bvpdpbusd\b" if il.HAVE_AVX512_VNNI else r"\bvpmaddubsw\b"
    assert re.search(dot + r"[^\n]*%ymm", asm)
    assert re.search(r"\bvcvtph2ps\b[^\n]*%ymm", asm)                 # 8 row scales at once
    assert re.search(r"\bvfn?madd\w*ps\b[^\n]*%ymm", asm)
    assert not re.search(r"\bvhaddps\b|\bvextractf128\b", asm)        # no horizontal sums
    if name == "Q5_0_X8":                # fifth bits: a qh byte spread per lane, compared
        assert re.search(r"\bvpshufb\b[^\n]*%ymm", asm)
        assert re.search(r"\b(vpcmpeqb|vptestn?mb)\b[^\n]*%ymm", asm)     # AVX-512: into a mask
    if name == "Q4_K_X8":                # sub-block scales picked per lane, multiplied as int32
        assert re.search(r"\bvpshufb\b[^\n]*%ymm", asm)
        assert re.search(r"\bvpmulld\b[^\n]*%ymm", asm)


_AVX2_CHECK = """
import sys
import numpy as np
sys.path.insert(0, "tests")
import quant
from quant import interleaved as il
from quant_helpers import random_matrix
from test_interleaved import TYPES, _emulated, _packed_matmul
assert il.HAVE_X8 and not il.HAVE_AVX512_VNNI
rng = np.random.default_rng(7)
for t in TYPES:
    for rows, k, n in ((24, 64, 1), (56, 576, 5), (8, 32, 17)):
        k = k * quant.FORMATS[t].block_size // 32
        w = random_matrix(rng, t, rows, k)
        x = rng.standard_normal((n, k)).astype(np.float32)
        p, code = quant.pack(w, t)
        got = _packed_matmul(p, code, x, rows)
        assert np.array_equal(got.view(np.uint32), _emulated(w, t, x).view(np.uint32)), (t, rows, n)
print("OK")
"""


def test_interleaved_kernels_compiled_for_an_avx2_only_cpu(tmp_path):
    """Without VNNI the byte dots are ``vpmaddubsw`` + ``vpmaddwd`` (Q4: eight int16 sums added
    before one ``vpmaddwd``, Q5: four; Q8_0: ``|w|`` times ``sign(w)·y``) and give the same bits (a
    separate process: numba's target CPU is fixed per process)."""
    run_for_avx2_only(_AVX2_CHECK, tmp_path)
