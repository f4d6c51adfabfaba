"""qwen3moe (Qwen3-MoE): fixture logits against Hugging Face and llama.cpp, decode vs prefill."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cpuinfer.gguf import open_gguf
from deepseek_helpers import kl_top1, load_family, run_logits

DATA = Path(__file__).parent / "data" / "tiny" / "qwen3moe"
IDS = json.loads((DATA / "ids.json").read_text())["ids"]


@pytest.fixture(scope="module")
def f32_family():
    return load_family(DATA / "qwen3moe-f32.gguf")


def test_f32_matches_hugging_face(f32_family):
    got = run_logits(f32_family, IDS)
    assert np.abs(got - np.load(DATA / "hf_logits_f32model.npy")).max() <= 2e-2


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_quantized_matches_llama_cpp(qtype):
    got = run_logits(load_family(DATA / f"qwen3moe-{qtype}.gguf"), IDS)
    kl, top1 = kl_top1(np.load(DATA / f"llamacpp_logits_{qtype}.npy"), got)
    assert kl <= 5e-3 and top1 >= 0.95, (kl, top1)


@pytest.mark.parametrize("chunk", [1, 6])
def test_incremental_decode_equals_prefill(f32_family, chunk):
    full = run_logits(f32_family, IDS)
    assert np.abs(run_logits(f32_family, IDS, chunk=chunk) - full).max() <= 1e-4


def test_streamed_bytes_count_only_used_experts(f32_family):
    c = f32_family.config
    expect = 0
    for t in open_gguf(DATA / "qwen3moe-f32.gguf").tensors.values():
        if len(t.shape) < 2:
            continue
        if t.name == "token_embd.weight":
            expect += f32_family.weights.token_embd.raw.shape[-1]
        elif "_exps." in t.name:
            expect += t.nbytes * c.moe.n_used // c.moe.n_expert
        else:
            expect += t.nbytes
    assert f32_family.weights.streamed_bytes() == expect
    assert c.kv_bytes_per_token == 3 * 2 * 2 * 32 * 2       # layers × kv heads × (k+v) × hd × f16
