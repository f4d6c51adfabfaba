"""quant's public drivers: matmul / get_rows against numpy references, validation, vector code."""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from cpuinfer.errors import CpuinferError
from cpuinfer.gguf import GGMLType, open_gguf
from quant import (FORMATS, SUPPORTED_TYPES, check_supported, dequantize, get_rows, matmul,
                   row_bytes, scratch_size)
from quant import avx2, avx512, kernels, legacy
from quant.jit import get_threads, max_threads, set_threads
from quant_helpers import asm_of, random_matrix

DATA = Path(__file__).parent / "data"
Q8_FIXTURE = DATA / "tiny" / "llama" / "llama-Q8_0.gguf"


def _k_for(t) -> int:
    return 2 * 256 if FORMATS[t].block_size == 256 else 320     # 320 = 10 blocks of 32


def _readonly(a: np.ndarray) -> np.ndarray:
    """Weights come from a read-only mmap; test the same compiled signature."""
    a.flags.writeable = False
    return a


def _assert_matmul_close(out, x, w, t):
    """out ≈ x @ W.T: float formats to rounding, int8-activation formats within their bound."""
    n, k = x.shape
    W = dequantize(w, t, k).astype(np.float64)
    x64 = x.astype(np.float64)
    ref = x64 @ W.T
    scale = np.abs(x64) @ np.abs(W).T
    bound = np.zeros_like(ref)
    if t in kernels.Q8_ACT_TYPES:
        nb = k // 32
        xd = np.abs(x64.reshape(n, nb, 32)).max(axis=2) / 127          # activation scales
        # per value: half a step plus the f16 rounding of the scale (2^-11 relative) · |q| <= 127
        bound = (xd * (0.5 + 127 * 2.0 ** -11)) @ np.abs(W.reshape(-1, nb, 32)).sum(axis=2).T
        assert np.linalg.norm(out - ref) <= 2e-2 * np.linalg.norm(ref)
    if t in kernels.Q8K_ACT_TYPES:
        nb = k // 256
        xd = np.abs(x64.reshape(n, nb, 256)).max(axis=2) / 127          # Q8_K scales (float32)
        bound = (xd * 0.5 * (1 + 1e-5)) @ np.abs(W.reshape(-1, nb, 256)).sum(axis=2).T
        assert np.linalg.norm(out - ref) <= 2e-2 * np.linalg.norm(ref)
    err = np.abs(out - ref)
    assert (err <= bound * 1.001 + 2e-5 * scale).all(), float((err - bound).max())


@pytest.fixture
def threads():
    before = get_threads()
    yield
    set_threads(before)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("n", [1, 5, 12])
@pytest.mark.parametrize("t", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_matmul_matches_dequantized_reference(t, n, n_threads, threads):
    if n_threads > max_threads():
        pytest.skip("numba has a single thread here")
    set_threads(n_threads)
    rng = np.random.default_rng([int(t), n, n_threads])
    k, rows = _k_for(t), 37
    w = _readonly(random_matrix(rng, t, rows, k))
    x = rng.standard_normal((n, k)).astype(np.float32)
    out = np.full((n, rows), np.nan, np.float32)
    matmul(w, t, x, out)
    _assert_matmul_close(out, x, w, t)


@pytest.mark.parametrize("t", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_dot_rows_switch_matches_format_dot(t):
    rng = np.random.default_rng(int(t))
    k = _k_for(t)
    w = random_matrix(rng, t, 4, k)
    x = rng.standard_normal(k).astype(np.float32)
    out = np.zeros(4, np.float32)
    kernels.dot_rows(int(t), w, 1, 3, x, out)         # rows 1 and 2 only
    assert out[0] == 0 and out[3] == 0
    for r in (1, 2):
        want = FORMATS[t].dot(w[r], x)
        assert abs(out[r] - want) <= 1e-6 * abs(want)


def test_matmul_uses_given_scratch_and_checks_its_size():
    rng = np.random.default_rng(7)
    t, k, rows, n = GGMLType.Q4_1, 320, 37, 5
    w = _readonly(random_matrix(rng, t, rows, k))
    x = rng.standard_normal((n, k)).astype(np.float32)
    need = scratch_size(t, n, k)
    assert need == n * (k + 8 * (k // 32))
    assert scratch_size(GGMLType.F16, n, k) == 0
    assert scratch_size(GGMLType.Q4_K, n, 512) == n * (512 + 4 * 2 + 2 * 32)   # q, d, bsums
    a, b = np.empty((n, rows), np.float32), np.empty((n, rows), np.float32)
    matmul(w, t, x, a)
    scratch = np.zeros(need + 100, np.uint8)
    matmul(w, t, x, b, scratch=scratch)
    np.testing.assert_array_equal(a, b)
    xq = scratch[:k].view(np.int8)             # token 0's quantized activations landed there
    xd = scratch[n * k:n * k + 4 * (k // 32)].view(np.float32)
    np.testing.assert_allclose(np.repeat(xd, 32) * xq, x[0], atol=float(xd.max()) * 0.57)
    with pytest.raises(CpuinferError, match="scratch has 10 bytes, needs"):
        matmul(w, t, x, b, scratch=np.empty(10, np.uint8))


@pytest.mark.parametrize("t", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_get_rows_exact(t):
    rng = np.random.default_rng(int(t) + 100)
    k, rows = _k_for(t), 37
    w = _readonly(random_matrix(rng, t, rows, k))
    W = dequantize(w, t, k)
    for dtype in (np.int64, np.int32):
        ids = np.array([36, 0, 5, 5], dtype)
        out = np.full((4, k), np.nan, np.float32)
        get_rows(w, t, ids, out)
        np.testing.assert_array_equal(out, W[ids])


def test_dequantize_keeps_leading_shape():
    rng = np.random.default_rng(3)
    w = random_matrix(rng, GGMLType.Q8_0, 6, 64).reshape(2, 3, -1)
    d = dequantize(w, GGMLType.Q8_0, 64)
    assert d.shape == (2, 3, 64) and d.dtype == np.float32
    np.testing.assert_array_equal(d[1, 2], FORMATS[GGMLType.Q8_0].dequantize_ref(w[1, 2].reshape(2, 34)).reshape(-1))


def test_row_bytes():
    assert row_bytes(GGMLType.Q4_1, 576) == 18 * 20
    assert row_bytes(GGMLType.Q8_0, 576) == 18 * 34
    assert row_bytes(GGMLType.F16, 7) == 14
    assert row_bytes(GGMLType.Q6_K, 512) == 2 * 210
    with pytest.raises(CpuinferError, match="not a positive multiple of the Q4_0 block size 32"):
        row_bytes(GGMLType.Q4_0, 100)


def test_supported_types_cover_the_model_formats():
    for t in (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0,
              GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q2_K, GGMLType.Q3_K,
              GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K):
        assert t in SUPPORTED_TYPES
        check_supported(t, "x", "f.gguf")


def test_unsupported_type_errors():
    with pytest.raises(CpuinferError) as e:
        check_supported(GGMLType.IQ2_XXS, "blk.0.ffn_up.weight", "m.gguf")
    msg = str(e.value)
    assert msg.startswith("m.gguf: tensor blk.0.ffn_up.weight has type IQ2_XXS, which cpuinfer "
                          "does not support (supported: F32, F16, ")
    assert "\n" not in msg
    with pytest.raises(CpuinferError, match="type IQ2_XXS is not supported"):
        matmul(np.zeros((1, 66), np.uint8), GGMLType.IQ2_XXS, np.zeros((1, 256), np.float32),
               np.zeros((1, 1), np.float32))
    with pytest.raises(CpuinferError, match="unknown type 12345"):
        check_supported(12345, "t", "m.gguf")


def test_matmul_validation():
    t, k, rows = GGMLType.Q4_0, 64, 3
    w = np.zeros((rows, row_bytes(t, k)), np.uint8)
    x = np.zeros((2, k), np.float32)
    out = np.zeros((2, rows), np.float32)
    bad = [
        (np.zeros((rows, 35), np.uint8), x, out, "rows of 64 values need 36 bytes"),
        (w[:, :-1], x, out, "w must be C-contiguous"),
        (w, x.astype(np.float64), out, "x must be a 2-d float32 array, got float64"),
        (w, x[0], out, "x must be a 2-d float32 array"),
        (w, x, out[:1], r"out must be \[2, 3\]"),
        (w, x, np.zeros((2, 6), np.float32)[:, ::2], "out must be C-contiguous"),
        (w.astype(np.int8), x, out, "w must be a 2-d uint8 array"),
        (w, np.zeros((2, 48), np.float32), out, "k a multiple of 32"),
    ]
    for ww, xx, oo, msg in bad:
        with pytest.raises(CpuinferError, match=msg):
            matmul(ww, t, xx, oo)
    ro = np.zeros((2, rows), np.float32)
    ro.flags.writeable = False
    with pytest.raises(CpuinferError, match="out must be writeable"):
        matmul(w, t, x, ro)


def test_get_rows_validation():
    t, k = GGMLType.Q8_0, 64
    w = np.zeros((4, row_bytes(t, k)), np.uint8)
    out = np.zeros((2, k), np.float32)
    with pytest.raises(CpuinferError, match=r"id 4 out of range \[0, 4\)"):
        get_rows(w, t, np.array([1, 4]), out)
    with pytest.raises(CpuinferError, match="id -1 out of range"):
        get_rows(w, t, np.array([-1, 0]), out)
    with pytest.raises(CpuinferError, match="ids must be a 1-d int64 or int32 array"):
        get_rows(w, t, np.array([1.0, 2.0]), out)
    with pytest.raises(CpuinferError, match="3 ids but out has 2 rows"):
        get_rows(w, t, np.array([1, 2, 3]), out)


def test_real_q8_0_tensors_from_fixture():
    g = open_gguf(Q8_FIXTURE)
    emb = g.tensors["token_embd.weight"]
    assert emb.ggml_type == GGMLType.Q8_0
    raw = g.raw(emb.name)
    vocab, k = emb.shape
    W = dequantize(raw, GGMLType.Q8_0, k)
    np.testing.assert_array_equal(W, np.asarray(gguf.quants.dequantize(raw, GGMLType.Q8_0)))
    rng = np.random.default_rng(11)
    for name in ("token_embd.weight", "blk.0.ffn_down.weight", "blk.0.attn_k.weight"):
        info = g.tensors[name]
        w = g.raw(name)
        for n in (1, 3):
            x = rng.standard_normal((n, info.shape[1])).astype(np.float32)
            out = np.empty((n, info.shape[0]), np.float32)
            matmul(w, info.ggml_type, x, out)
            _assert_matmul_close(out, x, w, info.ggml_type)
    ids = np.array([0, 1, vocab - 1, 17])
    out = np.empty((4, k), np.float32)
    get_rows(raw, GGMLType.Q8_0, ids, out)
    np.testing.assert_array_equal(out, W[ids])


_VECTOR_OP = re.compile(r"\bv(pmaddwd|pmaddubsw|pdpwssd|pdpbusd|pmulld|fmadd\w*ps)\b[^\n]*%[yz]mm")


def _fresh_asm(cached, t) -> str:
    """Assembly of a fresh, uncached copy (numba cannot inspect code loaded from its cache)."""
    w = random_matrix(np.random.default_rng(0), t, 1, 64)[0]
    return asm_of(cached, w, np.zeros(64, np.int8), np.ones(2, np.float32), np.zeros(2, np.float32))


HOT = {"q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0, "q4_1": GGMLType.Q4_1}


@pytest.mark.skipif(not avx2.HAVE_AVX2, reason="needs AVX2 (compile target)")
@pytest.mark.parametrize("name", list(HOT))
def test_portable_hot_dots_are_vectorized(name):
    asm = _fresh_asm(getattr(legacy, f"_idot_{name}"), HOT[name])
    assert _VECTOR_OP.search(asm), f"_idot_{name}: no packed integer multiply-add on ymm/zmm"


@pytest.mark.skipif(not avx2.HAVE_AVX2, reason="needs AVX2 (compile target)")
def test_f32_four_row_dot_is_vectorized():
    """The one-token F32 product (DeepSeek's routers) runs four rows in packed multiply-adds."""
    from quant import floats
    row = np.zeros(256, np.uint8)
    asm = asm_of(floats._dot4_f32, row, row, row, row, np.ones(64, np.float32))
    assert re.search(r"\bvfmadd\w*ps\b[^\n]*%[yz]mm", asm), "_dot4_f32: no packed multiply-add"


@pytest.mark.skipif(not avx2.HAVE_AVX2, reason="needs AVX2")
@pytest.mark.parametrize("name", list(HOT))
def test_avx2_hot_dots_use_byte_multiply_add(name):
    asm = _fresh_asm(getattr(avx2, f"idot_{name}_avx2"), HOT[name])
    assert re.search(r"\bvpmaddubsw\b[^\n]*%ymm", asm)
    assert re.search(r"\bvfmadd\w*ps\b[^\n]*%ymm", asm)


@pytest.mark.skipif(avx512.HAVE_AVX512_VNNI,
                    reason="AVX-512 VNNI kernels are chosen instead (tests/test_avx512.py)")
def test_matmul_dispatches_hot_formats_to_avx2_when_available():
    expect = avx2.HAVE_AVX2
    assert (kernels._idot_q4_1 is avx2.idot_q4_1_avx2) == expect
    assert (kernels._idot_q8_0 is avx2.idot_q8_0_avx2) == expect
    assert (kernels._idot_q4_0 is avx2.idot_q4_0_avx2) == expect
