"""The vectorized activation quantizers (quant.acts) give the references' bits."""
import numpy as np
import pytest

from quant import acts, kquants, legacy

from quant_helpers import run_for_avx2_only


def _rows(rng, k):
    """Rows that exercise every branch: mixed magnitudes, an all-zero block, exact halves
    (round half to even), ties of the largest magnitude with opposite signs."""
    x = (rng.standard_normal(k) * rng.uniform(0.01, 10.0, k)).astype(np.float32)
    x[:32] = 0.0                                     # Q8 block 0 all zero
    x[32:64] = np.arange(32) - 15.5                  # amax 16: x·127/16 hits no half, but ...
    x[64:96] = 0.0
    x[64:70] = [127.0, 0.5, 1.5, 2.5, -0.5, -2.5]    # amax 127: scale 1, exact halves
    x[256:512] = 0.0                                 # Q8_K block 1 all zero ...
    x[512:768] *= np.float32(0.1)                    # ... block 2: the first largest is negative
    x[600], x[601], x[700] = -7.5, 7.5, 7.5
    return x


def _q8_tables(k):
    return [np.full(k, 99, np.int8), np.full(k // 32, np.nan, np.float32),
            np.full(k // 32, np.nan, np.float32)]


def _q8k_tables(k):
    return [np.full(k, 99, np.int8), np.full(k // 256, np.nan, np.float32),
            np.full(k // 16, 99, np.int16)]


@pytest.mark.parametrize("k", [768, 4096])
@pytest.mark.parametrize("exact_sums", [False, True])
def test_q8_matches_reference(k, exact_sums):
    x = _rows(np.random.default_rng(k), k)
    got, want = _q8_tables(k), _q8_tables(k)
    acts.quantize_act_q8(x, *got, exact_sums)
    legacy.quantize_act_q8(x, *want, exact_sums)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("k", [768, 4096])
def test_q8k_matches_reference(k):
    x = _rows(np.random.default_rng(k + 1), k)
    got, want = _q8k_tables(k), _q8k_tables(k)
    acts.quantize_act_q8k(x, *got)
    kquants.quantize_act_q8k(x, *want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert want[1][1] == 0 and want[0][600] == -127  # the zero block and the signed tie were hit


def test_strided_rows_take_the_reference():
    """A row view with a stride (a column slice of a wider array) gives the same bits."""
    k = 768
    wide = np.repeat(_rows(np.random.default_rng(3), k)[:, None], 2, axis=1)
    x = wide[:, 0]
    assert x.strides[0] != 4
    got, want = _q8_tables(k), _q8_tables(k)
    acts.quantize_act_q8(x, *got)
    legacy.quantize_act_q8(np.ascontiguousarray(x), *want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    got, want = _q8k_tables(k), _q8k_tables(k)
    acts.quantize_act_q8k(x, *got)
    kquants.quantize_act_q8k(np.ascontiguousarray(x), *want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


_AVX2_CHECK = """
import numpy as np
from quant import acts, kquants, legacy
x = (np.random.default_rng(0).standard_normal(1024) * 3).astype(np.float32)
for fast, ref, tables in ((acts.quantize_act_q8, legacy.quantize_act_q8,
                           lambda: [np.zeros(1024, np.int8), np.zeros(32, np.float32), np.zeros(32, np.float32)]),
                          (acts.quantize_act_q8k, kquants.quantize_act_q8k,
                           lambda: [np.zeros(1024, np.int8), np.zeros(4, np.float32), np.zeros(64, np.int16)])):
    a, b = tables(), tables()
    fast(x, *a)
    ref(x, *b)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
print("OK")
"""


def test_on_an_avx2_only_cpu(tmp_path):
    """The portable vector IR compiles and gives the same bits for an AVX2-only target."""
    run_for_avx2_only(_AVX2_CHECK, tmp_path)
