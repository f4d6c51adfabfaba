"""Random test tensors for the quant tests: random bytes with sane fp16/bf16 scales."""
from __future__ import annotations

import numba
import numpy as np

from cpuinfer.gguf import GGMLType
from quant import FORMATS

# Byte offsets of the IEEE-half scale fields inside one block (ggml-common.h layouts).
HALF_OFFSETS = {
    GGMLType.Q8_0: (0,), GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,),
    GGMLType.Q5_1: (0, 2), GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,),
}


def random_blocks(rng: np.random.Generator, ggml_type: GGMLType, n_blocks: int) -> np.ndarray:
    """uint8 [n_blocks, type_size]: random bytes, finite scales (floats: finite random values)."""
    fmt = FORMATS[ggml_type]
    if ggml_type == GGMLType.F32:
        return rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8).reshape(n_blocks, 4)
    if ggml_type == GGMLType.F16:
        return rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if ggml_type == GGMLType.BF16:
        bits = (rng.standard_normal(n_blocks).astype(np.float32).view(np.uint32) >> 16)
        return bits.astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
    blocks = rng.integers(0, 256, size=(n_blocks, fmt.type_size), dtype=np.uint8)
    for o in HALF_OFFSETS[ggml_type]:
        scale = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        blocks[:, o:o + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def random_matrix(rng: np.random.Generator, ggml_type: GGMLType, rows: int, k: int) -> np.ndarray:
    """uint8 [rows, row_bytes] of a random quantized matrix."""
    fmt = FORMATS[ggml_type]
    return random_blocks(rng, ggml_type, rows * (k // fmt.block_size)).reshape(rows, -1)


def q8_activations(rng: np.random.Generator, n: int, nb: int, extreme: bool = False):
    """2-D (xq, xd, xs) for ``n`` tokens of ``nb`` 32-blocks, as quantize_act_q8 makes them;
    ``extreme``: only ±127."""
    if extreme:
        xq = rng.choice(np.array([127, -127], np.int8), (n, nb * 32))
    else:
        xq = rng.integers(-127, 128, (n, nb * 32)).astype(np.int8)
    xd = (rng.random((n, nb)) * 0.05 + 1e-3).astype(np.float32)
    xs = xd * xq.reshape(n, nb, 32).sum(axis=2, dtype=np.int32).astype(np.float32)
    return xq, xd, xs


def q8k_activations(rng: np.random.Generator, n: int, nb: int):
    """2-D Q8_K (xq, xd, xb) of ``n`` random tokens of ``nb`` 256-blocks (quantize_act_q8k)."""
    from quant import kquants
    k = nb * 256
    x = rng.standard_normal((n, k)).astype(np.float32)
    xq, xd = np.zeros((n, k), np.int8), np.zeros((n, nb), np.float32)
    xb = np.zeros((n, k // 16), np.int16)
    for t in range(n):
        kquants.quantize_act_q8k(x[t], xq[t], xd[t], xb[t])
    return xq, xd, xb


def rowwise(dot, w: np.ndarray, xq, xd, x4) -> np.ndarray:
    """float32 [n, rows]: ``dot(w[r], xq[t], xd[t], x4[t])`` for every token and row."""
    return np.array([[dot(w[r], xq[t], xd[t], x4[t]) for r in range(w.shape[0])]
                     for t in range(xq.shape[0])], np.float32)


def asm_of(cached, *args) -> str:
    """Assembly of an uncached copy of the compiled function ``cached``, compiled by calling it
    with ``args`` (numba cannot inspect code it loaded from its cache)."""
    fn = numba.njit(**{k: v for k, v in cached.targetoptions.items()
                       if k not in ("cache", "nopython")})(cached.py_func)
    fn(*args)
    return "\n".join(fn.inspect_asm().values())


AVX2_ONLY = {"NUMBA_CPU_NAME": "haswell",
             "NUMBA_CPU_FEATURES": "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fsgsbase,"
                                   "+lzcnt,+movbe,+popcnt,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,"
                                   "+xsave"}
"""numba's target settings for an AVX2-only CPU (Zen 2/3 EPYC, Haswell)."""


def run_for_avx2_only(script: str, cache_dir) -> None:
    """Run ``script`` (Python source that prints OK when its checks pass) in a new process
    compiling for :data:`AVX2_ONLY` with its own numba cache (the target CPU is fixed per
    process), from the repository root; assert it did."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), **AVX2_ONLY)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=900, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
