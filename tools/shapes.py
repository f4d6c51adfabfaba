"""Architecture shape tables: the exact GGUF tensors and metadata of the preset models.

One table drives both the tokens/s estimator's presets (``deepseek-r1:q8_0`` is computed from
these shapes, not from a hand-typed byte count) and the shape-true synthetic GGUF writer
(:mod:`tools.synth`). Everything here is data plus pure functions of it.

Tensor names and shapes are what llama.cpp's converter (``convert_hf_to_gguf.py``) and
``llama-quantize`` write, in numpy order (``shape[-1]`` = row length = ggml ``ne[0]``):

llama / qwen2, per layer ``blk.N.`` (h = hidden, d = head_dim, kv = KV heads)::

    attn_norm (h)   attn_q (heads*d, h)   attn_k (kv*d, h)   attn_v (kv*d, h)
    attn_output (h, heads*d)   ffn_norm (h)   ffn_gate, ffn_up (ffn, h)   ffn_down (h, ffn)
    qwen2 also: attn_q.bias (heads*d), attn_k.bias (kv*d), attn_v.bias (kv*d)

deepseek2 (DeepSeek-V2/V3/R1; MLA with the ``kv_b`` projection split into k_b / v_b)::

    attn_norm (h)  attn_q_a (q_lora, h)  attn_q_a_norm (q_lora)
    attn_q_b (heads*(nope+rope), q_lora)  attn_kv_a_mqa (kv_lora+rope, h)  attn_kv_a_norm (kv_lora)
    attn_k_b (heads, kv_lora, nope)  attn_v_b (heads, v_head, kv_lora)  attn_output (h, heads*v_head)
    ffn_norm (h)
    leading dense layers: ffn_gate, ffn_up (ffn, h), ffn_down (h, ffn)
    MoE layers: ffn_gate_inp (experts, h) F32, exp_probs_b.bias (experts) F32,
                ffn_gate_exps, ffn_up_exps (experts, expert_ffn, h), ffn_down_exps (experts, h, expert_ffn),
                ffn_gate_shexp, ffn_up_shexp (shared*expert_ffn, h), ffn_down_shexp (h, shared*expert_ffn)

plus ``token_embd`` (vocab, h), ``output_norm`` (h), ``output`` (vocab, h) unless the embeddings
are tied, and ``rope_freqs`` (d/2) for Llama-3.1-style rope scaling.

Quantization types follow ``llama_tensor_get_type`` in llama.cpp's ``src/llama-quant.cpp`` for the
non-imatrix ftypes listed in :data:`FTYPES` (checked against the fixtures' real llama-quantize
output in ``tests/test_synth.py``). Simplifications: no importance-matrix variants (IQ*), no
Falcon special cases, and ``--pure``/per-tensor overrides are not modelled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType, LlamaFileType

from cpuinfer.errors import CpuinferError
from cpuinfer.gguf import GGMLType, TensorInfo


@dataclass(frozen=True)
class ArchSpec:
    """Hyper-parameters that fix every tensor shape and metadata value of one model."""

    name: str                 # preset name, e.g. "deepseek-r1"
    title: str                # human-readable model name
    arch: str                 # GGUF general.architecture
    n_layer: int
    hidden: int
    n_head: int
    n_head_kv: int
    head_dim: int             # llama/qwen2: per-head q/k/v size; deepseek2: unused (see MLA fields)
    ffn: int                  # dense feed-forward width
    vocab: int                # rows of token_embd / output (padded vocab)
    ctx: int                  # trained context length (context_length)
    rope_base: float
    norm_eps: float
    tied_output: bool = False # no output.weight: token_embd doubles as the output head
    qkv_bias: bool = False    # qwen2: attn_{q,k,v}.bias
    rope_freqs: bool = False  # Llama 3.1 rope scaling stored as rope_freqs.weight (head_dim/2)
    # MLA (deepseek2)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    rope_dim: int = 0         # rotary dims (deepseek2: qk_rope_head_dim; llama/qwen2: head_dim)
    qk_nope_dim: int = 0
    v_head_dim: int = 0
    # mixture of experts (deepseek2)
    n_expert: int = 0
    n_expert_used: int = 0
    n_expert_shared: int = 0
    expert_ffn: int = 0
    n_expert_group: int = 0
    n_expert_group_used: int = 0
    leading_dense: int = 0
    gating_func: int = 0      # 1 softmax, 2 sigmoid
    expert_weights_scale: float = 1.0
    expert_weights_norm: bool = False
    expert_probs_bias: bool = False  # exp_probs_b.bias (V3/R1 noaux_tc routing)
    # YaRN rope scaling: (factor, original_ctx, beta_fast, beta_slow, yarn_log_multiplier)
    yarn: tuple[float, int, float, float, float] | None = None
    pre_tokenizer: str = "gpt2"

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    def moe_layer(self, i: int, leading_dense: int | None = None) -> bool:
        ld = self.leading_dense if leading_dense is None else leading_dense
        return self.is_moe and i >= ld


_R1 = dict(arch="deepseek2", n_layer=61, hidden=7168, n_head=128, n_head_kv=128, head_dim=192,
           ffn=18432, vocab=129280, ctx=163840, rope_base=10000.0, norm_eps=1e-6,
           q_lora_rank=1536, kv_lora_rank=512, rope_dim=64, qk_nope_dim=128, v_head_dim=128,
           n_expert=256, n_expert_used=8, n_expert_shared=1, expert_ffn=2048, n_expert_group=8,
           n_expert_group_used=4, leading_dense=3, gating_func=2, expert_weights_scale=2.5,
           expert_weights_norm=True, expert_probs_bias=True,
           yarn=(40.0, 4096, 32.0, 1.0, 0.1), pre_tokenizer="deepseek-v3")

PRESETS: dict[str, ArchSpec] = {s.name: s for s in (
    ArchSpec(name="deepseek-r1", title="DeepSeek-R1 671B", **_R1),
    ArchSpec(name="deepseek-v3", title="DeepSeek-V3 671B", **_R1),
    ArchSpec(name="deepseek-r1-distill-qwen-1.5b", title="DeepSeek-R1-Distill-Qwen-1.5B", arch="qwen2",
             n_layer=28, hidden=1536, n_head=12, n_head_kv=2, head_dim=128, ffn=8960, vocab=151936,
             ctx=131072, rope_base=10000.0, norm_eps=1e-6, qkv_bias=True, rope_dim=128,
             pre_tokenizer="deepseek-r1-qwen"),
    ArchSpec(name="deepseek-r1-distill-qwen-7b", title="DeepSeek-R1-Distill-Qwen-7B", arch="qwen2",
             n_layer=28, hidden=3584, n_head=28, n_head_kv=4, head_dim=128, ffn=18944, vocab=152064,
             ctx=131072, rope_base=10000.0, norm_eps=1e-6, qkv_bias=True, rope_dim=128,
             pre_tokenizer="deepseek-r1-qwen"),
    ArchSpec(name="deepseek-r1-distill-qwen-32b", title="DeepSeek-R1-Distill-Qwen-32B", arch="qwen2",
             n_layer=64, hidden=5120, n_head=40, n_head_kv=8, head_dim=128, ffn=27648, vocab=152064,
             ctx=131072, rope_base=1000000.0, norm_eps=1e-5, qkv_bias=True, rope_dim=128,
             pre_tokenizer="deepseek-r1-qwen"),
    ArchSpec(name="deepseek-r1-distill-llama-8b", title="DeepSeek-R1-Distill-Llama-8B", arch="llama",
             n_layer=32, hidden=4096, n_head=32, n_head_kv=8, head_dim=128, ffn=14336, vocab=128256,
             ctx=131072, rope_base=500000.0, norm_eps=1e-5, rope_freqs=True, rope_dim=128,
             pre_tokenizer="llama-bpe"),
    ArchSpec(name="deepseek-r1-distill-llama-70b", title="DeepSeek-R1-Distill-Llama-70B", arch="llama",
             n_layer=80, hidden=8192, n_head=64, n_head_kv=8, head_dim=128, ffn=28672, vocab=128256,
             ctx=131072, rope_base=500000.0, norm_eps=1e-5, rope_freqs=True, rope_dim=128,
             pre_tokenizer="llama-bpe"),
    ArchSpec(name="llama-3-8b", title="Meta-Llama-3-8B", arch="llama",
             n_layer=32, hidden=4096, n_head=32, n_head_kv=8, head_dim=128, ffn=14336, vocab=128256,
             ctx=8192, rope_base=500000.0, norm_eps=1e-5, rope_dim=128, pre_tokenizer="llama-bpe"),
    ArchSpec(name="qwen2-1.5b", title="Qwen2-1.5B", arch="qwen2",
             n_layer=28, hidden=1536, n_head=12, n_head_kv=2, head_dim=128, ffn=8960, vocab=151936,
             ctx=32768, rope_base=1000000.0, norm_eps=1e-6, qkv_bias=True, tied_output=True,
             rope_dim=128, pre_tokenizer="qwen2"),
)}

# llama.cpp file types this module can assign tensor types for: name -> (ftype, default type).
FTYPES: dict[str, tuple[LlamaFileType, GGMLType]] = {
    "f32": (LlamaFileType.ALL_F32, GGMLType.F32),
    "f16": (LlamaFileType.MOSTLY_F16, GGMLType.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, GGMLType.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, GGMLType.Q8_0),
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, GGMLType.Q4_0),
    "q4_1": (LlamaFileType.MOSTLY_Q4_1, GGMLType.Q4_1),
    "q5_0": (LlamaFileType.MOSTLY_Q5_0, GGMLType.Q5_0),
    "q5_1": (LlamaFileType.MOSTLY_Q5_1, GGMLType.Q5_1),
    "q2_k": (LlamaFileType.MOSTLY_Q2_K, GGMLType.Q2_K),
    "q3_k_s": (LlamaFileType.MOSTLY_Q3_K_S, GGMLType.Q3_K),
    "q3_k_m": (LlamaFileType.MOSTLY_Q3_K_M, GGMLType.Q3_K),
    "q3_k_l": (LlamaFileType.MOSTLY_Q3_K_L, GGMLType.Q3_K),
    "q4_k_s": (LlamaFileType.MOSTLY_Q4_K_S, GGMLType.Q4_K),
    "q4_k_m": (LlamaFileType.MOSTLY_Q4_K_M, GGMLType.Q4_K),
    "q5_k_s": (LlamaFileType.MOSTLY_Q5_K_S, GGMLType.Q5_K),
    "q5_k_m": (LlamaFileType.MOSTLY_Q5_K_M, GGMLType.Q5_K),
    "q6_k": (LlamaFileType.MOSTLY_Q6_K, GGMLType.Q6_K),
}

# Fallback when a row length is not a multiple of the chosen type's block (llama-quant.cpp).
_FALLBACK = {GGMLType.Q2_K: GGMLType.IQ4_NL, GGMLType.Q3_K: GGMLType.IQ4_NL,
             GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0}


def parse_ftype(name: str) -> tuple[LlamaFileType, GGMLType]:
    key = name.strip().lower()
    if key not in FTYPES:
        raise CpuinferError(f"unknown quantization type {name!r}; valid: {', '.join(FTYPES)}")
    return FTYPES[key]


def preset_names() -> list[str]:
    """Every valid ``MODEL:QUANT`` combination, model-major (for error messages and docs)."""
    return [f"{m}:{q}" for m in PRESETS for q in FTYPES]


def parse_preset(text: str) -> tuple[ArchSpec, str]:
    """``"deepseek-r1:q4_k_m"`` -> (spec, "q4_k_m"); unknown names raise listing the valid ones."""
    model, sep, quant = text.strip().lower().partition(":")
    if model not in PRESETS or not sep:
        raise CpuinferError(f"unknown preset {text!r}: expected MODEL:QUANT with MODEL one of "
                            f"{', '.join(PRESETS)} and QUANT one of {', '.join(FTYPES)}")
    parse_ftype(quant)
    return PRESETS[model], quant


def layer_count(spec: ArchSpec, n_layers: int | None) -> int:
    n = spec.n_layer if n_layers is None else int(n_layers)
    if n < 1:
        raise CpuinferError(f"{spec.name}: layer count must be at least 1, got {n}")
    return n


def dense_count(spec: ArchSpec, n_layers: int, leading_dense: int | None) -> int:
    """Leading dense layers in an ``n_layers`` model; by default the spec's, but when that
    would leave no MoE layer in a cut-down model, ``n_layers - 1`` so at least one remains."""
    if not spec.is_moe:
        return 0
    if leading_dense is None:
        return min(spec.leading_dense, max(n_layers - 1, 0))
    if not 0 <= leading_dense <= n_layers:
        raise CpuinferError(f"{spec.name}: leading dense layers must be in 0..{n_layers}, got {leading_dense}")
    return int(leading_dense)


def tensor_shapes(spec: ArchSpec, n_layers: int | None = None,
                  leading_dense: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor, in llama-quantize's order (non-layer tensors by
    name, then layers in numeric order with names sorted inside a layer)."""
    n = layer_count(spec, n_layers)
    ld = dense_count(spec, n, leading_dense)
    h = spec.hidden
    top = [("token_embd.weight", (spec.vocab, h)), ("output_norm.weight", (h,))]
    if not spec.tied_output:
        top.append(("output.weight", (spec.vocab, h)))
    if spec.rope_freqs:
        top.append(("rope_freqs.weight", (spec.head_dim // 2,)))
    out = sorted(top)
    for i in range(n):
        layer: list[tuple[str, tuple[int, ...]]] = [("attn_norm.weight", (h,)), ("ffn_norm.weight", (h,))]
        if spec.arch == "deepseek2":
            nh = spec.n_head
            layer += [
                ("attn_q_a.weight", (spec.q_lora_rank, h)),
                ("attn_q_a_norm.weight", (spec.q_lora_rank,)),
                ("attn_q_b.weight", (nh * (spec.qk_nope_dim + spec.rope_dim), spec.q_lora_rank)),
                ("attn_kv_a_mqa.weight", (spec.kv_lora_rank + spec.rope_dim, h)),
                ("attn_kv_a_norm.weight", (spec.kv_lora_rank,)),
                ("attn_k_b.weight", (nh, spec.kv_lora_rank, spec.qk_nope_dim)),
                ("attn_v_b.weight", (nh, spec.v_head_dim, spec.kv_lora_rank)),
                ("attn_output.weight", (h, nh * spec.v_head_dim)),
            ]
        else:
            q, kv = spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim
            layer += [("attn_q.weight", (q, h)), ("attn_k.weight", (kv, h)), ("attn_v.weight", (kv, h)),
                      ("attn_output.weight", (h, q))]
            if spec.qkv_bias:
                layer += [("attn_q.bias", (q,)), ("attn_k.bias", (kv,)), ("attn_v.bias", (kv,))]
        if spec.moe_layer(i, ld):
            e, ef, sh = spec.n_expert, spec.expert_ffn, spec.n_expert_shared * spec.expert_ffn
            layer += [("ffn_gate_inp.weight", (e, h)),
                      ("ffn_gate_exps.weight", (e, ef, h)), ("ffn_up_exps.weight", (e, ef, h)),
                      ("ffn_down_exps.weight", (e, h, ef))]
            if spec.expert_probs_bias:
                layer.append(("exp_probs_b.bias", (e,)))
            if sh:
                layer += [("ffn_gate_shexp.weight", (sh, h)), ("ffn_up_shexp.weight", (sh, h)),
                          ("ffn_down_shexp.weight", (h, sh))]
        else:
            layer += [("ffn_gate.weight", (spec.ffn, h)), ("ffn_up.weight", (spec.ffn, h)),
                      ("ffn_down.weight", (h, spec.ffn))]
        out += [(f"blk.{i}.{name}", shape) for name, shape in sorted(layer)]
    return out


def metadata(spec: ArchSpec, ftype: str, n_layers: int | None = None,
             leading_dense: int | None = None) -> list[tuple[str, Any, GGUFValueType]]:
    """Model metadata (no tokenizer) as llama.cpp's converter + quantizer write it:
    ``[(key, value, GGUF value type), ...]``."""
    n = layer_count(spec, n_layers)
    a = spec.arch
    U32, F32, STR, BOOL = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING, GGUFValueType.BOOL
    kv: list[tuple[str, Any, GGUFValueType]] = [
        ("general.architecture", a, STR),
        ("general.type", "model", STR),
        ("general.name", spec.title if n == spec.n_layer else f"{spec.title} (synthetic, {n} layers)", STR),
        (f"{a}.block_count", n, U32),
        (f"{a}.context_length", spec.ctx, U32),
        (f"{a}.embedding_length", spec.hidden, U32),
        (f"{a}.feed_forward_length", spec.ffn, U32),
        (f"{a}.attention.head_count", spec.n_head, U32),
        (f"{a}.rope.freq_base", spec.rope_base, F32),
        (f"{a}.attention.layer_norm_rms_epsilon", spec.norm_eps, F32),
    ]
    if a == "deepseek2":
        kv += [
            # MLA as one latent "KV head": K = latent + rope key, V = latent (llama.cpp convention)
            (f"{a}.attention.head_count_kv", 1, U32),
            (f"{a}.attention.key_length", spec.kv_lora_rank + spec.rope_dim, U32),
            (f"{a}.attention.value_length", spec.kv_lora_rank, U32),
            (f"{a}.attention.key_length_mla", spec.qk_nope_dim + spec.rope_dim, U32),
            (f"{a}.attention.value_length_mla", spec.v_head_dim, U32),
            (f"{a}.attention.q_lora_rank", spec.q_lora_rank, U32),
            (f"{a}.attention.kv_lora_rank", spec.kv_lora_rank, U32),
            (f"{a}.rope.dimension_count", spec.rope_dim, U32),
            (f"{a}.leading_dense_block_count", dense_count(spec, n, leading_dense), U32),
            (f"{a}.vocab_size", spec.vocab, U32),
            (f"{a}.expert_count", spec.n_expert, U32),
            (f"{a}.expert_used_count", spec.n_expert_used, U32),
            (f"{a}.expert_group_count", spec.n_expert_group, U32),
            (f"{a}.expert_group_used_count", spec.n_expert_group_used, U32),
            (f"{a}.expert_gating_func", spec.gating_func, U32),
            (f"{a}.expert_feed_forward_length", spec.expert_ffn, U32),
            (f"{a}.expert_shared_count", spec.n_expert_shared, U32),
            (f"{a}.expert_weights_scale", spec.expert_weights_scale, F32),
            (f"{a}.expert_weights_norm", spec.expert_weights_norm, BOOL),
        ]
    else:
        kv += [(f"{a}.attention.head_count_kv", spec.n_head_kv, U32)]
        if a == "llama":
            kv += [(f"{a}.attention.key_length", spec.head_dim, U32),
                   (f"{a}.attention.value_length", spec.head_dim, U32),
                   (f"{a}.vocab_size", spec.vocab, U32),
                   (f"{a}.rope.dimension_count", spec.rope_dim, U32)]
    if spec.yarn is not None:
        factor, orig, beta_fast, beta_slow, log_mul = spec.yarn
        kv += [(f"{a}.rope.scaling.type", "yarn", STR),
               (f"{a}.rope.scaling.factor", factor, F32),
               (f"{a}.rope.scaling.original_context_length", orig, U32),
               (f"{a}.rope.scaling.yarn_beta_fast", beta_fast, F32),
               (f"{a}.rope.scaling.yarn_beta_slow", beta_slow, F32),
               (f"{a}.rope.scaling.yarn_log_multiplier", log_mul, F32)]
    kv += [("general.quantization_version", 2, U32),
           ("general.file_type", int(parse_ftype(ftype)[0]), U32)]
    return kv


# -- quantization type per tensor (llama-quant.cpp, llama_tensor_get_type) ----------------------

@dataclass(frozen=True)
class QuantContext:
    """Model facts llama_tensor_get_type looks at."""

    n_layer: int
    n_expert: int          # 0 or 1 for dense models
    n_gqa: int             # heads / KV heads
    has_output: bool       # False: token_embd is the tied output head
    is_70b: bool           # llama.cpp's LLM_TYPE_70B (80-layer llama / qwen2)
    n_attention_wv: int    # number of attn_v.weight tensors


def quant_context(tensor_names: list[str], meta: dict) -> QuantContext:
    a = meta.get("general.architecture", "")
    n_layer = int(meta.get(f"{a}.block_count", 0))
    n_head = int(meta.get(f"{a}.attention.head_count", 1))
    n_kv = int(meta.get(f"{a}.attention.head_count_kv", n_head)) or n_head
    return QuantContext(
        n_layer=n_layer, n_expert=int(meta.get(f"{a}.expert_count", 0)), n_gqa=n_head // n_kv,
        has_output="output.weight" in tensor_names,
        is_70b=n_layer == 80 and a in ("llama", "qwen2"),
        n_attention_wv=sum(n.endswith("attn_v.weight") for n in tensor_names))


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer_of(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


def _quantized(name: str, shape: tuple[int, ...]) -> bool:
    """llama-quantize only quantizes 2-D/3-D ``*weight`` tensors that are not norms or routers."""
    return (name.endswith("weight") and len(shape) >= 2 and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def tensor_type(name: str, shape: tuple[int, ...], ftype: str, qc: QuantContext,
                pure: bool = False) -> GGMLType:
    """The ggml type llama-quantize gives tensor ``name`` under ``ftype`` (non-imatrix rules).

    ``pure`` (llama-quantize ``--pure``): every quantized tensor gets the ftype's default type,
    except that rows that do not fit its blocks still take the fallback type."""
    lf, default = parse_ftype(ftype)
    if not _quantized(name, shape):
        return GGMLType.F32
    if default in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        return default
    F = LlamaFileType
    nx = shape[-1]
    t = default
    if pure:
        pass
    elif name == "output.weight" or (not qc.has_output and name == "token_embd.weight"):
        if nx % GGML_QUANT_SIZES[t][0]:
            t = GGMLType.Q8_0
        elif t != GGMLType.Q8_0:
            t = GGMLType.Q6_K
    elif name == "token_embd.weight":
        pass
    elif "attn_v.weight" in name:
        i = _layer_of(name)
        if lf == F.MOSTLY_Q2_K:
            t = GGMLType.Q4_K if qc.n_gqa >= 4 else GGMLType.Q3_K
        elif lf == F.MOSTLY_Q3_K_M:
            t = GGMLType.Q5_K if i < 2 else GGMLType.Q4_K
        elif lf == F.MOSTLY_Q3_K_L:
            t = GGMLType.Q5_K
        elif lf in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(i, qc.n_attention_wv):
            t = GGMLType.Q6_K
        elif lf == F.MOSTLY_Q4_K_S and i < 4:
            t = GGMLType.Q5_K
        if qc.is_70b and t in (GGMLType.Q3_K, GGMLType.Q4_K):
            t = GGMLType.Q5_K
        if qc.n_expert == 8:
            t = GGMLType.Q8_0
    elif "attn_k.weight" in name:
        if qc.n_expert == 8:
            t = GGMLType.Q8_0
    elif "ffn_down" in name:
        i, n = _layer_of(name), qc.n_layer
        if lf == F.MOSTLY_Q2_K:
            t = GGMLType.Q3_K
        elif lf == F.MOSTLY_Q3_K_M:
            t = GGMLType.Q5_K if i < n // 16 else GGMLType.Q4_K
        elif lf == F.MOSTLY_Q3_K_L:
            t = GGMLType.Q5_K
        elif lf in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M):
            if _use_more_bits(i, n):
                t = GGMLType.Q6_K
        elif lf == F.MOSTLY_Q4_K_S and i < n // 8:
            t = GGMLType.Q5_K
    elif "attn_output.weight" in name:
        if qc.n_expert == 8:
            if lf in (F.MOSTLY_Q2_K, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M):
                t = GGMLType.Q5_K
        elif lf == F.MOSTLY_Q2_K:
            t = GGMLType.Q3_K
        elif lf == F.MOSTLY_Q3_K_M:
            t = GGMLType.Q4_K
        elif lf == F.MOSTLY_Q3_K_L:
            t = GGMLType.Q5_K
    if nx % GGML_QUANT_SIZES[t][0]:
        if t not in _FALLBACK:
            raise CpuinferError(f"tensor {name}: row length {nx} does not fit {t.name} blocks")
        t = _FALLBACK[t]
        if nx % GGML_QUANT_SIZES[t][0]:
            t = GGMLType.F16
    return t


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLType) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    n = int(np.prod(shape, dtype=np.int64))
    return n // block * size


def model_tensors(spec: ArchSpec, ftype: str, n_layers: int | None = None,
                  leading_dense: int | None = None,
                  pure: bool = False) -> tuple[dict[str, TensorInfo], dict[str, Any]]:
    """The tensor table and metadata dict a real ``spec`` GGUF quantized as ``ftype`` would have
    (offsets are 0: there is no file). Same types as :class:`cpuinfer.gguf.GGUFFile` gives."""
    shapes = tensor_shapes(spec, n_layers, leading_dense)
    meta = {k: v for k, v, _ in metadata(spec, ftype, n_layers, leading_dense)}
    qc = quant_context([n for n, _ in shapes], meta)
    tensors = {}
    for name, shape in shapes:
        t = tensor_type(name, shape, ftype, qc, pure)
        tensors[name] = TensorInfo(name, shape, t, 0, tensor_nbytes(shape, t))
    return tensors, meta
