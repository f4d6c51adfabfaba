"""quant.avx512: AVX-512 VNNI tiles equal the AVX2 row dots bit for bit, and are vector code."""
from __future__ import annotations

import re

import numba
import numpy as np
import pytest

from cpuinfer.gguf import GGMLType
from quant import avx2, avx512, kernels, legacy
from quant_helpers import (asm_of, q8_activations, q8k_activations, random_blocks, rowwise,
                           run_for_avx2_only)

HOT = {"q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0, "q4_1": GGMLType.Q4_1}
needs_vnni = pytest.mark.skipif(not avx512.HAVE_AVX512_VNNI,
                                reason="compile target lacks avx512f/bw/vl/vnni")


def _bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


def _tiled(name, w, xq, xd, xs, r0=0, r1=None):
    r1 = w.shape[0] if r1 is None else r1
    out = np.full((xq.shape[0], w.shape[0]), np.nan, np.float32)
    getattr(avx512, f"rows_{name}_avx512")(w, r0, r1, xq, xd, xs, out)
    return out


def _rowwise(name, w, xq, xd, xs):
    return rowwise(getattr(avx2, f"idot_{name}_avx2"), w, xq, xd, xs)


@needs_vnni
@pytest.mark.parametrize("name", list(HOT))
def test_avx512_tiles_bit_identical_to_avx2_rows(name):
    """Every tile shape (4 × 4, 4 × 1, 1 × 4, 1 × 1), odd block counts, sign/nibble edges."""
    rng = np.random.default_rng(5)
    t = HOT[name]
    checked = 0
    for nb, rows, n in ((1, 1, 1), (2, 4, 4), (3, 5, 7), (5, 9, 4), (6, 8, 5), (9, 3, 9),
                        (33, 12, 2), (64, 7, 6), (127, 4, 1), (128, 17, 8)):
        for trial in range(4):
            w = np.stack([random_blocks(rng, t, nb).reshape(-1) for _ in range(rows)])
            if trial % 2 == 1:               # weights at the offset / nibble edges
                q0 = 2 if t != GGMLType.Q4_1 else 4
                edges = np.array([0x80, 0x7F, 0x81, 0x00, 0x01, 0xFF, 0x88, 0x0F, 0xF0],
                                 np.uint8)
                blocks = w.reshape(rows, nb, -1)
                blocks[:, :, q0:] = rng.choice(edges, size=blocks[:, :, q0:].shape)
            if trial == 2 and t == GGMLType.Q8_0:
                w.reshape(rows, nb, -1)[:, :, 2:] = 0x80        # all −128
            xq, xd, xs = q8_activations(rng, n, nb, extreme=trial % 2 == 0)
            got, ref = _tiled(name, w, xq, xd, xs), _rowwise(name, w, xq, xd, xs)
            np.testing.assert_array_equal(_bits(got), _bits(ref), err_msg=f"{name} {nb} {rows} {n}")
            checked += int(np.count_nonzero(ref))
    assert checked > 1000                    # the rows were not trivially zero


@needs_vnni
def test_avx512_tiles_cover_exactly_the_asked_rows():
    rng = np.random.default_rng(6)
    w = np.stack([random_blocks(rng, GGMLType.Q4_0, 4).reshape(-1) for _ in range(23)])
    xq, xd, xs = q8_activations(rng, 5, 4, extreme=False)
    got = _tiled("q4_0", w, xq, xd, xs, 3, 21)
    ref = _rowwise("q4_0", w, xq, xd, xs)
    assert np.isnan(got[:, :3]).all() and np.isnan(got[:, 21:]).all()
    np.testing.assert_array_equal(_bits(got[:, 3:21]), _bits(ref[:, 3:21]))


@needs_vnni
def test_avx512_odd_tail_changes_result():
    """The last odd block is really accumulated (guards the tail path's wiring)."""
    rng = np.random.default_rng(9)
    w = np.stack([random_blocks(rng, GGMLType.Q4_0, 3).reshape(-1) for _ in range(4)])
    xq, xd, xs = q8_activations(rng, 1, 3, extreme=False)
    full = _tiled("q4_0", w, xq, xd, xs)
    two = _tiled("q4_0", np.ascontiguousarray(w[:, :36]), xq[:, :64].copy(), xd[:, :2].copy(),
                 xs[:, :2].copy())
    assert (full != two).all()


def _fresh_asm(cached) -> str:
    """Assembly of a fresh, uncached copy (numba cannot inspect code loaded from its cache)."""
    w = np.zeros((4, 36), np.uint8)
    xq, xd, xs = np.zeros((1, 64), np.int8), np.ones((1, 2), np.float32), np.zeros((1, 2), np.float32)
    return asm_of(cached, w, 0, 4, xq, xd, xs, np.zeros((1, 4), np.float32))


@needs_vnni
@pytest.mark.parametrize("name", list(HOT))
def test_avx512_tiles_use_zmm_vpdpbusd(name):
    asm = _fresh_asm(getattr(avx512, f"rows_{name}_avx512"))
    assert re.search(r"\bvpdpbusd\b[^\n]*%zmm", asm)
    assert re.search(r"\bvfmadd\w*ps\b[^\n]*%zmm", asm)


def test_feature_check_honours_numba_cpu_features(monkeypatch):
    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
    full = "+avx2,+fma,+avx512f,+avx512bw,+avx512vl,+avx512vnni"
    monkeypatch.setattr(numba.config, "CPU_FEATURES", full)
    assert avx2.host_has("avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", full.replace(",+avx512vnni", ""))
    assert avx2.host_has("avx2")
    assert not avx2.host_has("avx512f", "avx512bw", "avx512vl", "avx512vnni")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx512vnnix")
    assert not avx2.host_has("avx512vnni")


def test_matmul_dispatch_prefers_tiles_then_row_dots():
    assert (kernels.idot_rows is kernels._idot_rows_tiled) == avx512.HAVE_TILES
    assert (kernels._q8_0_rows is avx512.rows_q8_0_avx512) == avx512.HAVE_AVX512_VNNI
    for name in HOT:
        if avx2.HAVE_AVX2:
            assert getattr(kernels, f"_idot_{name}") is getattr(avx2, f"idot_{name}_avx2")


Q5 = {"q5_0": GGMLType.Q5_0, "q5_1": GGMLType.Q5_1}


@needs_vnni
@pytest.mark.parametrize("name", list(Q5))
def test_avx512_q5_tiles_match_portable_dots(name):
    """Q5_0/Q5_1 have no AVX2 row dot: the tiles equal the portable integer dot up to float
    order, and every tile shape gives the same bits for the same row and token."""
    t = Q5[name]
    rng = np.random.default_rng(8)
    portable = getattr(legacy, f"_idot_{name}")
    for nb, rows, n in ((1, 1, 1), (3, 5, 7), (6, 8, 5), (33, 9, 4), (128, 6, 2)):
        w = np.stack([random_blocks(rng, t, nb).reshape(-1) for _ in range(rows)])
        xq, xd, xs = q8_activations(rng, n, nb, extreme=False)
        out = np.full((n, rows), np.nan, np.float32)
        getattr(avx512, f"rows_{name}_avx512")(w, 0, rows, xq, xd, xs, out)
        ref = rowwise(portable, w, xq, xd, xs)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        one = np.full((n, rows), np.nan, np.float32)     # 1-row × 1-token tiles only
        for r in range(rows):
            for s_ in range(n):
                getattr(avx512, f"rows_{name}_avx512")(w, r, r + 1, xq[s_:s_ + 1], xd[s_:s_ + 1],
                                                       xs[s_:s_ + 1],
                                                       one[s_:s_ + 1])
        np.testing.assert_array_equal(_bits(out), _bits(one))


KQ = {"q2_k": GGMLType.Q2_K, "q3_k": GGMLType.Q3_K, "q4_k": GGMLType.Q4_K, "q5_k": GGMLType.Q5_K,
      "q6_k": GGMLType.Q6_K}


@needs_vnni
@pytest.mark.parametrize("name", list(KQ))
def test_avx512_kquant_tiles_match_portable_dots(name):
    """Q2_K/Q3_K/Q5_K tiles: the portable integer dot up to float order, and the 4-row tiles
    give the bits of 1-row tiles."""
    from quant import avx512_kquants, kquants
    t = KQ[name]
    rng = np.random.default_rng(11)
    tiled = getattr(avx512_kquants, f"rows_{name}_avx512")
    portable = getattr(kquants, f"_idot_{name}")
    for nb, rows, n in ((1, 1, 1), (2, 5, 3), (3, 9, 2), (2, 6, 5), (16, 8, 1)):
        w = np.stack([random_blocks(rng, t, nb).reshape(-1) for _ in range(rows)])
        xq, xd, xb = q8k_activations(rng, n, nb)
        out = np.full((n, rows), np.nan, np.float32)
        tiled(w, 0, rows, xq, xd, xb, out)
        ref = rowwise(portable, w, xq, xd, xb)
        np.testing.assert_allclose(out, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
        one = np.full((n, rows), np.nan, np.float32)
        for r in range(rows):
            tiled(w, r, r + 1, xq, xd, xb, one)
        np.testing.assert_array_equal(_bits(out), _bits(one))


@needs_vnni
@pytest.mark.parametrize("name", list(KQ))
def test_avx512_kquant_tiles_use_zmm_byte_multiply_add(name):
    from quant import avx512_kquants
    cached = getattr(avx512_kquants, f"rows_{name}_avx512")
    w = np.zeros((4, random_blocks(np.random.default_rng(0), KQ[name], 1).size), np.uint8)
    asm = asm_of(cached, w, 0, 4, np.zeros((1, 256), np.int8), np.ones((1, 1), np.float32),
                 np.zeros((1, 16), np.int16), np.zeros((1, 4), np.float32))
    assert re.search(r"\bvpmaddubsw\b[^\n]*%zmm", asm)
    assert re.search(r"\bvpmaddwd\b[^\n]*%zmm", asm)


@needs_vnni
@pytest.mark.parametrize("name", ["q4_k", "q6_k"])
def test_avx512_q4_k_q6_k_tiles_bit_identical_to_avx2(name):
    from quant import avx512_kquants
    rng = np.random.default_rng(12)
    for nb, rows, n in ((1, 1, 1), (2, 5, 3), (3, 9, 2), (2, 6, 5), (16, 8, 1)):
        w = np.stack([random_blocks(rng, KQ[name], nb).reshape(-1) for _ in range(rows)])
        xq, xd, xb = q8k_activations(rng, n, nb)
        out = np.full((n, rows), np.nan, np.float32)
        getattr(avx512_kquants, f"rows_{name}_avx512")(w, 0, rows, xq, xd, xb, out)
        ref = rowwise(getattr(avx2, f"idot_{name}_avx2"), w, xq, xd, xb)
        np.testing.assert_array_equal(_bits(out), _bits(ref))


_AVX2_CHECK = """
import sys
import numpy as np
sys.path.insert(0, "tests")
from cpuinfer.gguf import GGMLType
from quant import avx2, avx512, avx512_kquants as K, kernels, kquants, legacy
from quant_helpers import q8_activations, q8k_activations, random_blocks, rowwise
assert K.HAVE_KTILES and not avx512._WIDE and kernels.has_ktile(int(GGMLType.Q4_K))
rng = np.random.default_rng(3)
for name in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k"):
    t = GGMLType[name.upper()]
    for nb, rows, n in ((1, 1, 1), (2, 6, 5), (3, 9, 2)):
        w = np.stack([random_blocks(rng, t, nb).reshape(-1) for _ in range(rows)])
        xq, xd, xb = q8k_activations(rng, n, nb)
        out = np.full((n, rows), np.nan, np.float32)
        getattr(K, f"rows_{name}_avx512")(w, 0, rows, xq, xd, xb, out)
        dot = getattr(avx2, f"idot_{name}_avx2", None) or getattr(kquants, f"_idot_{name}")
        ref = rowwise(dot, w, xq, xd, xb)
        if name in ("q4_k", "q6_k"):
            assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), name
        else:
            np.testing.assert_allclose(out, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
for name in ("q4_0", "q4_1", "q5_0", "q5_1"):
    t = GGMLType[name.upper()]
    assert avx512.HAVE_TILES and not avx512.HAVE_AVX512_VNNI
    for nb, rows, n in ((1, 1, 1), (3, 6, 5), (9, 9, 2)):
        w = np.stack([random_blocks(rng, t, nb).reshape(-1) for _ in range(rows)])
        xq, xd, xs = q8_activations(rng, n, nb)
        out = np.full((n, rows), np.nan, np.float32)
        getattr(avx512, f"rows_{name}_avx512")(w, 0, rows, xq, xd, xs, out)
        dot = getattr(avx2, f"idot_{name}_avx2", None) or getattr(legacy, f"_idot_{name}")
        ref = rowwise(dot, w, xq, xd, xs)
        if name in ("q4_0", "q4_1"):
            assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), name
        else:
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
assert kernels.idot_rows is kernels._idot_rows_tiled
assert kernels._q8_0_rows is kernels._q8_0_rowwise
print("OK")
"""


@pytest.mark.skipif(not avx2.HAVE_AVX2, reason="this CPU cannot run AVX2 code")
def test_tiles_compiled_for_an_avx2_only_cpu(tmp_path):
    """Compiled for an AVX2-only CPU (Zen 2/3 EPYC, Haswell) the tiles run each 64-byte step as
    two 32-byte halves (``vpmaddubsw``/``vpmaddwd`` for ``vpdpbusd``): the AVX2 row dots' bits
    for Q4_0/Q4_1/Q4_K/Q6_K, the portable dots' sums for the others; Q8_0 stays on its row dot
    (a separate process: numba's target CPU is fixed per process)."""
    run_for_avx2_only(_AVX2_CHECK, tmp_path)
