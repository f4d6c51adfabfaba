"""Random test tensors for the quant tests: random bytes with sane fp16/bf16 scales."""
from __future__ import annotations

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
