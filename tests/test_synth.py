"""Shape tables, llama-quantize type rules and the shape-true synthetic GGUF writer."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from gguf.quants import dequantize

from cpuinfer.errors import CpuinferError
from cpuinfer.gguf import GGMLType, open_gguf
from tools import synth
from tools.shapes import (FTYPES, PRESETS, model_tensors, parse_preset, quant_context, tensor_shapes,
                          tensor_type)

DATA = Path(__file__).parent / "data" / "estimate"
FTYPE_OF_FILE = {0: "f32", 2: "q4_0", 7: "q8_0", 15: "q4_k_m"}


@pytest.mark.parametrize("path", sorted(DATA.glob("*.header.gguf")), ids=lambda p: p.name)
def test_type_rules_reproduce_llama_quantize(path):
    """For every fixture quantized by llama.cpp, our rules give each tensor the same type."""
    g = open_gguf(path, header_only=True)
    ftype = FTYPE_OF_FILE[g.get("general.file_type")]
    qc = quant_context(list(g.tensors), g.metadata)
    for name, t in g.tensors.items():
        assert tensor_type(name, t.shape, ftype, qc) == t.ggml_type, name


def _gb(preset):
    tensors, _ = model_tensors(*parse_preset(preset))
    return sum(t.nbytes for t in tensors.values()) / 1e9


def test_preset_sizes_match_published_files():
    assert 665 <= _gb("deepseek-r1:q8_0") <= 715          # unsloth/DeepSeek-R1 Q8_0: 713 GB
    assert 395 <= _gb("deepseek-r1:q4_k_m") <= 410        # Q4_K_M: 404 GB
    assert 235 <= _gb("deepseek-r1:q2_k") <= 250          # Q2_K: 245 GB
    assert 1.0 <= _gb("deepseek-r1-distill-qwen-1.5b:q4_k_m") <= 1.2
    assert 4.8 <= _gb("llama-3-8b:q4_k_m") <= 5.0         # 4.92 GB
    assert 40 <= _gb("deepseek-r1-distill-llama-70b:q4_k_m") <= 44
    tensors, _ = model_tensors(PRESETS["deepseek-r1"], "f32")
    params = sum(t.n_elements for t in tensors.values())
    assert 670e9 < params < 672e9                           # 671B without the MTP layer


def test_r1_shapes_and_types():
    shapes = dict(tensor_shapes(PRESETS["deepseek-r1"]))
    assert shapes["blk.0.ffn_gate.weight"] == (18432, 7168)
    assert "blk.2.ffn_gate.weight" in shapes and "blk.3.ffn_gate.weight" not in shapes
    assert shapes["blk.3.ffn_gate_exps.weight"] == (256, 2048, 7168)
    assert shapes["blk.60.ffn_down_exps.weight"] == (256, 7168, 2048)
    assert shapes["blk.3.ffn_gate_shexp.weight"] == (2048, 7168)
    assert shapes["blk.5.attn_q_b.weight"] == (128 * 192, 1536)
    assert shapes["blk.5.attn_kv_a_mqa.weight"] == (576, 7168)
    assert shapes["blk.5.attn_k_b.weight"] == (128, 512, 128)
    assert shapes["blk.5.attn_v_b.weight"] == (128, 128, 512)
    assert shapes["blk.5.attn_output.weight"] == (7168, 16384)
    assert shapes["token_embd.weight"] == (129280, 7168) and "blk.61.attn_norm.weight" not in shapes
    tensors, meta = model_tensors(PRESETS["deepseek-r1"], "q4_k_m")
    assert tensors["output.weight"].ggml_type == GGMLType.Q6_K
    assert tensors["blk.5.attn_k_b.weight"].ggml_type == GGMLType.Q5_0   # 128-wide rows: fallback
    assert tensors["blk.0.ffn_down.weight"].ggml_type == GGMLType.Q6_K   # use_more_bits(0, 61)
    assert tensors["blk.8.ffn_down_exps.weight"].ggml_type == GGMLType.Q4_K
    assert tensors["blk.9.ffn_down_exps.weight"].ggml_type == GGMLType.Q6_K
    assert tensors["blk.3.ffn_gate_inp.weight"].ggml_type == GGMLType.F32
    assert meta["deepseek2.attention.key_length"] == 576 and meta["deepseek2.expert_count"] == 256


def test_r1_two_layer_synthetic_has_preset_shapes(tmp_path):
    out = tmp_path / "r1.gguf"
    synth.write_synthetic(out, "deepseek-r1", "q4_0", 2, header_only=True)
    with pytest.raises(CpuinferError, match="past the end"):
        open_gguf(out)                      # header only: the data is not there
    g = open_gguf(out, header_only=True)
    full = dict(tensor_shapes(PRESETS["deepseek-r1"]))
    # layer 0 is a leading dense layer, layer 1 a MoE layer (kept so the file has one)
    assert g.get("deepseek2.block_count") == 2 and g.get("deepseek2.leading_dense_block_count") == 1
    for name, t in g.tensors.items():
        ref = name.replace("blk.1.", "blk.3.")      # compare with a MoE layer of the real model
        assert t.shape == full[ref], name
    assert {n for n in g.tensors if n.startswith("blk.1.")} == \
        {n.replace("blk.3.", "blk.1.") for n in full if n.startswith("blk.3.")}
    for key in ("deepseek2.attention.kv_lora_rank", "deepseek2.rope.dimension_count",
                "deepseek2.expert_group_count", "deepseek2.rope.scaling.yarn_log_multiplier"):
        assert key in g.metadata
    assert len(g.get("tokenizer.ggml.tokens")) == 129280
    assert {t.ggml_type for t in g.tensors.values()} == {GGMLType.Q4_0, GGMLType.Q6_K, GGMLType.F32}


SMALL_DS = dataclasses.replace(PRESETS["deepseek-r1"], name="small-ds", hidden=512, n_head=4,
                               q_lora_rank=256, kv_lora_rank=256, ffn=512, expert_ffn=256,
                               n_expert=16, n_expert_group=4, n_expert_group_used=2, vocab=1024)
SMALL_LLAMA = dataclasses.replace(PRESETS["llama-3-8b"], name="small-llama", hidden=256, n_head=4,
                                  n_head_kv=2, head_dim=64, rope_dim=64, ffn=512, vocab=600)


@pytest.mark.parametrize("spec,ftype", [(SMALL_DS, "q4_k_m"), (SMALL_DS, "q2_k"), (SMALL_DS, "q8_0"),
                                        (SMALL_LLAMA, "q4_0"), (SMALL_LLAMA, "q5_k_m"),
                                        (SMALL_LLAMA, "f16"), (SMALL_LLAMA, "q4_1")])
def test_synthetic_data_is_valid(tmp_path, spec, ftype):
    out = tmp_path / "m.gguf"
    written = synth.write_synthetic(out, spec, ftype, 4)
    g = open_gguf(out)
    assert list(g.tensors) == list(written)
    assert g.file_size == g.data_start + sum(-(-t.nbytes // 32) * 32 for t in written.values())
    for name, t in g.tensors.items():
        assert t.shape == written[name].shape and t.ggml_type == written[name].ggml_type
        w = dequantize(np.array(g.raw(name)), t.ggml_type)
        assert np.isfinite(w).all(), name
        if name.endswith("norm.weight"):
            assert np.all(np.abs(w - 1) <= 0.1 + 1e-6), name
        elif len(t.shape) >= 2:
            assert 0.012 < w.std() < 0.03, (name, t.type_name, w.std())


def test_synthetic_tokenizer_loads(tmp_path):
    from cpuinfer.tokenizer import load_tokenizer
    out = tmp_path / "m.gguf"
    synth.write_synthetic(out, SMALL_LLAMA, "q8_0", 1)
    tok = load_tokenizer(out)
    text = "hello there <think>ok</think> ünïcode"
    ids = tok.encode(text)
    assert tok.decode(ids).endswith(text)
    assert max(ids) < SMALL_LLAMA.vocab


def test_pure_and_dense_layers(tmp_path):
    tensors, _ = model_tensors(PRESETS["deepseek-r1"], "q4_k_m", 4, leading_dense=0, pure=True)
    assert "blk.0.ffn_gate_exps.weight" in tensors
    assert tensors["output.weight"].ggml_type == GGMLType.Q4_K        # pure: no Q6_K head
    assert tensors["blk.0.attn_k_b.weight"].ggml_type == GGMLType.Q5_0  # fallback still applies
    with pytest.raises(CpuinferError, match="leading dense"):
        model_tensors(PRESETS["deepseek-r1"], "q4_0", 2, leading_dense=3)


def test_synth_cli(tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert synth.main(["--preset", "qwen2-1.5b", "--layers", "1", "--type", "q4_k_m",
                       "--header-only", "-o", str(out)]) == 0
    g = open_gguf(out, header_only=True)
    assert "output.weight" not in g.tensors                       # Qwen2-1.5B ties embeddings
    assert g.tensors["token_embd.weight"].ggml_type == GGMLType.Q6_K
    assert g.tensors["blk.0.attn_q.bias"].shape == (1536,)
    assert synth.main(["--preset", "qwen2-1.5b", "--layers", "0", "-o", str(out)]) == 1
    assert "layer count" in capsys.readouterr().err
    with pytest.raises(CpuinferError, match="unknown synthetic preset"):
        synth.write_synthetic(out, "nope", "q4_0", 1)


def test_every_ftype_assigns_writable_types():
    for ftype in FTYPES:
        tensors, _ = model_tensors(PRESETS["deepseek-r1"], ftype, 4)
        assert all(t.ggml_type in synth.supported_types() for t in tensors.values()), ftype
