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
