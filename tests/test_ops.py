"""Per-token operations other than mat-muls and attention (cpuinfer.ops) against float64 numpy."""
import re

import numpy as np
import pytest

from cpuinfer import ops
from quant import avx2

from quant_helpers import asm_of


def test_exp_matches_numpy():
    x = np.concatenate([np.linspace(-87.0, 88.0, 350001), [-1e-7, -0.5, -0.6931472, -20.0, 1e-7]])
    got = np.array([ops.v_expf(np.float32(v)) for v in x.astype(np.float32)], np.float64)
    want = np.exp(x.astype(np.float32).astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 5e-7             # about 4 ulp
    assert ops.v_expf(np.float32(0.0)) == 1.0
    assert ops.v_expf(np.float32(-200.0)) == pytest.approx(np.exp(-87.0), rel=1e-6)
    assert ops.v_expf(np.float32(200.0)) == pytest.approx(np.exp(88.0), rel=1e-6)


def _silu_ref(g, u):
    g, u = g.astype(np.float64), u.astype(np.float64)
    with np.errstate(over="ignore"):
        return g / (1.0 + np.exp(-g)) * u


def _gate_up(rng, n, ff):
    gu = (rng.standard_normal((n, 2 * ff)) * 4).astype(np.float32)
    gu[0, :10] = [-200.0, -88.0, -87.5, -30.0, -1e-30, 0.0, -0.0, 30.0, 88.0, 200.0]
    return gu


def _assert_silu_close(got, want):
    err = np.abs(got - want)
    assert np.all(err <= 2e-6 * np.abs(want) + 1e-30), f"max rel error {np.max(err / (np.abs(want) + 1e-30))}"


@pytest.mark.parametrize("n", [1, 3])
def test_swiglu_matches_reference(n):
    """Joint gate ‖ up rows (u0 = ff) and separate arrays; every sign and size of gate, the
    overflow range of e^−g included; the serial and parallel drivers give the same bits."""
    rng = np.random.default_rng(n)
    ff = 77                                     # not a multiple of any vector width
    gu = _gate_up(rng, n, ff)
    out = np.full((n, ff), np.nan, np.float32)
    ops.swiglu(gu, gu, ff, out)
    _assert_silu_close(out, _silu_ref(gu[:, :ff], gu[:, ff:]))
    serial = np.full_like(out, np.nan)
    ops.swiglu_serial(np.ascontiguousarray(gu[:, :ff]), np.ascontiguousarray(gu[:, ff:]), 0, serial)
    np.testing.assert_array_equal(serial, out)
    assert np.all(np.isfinite(out))


def test_swiglu_in_place():
    """The routed experts write silu(gate) ⊙ up over gate (cpuinfer.moe)."""
    rng = np.random.default_rng(5)
    g = (rng.standard_normal((2, 40)) * 6).astype(np.float32)
    u = rng.standard_normal((2, 40)).astype(np.float32)
    want = _silu_ref(g, u)
    ops.swiglu_serial(g, u, 0, g)
    _assert_silu_close(g, want)


def _rmsnorm_ref(x, w, eps):
    """ggml's rounding: float32 squares summed in float64, float32 mean and scale, (x·scale)·w."""
    ss = np.sum((x * x).astype(np.float64), axis=1)
    mean = (ss / x.shape[1]).astype(np.float32)
    scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps)).astype(np.float32)
    return (x * scale[:, None]) * w


def test_rmsnorm_matches_ggml_rounding():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 4099)) * 3).astype(np.float32)
    w = rng.standard_normal(4099).astype(np.float32)
    out = np.zeros_like(x)
    ops.rmsnorm(x, w, 1e-5, out)
    np.testing.assert_allclose(out, _rmsnorm_ref(x, w, 1e-5), rtol=2e-7, atol=0)
    serial = np.zeros_like(x)
    ops.rmsnorm_serial(x, w, 1e-5, serial)
    np.testing.assert_array_equal(serial, out)


@pytest.mark.skipif(not avx2.HAVE_AVX2, reason="needs AVX2 (compile target)")
def test_swiglu_and_norm_sum_are_vectorized():
    """SiLU's exponential and division and the norm's float64 sum run 8+ lanes at a time (a
    libm exp per value, or the Python error model's zero-divisor branch, keeps them scalar)."""
    g = np.ones(64, np.float32)
    asm = asm_of(ops._swiglu_row, g, g, np.zeros(64, np.float32))
    assert re.search(r"\bvdivps\b[^\n]*%[yz]mm", asm), "SiLU: no packed division"
    assert re.search(r"\bvfmadd\w*ps\b[^\n]*%[yz]mm", asm), "SiLU: exp polynomial not packed"
    assert not re.search(r"call\w*\s[^\n]*exp", asm), "SiLU calls a libm exp"
    asm = asm_of(ops._sum_squares, g)
    assert re.search(r"\bvaddpd\b[^\n]*%[yz]mm", asm), "sum of squares not packed"


def test_token_ops_tool(capsys):
    """tools.token_ops: one row per op and the per-token totals; a bad shape is a one-line error."""
    from tools import token_ops
    assert token_ops.main(["--shape", "qwen2-1.5b"]) == 0
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| ") and not r.startswith("| op")]
    assert len(rows) == 8 and rows[2].startswith("| swiglu 8960 |")
    assert all(float(r.split("|")[2]) > 0 for r in rows)
    assert "total with Q8_K activations:" in out
    assert token_ops.main(["--shape", "deepseek-r1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown or not dense shape 'deepseek-r1'") and err.count("\n") == 1
