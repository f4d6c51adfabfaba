"""Architecture facts as data (after llama.cpp's ``llama-arch``): metadata keys, tensor names,
and which forward implementation and RoPE layout each GGUF architecture uses.

Model code asks for ``Key.BLOCK_COUNT`` or ``Tn.ATTN_Q`` and never formats strings itself.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import CpuinferError


class Key(str, enum.Enum):
    """Per-architecture metadata keys; ``{arch}`` is the GGUF ``general.architecture``."""
    CONTEXT_LENGTH = "{arch}.context_length"
    EMBEDDING_LENGTH = "{arch}.embedding_length"
    BLOCK_COUNT = "{arch}.block_count"
    FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
    VOCAB_SIZE = "{arch}.vocab_size"
    HEAD_COUNT = "{arch}.attention.head_count"
    HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
    KEY_LENGTH = "{arch}.attention.key_length"
    VALUE_LENGTH = "{arch}.attention.value_length"
    RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
    ROPE_DIMENSION_COUNT = "{arch}.rope.dimension_count"
    ROPE_FREQ_BASE = "{arch}.rope.freq_base"
    ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"
    ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"
    ROPE_SCALE_LINEAR = "{arch}.rope.scale_linear"
    # YaRN context extension (DeepSeek-V2/V3)
    ROPE_SCALING_ORIG_CTX = "{arch}.rope.scaling.original_context_length"
    ROPE_SCALING_YARN_BETA_FAST = "{arch}.rope.scaling.yarn_beta_fast"
    ROPE_SCALING_YARN_BETA_SLOW = "{arch}.rope.scaling.yarn_beta_slow"
    ROPE_SCALING_YARN_LOG_MUL = "{arch}.rope.scaling.yarn_log_multiplier"
    # multi-head latent attention (deepseek2)
    Q_LORA_RANK = "{arch}.attention.q_lora_rank"
    KV_LORA_RANK = "{arch}.attention.kv_lora_rank"
    KEY_LENGTH_MLA = "{arch}.attention.key_length_mla"
    VALUE_LENGTH_MLA = "{arch}.attention.value_length_mla"
    # mixture of experts
    EXPERT_COUNT = "{arch}.expert_count"
    EXPERT_USED_COUNT = "{arch}.expert_used_count"
    EXPERT_SHARED_COUNT = "{arch}.expert_shared_count"
    EXPERT_FEED_FORWARD_LENGTH = "{arch}.expert_feed_forward_length"
    EXPERT_WEIGHTS_SCALE = "{arch}.expert_weights_scale"
    EXPERT_WEIGHTS_NORM = "{arch}.expert_weights_norm"
    EXPERT_GATING_FUNC = "{arch}.expert_gating_func"
    EXPERT_GROUP_COUNT = "{arch}.expert_group_count"
    EXPERT_GROUP_USED_COUNT = "{arch}.expert_group_used_count"
    LEADING_DENSE_BLOCK_COUNT = "{arch}.leading_dense_block_count"

    def of(self, arch: str) -> str:
        return self.value.format(arch=arch)


def read_meta(g, arch: str, key: Key, default=None, kind=int):
    """The value of ``key`` for ``arch`` in GGUF file ``g``, converted by ``kind``; ``default`` when
    absent (None: required). A missing or malformed value is a one-line CpuinferError."""
    full = key.of(arch)
    v = g.get(full, default)
    if v is None:
        raise CpuinferError(f"{g.path}: metadata key {full} is missing")
    try:
        v = kind(v)
    except (TypeError, ValueError):
        raise CpuinferError(f"{g.path}: metadata key {full} = {v!r}, expected {kind.__name__}") from None
    return v


class Tn(str, enum.Enum):
    """GGUF tensor names; ``{bid}`` is the block (layer) index. Suffix ``.weight``/``.bias`` added by :func:`tensor_name`."""
    TOKEN_EMBD = "token_embd"
    OUTPUT_NORM = "output_norm"
    OUTPUT = "output"
    ROPE_FREQS = "rope_freqs"
    ATTN_NORM = "blk.{bid}.attn_norm"
    ATTN_Q = "blk.{bid}.attn_q"
    ATTN_K = "blk.{bid}.attn_k"
    ATTN_V = "blk.{bid}.attn_v"
    ATTN_OUT = "blk.{bid}.attn_output"
    FFN_NORM = "blk.{bid}.ffn_norm"
    FFN_GATE = "blk.{bid}.ffn_gate"
    FFN_UP = "blk.{bid}.ffn_up"
    FFN_DOWN = "blk.{bid}.ffn_down"
    # per-head q/k RMS norms (qwen3moe)
    ATTN_Q_NORM = "blk.{bid}.attn_q_norm"
    ATTN_K_NORM = "blk.{bid}.attn_k_norm"
    # multi-head latent attention (deepseek2)
    ATTN_Q_A = "blk.{bid}.attn_q_a"
    ATTN_Q_A_NORM = "blk.{bid}.attn_q_a_norm"
    ATTN_Q_B = "blk.{bid}.attn_q_b"
    ATTN_KV_A_MQA = "blk.{bid}.attn_kv_a_mqa"
    ATTN_KV_A_NORM = "blk.{bid}.attn_kv_a_norm"
    ATTN_K_B = "blk.{bid}.attn_k_b"
    ATTN_V_B = "blk.{bid}.attn_v_b"
    # mixture of experts: router, selection bias, stacked routed experts, shared experts
    FFN_GATE_INP = "blk.{bid}.ffn_gate_inp"
    FFN_EXP_PROBS_B = "blk.{bid}.exp_probs_b"
    FFN_GATE_EXPS = "blk.{bid}.ffn_gate_exps"
    FFN_UP_EXPS = "blk.{bid}.ffn_up_exps"
    FFN_DOWN_EXPS = "blk.{bid}.ffn_down_exps"
    FFN_GATE_SHEXP = "blk.{bid}.ffn_gate_shexp"
    FFN_UP_SHEXP = "blk.{bid}.ffn_up_shexp"
    FFN_DOWN_SHEXP = "blk.{bid}.ffn_down_shexp"


def tensor_name(tn: Tn, bid: int | None = None, suffix: str = "weight") -> str:
    base = tn.value.format(bid=bid) if bid is not None else tn.value
    return f"{base}.{suffix}"


class RopeType(enum.Enum):
    """How RoPE pairs the dimensions of a head (ggml ``GGML_ROPE_TYPE_*``)."""
    NORM = 0   # adjacent pairs (2i, 2i+1): llama (the converter permutes q/k weights for this), deepseek2's rope part
    NEOX = 2   # halves (i, i + d/2): qwen2, qwen3moe


@dataclass(frozen=True)
class ArchInfo:
    name: str          # GGUF general.architecture
    family: str        # the forward implementation (module in cpuinfer.models)
    rope_type: RopeType
    description: str


ARCHITECTURES: dict[str, ArchInfo] = {a.name: a for a in (
    ArchInfo("llama", "llama", RopeType.NORM, "Llama 2/3, SmolLM2, DeepSeek-R1-Distill-Llama"),
    ArchInfo("qwen2", "llama", RopeType.NEOX, "Qwen2/2.5, DeepSeek-R1-Distill-Qwen (q/k/v biases)"),
    ArchInfo("deepseek2", "deepseek2", RopeType.NORM,
             "DeepSeek-V2/V2-Lite/V3/R1: multi-head latent attention, YaRN, routed + shared experts"),
    ArchInfo("qwen3moe", "qwen3moe", RopeType.NEOX, "Qwen3-MoE: GQA with q/k norms, softmax top-k experts"),
)}
