"""quant.avx512: AVX-512 VNNI row dots equal the AVX2 ones bit for bit, and are vector code."""
from __future__ import annotations

import re

import numba
import numpy as np
import pytest

from cpuinfer.gguf import GGMLType
from quant import avx2, avx512, kernels
from quant_helpers import random_blocks, random_matrix

HOT = {"q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0, "q4_1": GGMLType.Q4_1}
needs_vnni = pytest.mark.skipif(not avx512.HAVE_AVX512_VNNI,
                                reason="compile target lacks avx512f/bw/vl/vnni")


def _bits(v) -> int:
    return int(np.float32(v).view(np.uint32))


def _activations(rng, nb: int, extreme: bool):
    """(xq, xd, xs) as quantize_act_q8 makes them; ``extreme``: only ±127."""
    if extreme:
        xq = rng.choice(np.array([127, -127], np.int8), nb * 32)
    else:
        xq = rng.integers(-127, 128, nb * 32).astype(np.int8)
    xd = (rng.random(nb) * 0.05 + 1e-3).astype(np.float32)
    xs = xd * xq.reshape(nb, 32).sum(axis=1, dtype=np.int32).astype(np.float32)
    return xq, xd, xs


@needs_vnni
@pytest.mark.parametrize("name", list(HOT))
def test_avx512_dots_bit_identical_to_avx2(name):
    rng = np.random.default_rng(5)
    t = HOT[name]
    wide = getattr(avx512, f"idot_{name}_avx512")
    ref = getattr(avx2, f"idot_{name}_avx2")
    checked = 0
    for nb in (1, 2, 3, 4, 5, 6, 7, 9, 33, 64, 127, 128):
        for trial in range(12):
            blocks = random_blocks(rng, t, nb)
            if trial % 3 == 1:               # weights at the sign-trick / nibble edges
                q0 = 2 if t != GGMLType.Q4_1 else 4
                edges = np.array([0x80, 0x7F, 0x81, 0x00, 0x01, 0xFF, 0x88, 0x0F, 0xF0],
                                 np.uint8)
                blocks[:, q0:] = rng.choice(edges, size=blocks[:, q0:].shape)
            if trial % 4 == 2 and t == GGMLType.Q8_0:
                blocks[:, 2:] = 0x80         # all −128
            xq, xd, xs = _activations(rng, nb, extreme=trial % 2 == 0)
            row = blocks.reshape(-1)
            a, b = ref(row, xq, xd, xs), wide(row, xq, xd, xs)
            assert _bits(a) == _bits(b), (name, nb, trial, a, b)
            checked += a != 0
    assert checked > 100                     # the rows were not trivially zero


@needs_vnni
def test_avx512_odd_tail_changes_result():
    """The last odd block is really accumulated (guards the tail path's wiring)."""
    rng = np.random.default_rng(9)
    blocks = random_blocks(rng, GGMLType.Q4_0, 3)
    xq, xd, xs = _activations(rng, 3, extreme=False)
    row = blocks.reshape(-1)
    full = avx512.idot_q4_0_avx512(row, xq, xd, xs)
    two = avx512.idot_q4_0_avx512(row[:36], xq[:64], xd[:2], xs[:2])
    last = avx2.idot_q4_0_avx2(row[36:], xq[64:], xd[2:], xs[2:])
    assert full != two
    assert abs(full - (two + last)) <= 1e-5 * (abs(two) + abs(last))


def _fresh_asm(cached, t) -> str:
    """Assembly of a fresh, uncached copy (numba cannot inspect code loaded from its cache)."""
    fn = numba.njit(**{k: v for k, v in cached.targetoptions.items()
                       if k not in ("cache", "nopython")})(cached.py_func)
    w = random_matrix(np.random.default_rng(0), t, 1, 64)[0]
    fn(w, np.zeros(64, np.int8), np.ones(2, np.float32), np.zeros(2, np.float32))
    return "\n".join(fn.inspect_asm().values())


@needs_vnni
@pytest.mark.parametrize("name", list(HOT))
def test_avx512_dots_use_zmm_vpdpbusd(name):
    asm = _fresh_asm(getattr(avx512, f"idot_{name}_avx512"), HOT[name])
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


def test_matmul_dispatch_prefers_avx512_then_avx2():
    for name in HOT:
        chosen = getattr(kernels, f"_idot_{name}")
        if avx512.HAVE_AVX512_VNNI:
            assert chosen is getattr(avx512, f"idot_{name}_avx512")
        elif avx2.HAVE_AVX2:
            assert chosen is getattr(avx2, f"idot_{name}_avx2")
