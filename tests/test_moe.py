"""The MoE routing kernel against its numpy reference, and proof that experts no token selected
are never read: page residency (mincore) of the mapped expert tensors after a decode step."""
from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import pytest

from cpuinfer.moe import Gating, MoeBuffers, MoeConfig, MoeWeights, moe_ffn, route_reference
from cpuinfer.weights import QTensor
from cpuinfer.gguf import GGMLType
from deepseek_helpers import load_family, run_logits, write_deepseek

CONFIGS = [
    MoeConfig(16, 4, 32, Gating.SIGMOID, True, 2.5, 4, 2),
    MoeConfig(16, 4, 32, Gating.SOFTMAX, True, 1.0),
    MoeConfig(24, 6, 32, Gating.SOFTMAX, False, 1.0, 3, 1),
    MoeConfig(32, 3, 32, Gating.SIGMOID, False, 1.5, 8, 3),
]


def _f32(name, a):
    a = np.ascontiguousarray(a, np.float32)
    return QTensor(name, a.view(np.uint8), GGMLType.F32, a.shape[-2], a.shape[-1])


@pytest.mark.parametrize("c", CONFIGS, ids=lambda c: f"{c.gating.name}-{c.n_expert}x{c.n_used}-g{c.n_group}")
def test_moe_ffn_matches_reference(c):
    rng = np.random.default_rng(0)
    d, n = 64, 9
    w = MoeWeights(gate_inp=_f32("r", rng.standard_normal((c.n_expert, d)) / 8),
                   probs_b=(0.05 * rng.standard_normal(c.n_expert)).astype(np.float32),
                   gate=_f32("g", rng.standard_normal((c.n_expert, c.n_ff, d)) / 8),
                   up=_f32("u", rng.standard_normal((c.n_expert, c.n_ff, d)) / 8),
                   down=_f32("d", rng.standard_normal((c.n_expert, d, c.n_ff)) / 6))
    x = rng.standard_normal((n, d)).astype(np.float32)
    out = np.zeros_like(x)
    b = MoeBuffers(c, d, 16, [w])
    moe_ffn(c, w, x, out, b)
    logits = x.astype(np.float64) @ w.gate_inp.raw.view(np.float32).reshape(c.n_expert, d).T
    ids, wts = route_reference(logits, w.probs_b, c)
    np.testing.assert_array_equal(np.sort(b.ids[:n], -1), np.sort(ids, -1))
    order = np.argsort(b.ids[:n], -1)
    np.testing.assert_allclose(np.take_along_axis(b.weights[:n], order, -1),
                               np.take_along_axis(wts, np.argsort(ids, -1), -1), rtol=1e-5, atol=1e-6)
    G = w.gate.raw.view(np.float32).reshape(c.n_expert, c.n_ff, d).astype(np.float64)
    U = w.up.raw.view(np.float32).reshape(c.n_expert, c.n_ff, d).astype(np.float64)
    D = w.down.raw.view(np.float32).reshape(c.n_expert, d, c.n_ff).astype(np.float64)
    ref = np.zeros((n, d))
    for t in range(n):
        for e, wt in zip(ids[t], wts[t]):
            gt = G[e] @ x[t]
            ref[t] += wt * (D[e] @ (gt / (1 + np.exp(-gt)) * (U[e] @ x[t])))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    counts = np.bincount(ids.ravel(), minlength=c.n_expert)
    np.testing.assert_array_equal(b.counts, counts)


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.F32])
def test_one_token_expert_path_equals_batched_path(qtype):
    """Decode (one token: every expert's mat-vecs in shared parallel regions) gives the bits of
    the general per-expert loop, which a batch of two copies of the token takes."""
    from quant_helpers import random_matrix
    c = MoeConfig(16, 4, 256, Gating.SIGMOID, True, 2.5, 4, 2)
    rng = np.random.default_rng(4)
    d = 256

    def stack(name, rows, cols):
        raw = np.stack([random_matrix(rng, qtype, rows, cols) for _ in range(c.n_expert)])
        return QTensor(name, raw, qtype, rows, cols)
    w = MoeWeights(gate_inp=_f32("r", rng.standard_normal((c.n_expert, d)) / 8),
                   probs_b=np.zeros(c.n_expert, np.float32),
                   gate=stack("g", c.n_ff, d), up=stack("u", c.n_ff, d), down=stack("d", d, c.n_ff))
    x = rng.standard_normal((1, d)).astype(np.float32)
    one, two = np.zeros((1, d), np.float32), np.zeros((2, d), np.float32)
    b = MoeBuffers(c, d, 4, [w])
    moe_ffn(c, w, x, one, b)
    moe_ffn(c, w, np.repeat(x, 2, 0), two, b)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(two[0], two[1])
    assert np.abs(one).max() > 0


# --- experts nobody selected are never read ------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_PAGE = mmap.PAGESIZE
MADV_RANDOM = 1
MADV_DONTNEED = 4


def _resident(addr: int, length: int) -> np.ndarray:
    """Per page of [addr, addr+length) (page-aligned): 1 if in the page cache (mincore)."""
    n = (length + _PAGE - 1) // _PAGE
    vec = (ctypes.c_ubyte * n)()
    if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return np.frombuffer(vec, np.uint8) & 1


def _interior_pages(a: np.ndarray) -> tuple[int, int]:
    """Page-aligned (addr, length) of the pages lying entirely inside array ``a``'s bytes."""
    start = a.ctypes.data
    lo = (start + _PAGE - 1) // _PAGE * _PAGE
    hi = (start + a.nbytes) // _PAGE * _PAGE
    return lo, max(0, hi - lo)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise and mincore")
def test_unselected_experts_are_never_read(tmp_path):
    # 64 experts of 3 × 128×128 float32 (64 KiB each); one token routes to 2 of them
    path = tmp_path / "big_experts.gguf"
    write_deepseek(path, seed=5, d=128, n_layer=2, n_dense=1, n_expert=64, n_used=2, n_ff_exp=128,
                   n_group=1, n_shared=0, vocab=64)
    fam = load_family(path)                 # parsing the header may read ahead into the experts
    moe = fam.weights.layers[1].moe
    stacks = [moe.gate.raw, moe.up.raw, moe.down.raw]
    whole = moe.gate.raw
    while isinstance(whole.base, np.ndarray):
        whole = whole.base                  # the array over the whole mapped file
    lo, ln = _interior_pages(whole)         # no read-around on any fault (router reads included)
    assert _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(ln), MADV_RANDOM) == 0
    for s in stacks:                        # unmap the experts' pages
        lo, ln = _interior_pages(s)
        assert _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(ln), MADV_DONTNEED) == 0
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)        # drop the file from the page cache
    finally:
        os.close(fd)
    before = [[_resident(*_interior_pages(s[e])).sum() for e in range(64)] for s in stacks]
    if any(sum(b) for b in before):
        pytest.skip("the page cache kept the file's pages (cannot observe residency here)")
    st, cache, rope = fam.new_state(1), fam.new_cache(4), fam.rope_tables(4)
    st.tokens[0] = 7
    fam.forward(st, cache, rope, 1, 0, np.zeros((1, fam.config.n_vocab), np.float32))
    chosen = set(int(e) for e in st.moe.ids[0])
    assert len(chosen) == 2 and set(np.nonzero(st.moe.counts)[0]) == chosen
    for s in stacks:
        for e in range(64):
            pages = _resident(*_interior_pages(s[e]))
            if e in chosen:
                assert pages.all(), f"expert {e} was selected but not read"
            else:
                assert not pages.any(), f"expert {e} was not selected but {pages.sum()} of its pages were read"
    # control: the measurement does see a read of an unselected expert
    other = next(e for e in range(64) if e not in chosen)
    int(stacks[0][other].sum())
    assert _resident(*_interior_pages(stacks[0][other])).all()
