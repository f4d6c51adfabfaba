"""Shared test helpers for the MoE families: run a family straight from a GGUF path, compare logits,
write small random DeepSeek (deepseek2) GGUF files, and a naive float64 numpy DeepSeek forward.

The reference forward is deliberately a different path from :mod:`cpuinfer.models.deepseek2`:
MLA is *not* absorbed (each head's full key ``[k_b[h]ᵀ·latent ‖ k_pe]`` and value
``v_b[h]·latent`` are materialised, as DeepSeek's ``inference/model.py`` "naive" mode does),
RoPE is a complex multiplication of adjacent pairs, YaRN frequencies follow the Hugging Face
formula, and every weight is dequantized by the numpy reference of :mod:`quant`.
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path

import gguf
import numpy as np

import quant
from cpuinfer.arch import ARCHITECTURES
from cpuinfer.gguf import open_gguf
from cpuinfer.moe import Gating, MoeConfig, route_reference
from cpuinfer.weights import TensorLoader
from tools.accuracy import kl_top1  # noqa: F401  (one definition, shared by the model tests)


def load_family(path):
    g = open_gguf(path)
    info = ARCHITECTURES[g.get("general.architecture")]
    return importlib.import_module(f"cpuinfer.models.{info.family}").Family(g, info, TensorLoader(g))


def run_logits(fam, ids, chunk=None, n_ctx=None):
    """All-position logits of ``ids`` evaluated in chunks of ``chunk`` tokens (None = one batch)."""
    n = len(ids)
    chunk = chunk or n
    n_ctx = n_ctx or n
    st, cache, rope = fam.new_state(chunk), fam.new_cache(n_ctx), fam.rope_tables(n_ctx)
    out = np.zeros((n, fam.config.n_vocab), np.float32)
    for i0 in range(0, n, chunk):
        c = ids[i0:i0 + chunk]
        st.tokens[:len(c)] = c
        fam.forward(st, cache, rope, len(c), i0, out[i0:i0 + len(c)])
    return out


# --- random deepseek2 files ------------------------------------------------------------------------

DEFAULT = dict(d=64, n_layer=3, n_head=4, q_lora=48, kv_lora=32, nope=16, rope=8, v=16, n_ff=96,
               n_dense=1, n_expert=8, n_used=2, n_ff_exp=32, n_shared=1, gating=Gating.SIGMOID,
               norm_w=True, w_scale=2.5, n_group=4, n_group_used=2, bias=True, vocab=96,
               yarn_factor=4.0, orig_ctx=32, log_mul=0.1, rope_base=10000.0, eps=1e-6)


def write_deepseek(path: Path, seed: int = 0, qtype=gguf.GGMLQuantizationType.F32, **over) -> dict:
    """A random-weight deepseek2 GGUF (no tokenizer) with the given shape options; returns them."""
    c = {**DEFAULT, **over}
    rng = np.random.default_rng(seed)
    a = "deepseek2"
    w = gguf.GGUFWriter(str(path), a)
    w.add_block_count(c["n_layer"])
    w.add_context_length(4096)
    w.add_embedding_length(c["d"])
    w.add_feed_forward_length(c["n_ff"])
    w.add_head_count(c["n_head"])
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(c["eps"])
    w.add_rope_freq_base(c["rope_base"])
    w.add_rope_dimension_count(c["rope"])
    w.add_vocab_size(c["vocab"])
    w.add_key_length(c["kv_lora"] + c["rope"])
    w.add_value_length(c["kv_lora"])
    w.add_key_length_mla(c["nope"] + c["rope"])
    w.add_value_length_mla(c["v"])
    if c["q_lora"]:
        w.add_q_lora_rank(c["q_lora"])
    w.add_kv_lora_rank(c["kv_lora"])
    w.add_leading_dense_block_count(c["n_dense"])
    w.add_expert_count(c["n_expert"])
    w.add_expert_used_count(c["n_used"])
    w.add_expert_shared_count(c["n_shared"])
    w.add_expert_feed_forward_length(c["n_ff_exp"])
    w.add_expert_weights_scale(c["w_scale"])
    w.add_expert_weights_norm(c["norm_w"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType(int(c["gating"])))
    if c["n_group"] > 1:
        w.add_expert_group_count(c["n_group"])
        w.add_expert_group_used_count(c["n_group_used"])
    if c["yarn_factor"] > 1:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(c["yarn_factor"])
        w.add_rope_scaling_orig_ctx_len(c["orig_ctx"])
        w.add_rope_scaling_yarn_beta_fast(32.0)
        w.add_rope_scaling_yarn_beta_slow(1.0)
        if c["log_mul"]:
            w.add_rope_scaling_yarn_log_mul(c["log_mul"])
    d, nh, hk = c["d"], c["n_head"], c["nope"] + c["rope"]

    def mat(*shape, std=None):
        std = std or 1.0 / math.sqrt(shape[-1])
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def add(name, arr):
        if arr.ndim >= 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", mat(c["vocab"], d, std=1.0))
    add("output_norm.weight", norm(d))
    add("output.weight", mat(c["vocab"], d))
    for i in range(c["n_layer"]):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", norm(d))
        if c["q_lora"]:
            add(p + "attn_q_a.weight", mat(c["q_lora"], d))
            add(p + "attn_q_a_norm.weight", norm(c["q_lora"]))
            add(p + "attn_q_b.weight", mat(nh * hk, c["q_lora"]))
        else:
            add(p + "attn_q.weight", mat(nh * hk, d))
        add(p + "attn_kv_a_mqa.weight", mat(c["kv_lora"] + c["rope"], d))
        add(p + "attn_kv_a_norm.weight", norm(c["kv_lora"]))
        add(p + "attn_k_b.weight", mat(nh, c["kv_lora"], c["nope"]))
        add(p + "attn_v_b.weight", mat(nh, c["v"], c["kv_lora"]))
        add(p + "attn_output.weight", mat(d, nh * c["v"]))
        add(p + "ffn_norm.weight", norm(d))
        if i < c["n_dense"]:
            add(p + "ffn_gate.weight", mat(c["n_ff"], d))
            add(p + "ffn_up.weight", mat(c["n_ff"], d))
            add(p + "ffn_down.weight", mat(d, c["n_ff"]))
            continue
        ne, fe = c["n_expert"], c["n_ff_exp"]
        add(p + "ffn_gate_inp.weight", mat(ne, d))
        if c["bias"]:
            add(p + "exp_probs_b.bias", (0.05 * rng.standard_normal(ne)).astype(np.float32))
        add(p + "ffn_gate_exps.weight", mat(ne, fe, d))
        add(p + "ffn_up_exps.weight", mat(ne, fe, d))
        add(p + "ffn_down_exps.weight", mat(ne, d, fe))
        if c["n_shared"]:
            fs = fe * c["n_shared"]
            add(p + "ffn_gate_shexp.weight", mat(fs, d))
            add(p + "ffn_up_shexp.weight", mat(fs, d))
            add(p + "ffn_down_shexp.weight", mat(d, fs))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return c


# --- naive float64 reference ----------------------------------------------------------------------

def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1.0 + np.exp(-x))


def reference_deepseek(path, ids) -> np.ndarray:
    """float64 logits [len(ids), vocab] of a deepseek2 GGUF by the non-absorbed MLA formulas."""
    g = open_gguf(path)
    a = "deepseek2"

    def meta(key, default=None):
        return g.get(f"{a}.{key}", default)

    def W(name):
        t = g.tensors[name]
        return quant.dequantize(g.raw(t), t.ggml_type, t.shape[-1]).astype(np.float64)

    eps = float(meta("attention.layer_norm_rms_epsilon"))
    nh = int(meta("attention.head_count"))
    rope = int(meta("rope.dimension_count"))
    hk = int(meta("attention.key_length_mla"))
    nope = hk - rope
    kv_lora = int(meta("attention.kv_lora_rank"))
    n_layer = int(meta("block_count"))
    n_dense = int(meta("leading_dense_block_count", 0))
    base = float(meta("rope.freq_base", 10000.0))
    # YaRN, Hugging Face's formula (modeling_rope_utils._compute_yarn_parameters)
    inv_freq = 1.0 / base ** (np.arange(0, rope, 2) / rope)
    scale = 1.0 / math.sqrt(hk)
    if meta("rope.scaling.type") == "yarn":
        factor = float(meta("rope.scaling.factor"))
        orig = int(meta("rope.scaling.original_context_length"))
        bf, bs = float(meta("rope.scaling.yarn_beta_fast")), float(meta("rope.scaling.yarn_beta_slow"))

        def corr(nr):
            return rope * math.log(orig / (nr * 2 * math.pi)) / (2 * math.log(base))
        low, high = max(math.floor(corr(bf)), 0), min(math.ceil(corr(bs)), rope - 1)
        if low == high:
            high += 0.001
        extra = 1.0 - np.clip((np.arange(rope // 2) - low) / (high - low), 0, 1)
        inv_freq = inv_freq / factor * (1 - extra) + inv_freq * extra
        mscale_all = float(meta("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1
        scale *= (0.1 * mscale_all * math.log(factor) + 1.0) ** 2
    pos = np.arange(len(ids))
    rot = np.exp(1j * pos[:, None] * inv_freq[None, :])              # [n, rope/2]

    def apply_rope(x):  # x [..., n, rope] with adjacent pairs as complex numbers
        z = x[..., 0::2] + 1j * x[..., 1::2]
        z = z * rot
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
        return out

    moe = MoeConfig(
        n_expert=int(meta("expert_count", 1)), n_used=int(meta("expert_used_count", 1)),
        n_ff=int(meta("expert_feed_forward_length", 1)),
        gating=Gating(int(meta("expert_gating_func", 1))), norm_w=bool(meta("expert_weights_norm", False)),
        w_scale=float(meta("expert_weights_scale", 0.0)) or 1.0,
        n_group=int(meta("expert_group_count", 1)), n_group_used=int(meta("expert_group_used_count", 1)))

    x = W("token_embd.weight")[np.asarray(ids)]
    n = len(ids)
    mask = np.tril(np.ones((n, n), bool))
    for i in range(n_layer):
        p = f"blk.{i}."
        h = _rms(x, W(p + "attn_norm.weight"), eps)
        if p + "attn_q_a.weight" in g.tensors:
            q = _rms(h @ W(p + "attn_q_a.weight").T, W(p + "attn_q_a_norm.weight"), eps) @ W(p + "attn_q_b.weight").T
        else:
            q = h @ W(p + "attn_q.weight").T
        q = q.reshape(n, nh, hk).transpose(1, 0, 2)                      # [nh, n, hk]
        kv = h @ W(p + "attn_kv_a_mqa.weight").T
        latent = _rms(kv[:, :kv_lora], W(p + "attn_kv_a_norm.weight"), eps)
        k_pe = apply_rope(kv[:, kv_lora:])                              # [n, rope]
        kb, vb = W(p + "attn_k_b.weight"), W(p + "attn_v_b.weight")     # [nh, L, nope], [nh, v, L]
        k_nope = np.einsum("hln,tl->htn", kb, latent)                    # full keys per head
        v = np.einsum("hvl,tl->htv", vb, latent)                         # full values per head
        k = np.concatenate([k_nope, np.broadcast_to(k_pe, (nh, n, rope))], -1)
        qf = np.concatenate([q[..., :nope], apply_rope(q[..., nope:])], -1)
        s = np.einsum("hik,hjk->hij", qf, k) * scale
        s = np.where(mask, s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = np.einsum("hij,hjv->hiv", pr, v).transpose(1, 0, 2).reshape(n, -1)
        x = x + o @ W(p + "attn_output.weight").T
        h = _rms(x, W(p + "ffn_norm.weight"), eps)
        if i < n_dense:
            x = x + (_silu(h @ W(p + "ffn_gate.weight").T) * (h @ W(p + "ffn_up.weight").T)) @ W(p + "ffn_down.weight").T
            continue
        logits = h @ W(p + "ffn_gate_inp.weight").T
        bias = W(p + "exp_probs_b.bias") if p + "exp_probs_b.bias" in g.tensors else np.zeros(moe.n_expert)
        sel, wts = route_reference(logits, bias, moe)
        ge, ue, de = W(p + "ffn_gate_exps.weight"), W(p + "ffn_up_exps.weight"), W(p + "ffn_down_exps.weight")
        y = np.zeros_like(x)
        for t in range(n):
            for e, wt in zip(sel[t], wts[t]):
                y[t] += wt * (de[e] @ (_silu(ge[e] @ h[t]) * (ue[e] @ h[t])))
        if p + "ffn_gate_shexp.weight" in g.tensors:
            y += (_silu(h @ W(p + "ffn_gate_shexp.weight").T) * (h @ W(p + "ffn_up_shexp.weight").T)) @ W(p + "ffn_down_shexp.weight").T
        x = x + y
    return _rms(x, W("output_norm.weight"), eps) @ W("output.weight").T
