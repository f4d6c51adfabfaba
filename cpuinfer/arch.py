"""Architecture facts as data (after llama.cpp's ``llama-arch``): metadata keys, tensor names,
and which forward implementation and RoPE layout each GGUF architecture uses.

Model code asks for ``Key.BLOCK_COUNT`` or ``Tn.ATTN_Q`` and never formats strings itself.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


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

    def of(self, arch: str) -> str:
        return self.value.format(arch=arch)


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


def tensor_name(tn: Tn, bid: int | None = None, suffix: str = "weight") -> str:
    base = tn.value.format(bid=bid) if bid is not None else tn.value
    return f"{base}.{suffix}"


class RopeType(enum.Enum):
    """How RoPE pairs the dimensions of a head (ggml ``GGML_ROPE_TYPE_*``)."""
    NORM = 0   # adjacent pairs (2i, 2i+1): llama (the converter permutes q/k weights for this)
    NEOX = 2   # halves (i, i + d/2): qwen2, qwen3moe, and the rope part of deepseek2


@dataclass(frozen=True)
class ArchInfo:
    name: str          # GGUF general.architecture
    family: str        # the forward implementation (module in cpuinfer.models)
    rope_type: RopeType
    description: str


ARCHITECTURES: dict[str, ArchInfo] = {a.name: a for a in (
    ArchInfo("llama", "llama", RopeType.NORM, "Llama 2/3, SmolLM2, DeepSeek-R1-Distill-Llama"),
    ArchInfo("qwen2", "llama", RopeType.NEOX, "Qwen2/2.5, DeepSeek-R1-Distill-Qwen (q/k/v biases)"),
)}
