"""The deepseek2 family: DeepSeek-V2, V2-Lite, V3 and R1 (GGUF architecture ``deepseek2``).

Decoder blocks = multi-head latent attention (MLA) + a dense FFN for the first
``leading_dense_block_count`` blocks, then mixture-of-experts blocks (routed experts, see
:mod:`cpuinfer.moe`, plus ``expert_shared_count`` shared experts as one dense SwiGLU FFN).

MLA as llama.cpp lays it out (per token; nope = key_length_mla − rope, L = kv_lora_rank)::

    q        = q_b(norm(q_a(x)))   or  attn_q(x)          [n_head, nope + rope]
    kv       = kv_a_mqa(x)                                [L + rope]
    latent   = norm(kv[:L])          k_pe = rope(kv[L:])  (one rope key shared by all heads)
    q_lat[h] = k_b[h] · q[h, :nope]                       k_b[h]: [L, nope]  (absorbed key proj.)
    score    = (q_lat[h]·latent_j + rope(q[h, nope:])·k_pe_j) · kq_scale
    o[h]     = v_b[h] · Σ_j softmax(score)_j latent_j     v_b[h]: [v_dim, L]
    out      = attn_output(o)

so the cache holds only ``latent ‖ k_pe`` (L + rope values, 576 for R1) per token and layer:
attention is MQA with one key head of L + rope dims whose first L dims are also the value.

YaRN (``rope.scaling.type = yarn``): each rope frequency blends its interpolated (÷ factor) and
original value by a ramp over the dims between the ``beta_fast``/``beta_slow`` correction dims of
``original_context_length``; the rotation keeps unit magnitude (llama.cpp's attn_factor and its
internal ``1 + 0.1 ln factor`` cancel for deepseek2) and the score scale becomes
``mscale² / sqrt(key_length_mla)`` with ``mscale = 1 + 0.1 · mscale_all_dim · ln factor``,
``mscale_all_dim = yarn_log_multiplier / 0.1`` (the converter stores it pre-multiplied by 0.1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import prange

from quant import kernels as qk
from quant.jit import inline_kernel, kernel, parallel_kernel
from quant.kernels import matmul_kernel

from .. import ops
from ..attention import attention
from ..blocks import matmul_parts, matrix_args, swiglu_ffn
from ..arch import ArchInfo, Key, RopeType, Tn, read_meta, tensor_name
from ..errors import CpuinferError
from ..gguf import GGUFFile
from ..kvcache import BYTES_PER_VALUE
from ..moe import Gating, MoeBuffers, MoeConfig, MoeWeights, moe_kernel
from ..weights import QTensor, TensorLoader, matmul_scratch


@dataclass(frozen=True)
class Config:
    arch: str
    rope_type: RopeType
    n_vocab: int
    d_model: int
    n_layer: int
    n_head: int
    q_lora: int                 # 0 = plain attn_q (V2-Lite)
    kv_lora: int
    nope: int                   # no-rope part of a q/k head
    rope_dims: int              # rope part of a q/k head (and of the shared k_pe)
    v_dim: int                  # value head size
    n_ff: int                   # dense FFN (leading blocks)
    n_dense: int                # leading dense blocks
    n_ff_shexp: int             # shared experts' FFN rows (n_shared · expert ff), 0 = none
    moe: MoeConfig
    rms_eps: float
    rope_base: float
    rope_factor: float          # YaRN factor (1 = no scaling)
    rope_orig_ctx: int
    yarn_beta_fast: float
    yarn_beta_slow: float
    yarn_log_mul: float         # mscale_all_dim (file value / 0.1), 0 = not set
    n_ctx_train: int

    @classmethod
    def from_gguf(cls, g: GGUFFile, info: ArchInfo) -> "Config":
        a = info.name
        d = read_meta(g, a, Key.EMBEDDING_LENGTH)
        n_head = read_meta(g, a, Key.HEAD_COUNT)
        rope_dims = read_meta(g, a, Key.ROPE_DIMENSION_COUNT)
        kv_lora = read_meta(g, a, Key.KV_LORA_RANK)
        k_mla = read_meta(g, a, Key.KEY_LENGTH_MLA, -1)
        v_mla = read_meta(g, a, Key.VALUE_LENGTH_MLA, -1)
        if k_mla < 0 or v_mla < 0:
            # older conversions store the MLA head sizes in key_length/value_length and carry the
            # combined attn_kv_b tensor instead of attn_k_b/attn_v_b
            raise CpuinferError(f"{g.path}: metadata keys {Key.KEY_LENGTH_MLA.of(a)}/{Key.VALUE_LENGTH_MLA.of(a)} "
                                f"are missing (a conversion from before llama.cpp's MLA split; reconvert the model)")
        if rope_dims <= 0 or rope_dims % 2 or rope_dims >= k_mla:
            raise CpuinferError(f"{g.path}: {Key.ROPE_DIMENSION_COUNT.of(a)} = {rope_dims}, expected an even number "
                                f"below {Key.KEY_LENGTH_MLA.of(a)} = {k_mla}")
        n_layer = read_meta(g, a, Key.BLOCK_COUNT)
        n_dense = read_meta(g, a, Key.LEADING_DENSE_BLOCK_COUNT, 0)
        n_ff_exp = read_meta(g, a, Key.EXPERT_FEED_FORWARD_LENGTH, 0 if n_dense >= n_layer else None)
        moe = MoeConfig(
            n_expert=read_meta(g, a, Key.EXPERT_COUNT, 0 if n_dense >= n_layer else None),
            n_used=read_meta(g, a, Key.EXPERT_USED_COUNT, 0 if n_dense >= n_layer else None),
            n_ff=n_ff_exp,
            gating=Gating(read_meta(g, a, Key.EXPERT_GATING_FUNC, int(Gating.SOFTMAX))),
            norm_w=bool(g.get(Key.EXPERT_WEIGHTS_NORM.of(a), False)),
            w_scale=float(g.get(Key.EXPERT_WEIGHTS_SCALE.of(a), 0.0)) or 1.0,
            n_group=read_meta(g, a, Key.EXPERT_GROUP_COUNT, 1),
            n_group_used=read_meta(g, a, Key.EXPERT_GROUP_USED_COUNT, 1),
        )
        if n_dense < n_layer:
            moe.validate(g.path)
        scale_type = g.get(Key.ROPE_SCALING_TYPE.of(a), "none")
        factor = float(g.get(Key.ROPE_SCALING_FACTOR.of(a), 1.0) or 1.0)
        if scale_type not in ("none", "yarn") and factor != 1.0:
            raise CpuinferError(f"{g.path}: {Key.ROPE_SCALING_TYPE.of(a)} = {scale_type!r} is not supported "
                                f"for {a} (expected none or yarn)")
        if scale_type != "yarn":
            factor = 1.0
        n_ctx_train = read_meta(g, a, Key.CONTEXT_LENGTH, 4096)
        return cls(
            arch=a, rope_type=info.rope_type,
            n_vocab=g.tensor(tensor_name(Tn.TOKEN_EMBD)).shape[0], d_model=d, n_layer=n_layer,
            n_head=n_head, q_lora=read_meta(g, a, Key.Q_LORA_RANK, 0), kv_lora=kv_lora,
            nope=k_mla - rope_dims, rope_dims=rope_dims, v_dim=v_mla,
            n_ff=read_meta(g, a, Key.FEED_FORWARD_LENGTH, 0), n_dense=n_dense,
            n_ff_shexp=read_meta(g, a, Key.EXPERT_SHARED_COUNT, 0) * n_ff_exp, moe=moe,
            rms_eps=read_meta(g, a, Key.RMS_EPS, kind=float),
            rope_base=read_meta(g, a, Key.ROPE_FREQ_BASE, 10000.0, kind=float),
            rope_factor=factor,
            rope_orig_ctx=read_meta(g, a, Key.ROPE_SCALING_ORIG_CTX, n_ctx_train),
            yarn_beta_fast=read_meta(g, a, Key.ROPE_SCALING_YARN_BETA_FAST, 32.0, kind=float),
            yarn_beta_slow=read_meta(g, a, Key.ROPE_SCALING_YARN_BETA_SLOW, 1.0, kind=float),
            yarn_log_mul=read_meta(g, a, Key.ROPE_SCALING_YARN_LOG_MUL, 0.0, kind=float) / 0.1,
            n_ctx_train=n_ctx_train,
        )

    @property
    def kv_width(self) -> int:
        """Cached values per token and layer: latent ‖ rope key."""
        return self.kv_lora + self.rope_dims

    @property
    def kv_bytes_per_token(self) -> int:
        """f16 latent + rope key for every layer: layers × (kv_lora + rope) × 2 bytes."""
        return self.n_layer * self.kv_width * BYTES_PER_VALUE

    @property
    def yarn_attn_factor(self) -> float:
        """Magnitude of the rotation (llama.cpp's yarn_attn_factor as deepseek2 ends up using it)."""
        f = self.rope_factor
        if f <= 1.0 or self.yarn_log_mul != 0.0:
            return 1.0
        return 1.0 + 0.1 * math.log(f)

    @property
    def kq_scale(self) -> float:
        m = self.yarn_attn_factor
        if self.rope_factor > 1.0:
            m *= 1.0 + 0.1 * self.yarn_log_mul * math.log(self.rope_factor)
        return m * m / math.sqrt(self.nope + self.rope_dims)


def yarn_rope_table(n_ctx: int, n_dims: int, base: float, factor: float, n_ctx_orig: int,
                    beta_fast: float, beta_slow: float, mscale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [n_ctx, n_dims/2] of YaRN angles, times ``mscale`` (ggml ``rope_yarn``, ext_factor 1).

    θ_i(p) = p · base^(−2i/n_dims) blended as θ·(1 − r_i)/factor + θ·r_i, where the ramp r_i is 1
    below the correction dim of ``beta_fast`` (fast, high-frequency dims keep their angle), 0 above
    that of ``beta_slow`` (interpolated), linear between. factor 1 gives plain RoPE.
    """
    half = n_dims // 2
    i = np.arange(half, dtype=np.float64)
    theta = base ** (-2.0 * i / n_dims)
    if factor > 1.0:
        def corr_dim(n_rot):
            return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(0.0, math.floor(corr_dim(beta_fast)))
        high = min(n_dims - 1.0, math.ceil(corr_dim(beta_slow)))
        ramp = 1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)
        theta = theta / factor * (1.0 - ramp) + theta * ramp
    ang = np.arange(n_ctx, dtype=np.float64)[:, None] * theta[None, :]
    return (np.cos(ang) * mscale).astype(np.float32), (np.sin(ang) * mscale).astype(np.float32)


@dataclass(frozen=True)
class Ffn:
    gate: QTensor
    up: QTensor
    down: QTensor
    gate_up: QTensor | None = None     # gate ‖ up when joined at load (:mod:`cpuinfer.blocks`)


@dataclass(frozen=True)
class Layer:
    attn_norm: np.ndarray              # [d]
    wq_a: QTensor | None               # [q_lora, d]
    q_a_norm: np.ndarray | None        # [q_lora]
    wq_b: QTensor | None               # [n_head·(nope+rope), q_lora]
    wq: QTensor | None                 # [n_head·(nope+rope), d]   (no q-LoRA)
    wkv_a: QTensor                     # [kv_lora + rope, d]
    kv_a_norm: np.ndarray              # [kv_lora]
    wk_b: QTensor                      # stacked [n_head, kv_lora, nope]
    wv_b: QTensor                      # stacked [n_head, v_dim, kv_lora]
    wo: QTensor                        # [d, n_head·v_dim]
    ffn_norm: np.ndarray               # [d]
    ffn: Ffn | None                    # dense FFN (leading blocks)
    moe: MoeWeights | None             # routed experts (other blocks)
    shexp: Ffn | None                  # shared experts
    w_in: QTensor | None = None        # (wq_a or wq) ‖ wkv_a when joined at load: both read norm(x)


def _ffn(t: TensorLoader, gate: Tn, up: Tn, down: Tn, i: int, ff: int, d: int) -> Ffn:
    gate_up, (g, u) = t.joined((tensor_name(gate, i), tensor_name(up, i)), (ff, ff), d)
    return Ffn(g, u, t.matrix(tensor_name(down, i), d, ff), gate_up)


@dataclass(frozen=True)
class Weights:
    token_embd: QTensor
    layers: tuple[Layer, ...]
    output_norm: np.ndarray
    output: QTensor
    n_used: int                        # routed experts per token
    layer_args: tuple = ()             # per layer, the compiled blocks' arguments (built at load)

    @classmethod
    def from_gguf(cls, t: TensorLoader, c: Config) -> "Weights":
        d, nh, hk = c.d_model, c.n_head, c.nope + c.rope_dims
        layers = []
        for i in range(c.n_layer):
            def name(tn, suffix="weight"):
                return tensor_name(tn, i, suffix)
            lora = c.q_lora > 0
            moe = shexp = ffn = None
            if i < c.n_dense:
                ffn = _ffn(t, Tn.FFN_GATE, Tn.FFN_UP, Tn.FFN_DOWN, i, c.n_ff, d)
            else:
                m, ne = c.moe, c.moe.n_expert
                bias_name = name(Tn.FFN_EXP_PROBS_B, "bias")
                moe = MoeWeights(
                    gate_inp=t.matrix(name(Tn.FFN_GATE_INP), ne, d),
                    probs_b=(t.vector(bias_name, ne) if t.has(bias_name) else np.zeros(ne, np.float32)),
                    gate=t.stacked(name(Tn.FFN_GATE_EXPS), ne, m.n_ff, d),
                    up=t.stacked(name(Tn.FFN_UP_EXPS), ne, m.n_ff, d),
                    down=t.stacked(name(Tn.FFN_DOWN_EXPS), ne, d, m.n_ff))
                if c.n_ff_shexp:
                    shexp = _ffn(t, Tn.FFN_GATE_SHEXP, Tn.FFN_UP_SHEXP, Tn.FFN_DOWN_SHEXP, i, c.n_ff_shexp, d)
            # the two products of norm(x): q's (its LoRA down-projection, or q itself) and kv's
            q_in, q_rows = (Tn.ATTN_Q_A, c.q_lora) if lora else (Tn.ATTN_Q, nh * hk)
            w_in, (wq_in, wkv_a) = t.joined((name(q_in), name(Tn.ATTN_KV_A_MQA)),
                                            (q_rows, c.kv_width), d)
            layers.append(Layer(
                attn_norm=t.vector(name(Tn.ATTN_NORM), d),
                wq_a=wq_in if lora else None,
                q_a_norm=t.vector(name(Tn.ATTN_Q_A_NORM), c.q_lora) if lora else None,
                wq_b=t.matrix(name(Tn.ATTN_Q_B), nh * hk, c.q_lora) if lora else None,
                wq=None if lora else wq_in,
                wkv_a=wkv_a,
                kv_a_norm=t.vector(name(Tn.ATTN_KV_A_NORM), c.kv_lora),
                wk_b=t.stacked(name(Tn.ATTN_K_B), nh, c.kv_lora, c.nope),
                wv_b=t.stacked(name(Tn.ATTN_V_B), nh, c.v_dim, c.kv_lora),
                wo=t.matrix(name(Tn.ATTN_OUT), d, nh * c.v_dim),
                ffn_norm=t.vector(name(Tn.FFN_NORM), d),
                ffn=ffn, moe=moe, shexp=shexp, w_in=w_in))
        embd, output = t.embeddings_and_output(tensor_name(Tn.TOKEN_EMBD), tensor_name(Tn.OUTPUT),
                                               c.n_vocab, d)
        return cls(embd, tuple(layers), t.vector(tensor_name(Tn.OUTPUT_NORM), d), output, c.moe.n_used,
                   tuple(_layer_inputs(L) for L in layers))

    def streamed_bytes(self) -> int:
        """Weight bytes read per decoded token: attention, dense and shared FFNs, routers, the
        routed experts' bytes × n_used / n_expert, the output head and one embedding row."""
        total = self.output.nbytes + self.token_embd.raw.shape[-1]
        for L in self.layers:
            mats = [L.wq_a, L.wq_b, L.wq, L.wkv_a, L.wk_b, L.wv_b, L.wo]
            for f in (L.ffn, L.shexp):
                if f is not None:
                    mats += [f.gate, f.up, f.down]
            total += sum(m.nbytes for m in mats if m is not None)
            if L.moe is not None:
                ne = L.moe.gate.raw.shape[0]
                total += L.moe.gate_inp.nbytes + L.moe.routed_bytes() * self.n_used // ne
        return total


class State:
    """Activation buffers for up to ``n_batch`` tokens, allocated once."""

    def __init__(self, c: Config, w: Weights, n_batch: int):
        f32 = np.float32
        nh, hk = c.n_head, c.nope + c.rope_dims
        ff = max(c.n_ff, c.n_ff_shexp, 1)
        self.n_batch = n_batch
        self.tokens = np.zeros(n_batch, np.int64)
        self.x = np.zeros((n_batch, c.d_model), f32)
        self.xb = np.zeros((n_batch, c.d_model), f32)
        self.xo = np.zeros((n_batch, c.d_model), f32)
        self.xm = np.zeros((n_batch, c.d_model), f32)            # routed experts' output
        self.qa = np.zeros((n_batch, max(c.q_lora, 1)), f32)
        self.qa_n = np.zeros((n_batch, max(c.q_lora, 1)), f32)
        self.q = np.zeros((n_batch, nh * hk), f32)
        self.kva = np.zeros((n_batch, c.kv_width), f32)
        self.q_mqa = np.zeros((n_batch, nh, c.kv_width), f32)    # absorbed query ‖ rotated q_pe
        self.o_lat = np.zeros((n_batch, nh, c.kv_lora), f32)     # attention output in latent space
        self.att = np.zeros((n_batch, nh * c.v_dim), f32)
        # one head's gathered input / output rows (flat, reshaped per use so they stay contiguous),
        # or for one token every head's, with per-head quantized activations
        self.hbuf_in = np.zeros(max(n_batch, nh) * max(c.nope, c.kv_lora), f32)
        self.hbuf_out = np.zeros(max(n_batch, nh) * max(c.kv_lora, c.v_dim), f32)
        self.head_scratch = matmul_scratch(nh, max(c.nope, c.kv_lora))
        self.ffn = np.zeros(3 * n_batch * ff, f32)        # dense / shared FFN: gate, up, hidden (flat)
        self.q_in = np.zeros(n_batch * (max(c.q_lora, nh * hk) + c.kv_width), f32)  # joint product
        self.logits = np.zeros((1, c.n_vocab), f32)
        # quantized activations of every mat-mul, the per-head k_b / v_b ones included
        self.scratch = matmul_scratch(n_batch, max(c.d_model, c.q_lora, nh * hk, nh * c.v_dim, c.kv_lora, ff))
        moe_layers = [L.moe for L in w.layers if L.moe is not None]
        self.moe = MoeBuffers(c.moe, c.d_model, n_batch, moe_layers) if moe_layers else None


class KVCache:
    """Per layer and position the normed latent (kv_lora) and the rotated rope key as IEEE half
    bits: uint16 [n_layer, n_ctx, kv_lora + rope] (llama.cpp's f16 cache), allocated once per
    context, plus the attention scratch (a score row and a half-rounded query per head)."""

    def __init__(self, c: Config, n_ctx: int):
        self.n_ctx = n_ctx
        self.kv = np.zeros((c.n_layer, n_ctx, c.kv_width), np.uint16)
        self.scores = np.zeros((c.n_head, n_ctx), np.float32)
        self.qh = np.zeros((c.n_head, c.kv_width), np.float32)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


@inline_kernel
def _per_head_matmul(qtype, w, src, dst, xbuf, ybuf, scratch):
    """``dst[t, h] = W[h] · src[t, h]`` for every head h of stacked ``w`` [n_head, rows, row_bytes];
    ``src`` [n, n_head, cols] and ``dst`` [n, n_head, rows] may be strided views, ``xbuf``/``ybuf``
    gather one head's rows so each head is one (parallel) mat-mul over its tokens."""
    n, n_head, cols = src.shape
    rows = dst.shape[2]
    xs = xbuf[:n * cols].reshape((n, cols))
    ys = ybuf[:n * rows].reshape((n, rows))
    for h in range(n_head):
        for t in range(n):
            for i in range(cols):
                xs[t, i] = src[t, h, i]
        qk.matmul_kernel(qtype, w[h], xs, ys, scratch)
        for t in range(n):
            for i in range(rows):
                dst[t, h, i] = ys[t, i]


@parallel_kernel
def _per_head_matvec(qtype, w, src, dst, xbuf, ybuf, scratch):
    """One token's :func:`_per_head_matmul` (same results), parallel over heads: one head's
    mat-vec (a few tens of KB) is too small to split over threads, and 128 heads × 2 per layer
    would each pay a parallel region. ``xbuf``/``ybuf``/``scratch`` hold one slice per head."""
    n_head, cols = src.shape[1], src.shape[2]
    rows = dst.shape[2]
    per = qk.act_scratch_bytes(qtype, 1, cols)
    for h in prange(n_head):
        xs = xbuf[h * cols:(h + 1) * cols].reshape((1, cols))
        ys = ybuf[h * rows:(h + 1) * rows].reshape((1, rows))
        for i in range(cols):
            xs[0, i] = src[0, h, i]
        qk.matmul_serial(qtype, w[h], xs, ys, scratch[h * per:(h + 1) * per])
        for i in range(rows):
            dst[0, h, i] = ys[0, i]


_NO_VEC = np.zeros(0, np.float32)        # stand-in for an absent norm (never read)
_NO_VEC.flags.writeable = False
_m = matrix_args


def _ffn_inputs(f: Ffn | None) -> tuple:
    return (*_m(f and f.gate_up), *_m(f and f.gate), *_m(f and f.up), *_m(f and f.down))


def _layer_inputs(L: Layer) -> tuple:
    """(attention args, is_moe, FFN args) of one layer for :func:`_mla_block` and
    :func:`_dense_block` / :func:`_moe_block`: raw blocks + type codes, norms, placeholders for
    absent parts."""
    has_qa = L.wq is None
    attn = (L.attn_norm, has_qa, *_m(L.w_in), *_m(L.wq_a), L.q_a_norm if has_qa else _NO_VEC,
            *_m(L.wq_b), *_m(L.wq), *_m(L.wkv_a), L.kv_a_norm, *_m(L.wk_b), *_m(L.wv_b), *_m(L.wo))
    if L.moe is None:
        return attn, False, (L.ffn_norm, *_ffn_inputs(L.ffn))
    return attn, True, (L.ffn_norm, L.moe.kernel_args(), L.shexp is not None,
                        *_ffn_inputs(L.shexp))


@inline_kernel
def _heads(qtype, w, src, dst, hbuf_in, hbuf_out, head_scratch, scratch):
    """``dst[:, h] = W[h] · src[:, h]`` for every head: per head over threads for one token
    (:func:`_per_head_matvec`), else per head one parallel mat-mul over its tokens."""
    if src.shape[0] == 1:
        _per_head_matvec(qtype, w, src, dst, hbuf_in, hbuf_out, head_scratch)
    else:
        _per_head_matmul(qtype, w, src, dst, hbuf_in, hbuf_out, scratch)


@kernel
def _mla_block(n, p0, li, eps, kq_scale, neox, nh, nope,
               x_all, xb_all, xo_all, q_all, qa_all, qa_n_all, kva_all, q_mqa_all, o_lat_all,
               att_all, q_in_flat, hbuf_in, hbuf_out, head_scratch, scratch, kv_all, scores, qh,
               cos, sin, attn_norm, has_qa, w_in, t_in, wq_a, tq_a, q_a_norm, wq_b, tq_b, wq, tq,
               wkv_a, tkv_a,
               kv_a_norm, wk_b, tk_b, wv_b, tv_b, wo, to):
    """MLA attention of one layer for tokens 0..n-1 at positions p0.. (module docstring), in one
    compiled call: x += attn_output(MLA(norm(x)))."""
    x, xb, xo = x_all[:n], xb_all[:n], xo_all[:n]                        # [n, d]
    q, kva, q_mqa = q_all[:n], kva_all[:n], q_mqa_all[:n]
    o_lat, att = o_lat_all[:n], att_all[:n]
    L_ = kv_a_norm.shape[0]
    width = kva.shape[1]                                                 # L + rope
    hk = q.shape[1] // nh                                                # nope + rope
    ops.rmsnorm(x, attn_norm, eps, xb)
    # the two products of norm(x): q's LoRA down-projection (or q itself) and kv's
    q_in = qa_all[:n] if has_qa else q                                   # [n, q_lora] or [n, nh·hk]
    matmul_parts(xb, scratch, q_in_flat, w_in, t_in, 2, q_in, wq_a if has_qa else wq,
                 tq_a if has_qa else tq, kva, wkv_a, tkv_a, kva, wkv_a, tkv_a)  # kva: [n, L + rope]
    if has_qa:
        qa_n = qa_n_all[:n]
        ops.rmsnorm(q_in, q_a_norm, eps, qa_n)
        matmul_kernel(tq_b, wq_b, qa_n, q, scratch)                      # [n, nh·(nope+rope)]
    # cache (f16): normed latent ‖ rotated rope key at p0..p0+n-1
    ops.rmsnorm(kva[:, :L_], kv_a_norm, eps, kva[:, :L_])
    kva3 = kva.reshape((n, 1, width))
    ops.rope_kernel(kva3[:, :, L_:], cos, sin, p0, neox)
    kc = kv_all[li].reshape((kv_all.shape[1], 1, width))                 # [ctx, 1, L + rope]
    ops.store_f16(kva3, kc[p0:p0 + n])
    # query: absorbed no-rope part ‖ rotated rope part
    q3 = q.reshape((n, nh, hk))
    ops.rope_kernel(q3[:, :, nope:], cos, sin, p0, neox)
    _heads(tk_b, wk_b, q3[:, :, :nope], q_mqa[:, :, :L_], hbuf_in, hbuf_out, head_scratch,
           scratch)                                                      # [n, nh, L]
    q_mqa[:, :, L_:] = q3[:, :, nope:]
    attention(q_mqa, kc, kc, p0, kq_scale, scores, qh, o_lat)  # MQA, V = the first L of each row
    _heads(tv_b, wv_b, o_lat, att.reshape((n, nh, att.shape[1] // nh)), hbuf_in, hbuf_out,
           head_scratch, scratch)                                        # [n, nh, v_dim]
    matmul_kernel(to, wo, att, xo, scratch)                              # [n, d]
    ops.add_into(x, xo)


@kernel
def _dense_block(n, eps, x_all, xb_all, xo_all, xm_all, ffn_flat, scratch,
                 ffn_norm, wgu, tgu, wg, tg, wu, tu, wd, td):
    """x += FFN(norm(x)) for a leading dense block."""
    x, xb, xo = x_all[:n], xb_all[:n], xo_all[:n]
    ops.rmsnorm(x, ffn_norm, eps, xb)
    swiglu_ffn(xb, xo, ffn_flat, scratch, wgu, tgu, wg, tg, wu, tu, wd, td)
    ops.add_into(x, xo)


@kernel
def _moe_block(n, eps, x_all, xb_all, xo_all, xm_all, ffn_flat, scratch,
               ffn_norm, moe_w, has_shexp, wgu, tgu, wg, tg, wu, tu, wd, td, moe_cfg, moe_bufs):
    """x += routed experts(norm(x)) + shared experts(norm(x)) for a MoE block."""
    x, xb, xo, xm = x_all[:n], xb_all[:n], xo_all[:n], xm_all[:n]
    ops.rmsnorm(x, ffn_norm, eps, xb)
    moe_kernel(xb, xm, moe_cfg, moe_w, moe_bufs)                         # [n, d]
    ops.add_into(x, xm)
    if has_shexp:
        swiglu_ffn(xb, xo, ffn_flat, scratch, wgu, tgu, wg, tg, wu, tu, wd, td)
        ops.add_into(x, xo)


def forward(c: Config, w: Weights, s: State, kv: KVCache, rope_cs, n: int, p0: int,
            logits_out: np.ndarray) -> None:
    """Run tokens ``s.tokens[:n]`` at positions p0..p0+n-1; logits of the last
    ``len(logits_out)`` tokens into ``logits_out`` [m, vocab]. Two compiled calls per layer:
    attention (:func:`_mla_block`) and the dense or MoE FFN block."""
    cos, sin = rope_cs
    neox = c.rope_type is RopeType.NEOX
    moe_cfg = c.moe.kernel_args()
    moe_bufs = s.moe.kernel_args() if s.moe is not None else None
    acts = (s.x, s.xb, s.xo, s.xm, s.ffn, s.scratch)
    w.token_embd.get_rows(s.tokens[:n], s.x[:n])
    for li, (attn, is_moe, ffn) in enumerate(w.layer_args):
        _mla_block(n, p0, li, c.rms_eps, c.kq_scale, neox, c.n_head, c.nope,
                   s.x, s.xb, s.xo, s.q, s.qa, s.qa_n, s.kva, s.q_mqa, s.o_lat, s.att, s.q_in,
                   s.hbuf_in, s.hbuf_out, s.head_scratch, s.scratch, kv.kv, kv.scores, kv.qh,
                   cos, sin, *attn)
        if is_moe:
            _moe_block(n, c.rms_eps, *acts, *ffn, moe_cfg, moe_bufs)
        else:
            _dense_block(n, c.rms_eps, *acts, *ffn)
    m = logits_out.shape[0]
    xl = s.xb[n - m:n]
    ops.rmsnorm(s.x[n - m:n], w.output_norm, c.rms_eps, xl)
    w.output.matmul(xl, logits_out, s.scratch)


class Family:
    """What the runtime needs from an architecture family, bound to one loaded file."""

    def __init__(self, g: GGUFFile, info: ArchInfo, loader: TensorLoader):
        self.config = Config.from_gguf(g, info)
        self.weights = Weights.from_gguf(loader, self.config)

    def new_cache(self, n_ctx: int) -> KVCache:
        return KVCache(self.config, n_ctx)

    def new_state(self, n_batch: int) -> State:
        return State(self.config, self.weights, n_batch)

    def rope_tables(self, n_ctx: int):
        c = self.config
        return yarn_rope_table(n_ctx, c.rope_dims, c.rope_base, c.rope_factor, c.rope_orig_ctx,
                               c.yarn_beta_fast, c.yarn_beta_slow, c.yarn_attn_factor)

    def forward(self, state, cache, rope_cs, n, p0, logits_out):
        forward(self.config, self.weights, state, cache, rope_cs, n, p0, logits_out)
