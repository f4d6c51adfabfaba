"""The tiled attention kernel against a float64 numpy reference on the same f16 roundings."""
import re

import numpy as np
import pytest

import quant
from cpuinfer import attention as A
from quant import avx2

from quant_helpers import asm_of, run_for_avx2_only


def _cache(rng, ctx, n_kv, width):
    return rng.standard_normal((ctx, n_kv, width)).astype(np.float16).view(np.uint16)


def _run(q, kc, vc, p0, scale, hdv):
    n, nh, hd = q.shape
    out = np.full((n, nh, hdv), np.nan, np.float32)          # every value must be written
    scores = np.zeros((nh, p0 + n + 3), np.float32)
    qh = np.zeros((nh, hd), np.float32)
    A.attention(q, kc, vc, p0, scale, scores, qh, out)      # a Python float, as the models pass
    return out


# (n_head, n_kv, hd, hdv, V = the first hdv values of the K rows as in MLA)
SHAPES = {
    "gqa": (6, 2, 16, 16, False),          # groups of 3: 1-head tiles only
    "gqa8": (8, 1, 24, 24, False),         # two 4-head tiles
    "mha": (3, 3, 8, 8, False),
    "mla": (9, 1, 40, 32, True),           # 4 + 4 + 1 heads, V a prefix of each K row
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_reference(shape):
    nh, nkv, hd, hdv, mla = SHAPES[shape]
    rng = np.random.default_rng(len(shape))
    for n, p0 in ((1, 0), (1, 5), (1, 130), (5, 3), (7, 70)):   # 130, 77: past POS_BLOCK, odd
        ctx = p0 + n
        kc = _cache(rng, ctx, nkv, hd)
        vc = kc if mla else _cache(rng, ctx, nkv, hdv)
        q = (2 * rng.standard_normal((n, nh, hd))).astype(np.float32)
        want = A.attention_reference(q, kc, vc, p0, 0.3, hdv)
        for threads in (1, 2, 4):                              # 4: runs that split a K/V group
            quant.set_threads(threads)
            got = _run(q, kc, vc, p0, 0.3, hdv)
            # p is rounded to f16 on both sides; a sum in another order may round one p to the
            # neighbouring f16 value (2^-11 relative)
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max(),
                                       err_msg=f"{shape} n={n} p0={p0} threads={threads}")
    quant.set_threads(2)


def test_one_position_returns_its_value_row():
    """With one key, softmax is 1 and the output is that value row (rounded through f16)."""
    rng = np.random.default_rng(1)
    kc, vc = _cache(rng, 1, 2, 8), _cache(rng, 1, 2, 8)
    q = rng.standard_normal((1, 4, 8)).astype(np.float32)
    out = _run(q, kc, vc, 0, 0.5, 8)
    v = vc.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out[0], v[0][[0, 0, 1, 1]])


@pytest.mark.skipif(not avx2.HAVE_AVX2, reason="needs AVX2 (compile target)")
@pytest.mark.parametrize("tile", ["_qk_4x2", "_qk_1x4", "_pv_4x4", "_pv_1x4"])
def test_tiles_are_vectorized(tile):
    rng = np.random.default_rng(0)
    kc = _cache(rng, 8, 1, 64)
    sc = rng.standard_normal((4, 8)).astype(np.float32)
    a = np.zeros((4, 64), np.float32)
    args = ((a, 0, kc, 0, 0, 8, np.float32(1.0), sc) if tile.startswith("_qk")
            else (sc, 0, kc, 0, 0, 8, a))
    asm = asm_of(getattr(A, tile), *args)
    assert re.search(r"\bvcvtph2ps\b[^\n]*%[yz]mm", asm), f"{tile}: f16 not converted 8+ at a time"
    assert re.search(r"\bvfmadd\w*ps\b[^\n]*%[yz]mm", asm), f"{tile}: no packed multiply-add"


def test_attention_speed_tool(capsys):
    """tools.attention_speed: one markdown row per shape × positions × threads; bad input is a
    one-line error and exit status 1."""
    from tools import attention_speed
    assert attention_speed.main(["--shapes", "smollm2,deepseek-v3", "--positions", "8,20",
                                 "--tokens", "3", "-t", "1,2"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| smollm2")
            or r.startswith("| deepseek-v3")]
    assert len(rows) == 8
    cells = rows[0].strip("|").split("|")
    assert [c.strip() for c in cells[:4]] == ["smollm2", "1", "8", "3"]
    assert all(float(c) > 0 for c in cells[4:])
    for bad in (["--shapes", "gpt5"], ["--positions", "x"], ["--positions", "4", "--tokens", "5"]):
        assert attention_speed.main(bad) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.skipif(not A.HAVE_QK_2X8, reason="needs AVX-512 (the 2-head IR tile's target)")
def test_head_pair_tile_is_vector_code_and_matches_the_numba_tile():
    rng = np.random.default_rng(5)
    kc = _cache(rng, 21, 2, 32)
    qh = rng.standard_normal((4, 32)).astype(np.float32)
    a, b = np.zeros((4, 21), np.float32), np.zeros((4, 21), np.float32)
    A._qk_pairs(qh, 2, kc, 1, 3, 21, np.float32(0.5), a)           # 2 tiles of 8, 2 left over
    A._qk_1x4(qh, 2, kc, 1, 3, 21, np.float32(0.5), b)
    A._qk_1x4(qh, 3, kc, 1, 3, 21, np.float32(0.5), b)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not a[:2].any() and not a[:, :3].any()                  # nothing outside its rows
    asm = asm_of(A._qk_pairs, qh, 2, kc, 1, 3, 21, np.float32(0.5), a)
    assert re.search(r"\bvcvtph2ps\b[^\n]*%[yz]mm", asm)
    assert len(re.findall(r"\bvfmadd\w*ps\b[^\n]*%[yz]mm", asm)) >= 16


_AVX2_CHECK = """
import numpy as np
from cpuinfer import attention as A
assert not A.HAVE_QK_2X8
rng = np.random.default_rng(0)
for nh, nkv, hd in ((8, 2, 16), (9, 1, 40)):
    kc = rng.standard_normal((70, nkv, hd)).astype(np.float16).view(np.uint16)
    q = rng.standard_normal((2, nh, hd)).astype(np.float32)
    out = np.zeros((2, nh, hd), np.float32)
    A.attention(q, kc, kc, 68, np.float32(0.3), np.zeros((nh, 70), np.float32),
                np.zeros((nh, hd), np.float32), out)
    want = A.attention_reference(q, kc, kc, 68, 0.3, hd)
    assert np.abs(out - want).max() <= 2e-3 * np.abs(want).max()
print("OK")
"""


def test_numba_tiles_on_an_avx2_only_cpu(tmp_path):
    """Without AVX-512 the numba tiles run (a separate process: numba's target is per process)."""
    run_for_avx2_only(_AVX2_CHECK, tmp_path)
