"""K-quants (Q2_K..Q6_K): numpy references vs gguf-py, compiled row dequantizers and dots vs the
references, on random blocks and on every K-quant tensor of a real llama.cpp-quantized file."""
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

from cpuinfer.errors import CpuinferError
from cpuinfer.gguf import GGMLType, open_gguf
from quant.kquants import KQUANT_FORMATS, QK_K
from quant_helpers import asm_of

DATA = Path(__file__).parent / "data" / "tiny" / "llama" / "llama-Q4_K_M.gguf"

# Byte offsets of the fp16 super-block scales (d, and dmin where the format has one).
F16_OFFSETS = {
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q3_K: (108,),
    GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
}
TYPES = list(KQUANT_FORMATS)
IDS = [t.name for t in TYPES]


def random_blocks(qtype: GGMLType, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes, with finite fp16 scales of mixed sign and magnitude (incl. 0, subnormals)."""
    rng = np.random.default_rng(seed)
    type_size = KQUANT_FORMATS[qtype].type_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_OFFSETS[qtype]:
        scale = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        scale[0] = 0.0
        scale[1] = np.float16(3e-6)   # subnormal
        scale[2] = np.float16(-2.5)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_sizes_match_ggml(qtype):
    fmt = KQUANT_FORMATS[qtype]
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype]


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_reference_bit_exact_vs_gguf_py(qtype):
    blocks = random_blocks(qtype, 96, seed=int(qtype))
    ours = KQUANT_FORMATS[qtype].dequantize_ref(blocks)
    theirs = gguf_dequantize(blocks, qtype).reshape(96, QK_K)
    assert ours.dtype == np.float32 and ours.shape == (96, QK_K)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_reference_rejects_bad_blocks(qtype):
    fmt = KQUANT_FORMATS[qtype]
    with pytest.raises(CpuinferError, match=qtype.name):
        fmt.dequantize_ref(np.zeros((2, fmt.type_size + 1), np.uint8))
    with pytest.raises(CpuinferError, match=qtype.name):
        fmt.dequantize_ref(np.zeros((2, fmt.type_size), np.int8))


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_dequant_row_equals_reference(qtype):
    fmt = KQUANT_FORMATS[qtype]
    n_rows, blocks_per_row = 8, 8
    blocks = random_blocks(qtype, n_rows * blocks_per_row, seed=100 + int(qtype))
    ref = fmt.dequantize_ref(blocks).reshape(n_rows, blocks_per_row * QK_K)
    rows = blocks.reshape(n_rows, blocks_per_row * fmt.type_size)
    for r in range(n_rows):
        out = np.full(blocks_per_row * QK_K, np.nan, np.float32)
        fmt.dequant_row(rows[r], out)
        np.testing.assert_array_equal(out.view(np.uint32), ref[r].view(np.uint32))


def check_dot(fmt, rows: np.ndarray, ref: np.ndarray, rng) -> None:
    """``fmt.dot`` of every row against float64 ``ref @ x``, relative to Σ|w·x|."""
    x = rng.standard_normal(ref.shape[1]).astype(np.float32)
    exact = ref.astype(np.float64) @ x.astype(np.float64)
    scale = np.abs(ref.astype(np.float64)) @ np.abs(x.astype(np.float64))
    got = np.array([fmt.dot(rows[r], x) for r in range(rows.shape[0])], np.float64)
    assert np.all(np.abs(got - exact) <= 2e-6 * scale + 1e-30), (got, exact)


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_dot_matches_float64(qtype):
    fmt = KQUANT_FORMATS[qtype]
    n_rows, blocks_per_row = 16, 6
    blocks = random_blocks(qtype, n_rows * blocks_per_row, seed=200 + int(qtype))
    ref = fmt.dequantize_ref(blocks).reshape(n_rows, blocks_per_row * QK_K)
    rows = blocks.reshape(n_rows, blocks_per_row * fmt.type_size)
    check_dot(fmt, rows, ref, np.random.default_rng(int(qtype)))
    assert isinstance(fmt.dot(rows[0], np.zeros(blocks_per_row * QK_K, np.float32)), float)


def test_real_file_every_kquant_tensor():
    g = open_gguf(DATA)
    seen = set()
    for info in g.tensors.values():
        if info.ggml_type not in KQUANT_FORMATS:
            continue
        fmt = KQUANT_FORMATS[info.ggml_type]
        seen.add(info.ggml_type)
        raw = g.raw(info)
        rows = raw.reshape(-1, raw.shape[-1])
        k = info.shape[-1]
        theirs = gguf_dequantize(rows, info.ggml_type).reshape(-1, k)
        ours = fmt.dequantize_ref(rows.reshape(-1, fmt.type_size)).reshape(-1, k)
        np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32), err_msg=info.name)
        out = np.empty(k, np.float32)
        for r in (0, rows.shape[0] // 2, rows.shape[0] - 1):
            fmt.dequant_row(rows[r], out)
            np.testing.assert_array_equal(out.view(np.uint32), ours[r].view(np.uint32), err_msg=info.name)
        check_dot(fmt, rows[:32], ours[:32], np.random.default_rng(7))
    assert seen == {GGMLType.Q4_K, GGMLType.Q6_K}


# --- Q8_K activations and integer dots (llama.cpp's vec_dot_q<n>_K_q8_K) ----------------------

from quant import kquants  # noqa: E402
from quant.base import f16_scales  # noqa: E402


def ggml_quantize_q8k(x: np.ndarray):
    """Literal numpy transcription of ggml's ``quantize_row_q8_K_ref``: strict ``>`` search for the
    largest magnitude, ``iscale = -127/max``, ``nearest_int`` by the 1.5·2^23 float trick."""
    xb = x.astype(np.float32).reshape(-1, QK_K)
    q = np.zeros(xb.shape, np.int8)
    d = np.zeros(xb.shape[0], np.float32)
    for b in range(xb.shape[0]):
        amax, mx = np.float32(0), np.float32(0)
        for v in xb[b]:
            if abs(v) > amax:
                amax, mx = abs(v), v
        if amax == 0:
            continue
        iscale = np.float32(-127.0) / mx
        val = (iscale * xb[b]) + np.float32(12582912.0)                 # float32 ops
        i = (val.view(np.int32) & 0x007FFFFF) - 0x00400000
        q[b] = np.minimum(127, i)
        d[b] = np.float32(1.0) / iscale
    sums = q.reshape(-1, 16).astype(np.int32).sum(axis=1).astype(np.int16)
    return q.reshape(-1), d, sums


def quantize_q8k(x: np.ndarray):
    nb = x.size // QK_K
    xq, xd, xb = np.empty(x.size, np.int8), np.empty(nb, np.float32), np.empty(nb * 16, np.int16)
    kquants.quantize_act_q8k(x, xq, xd, xb)
    return xq, xd, xb


def test_quantize_q8k_matches_ggml():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(8 * QK_K) * rng.uniform(0.01, 10, 8 * QK_K)).astype(np.float32)
    x[:QK_K] = 0.0                                        # all-zero block: d = 0, q = 0
    x[QK_K + 7] = -50.0                                   # negative extreme -> iscale > 0
    x[2 * QK_K:2 * QK_K + 8] = [2.54, -1.27, 0.635, 0.0635, -0.0635, 1.905, 3.175, 0.3]  # halves
    x[3 * QK_K + 3] = 1e-30                               # tiny values beside normal ones
    xq, xd, xb = quantize_q8k(x)
    rq, rd, rb = ggml_quantize_q8k(x)
    np.testing.assert_array_equal(xq, rq)
    np.testing.assert_array_equal(xd.view(np.uint32), rd.view(np.uint32))
    np.testing.assert_array_equal(xb, rb)
    # the extreme always maps to -127: a negative one gives a positive scale
    assert xd[0] == 0 and not xq[:QK_K].any() and xd[1] > 0 and xq[QK_K + 7] == -127
    err = np.abs(xq.reshape(-1, QK_K) * xd[:, None].astype(np.float64) - x.reshape(-1, QK_K))
    assert (err <= np.abs(xd[:, None]) * 0.5 * (1 + 1e-6)).all()


def _emulate_ggml_k_dot(qtype, blocks: np.ndarray, xq, xd, xb) -> np.float32:
    """ggml's per-block arithmetic in numpy: exact integer sums from the dequantized integer
    weights, float32 scales, each ``acc = fma(d, float(sum), acc)`` as float64 product + sum rounded
    once to float32 (the product of two float32 is exact in float64)."""
    f32 = np.float32

    def fma(a, b, c):
        return f32(np.float64(a) * np.float64(b) + np.float64(c))

    ints, mins = _integer_weights(qtype, blocks)          # [nb, 256] int64, [nb, 16] int64 or None
    q8 = xq.reshape(-1, QK_K).astype(np.int64)
    bs = xb.reshape(-1, 16).astype(np.int64)
    d_off = F16_OFFSETS[qtype]
    acc, acc_m = f32(0), f32(0)
    for b in range(blocks.shape[0]):
        d = f32(xd[b] * f16_scales(blocks[b:b + 1], d_off[0])[0, 0])
        sumi = f32(int((ints[b] * q8[b]).sum()))
        if mins is not None:
            dmin = -f32(xd[b] * f16_scales(blocks[b:b + 1], d_off[1])[0, 0])
            summ = f32(int((mins[b] * bs[b]).sum()))
            if qtype == GGMLType.Q2_K:                   # one accumulator, min term first
                acc = fma(dmin, summ, acc)
            else:
                acc_m = fma(dmin, summ, acc_m)
        acc = fma(d, sumi, acc)
    return f32(acc + acc_m)


def _integer_weights(qtype, blocks):
    """Per block: the integer factor ``scale · q`` of each weight (so weight = d · that, minus the
    min part) and, for formats with mins, the integer min of each 16-weight group."""
    ref = KQUANT_FORMATS[qtype].dequantize_ref
    nb = blocks.shape[0]
    probe = blocks.copy()
    d_off = F16_OFFSETS[qtype]
    one = np.array([1.0], np.float16).view(np.uint8)
    zero = np.array([0.0], np.float16).view(np.uint8)
    probe[:, d_off[0]:d_off[0] + 2] = one
    mins = None
    if len(d_off) == 2:
        probe[:, d_off[1]:d_off[1] + 2] = zero
        mprobe = blocks.copy()
        mprobe[:, d_off[0]:d_off[0] + 2] = zero
        mprobe[:, d_off[1]:d_off[1] + 2] = one
        mins = (-ref(mprobe)).reshape(nb, 16, 16)[:, :, 0].astype(np.int64)   # weight = -min
    return ref(probe).astype(np.int64), mins


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_integer_dot_matches_ggml_emulation_and_float64(qtype):
    rng = np.random.default_rng(300 + int(qtype))
    nb = 6
    blocks = random_blocks(qtype, nb, seed=300 + int(qtype))
    blocks[:3] = blocks[3:6]                   # keep the random scales; drop the zero/huge ones
    for off in F16_OFFSETS[qtype]:
        blocks[:, off:off + 2] = (rng.standard_normal(nb) * 0.01).astype(np.float16).view(np.uint8).reshape(nb, 2)
    x = (rng.standard_normal(nb * QK_K) * rng.uniform(0.1, 4, nb * QK_K)).astype(np.float32)
    xq, xd, xb = quantize_q8k(x)
    row = blocks.reshape(-1)
    got = getattr(kquants, f"_idot_{qtype.name.lower()}")(row, xq, xd, xb)
    want = _emulate_ggml_k_dot(qtype, blocks, xq, xd, xb)
    assert np.float32(got).view(np.uint32) == want.view(np.uint32), (got, want)
    # within the activation rounding bound of the float64 dot with the true activations
    w = KQUANT_FORMATS[qtype].dequantize_ref(blocks).astype(np.float64).reshape(-1)
    bound = (np.abs(xd).astype(np.float64) * 0.5 * 1.0001) @ np.abs(w.reshape(nb, QK_K)).sum(axis=1)
    assert abs(got - w @ x.astype(np.float64)) <= bound + 1e-5 * (np.abs(w) @ np.abs(x))


@pytest.mark.skipif(not __import__("quant").avx2.HAVE_AVX2, reason="needs AVX2 (compile target)")
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_integer_dots_are_vectorized(qtype):
    """The lane loops must compile to packed integer multiply-adds (a call or an int64 product
    in the loop body silently makes them scalar and ~3x slower)."""
    import re

    cached = getattr(kquants, f"_idot_{qtype.name.lower()}")
    size = KQUANT_FORMATS[qtype].type_size
    asm = asm_of(cached, np.zeros(2 * size, np.uint8), np.zeros(512, np.int8),
                 np.ones(2, np.float32), np.zeros(32, np.int16))
    assert re.search(r"\bv(pmaddwd|pmulld|pdpwssd)\b[^\n]*%[yz]mm", asm), qtype.name


def _ggml_avx2_k_dot(qtype, blocks, xq, xd, xb) -> np.float32:
    """ggml's AVX2 ``vec_dot_q4_K_q8_K`` / ``q6_K_q8_K`` replayed lane by lane in numpy (the Q4_K
    kernel runs llama.cpp's repacked order instead; this lane form checked the emulation against
    libggml-cpu while writing it): int32 lane u
    of a block holds the products of the bytes 4u..4u+3 of every 32-value step (scaled by their
    sub-block scale); Q6_K subtracts ``32·(bsum[2u]·sc[2u] + bsum[2u+1]·sc[2u+1])`` from lane u;
    ``acc = fma(d, float(lane), acc)`` per block (fma as an exact float64 product plus one
    rounding), Q4_K's min term in a 4-lane ``acc_m``; the end is ``hsum_float_8`` plus the
    ``acc_m`` sum ((m0+m2)+(m1+m3))."""
    f32 = np.float32
    nb = blocks.shape[0]
    iw, mins = _integer_weights(qtype, blocks)
    q8 = xq.reshape(nb, QK_K).astype(np.int64)
    bs = xb.reshape(nb, 16).astype(np.int64)
    lane_of = (np.arange(QK_K) % 32) // 4
    acc, acc_m = np.zeros(8, np.float32), np.zeros(4, np.float32)
    for b in range(nb):
        dy = xd[b]
        if qtype == GGMLType.Q6_K:
            sc = blocks[b, 192:208].view(np.int8).astype(np.int64)
            prod = (iw[b] + 32 * np.repeat(sc, 16)) * q8[b]              # unsigned 6-bit q
            lanes = np.bincount(lane_of, weights=prod, minlength=8).astype(np.int64)
            lanes -= 32 * (bs[b] * sc).reshape(8, 2).sum(axis=1)
            d = f32(dy * f16_scales(blocks[b:b + 1], 208)[0, 0])
        else:
            lanes = np.bincount(lane_of, weights=iw[b] * q8[b], minlength=8).astype(np.int64)
            d = f32(dy * f16_scales(blocks[b:b + 1], 0)[0, 0])
            dmin = -f32(dy * f16_scales(blocks[b:b + 1], 2)[0, 0])
            m = mins[b, ::2]                                             # one min per 32
            s = bs[b].reshape(8, 2).sum(axis=1)
            pm = (m * s).reshape(4, 2).sum(axis=1)
            acc_m = (np.float64(dmin) * pm.astype(np.float32).astype(np.float64)
                     + acc_m.astype(np.float64)).astype(np.float32)
        acc = (np.float64(d) * lanes.astype(np.float32).astype(np.float64)
               + acc.astype(np.float64)).astype(np.float32)
    r = acc[4:] + acc[:4]
    total = f32(f32(r[0] + r[2]) + f32(r[1] + r[3]))
    if qtype == GGMLType.Q4_K:
        total = f32(total + f32(f32(acc_m[0] + acc_m[2]) + f32(acc_m[1] + acc_m[3])))
    return total


@pytest.mark.skipif(not __import__("quant").avx2.HAVE_AVX2, reason="needs AVX2")
@pytest.mark.parametrize("qtype", [GGMLType.Q4_K, GGMLType.Q6_K], ids=["Q4_K", "Q6_K"])
def test_avx2_k_dot_bit_exact_vs_ggml_lanes(qtype):
    from quant import avx2, kernels
    rng = np.random.default_rng(400 + int(qtype))
    nb = 8
    fast = getattr(avx2, f"idot_{qtype.name.lower()}_avx2")
    assert getattr(kernels, f"_idot_{qtype.name.lower()}") is fast       # matmul uses it
    for rep in range(12):
        blocks = rng.integers(0, 256, (nb, KQUANT_FORMATS[qtype].type_size), dtype=np.uint8)
        for off in F16_OFFSETS[qtype]:
            blocks[:, off:off + 2] = (rng.standard_normal(nb) * 0.01).astype(np.float16).view(np.uint8).reshape(nb, 2)
        x = (rng.standard_normal(nb * QK_K) * rng.uniform(0.1, 4, nb * QK_K)).astype(np.float32)
        xq, xd, xb = quantize_q8k(x)
        got = np.float32(fast(blocks.reshape(-1), xq, xd, xb))
        slow = np.float32(getattr(kquants, f"_idot_{qtype.name.lower()}")(blocks.reshape(-1), xq, xd, xb))
        if qtype == GGMLType.Q6_K:      # ggml_vec_dot_q6_K_q8_K's lanes
            want = _ggml_avx2_k_dot(qtype, blocks, xq, xd, xb)
            w = KQUANT_FORMATS[qtype].dequantize_ref(blocks).astype(np.float64).reshape(-1)
            assert abs(got - slow) <= 1e-5 * (np.abs(w) @ (np.abs(xq) * np.repeat(np.abs(xd), QK_K)))
        else:                           # repacked Q4_K: block totals, like the portable loop
            want = _emulate_ggml_k_dot(qtype, blocks, xq, xd, xb)
            assert got.view(np.uint32) == slow.view(np.uint32)
        assert got.view(np.uint32) == want.view(np.uint32), (rep, got, want)
