"""The llama family: ``llama`` (Llama 2/3, SmolLM2, R1-Distill-Llama) and ``qwen2``
(Qwen2/2.5, R1-Distill-Qwen): pre-norm decoder, GQA attention with RoPE, SwiGLU FFN.
qwen2 differs only by q/k/v biases (present in the file) and NEOX RoPE (in the arch table).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import ops
from ..attention import attention
from ..blocks import matmul_parts, matrix_args, swiglu_ffn
from ..arch import ArchInfo, Key, RopeType, Tn, read_meta, tensor_name
from ..errors import CpuinferError
from ..gguf import GGUFFile
from ..kvcache import KVCache
from ..weights import QTensor, TensorLoader, matmul_scratch
from quant.jit import kernel
from quant.kernels import matmul_kernel


@dataclass(frozen=True)
class Config:
    arch: str
    rope_type: RopeType
    n_vocab: int
    d_model: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    rms_eps: float
    rope_dims: int
    rope_base: float
    rope_freq_scale: float
    n_ctx_train: int

    @classmethod
    def from_gguf(cls, g: GGUFFile, info: ArchInfo) -> "Config":
        a = info.name
        d = read_meta(g, a, Key.EMBEDDING_LENGTH)
        n_head = read_meta(g, a, Key.HEAD_COUNT)
        n_head_kv = read_meta(g, a, Key.HEAD_COUNT_KV, n_head)
        if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
            raise CpuinferError(f"{g.path}: {Key.HEAD_COUNT.of(a)} = {n_head} is not a multiple of "
                                f"{Key.HEAD_COUNT_KV.of(a)} = {n_head_kv}")
        head_dim = read_meta(g, a, Key.KEY_LENGTH, d // n_head)
        n_vocab = g.tensor(tensor_name(Tn.TOKEN_EMBD)).shape[0]
        scale_type = g.get(Key.ROPE_SCALING_TYPE.of(a), "none")
        factor = float(g.get(Key.ROPE_SCALING_FACTOR.of(a), g.get(Key.ROPE_SCALE_LINEAR.of(a), 1.0)) or 1.0)
        if scale_type not in ("none", "linear") and factor != 1.0:
            raise CpuinferError(f"{g.path}: {Key.ROPE_SCALING_TYPE.of(a)} = {scale_type!r} is not supported "
                                f"for {a} (expected none or linear)")
        cfg = cls(
            arch=a, rope_type=info.rope_type, n_vocab=n_vocab, d_model=d,
            n_layer=read_meta(g, a, Key.BLOCK_COUNT), n_head=n_head, n_head_kv=n_head_kv,
            head_dim=head_dim, n_ff=read_meta(g, a, Key.FEED_FORWARD_LENGTH),
            rms_eps=read_meta(g, a, Key.RMS_EPS, kind=float),
            rope_dims=read_meta(g, a, Key.ROPE_DIMENSION_COUNT, head_dim),
            rope_base=read_meta(g, a, Key.ROPE_FREQ_BASE, 10000.0, kind=float),
            rope_freq_scale=1.0 / factor,
            n_ctx_train=read_meta(g, a, Key.CONTEXT_LENGTH, 2048),
        )
        if cfg.rope_dims > head_dim or cfg.rope_dims % 2:
            raise CpuinferError(f"{g.path}: {Key.ROPE_DIMENSION_COUNT.of(a)} = {cfg.rope_dims}, expected an "
                                f"even number ≤ head size {head_dim}")
        return cfg

    @property
    def kv_bytes_per_token(self) -> int:
        """f16 K and V for every layer: layers × kv_heads × 2·head_dim × 2 bytes."""
        return KVCache.bytes_per_token(self.n_layer, self.n_head_kv, self.head_dim, self.head_dim)


@dataclass(frozen=True)
class Layer:
    attn_norm: np.ndarray            # [d]
    wq: QTensor                      # [n_head·hd, d]
    wk: QTensor                      # [n_kv·hd, d]
    wv: QTensor                      # [n_kv·hd, d]
    bq: np.ndarray | None            # qwen2 biases
    bk: np.ndarray | None
    bv: np.ndarray | None
    wo: QTensor                      # [d, n_head·hd]
    ffn_norm: np.ndarray             # [d]
    w_gate: QTensor                  # [ff, d]
    w_up: QTensor                    # [ff, d]
    w_down: QTensor                  # [d, ff]
    wqkv: QTensor | None = None      # [(n_head + 2·n_kv)·hd, d]: wq ‖ wk ‖ wv when joined at load
    w_gate_up: QTensor | None = None  # [2·ff, d]: w_gate ‖ w_up when joined at load

    def products(self) -> tuple[tuple[str, QTensor], ...]:
        """(role, matrix) of the products the forward runs, in its order."""
        qkv = ((("wqkv", self.wqkv),) if self.wqkv is not None
               else (("wq", self.wq), ("wk", self.wk), ("wv", self.wv)))
        ffn = ((("w_gate_up", self.w_gate_up),) if self.w_gate_up is not None
               else (("w_gate", self.w_gate), ("w_up", self.w_up)))
        return (*qkv, ("wo", self.wo), *ffn, ("w_down", self.w_down))


@dataclass(frozen=True)
class Weights:
    token_embd: QTensor              # [vocab, d]
    layers: tuple[Layer, ...]
    output_norm: np.ndarray          # [d]
    output: QTensor                  # [vocab, d] (token_embd when tied)
    rope_freq_factors: np.ndarray | None
    layer_args: tuple = ()           # per layer, the weights as _layer takes them (built at load)

    @classmethod
    def from_gguf(cls, t: TensorLoader, c: Config) -> "Weights":
        d, q_dim, kv_dim = c.d_model, c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        layers = []
        for i in range(c.n_layer):
            def name(tn, suffix="weight"):
                return tensor_name(tn, i, suffix)
            wqkv, (wq, wk, wv) = t.joined((name(Tn.ATTN_Q), name(Tn.ATTN_K), name(Tn.ATTN_V)),
                                          (q_dim, kv_dim, kv_dim), d)
            w_gate_up, (w_gate, w_up) = t.joined((name(Tn.FFN_GATE), name(Tn.FFN_UP)),
                                                 (c.n_ff, c.n_ff), d)
            layers.append(Layer(
                attn_norm=t.vector(name(Tn.ATTN_NORM), d), wq=wq, wk=wk, wv=wv,
                bq=t.optional_vector(name(Tn.ATTN_Q, "bias"), q_dim),
                bk=t.optional_vector(name(Tn.ATTN_K, "bias"), kv_dim),
                bv=t.optional_vector(name(Tn.ATTN_V, "bias"), kv_dim),
                wo=t.matrix(name(Tn.ATTN_OUT), d, q_dim),
                ffn_norm=t.vector(name(Tn.FFN_NORM), d),
                w_gate=w_gate, w_up=w_up,
                w_down=t.matrix(name(Tn.FFN_DOWN), d, c.n_ff),
                wqkv=wqkv, w_gate_up=w_gate_up,
            ))
        embd, output = t.embeddings_and_output(tensor_name(Tn.TOKEN_EMBD), tensor_name(Tn.OUTPUT),
                                               c.n_vocab, d)
        return cls(token_embd=embd, layers=tuple(layers),
                   output_norm=t.vector(tensor_name(Tn.OUTPUT_NORM), d), output=output,
                   rope_freq_factors=t.optional_vector(tensor_name(Tn.ROPE_FREQS), c.rope_dims // 2),
                   layer_args=tuple(_layer_inputs(L) for L in layers))

    def streamed_bytes(self) -> int:
        """Weight bytes read per decoded token: every matrix once, the output head, one embedding row."""
        mats = [m for L in self.layers for m in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down)]
        return sum(m.nbytes for m in mats) + self.output.nbytes + self.token_embd.raw.shape[-1]


class State:
    """Activation buffers for up to ``n_batch`` tokens, allocated once (llama2.c's RunState)."""

    def __init__(self, c: Config, n_batch: int):
        q_dim, kv_dim = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        f32 = np.float32
        self.n_batch = n_batch
        self.tokens = np.zeros(n_batch, np.int64)
        self.x = np.zeros((n_batch, c.d_model), f32)       # residual stream
        self.xb = np.zeros((n_batch, c.d_model), f32)      # normed input of a sub-block
        self.xo = np.zeros((n_batch, c.d_model), f32)      # sub-block output
        self.q = np.zeros((n_batch, q_dim), f32)
        self.k = np.zeros((n_batch, kv_dim), f32)
        self.v = np.zeros((n_batch, kv_dim), f32)
        self.qkv = np.zeros(n_batch * (q_dim + 2 * kv_dim), f32)   # joint q ‖ k ‖ v product (flat)
        self.att = np.zeros((n_batch, q_dim), f32)
        self.ffn = np.zeros(3 * n_batch * c.n_ff, f32)   # gate, up (or gate ‖ up), hidden (flat)
        self.logits = np.zeros((1, c.n_vocab), f32)         # last token's logits
        self.scratch = matmul_scratch(n_batch, max(c.d_model, q_dim, c.n_ff))  # quantized activations
        # what every layer call gets, in _layer's order (built once: no per-token tuple work)
        self.buffers = (self.x, self.xb, self.xo, self.q, self.k, self.v, self.qkv, self.att,
                        self.ffn, self.scratch)


_NO_BIAS = np.zeros(0, np.float32)   # read-only stand-in for an absent bias (never written)
_NO_BIAS.flags.writeable = False


def _layer_inputs(L: Layer) -> tuple:
    """A layer's weights as :func:`_layer` takes them: raw blocks + integer type code per matrix,
    norms, and biases (empty when absent). Built once at load."""
    m = matrix_args
    bias = [b if b is not None else _NO_BIAS for b in (L.bq, L.bk, L.bv)]
    return (L.attn_norm, *m(L.wqkv), *m(L.wq), *m(L.wk), *m(L.wv), *bias, *m(L.wo),
            L.ffn_norm, *m(L.w_gate_up), *m(L.w_gate), *m(L.w_up), *m(L.w_down))


@kernel
def _layer(n, p0, li, eps, scale, neox, nh, nkv,
           x_all, xb_all, xo_all, q_all, k_all, v_all, qkv_flat, att_all, ffn_flat, scratch,
           k_cache, v_cache, scores, qh, cos, sin,
           attn_norm, wqkv, tqkv, wq, tq, wk, tk, wv, tv, bq, bk, bv, wo, to,
           ffn_norm, w_gu, tgu, w_gate, tg, w_up, tu, w_down, td):
    """One decoder layer for tokens 0..n-1 of the state buffers at positions p0..p0+n-1, in one
    compiled call (no Python between the kernels). ``w*`` are raw uint8 rows [rows, row_bytes]
    with their ``int(GGMLType)`` codes ``t*`` (``wqkv``/``w_gu`` the joint matrices, or empty:
    :mod:`cpuinfer.blocks`); ``b*`` are empty when the layer has no bias;
    ``k_cache``/``v_cache`` are the whole f16 caches [n_layer, ctx, nkv, hd]."""
    x, xb, xo = x_all[:n], xb_all[:n], xo_all[:n]                       # [n, d]
    q, k, v, att = q_all[:n], k_all[:n], v_all[:n], att_all[:n]
    hd = q.shape[1] // nh
    one = n == 1     # one token: the small ops run on this thread (a parallel region costs more)
    # attention: xb = norm(x); q, k, v = xb·Wqᵀ, xb·Wkᵀ, xb·Wvᵀ (+ biases)
    if one:
        ops.rmsnorm_serial(x, attn_norm, eps, xb)                       # [n, d]
    else:
        ops.rmsnorm(x, attn_norm, eps, xb)
    matmul_parts(xb, scratch, qkv_flat, wqkv, tqkv, 3, q, wq, tq, k, wk, tk, v, wv, tv)   # [n, (nh+2·nkv)·hd]
    if bq.shape[0]:
        ops.add_rows(q, bq)
    if bk.shape[0]:
        ops.add_rows(k, bk)
    if bv.shape[0]:
        ops.add_rows(v, bv)
    q3 = q.reshape((n, nh, hd))
    k3 = k.reshape((n, nkv, hd))
    if one:                                                             # rotate q, k at p0..p0+n-1
        ops.rope_serial(q3, cos, sin, p0, neox)
        ops.rope_serial(k3, cos, sin, p0, neox)
    else:
        ops.rope_kernel(q3, cos, sin, p0, neox)
        ops.rope_kernel(k3, cos, sin, p0, neox)
    ops.store_f16(k3, k_cache[li, p0:p0 + n])                           # cache (f16): [ctx, nkv, hd]
    ops.store_f16(v.reshape((n, nkv, hd)), v_cache[li, p0:p0 + n])
    attention(q3, k_cache[li], v_cache[li], p0, scale, scores, qh,
                  att.reshape((n, nh, hd)))                             # [n, nh, hd]
    matmul_kernel(to, wo, att, xo, scratch)                             # [n, d]
    ops.add_into(x, xo)
    # feed-forward: x += W_down · (silu(xb·W_gateᵀ) ⊙ xb·W_upᵀ), xb = norm(x)
    if one:
        ops.rmsnorm_serial(x, ffn_norm, eps, xb)
    else:
        ops.rmsnorm(x, ffn_norm, eps, xb)
    swiglu_ffn(xb, xo, ffn_flat, scratch, w_gu, tgu, w_gate, tg, w_up, tu, w_down, td)  # [n, d]
    ops.add_into(x, xo)


def forward(c: Config, w: Weights, s: State, kv: KVCache, rope_cs, n: int, p0: int,
            logits_out: np.ndarray) -> None:
    """Run tokens ``s.tokens[:n]`` at positions p0..p0+n-1; write the logits of the last
    ``len(logits_out)`` of them into ``logits_out`` [m, vocab].

    Each layer is one compiled call (:func:`_layer`); Python only loops over the layers."""
    cos, sin = rope_cs
    x, xb = s.x[:n], s.xb[:n]
    scale = 1.0 / np.sqrt(c.head_dim)
    neox = c.rope_type is RopeType.NEOX
    w.token_embd.get_rows(s.tokens[:n], x)                            # x: [n, d]
    for li, args in enumerate(w.layer_args):
        _layer(n, p0, li, c.rms_eps, scale, neox, c.n_head, c.n_head_kv, *s.buffers,
               kv.k, kv.v, kv.scores, kv.qh, cos, sin, *args)
    m = logits_out.shape[0]
    xl = xb[n - m:]
    ops.rmsnorm(x[n - m:], w.output_norm, c.rms_eps, xl)              # [m, d]
    w.output.matmul(xl, logits_out, s.scratch)                        # [m, vocab]


class Family:
    """What the runtime needs from an architecture family, bound to one loaded file."""

    def __init__(self, g: GGUFFile, info: ArchInfo, loader: TensorLoader):
        self.config = Config.from_gguf(g, info)
        self.weights = Weights.from_gguf(loader, self.config)

    def new_cache(self, n_ctx: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, n_ctx, c.n_head, c.n_head_kv, c.head_dim, c.head_dim)

    def new_state(self, n_batch: int) -> State:
        return State(self.config, n_batch)

    def rope_tables(self, n_ctx: int):
        c = self.config
        return ops.rope_table(n_ctx, c.rope_dims, c.rope_base, c.rope_freq_scale, self.weights.rope_freq_factors)

    def forward(self, state, cache, rope_cs, n, p0, logits_out):
        forward(self.config, self.weights, state, cache, rope_cs, n, p0, logits_out)
