"""Float and legacy block formats: references vs gguf-py, compiled rows and dots vs references."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from cpuinfer.gguf import GGMLType
from quant import FORMATS, avx2, legacy
from quant_helpers import random_blocks

TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1,
         GGMLType.Q5_0, GGMLType.Q5_1]
LEGACY = [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1]
N_VALUES = 64 * 32
# Activation rounding error per value, in units of max|x_block| / 127: half a step, plus the
# half-precision rounding of the scale (relative 2^-11) times |q| <= 127.
ACT_ERR = 0.5 + 127 * 2.0 ** -11 + 1e-5


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_geometry_matches_gguf(t):
    fmt = FORMATS[t]
    assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[t]
    assert fmt.ggml_type == t and fmt.name == t.name


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_reference_bit_exact_vs_gguf(t, rng):
    fmt = FORMATS[t]
    blocks = random_blocks(rng, t, N_VALUES // fmt.block_size)
    ours = fmt.dequantize_ref(blocks)
    assert ours.dtype == np.float32 and ours.shape == (blocks.shape[0], fmt.block_size)
    theirs = gguf.quants.dequantize(blocks, t).reshape(ours.shape)
    np.testing.assert_array_equal(ours.view(np.uint32), np.asarray(theirs, np.float32).view(np.uint32))


def test_legacy_reference_known_block():
    # Q4_1 block: d = 0.5, m = -1.0, byte i = (i & 15) in both nibbles -> value j = d*(j & 15) + m
    d, m = np.array([0.5], np.float16).view(np.uint8), np.array([-1.0], np.float16).view(np.uint8)
    qs = np.array([(i & 15) | ((i & 15) << 4) for i in range(16)], np.uint8)
    block = np.concatenate([d, m, qs])[None, :]
    expect = np.array([0.5 * (i & 15) - 1.0 for i in range(32)], np.float32)
    np.testing.assert_array_equal(legacy.dequantize_q4_1(block)[0], expect)
    # Q5_0: qh bit j set for odd j -> q_j = nibble + 16 on odd positions, minus 16
    qh = np.array([0xAA, 0xAA, 0xAA, 0xAA], np.uint8)
    block = np.concatenate([np.array([2.0], np.float16).view(np.uint8), qh, qs])[None, :]
    expect = np.array([2.0 * ((i & 15) + 16 * (i & 1) - 16) for i in range(32)], np.float32)
    np.testing.assert_array_equal(legacy.dequantize_q5_0(block)[0], expect)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_compiled_row_equals_reference(t, rng):
    fmt = FORMATS[t]
    blocks = random_blocks(rng, t, N_VALUES // fmt.block_size)
    out = np.full(N_VALUES, np.nan, np.float32)
    fmt.dequant_row(blocks.reshape(-1), out)
    np.testing.assert_array_equal(out, fmt.dequantize_ref(blocks).reshape(-1))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_float_dot_matches_float64(t, rng):
    fmt = FORMATS[t]
    blocks = random_blocks(rng, t, N_VALUES // fmt.block_size)
    w = fmt.dequantize_ref(blocks).reshape(-1).astype(np.float64)
    x = rng.standard_normal(N_VALUES).astype(np.float32)
    got = fmt.dot(blocks.reshape(-1), x)
    scale = np.abs(w) @ np.abs(x)
    assert abs(got - w @ x) <= 1e-5 * scale


def test_quantize_act_q8_round_trip(rng):
    x = (rng.standard_normal(N_VALUES) * rng.uniform(0.01, 10, N_VALUES)).astype(np.float32)
    x[:32] = 0.0                                     # an all-zero block must give scale 0
    nb = N_VALUES // 32
    xq, xd, xs = np.empty(N_VALUES, np.int8), np.empty(nb, np.float32), np.empty(nb, np.float32)
    legacy.quantize_act_q8(x, xq, xd, xs)
    d = np.abs(x.reshape(nb, 32)).max(axis=1) / np.float32(127)
    # as ggml's quantize_row_q8_0: the scale is kept as an IEEE half, q = round(x · 127 / max)
    np.testing.assert_array_equal(xd, d.astype(np.float16).astype(np.float32))
    assert np.abs(xq.astype(np.int32)).max() <= 127
    err = np.abs(xq.reshape(nb, 32) * xd[:, None] - x.reshape(nb, 32))
    assert (err <= d[:, None] * ACT_ERR).all()
    # ggml's block_q8_1.s: f16(d · Σq) with the unrounded d
    s_ref = (d * xq.reshape(nb, 32).sum(axis=1).astype(np.float32)).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(xs, s_ref)
    assert xd[0] == 0 and not xq[:32].any()


@pytest.mark.parametrize("t", LEGACY, ids=lambda t: t.name)
def test_integer_dot_within_activation_rounding_bound(t, rng):
    fmt = FORMATS[t]
    nb = N_VALUES // 32
    blocks = random_blocks(rng, t, nb)
    w = fmt.dequantize_ref(blocks).reshape(-1).astype(np.float64)
    x = rng.standard_normal(N_VALUES).astype(np.float32)
    xq, xd, xs = np.empty(N_VALUES, np.int8), np.empty(nb, np.float32), np.empty(nb, np.float32)
    legacy.quantize_act_q8(x, xq, xd, xs)
    got = getattr(legacy, f"_idot_{t.name.lower()}")(blocks.reshape(-1), xq, xd, xs)
    # exact on the quantized activations (up to float rounding) ...
    xr = (xq.reshape(nb, 32) * xd[:, None].astype(np.float64)).reshape(-1)
    scale = np.abs(w) @ np.abs(x)
    assert abs(got - w @ xr) <= 1e-5 * scale
    # ... and within the rounding bound of the true activations
    d = np.abs(x.reshape(nb, 32)).max(axis=1).astype(np.float64) / 127
    bound = (d * ACT_ERR) @ np.abs(w.reshape(nb, 32)).sum(axis=1)
    assert abs(got - w @ x) <= bound * 1.001 + 1e-5 * scale


@pytest.mark.skipif(not avx2.HAVE_AVX2, reason="CPU lacks AVX2")
@pytest.mark.parametrize("t", [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1], ids=lambda t: t.name)
@pytest.mark.parametrize("nb", [1, 2, 7, 64])
def test_avx2_dot_matches_portable(t, nb, rng):
    blocks = random_blocks(rng, t, nb)
    if t == GGMLType.Q8_0:
        blocks[0, 2:6] = [0x80, 0x7F, 0x81, 0x00]     # -128, 127, -127, 0: the sign-trick edges
    x = rng.standard_normal(nb * 32).astype(np.float32) * 3
    xq, xd, xs = np.empty(nb * 32, np.int8), np.empty(nb, np.float32), np.empty(nb, np.float32)
    legacy.quantize_act_q8(x, xq, xd, xs)
    xq[:4] = [127, -127, -127, 5]                    # extremes; keep xs consistent with xq
    xs[:] = xd * xq.reshape(nb, 32).sum(axis=1, dtype=np.int32).astype(np.float32)
    row = blocks.reshape(-1)
    name = t.name.lower()
    fast = getattr(avx2, f"idot_{name}_avx2")(row, xq, xd, xs)
    slow = getattr(legacy, f"_idot_{name}")(row, xq, xd, xs)
    w = FORMATS[t].dequantize_ref(blocks).reshape(-1).astype(np.float64)
    xr = (xq.reshape(nb, 32) * xd[:, None].astype(np.float64)).reshape(-1)
    scale = np.abs(w) @ np.abs(xr)
    assert abs(fast - w @ xr) <= 1e-5 * scale
    assert abs(fast - slow) <= 2e-5 * scale
