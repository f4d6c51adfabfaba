"""The qwen3moe family (Qwen3-MoE): GQA attention whose q and k heads are RMS-normed before a
NEOX RoPE, and a mixture-of-experts FFN in every block — softmax over the router logits, the
``expert_used_count`` best experts, their probabilities renormalized to sum 1 (llama.cpp fixes
this for qwen3moe; ``expert_weights_norm`` may override it), no shared experts.

Attention settings (heads, head size, rope) come from :class:`cpuinfer.models.llama.Config`; the
routed experts run through :func:`cpuinfer.moe.moe_ffn`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quant.jit import kernel
from quant.kernels import matmul_kernel

from .. import ops
from ..attention import attention
from ..blocks import matmul_parts, matrix_args
from ..arch import ArchInfo, Key, RopeType, Tn, read_meta, tensor_name
from ..gguf import GGUFFile
from ..kvcache import KVCache
from ..moe import Gating, MoeBuffers, MoeConfig, MoeWeights, moe_kernel
from ..weights import QTensor, TensorLoader, matmul_scratch
from . import llama


@dataclass(frozen=True)
class Config:
    attn: llama.Config           # dims, heads, rope, eps, vocab
    moe: MoeConfig

    @classmethod
    def from_gguf(cls, g: GGUFFile, info: ArchInfo) -> "Config":
        a = info.name
        moe = MoeConfig(
            n_expert=read_meta(g, a, Key.EXPERT_COUNT), n_used=read_meta(g, a, Key.EXPERT_USED_COUNT),
            n_ff=read_meta(g, a, Key.EXPERT_FEED_FORWARD_LENGTH),
            gating=Gating(read_meta(g, a, Key.EXPERT_GATING_FUNC, int(Gating.SOFTMAX))),
            norm_w=bool(g.get(Key.EXPERT_WEIGHTS_NORM.of(a), True)),
            w_scale=float(g.get(Key.EXPERT_WEIGHTS_SCALE.of(a), 0.0)) or 1.0)
        moe.validate(g.path)
        return cls(llama.Config.from_gguf(g, info), moe)

    @property
    def n_vocab(self) -> int:
        return self.attn.n_vocab

    @property
    def n_ctx_train(self) -> int:
        return self.attn.n_ctx_train

    @property
    def kv_bytes_per_token(self) -> int:
        return self.attn.kv_bytes_per_token


@dataclass(frozen=True)
class Layer:
    attn_norm: np.ndarray
    wq: QTensor                  # [n_head·hd, d]
    wk: QTensor                  # [n_kv·hd, d]
    wv: QTensor                  # [n_kv·hd, d]
    q_norm: np.ndarray           # [hd]
    k_norm: np.ndarray           # [hd]
    wo: QTensor                  # [d, n_head·hd]
    ffn_norm: np.ndarray
    moe: MoeWeights
    wqkv: QTensor | None = None  # wq ‖ wk ‖ wv when joined at load (:mod:`cpuinfer.blocks`)


@dataclass(frozen=True)
class Weights:
    token_embd: QTensor
    layers: tuple[Layer, ...]
    output_norm: np.ndarray
    output: QTensor
    n_used: int
    layer_args: tuple = ()           # per layer, _layer's weight arguments (built at load)

    @classmethod
    def from_gguf(cls, t: TensorLoader, c: Config) -> "Weights":
        a, m = c.attn, c.moe
        d, hd = a.d_model, a.head_dim
        q_dim, kv_dim = a.n_head * hd, a.n_head_kv * hd
        layers = []
        for i in range(a.n_layer):
            def name(tn, suffix="weight"):
                return tensor_name(tn, i, suffix)
            bias_name = name(Tn.FFN_EXP_PROBS_B, "bias")
            wqkv, (wq, wk, wv) = t.joined((name(Tn.ATTN_Q), name(Tn.ATTN_K), name(Tn.ATTN_V)),
                                          (q_dim, kv_dim, kv_dim), d)
            layers.append(Layer(
                attn_norm=t.vector(name(Tn.ATTN_NORM), d), wq=wq, wk=wk, wv=wv, wqkv=wqkv,
                q_norm=t.vector(name(Tn.ATTN_Q_NORM), hd),
                k_norm=t.vector(name(Tn.ATTN_K_NORM), hd),
                wo=t.matrix(name(Tn.ATTN_OUT), d, q_dim),
                ffn_norm=t.vector(name(Tn.FFN_NORM), d),
                moe=MoeWeights(
                    gate_inp=t.matrix(name(Tn.FFN_GATE_INP), m.n_expert, d),
                    probs_b=(t.vector(bias_name, m.n_expert) if t.has(bias_name)
                             else np.zeros(m.n_expert, np.float32)),
                    gate=t.stacked(name(Tn.FFN_GATE_EXPS), m.n_expert, m.n_ff, d),
                    up=t.stacked(name(Tn.FFN_UP_EXPS), m.n_expert, m.n_ff, d),
                    down=t.stacked(name(Tn.FFN_DOWN_EXPS), m.n_expert, d, m.n_ff))))
        embd, output = t.embeddings_and_output(tensor_name(Tn.TOKEN_EMBD), tensor_name(Tn.OUTPUT),
                                               a.n_vocab, d)
        return cls(embd, tuple(layers), t.vector(tensor_name(Tn.OUTPUT_NORM), d), output, m.n_used,
                   tuple(_layer_inputs(L) for L in layers))

    def streamed_bytes(self) -> int:
        """Attention and router bytes, the routed experts' bytes × n_used / n_expert, the output
        head and one embedding row."""
        total = self.output.nbytes + self.token_embd.raw.shape[-1]
        for L in self.layers:
            total += sum(m.nbytes for m in (L.wq, L.wk, L.wv, L.wo, L.moe.gate_inp))
            total += L.moe.routed_bytes() * self.n_used // L.moe.gate.raw.shape[0]
        return total


class State:
    """Activation buffers for up to ``n_batch`` tokens, allocated once."""

    def __init__(self, c: Config, w: Weights, n_batch: int):
        a = c.attn
        f32 = np.float32
        q_dim, kv_dim = a.n_head * a.head_dim, a.n_head_kv * a.head_dim
        self.n_batch = n_batch
        self.tokens = np.zeros(n_batch, np.int64)
        self.x = np.zeros((n_batch, a.d_model), f32)
        self.xb = np.zeros((n_batch, a.d_model), f32)
        self.xo = np.zeros((n_batch, a.d_model), f32)
        self.q = np.zeros((n_batch, q_dim), f32)
        self.k = np.zeros((n_batch, kv_dim), f32)
        self.v = np.zeros((n_batch, kv_dim), f32)
        self.qkv = np.zeros(n_batch * (q_dim + 2 * kv_dim), f32)   # joint q ‖ k ‖ v product (flat)
        self.att = np.zeros((n_batch, q_dim), f32)
        self.logits = np.zeros((1, a.n_vocab), f32)
        self.scratch = matmul_scratch(n_batch, max(a.d_model, q_dim))   # quantized activations
        self.moe = MoeBuffers(c.moe, a.d_model, n_batch, [L.moe for L in w.layers])


def _layer_inputs(L: Layer) -> tuple:
    m = matrix_args
    return (L.attn_norm, *m(L.wqkv), *m(L.wq), *m(L.wk), *m(L.wv), L.q_norm, L.k_norm, *m(L.wo),
            L.ffn_norm, L.moe.kernel_args())


@kernel
def _layer(n, p0, li, eps, scale, neox, nh, nkv,
           x_all, xb_all, xo_all, q_all, k_all, v_all, qkv_flat, att_all, scratch,
           k_cache, v_cache, scores, qh, cos, sin,
           attn_norm, wqkv, tqkv, wq, tq, wk, tk, wv, tv, q_norm, k_norm, wo, to, ffn_norm, moe_w,
           moe_cfg, moe_bufs):
    """One decoder layer for tokens 0..n-1 at positions p0..p0+n-1 in one compiled call (as
    :func:`cpuinfer.models.llama._layer`, plus per-head q/k norms and the routed-expert FFN)."""
    x, xb, xo = x_all[:n], xb_all[:n], xo_all[:n]                       # [n, d]
    q, k, v, att = q_all[:n], k_all[:n], v_all[:n], att_all[:n]
    hd = q_norm.shape[0]
    ops.rmsnorm(x, attn_norm, eps, xb)                                  # [n, d]
    matmul_parts(xb, scratch, qkv_flat, wqkv, tqkv, 3, q, wq, tq, k, wk, tk, v, wv, tv)   # [n, (nh+2·nkv)·hd]
    qh_, kh_ = q.reshape((n * nh, hd)), k.reshape((n * nkv, hd))
    ops.rmsnorm(qh_, q_norm, eps, qh_)                                  # per-head q/k norms
    ops.rmsnorm(kh_, k_norm, eps, kh_)
    q3, k3 = q.reshape((n, nh, hd)), k.reshape((n, nkv, hd))
    ops.rope_kernel(q3, cos, sin, p0, neox)
    ops.rope_kernel(k3, cos, sin, p0, neox)
    ops.store_f16(k3, k_cache[li, p0:p0 + n])                           # f16 cache [ctx, nkv, hd]
    ops.store_f16(v.reshape((n, nkv, hd)), v_cache[li, p0:p0 + n])
    attention(q3, k_cache[li], v_cache[li], p0, scale, scores, qh,
                  att.reshape((n, nh, hd)))                             # [n, nh, hd]
    matmul_kernel(to, wo, att, xo, scratch)                             # [n, d]
    ops.add_into(x, xo)
    ops.rmsnorm(x, ffn_norm, eps, xb)
    moe_kernel(xb, xo, moe_cfg, moe_w, moe_bufs)                        # [n, d]
    ops.add_into(x, xo)


def forward(c: Config, w: Weights, s: State, kv: KVCache, rope_cs, n: int, p0: int,
            logits_out: np.ndarray) -> None:
    """Run tokens ``s.tokens[:n]`` at positions p0..p0+n-1; logits of the last
    ``len(logits_out)`` tokens into ``logits_out`` [m, vocab]. One compiled call per layer."""
    a = c.attn
    cos, sin = rope_cs
    x, xb = s.x[:n], s.xb[:n]
    scale = 1.0 / np.sqrt(a.head_dim)
    neox = a.rope_type is RopeType.NEOX
    moe_cfg, moe_bufs = c.moe.kernel_args(), s.moe.kernel_args()

    w.token_embd.get_rows(s.tokens[:n], x)
    for li, args in enumerate(w.layer_args):
        _layer(n, p0, li, a.rms_eps, scale, neox, a.n_head, a.n_head_kv,
               s.x, s.xb, s.xo, s.q, s.k, s.v, s.qkv, s.att, s.scratch,
               kv.k, kv.v, kv.scores, kv.qh, cos, sin, *args, moe_cfg, moe_bufs)
    m = logits_out.shape[0]
    xl = xb[n - m:]
    ops.rmsnorm(x[n - m:], w.output_norm, a.rms_eps, xl)
    w.output.matmul(xl, logits_out, s.scratch)


class Family:
    """What the runtime needs from an architecture family, bound to one loaded file."""

    def __init__(self, g: GGUFFile, info: ArchInfo, loader: TensorLoader):
        self.config = Config.from_gguf(g, info)
        self.weights = Weights.from_gguf(loader, self.config)

    def new_cache(self, n_ctx: int) -> KVCache:
        a = self.config.attn
        return KVCache(a.n_layer, n_ctx, a.n_head, a.n_head_kv, a.head_dim, a.head_dim)

    def new_state(self, n_batch: int) -> State:
        return State(self.config, self.weights, n_batch)

    def rope_tables(self, n_ctx: int):
        a = self.config.attn
        return ops.rope_table(n_ctx, a.rope_dims, a.rope_base, a.rope_freq_scale)

    def forward(self, state, cache, rope_cs, n, p0, logits_out):
        forward(self.config, self.weights, state, cache, rope_cs, n, p0, logits_out)
