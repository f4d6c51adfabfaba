"""deepseek2 (DeepSeek-V2/V3/R1): fixture logits against Hugging Face and llama.cpp, latent-cache
decode against prefill, and random files of other configurations against a naive float64
non-absorbed MLA reference (tests/deepseek_helpers.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cpuinfer.gguf import GGMLType, open_gguf
from cpuinfer.moe import Gating
from deepseek_helpers import kl_top1, load_family, reference_deepseek, run_logits, write_deepseek

DATA = Path(__file__).parent / "data" / "tiny" / "deepseek3"
IDS = json.loads((DATA / "ids.json").read_text())["ids"]


@pytest.fixture(scope="module")
def f32_family():
    return load_family(DATA / "deepseek3-f32.gguf")


def test_f32_matches_hugging_face(f32_family):
    got = run_logits(f32_family, IDS)
    hf = np.load(DATA / "hf_logits_f32model.npy")
    assert np.abs(got - hf).max() <= 2e-2


def test_naive_reference_matches_hugging_face():
    """The float64 reference used for the variants is itself right on the fixture."""
    ref = reference_deepseek(DATA / "deepseek3-f32.gguf", IDS)
    assert np.abs(ref - np.load(DATA / "hf_logits_f32model.npy")).max() <= 1e-4


# Measured with quant's ggml-faithful activations (Q8_0/Q8_1 for the legacy formats, Q8_K for the
# K-quants) and the f16 latent cache: Q8_0 KL 4.6e-6 top-1 1.0 (median per-position KL 1e-14),
# Q4_0 KL 1.1e-3 top-1 0.979, Q4_K_M KL 4.1e-5 top-1 1.0 (it was 1.3e-2 / 0.833 while the K-quant
# mat-muls ran on float activations: that offset flipped the expert routing of two positions).
QUANT_FILES = [
    "Q8_0",
    "Q4_0",
    "Q4_K_M",
]


@pytest.mark.parametrize("qtype", QUANT_FILES)
def test_quantized_matches_llama_cpp(qtype):
    got = run_logits(load_family(DATA / f"deepseek3-{qtype}.gguf"), IDS)
    kl, top1 = kl_top1(np.load(DATA / f"llamacpp_logits_{qtype}.npy"), got)
    assert kl <= 5e-3 and top1 >= 0.95, (kl, top1)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K_M"])
def test_quantized_close_to_llama_cpp_on_most_positions(qtype):
    """The bulk of positions (all but the two with flipped routing) sit near llama.cpp."""
    ref = np.load(DATA / f"llamacpp_logits_{qtype}.npy")
    got = run_logits(load_family(DATA / f"deepseek3-{qtype}.gguf"), IDS)
    per_pos = np.array([kl_top1(ref[i:i + 1], got[i:i + 1])[0] for i in range(len(IDS))])
    assert np.median(per_pos) <= 2e-3
    assert np.sort(per_pos)[:-2].mean() <= 3e-3


@pytest.mark.parametrize("chunk", [1, 5])
def test_incremental_decode_equals_prefill(f32_family, chunk):
    full = run_logits(f32_family, IDS)
    inc = run_logits(f32_family, IDS, chunk=chunk)
    assert np.abs(inc - full).max() <= 1e-4


def test_cache_and_streamed_bytes(f32_family):
    c = f32_family.config
    assert c.kv_bytes_per_token == 3 * (64 + 16) * 2        # layers × (kv_lora + rope) × f16
    assert f32_family.new_cache(10).nbytes == 10 * c.kv_bytes_per_token
    # every matrix once, routed experts × 4/16, one embedding row
    g = f32_family.weights.token_embd
    expect = 0
    for t in open_gguf(DATA / "deepseek3-f32.gguf").tensors.values():
        if len(t.shape) < 2:
            continue
        if t.name == "token_embd.weight":
            expect += g.raw.shape[-1]
        elif "_exps." in t.name:
            expect += t.nbytes * 4 // 16
        else:
            expect += t.nbytes
    assert f32_family.weights.streamed_bytes() == expect


VARIANTS = {
    "v3-like": dict(),
    "v2-lite-like": dict(q_lora=0, gating=Gating.SOFTMAX, n_group=1, bias=False, norm_w=False,
                         w_scale=1.0, yarn_factor=1.0),
    "groups8-used3": dict(n_group=8, n_group_used=3, n_expert=16, n_used=3, n_shared=2,
                          yarn_factor=8.0, orig_ctx=16, log_mul=0.0707),
    "softmax-groups-no-shared": dict(gating=Gating.SOFTMAX, n_group=2, n_group_used=1, n_shared=0,
                                     n_dense=0, n_used=3, yarn_factor=40.0, orig_ctx=8),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_match_naive_reference(tmp_path, name):
    """Other configurations, 80-token prompts (positions far past YaRN's original context):
    absorbed MLA + latent cache + routing against the non-absorbed float64 reference."""
    path = tmp_path / "m.gguf"
    write_deepseek(path, seed=1, **VARIANTS[name])
    ids = [int(i) for i in np.random.default_rng(2).integers(0, 96, 80)]
    fam = load_family(path)
    got = run_logits(fam, ids)
    ref = reference_deepseek(path, ids)
    per_pos = np.abs(got - ref).max(axis=1)
    # f16 cache rounding; logits are O(4). A random router has near-ties: a last-bit difference
    # may pick another expert at an isolated position (seen: one of 80), never systematically.
    assert np.median(per_pos) <= 3e-3
    assert (per_pos > 1e-2).sum() <= 2, np.nonzero(per_pos > 1e-2)
    assert np.abs(run_logits(fam, ids, chunk=7) - got).max() <= 1e-4


def test_yarn_matters(tmp_path):
    """The variant check is sensitive to YaRN: the same file read as if unscaled differs."""
    path = tmp_path / "m.gguf"
    write_deepseek(path, seed=3, yarn_factor=8.0, orig_ctx=16)
    ids = [int(i) for i in np.random.default_rng(4).integers(0, 96, 40)]
    fam = load_family(path)
    got = run_logits(fam, ids)
    ref = reference_deepseek(path, ids)
    plain = tmp_path / "plain.gguf"
    write_deepseek(plain, seed=3, yarn_factor=1.0)
    assert np.abs(got - ref).max() <= 1e-2
    assert np.abs(run_logits(load_family(plain), ids) - got).max() > 1e-1


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.F16])
def test_per_head_matvec_equals_per_head_matmul(qtype):
    """The one-token path (parallel over heads, each head serial) gives the bits of the batched
    path (heads in turn, each a parallel mat-mul)."""
    from cpuinfer.models.deepseek2 import _per_head_matmul, _per_head_matvec
    from cpuinfer.weights import matmul_scratch
    from quant_helpers import random_matrix
    rng = np.random.default_rng(3)
    nh, rows, cols = 6, 40, 64
    w = np.stack([random_matrix(rng, qtype, rows, cols) for _ in range(nh)])
    src = rng.standard_normal((1, nh, cols + 16)).astype(np.float32)[:, :, :cols]   # strided view
    want, got = np.zeros((1, nh, rows), np.float32), np.zeros((1, nh, rows + 8), np.float32)
    xbuf, ybuf = np.zeros(nh * cols, np.float32), np.zeros(nh * rows, np.float32)
    _per_head_matmul(int(qtype), w, src, want, xbuf, ybuf, matmul_scratch(1, cols))
    _per_head_matvec(int(qtype), w, src, got[:, :, :rows], xbuf, ybuf, matmul_scratch(nh, cols))
    np.testing.assert_array_equal(got[:, :, :rows], want)
    assert np.abs(want).max() > 0
