"""Mixture-of-experts feed-forward: routing and the expert loop (shared by deepseek2 and qwen3moe).

One layer's routed experts are three stacked tensors in the mapped file, uint8
``[n_expert, rows, row_bytes]`` each: ``gate``/``up`` (rows = expert ff, cols = d_model) and
``down`` (rows = d_model, cols = expert ff). For a batch of ``n`` tokens :func:`moe_ffn` runs one
compiled call that

1. turns router logits into probabilities (softmax or sigmoid, :class:`Gating`), adds the
   selection bias ``exp_probs_b`` for *choosing* experts only, optionally keeps the best
   ``n_group_used`` of ``n_group`` expert groups (group score = sum of its two best biased
   scores, as llama.cpp), and takes the ``n_used`` best experts of each token;
2. weights them by their unbiased probabilities, normalized to sum 1 (``norm_w``) and scaled
   (``w_scale``);
3. groups the (token, expert) pairs by expert (a counting sort) and runs each selected expert
   once over all its tokens — a mat-vec when it has one token, a mat-mat otherwise — straight
   from the mapped stacked tensors; experts no token selected are never read. For one token
   (decode) the gate, up and down mat-vecs of all its experts run as three parallel regions
   (:func:`quant.kernels.matvec_stack`), not three per expert: at 100+ threads a region's
   fork/join costs about as much as one expert's 2048-row mat-vec;
4. adds ``weight · down(silu(gate(x)) ⊙ up(x))`` into each token's output.

The per-expert mat-muls are :func:`quant.kernels.matmul_kernel` (parallel over weight rows), so
quantized activations and every format behave exactly like the dense mat-muls.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

import quant
from quant import kernels as qk
from quant.jit import inline_kernel, kernel

from . import ops
from .errors import CpuinferError
from .weights import QTensor


class Gating(enum.IntEnum):
    """``{arch}.expert_gating_func`` (llama.cpp ``llama_expert_gating_func_type``)."""
    SOFTMAX = 1
    SIGMOID = 2


@dataclass(frozen=True)
class MoeConfig:
    n_expert: int
    n_used: int              # experts per token
    n_ff: int                # rows of one expert's gate/up
    gating: Gating
    norm_w: bool             # normalize the selected weights to sum 1
    w_scale: float           # then multiply them by this (1.0 = no scaling)
    n_group: int = 1         # group-limited routing: experts split into n_group groups ...
    n_group_used: int = 1    # ... of which the best n_group_used are eligible

    def kernel_args(self) -> tuple:
        """(gating, n_group, n_group_used, norm_w, w_scale) for :func:`moe_kernel`."""
        return (int(self.gating), self.n_group, self.n_group_used, self.norm_w,
                np.float32(self.w_scale))

    def validate(self, where: str) -> None:
        if not 0 < self.n_used <= self.n_expert:
            raise CpuinferError(f"{where}: expert_used_count {self.n_used} must be in 1..expert_count {self.n_expert}")
        if self.n_group < 1 or self.n_expert % self.n_group:
            raise CpuinferError(f"{where}: expert_group_count {self.n_group} does not divide expert_count {self.n_expert}")
        if self.n_group > 1:
            if not 0 < self.n_group_used <= self.n_group:
                raise CpuinferError(f"{where}: expert_group_used_count {self.n_group_used} must be in 1..{self.n_group}")
            if (self.n_expert // self.n_group) * self.n_group_used < self.n_used:
                raise CpuinferError(f"{where}: {self.n_group_used} of {self.n_group} expert groups hold fewer than "
                                    f"expert_used_count {self.n_used} experts")


@dataclass(frozen=True)
class MoeWeights:
    """One layer's router and routed experts (shared experts are a dense FFN, kept by the family)."""
    gate_inp: QTensor              # router [n_expert, d]
    probs_b: np.ndarray            # selection bias [n_expert] (zeros when the file has none)
    gate: QTensor                  # stacked [n_expert, n_ff, d]
    up: QTensor                    # stacked [n_expert, n_ff, d]
    down: QTensor                  # stacked [n_expert, d, n_ff]

    def routed_bytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    def kernel_args(self) -> tuple:
        """Raw blocks and type codes of router and experts for :func:`moe_kernel`."""
        return (self.gate_inp.qtype, self.gate_inp.raw, self.probs_b,
                self.gate.qtype, self.gate.raw, self.up.qtype, self.up.raw,
                self.down.qtype, self.down.raw)


class MoeBuffers:
    """Preallocated work arrays of :func:`moe_ffn` for up to ``n_batch`` tokens."""

    def __init__(self, c: MoeConfig, d_model: int, n_batch: int, layers: Sequence[MoeWeights] = ()):
        f32 = np.float32
        k = c.n_used
        self.logits = np.zeros((n_batch, c.n_expert), f32)    # router output
        self.probs = np.zeros(c.n_expert, f32)                # one token's probabilities
        self.sel = np.zeros(c.n_expert, f32)                  # one token's selection scores
        self.group_score = np.zeros(max(c.n_group, 1), f32)
        self.ids = np.zeros((n_batch, k), np.int64)           # chosen experts per token
        self.weights = np.zeros((n_batch, k), f32)            # their weights
        self.counts = np.zeros(c.n_expert, np.int64)          # tokens per expert (last call)
        self.starts = np.zeros(c.n_expert + 1, np.int64)
        self.order = np.zeros(n_batch * k, np.int64)          # slots (t·k + j) grouped by expert
        self.xs = np.zeros((n_batch, d_model), f32)           # gathered inputs of one expert
        rows = max(n_batch, k)     # one expert's tokens, or one token's experts
        self.gs = np.zeros((rows, c.n_ff), f32)
        self.us = np.zeros((rows, c.n_ff), f32)
        self.ys = np.zeros((rows, d_model), f32)
        self.one_ids = np.zeros(k, np.int64)                  # one token's experts, ascending
        self.one_w = np.zeros(k, f32)                         # and their weights
        need = [1]      # activation scratch for the largest need of any layer's formats
        for w in layers:
            for qt, k_ in ((w.gate, d_model), (w.up, d_model), (w.down, c.n_ff), (w.gate_inp, d_model)):
                need.append(int(qk.act_scratch_bytes(qt.qtype, rows, k_)))
        self.scratch = np.zeros(max(need), np.uint8)

    def kernel_args(self) -> tuple:
        """The work arrays in :func:`moe_kernel`'s order."""
        return (self.logits, self.probs, self.sel, self.group_score, self.ids, self.weights,
                self.counts, self.starts, self.order, self.xs, self.gs, self.us, self.ys,
                self.one_ids, self.one_w, self.scratch)


# --- routing -------------------------------------------------------------------------------------

@kernel
def _route_token(logits, bias, gating, n_group, n_group_used, norm_w, w_scale,
                 probs, sel, group_score, ids, weights):
    """Choose ``len(ids)`` experts for one token from its router ``logits`` (see module doc)."""
    n_expert = logits.shape[0]
    if gating == 1:                                   # softmax
        m = logits[0]
        for e in range(n_expert):
            m = max(m, logits[e])
        s = 0.0
        for e in range(n_expert):
            p = math.exp(logits[e] - m)
            probs[e] = p
            s += p
        for e in range(n_expert):
            probs[e] = probs[e] / s
    else:                                             # sigmoid
        for e in range(n_expert):
            probs[e] = 1.0 / (1.0 + math.exp(-logits[e]))
    for e in range(n_expert):
        sel[e] = probs[e] + bias[e]
    if n_group > 1:
        per = n_expert // n_group
        for g in range(n_group):                      # group score: sum of its two best
            b1 = -np.inf
            b2 = -np.inf
            for e in range(g * per, (g + 1) * per):
                v = sel[e]
                if v > b1:
                    b2 = b1
                    b1 = v
                elif v > b2:
                    b2 = v
            group_score[g] = b1 + b2 if per > 1 else b1
        for _ in range(n_group_used):                 # mark the best groups with +inf
            best = -1
            for g in range(n_group):
                if group_score[g] != np.inf and (best < 0 or group_score[g] > group_score[best]):
                    best = g
            group_score[best] = np.inf
        for g in range(n_group):
            if group_score[g] != np.inf:
                for e in range(g * per, (g + 1) * per):
                    sel[e] = -np.inf
    total = 0.0
    for j in range(ids.shape[0]):                     # top-k by repeated arg-max
        best = -1
        for e in range(n_expert):
            if sel[e] != -np.inf and (best < 0 or sel[e] > sel[best]):
                best = e
        ids[j] = best
        sel[best] = -np.inf
        weights[j] = probs[best]
        total += probs[best]
    if norm_w:
        total = max(total, 6.103515625e-5)            # llama.cpp's clamp (smallest normal f16)
        for j in range(ids.shape[0]):
            weights[j] = weights[j] / total
    for j in range(ids.shape[0]):
        weights[j] = weights[j] * w_scale


@inline_kernel
def _one_token_experts(x, out, ids, weights, q_gate, w_gate, q_up, w_up, q_down, w_down,
                       sel, sel_w, gs, us, ys, scratch):
    """The expert loop of :func:`_moe_ffn` for one token (its ``ids``/``weights`` [k]) in 3
    parallel regions — gate, up, down of all its experts (:func:`quant.kernels.matvec_stack`) —
    instead of 3 per expert. Same results: the same row kernels, and the weighted outputs are
    added in ascending expert order, as the general loop adds them."""
    m = ids.shape[0]
    for j in range(m):                             # insertion sort of (id, weight) by id
        e, wt = ids[j], weights[j]
        i = j
        while i > 0 and sel[i - 1] > e:
            sel[i] = sel[i - 1]
            sel_w[i] = sel_w[i - 1]
            i -= 1
        sel[i] = e
        sel_w[i] = wt
    ge, ue, ye = gs[:m], us[:m], ys[:m]
    qk.matvec_stack(q_gate, w_gate, sel, x, ge, scratch)
    qk.matvec_stack(q_up, w_up, sel, x, ue, scratch)
    ops.swiglu_serial(ge, ue, 0, ge)
    qk.matvec_stack(q_down, w_down, sel, ge, ye, scratch)
    for i in range(m):
        for j in range(out.shape[1]):
            out[0, j] += sel_w[i] * ye[i, j]


@inline_kernel
def _moe_ffn(x, out, logits, bias, gating, n_group, n_group_used, norm_w, w_scale,
             q_gate, w_gate, q_up, w_up, q_down, w_down,
             probs, sel, group_score, ids, weights, counts, starts, order,
             xs, gs, us, ys, one_ids, one_w, scratch):
    n, d = x.shape
    k = ids.shape[1]
    n_expert = counts.shape[0]
    for t in range(n):
        _route_token(logits[t], bias, gating, n_group, n_group_used, norm_w, w_scale,
                     probs, sel, group_score, ids[t], weights[t])
    # counting sort of the n·k (token, expert) slots by expert
    for e in range(n_expert):
        counts[e] = 0
    for t in range(n):
        for j in range(k):
            counts[ids[t, j]] += 1
    starts[0] = 0
    for e in range(n_expert):
        starts[e + 1] = starts[e] + counts[e]
    for e in range(n_expert):
        counts[e] = 0
    for t in range(n):
        for j in range(k):
            e = ids[t, j]
            order[starts[e] + counts[e]] = t * k + j
            counts[e] += 1
    for t in range(n):
        for i in range(d):
            out[t, i] = 0.0
    if n == 1:                 # one token: all its experts' mat-vecs share each parallel region
        _one_token_experts(x, out, ids[0], weights[0], q_gate, w_gate, q_up, w_up, q_down,
                           w_down, one_ids, one_w, gs, us, ys, scratch)
        return
    for e in range(n_expert):
        c = counts[e]
        if c == 0:
            continue                                   # never read: nobody chose this expert
        s0 = starts[e]
        for i in range(c):
            t = order[s0 + i] // k
            for j in range(d):
                xs[i, j] = x[t, j]
        xe, ge, ue, ye = xs[:c], gs[:c], us[:c], ys[:c]
        qk.matmul_kernel(q_gate, w_gate[e], xe, ge, scratch)
        qk.matmul_kernel(q_up, w_up[e], xe, ue, scratch)
        ops.swiglu(ge, ue, 0, ge)
        qk.matmul_kernel(q_down, w_down[e], ge, ye, scratch)
        for i in range(c):
            slot = order[s0 + i]
            t = slot // k
            wt = weights[t, slot - t * k]
            for j in range(d):
                out[t, j] += wt * ye[i, j]


@inline_kernel
def moe_kernel(x, out, cfg, wts, bufs):
    """:func:`moe_ffn` for compiled callers: router mat-mul, routing and the expert loop in one
    call. ``cfg``, ``wts``, ``bufs`` are :meth:`MoeConfig.kernel_args`,
    :meth:`MoeWeights.kernel_args` and :meth:`MoeBuffers.kernel_args` (sizes checked by the
    caller)."""
    gating, n_group, n_group_used, norm_w, w_scale = cfg
    q_r, w_r, bias, q_gate, w_gate, q_up, w_up, q_down, w_down = wts
    (logits_all, probs, sel, group_score, ids, weights, counts, starts, order,
     xs, gs, us, ys, one_ids, one_w, scratch) = bufs
    logits = logits_all[:x.shape[0]]
    qk.matmul_kernel(q_r, w_r, x, logits, scratch)                       # [n, n_expert]
    _moe_ffn(x, out, logits, bias, gating, n_group, n_group_used, norm_w, w_scale,
             q_gate, w_gate, q_up, w_up, q_down, w_down,
             probs, sel, group_score, ids, weights, counts, starts, order,
             xs, gs, us, ys, one_ids, one_w, scratch)


def moe_ffn(c: MoeConfig, w: MoeWeights, x: np.ndarray, out: np.ndarray, b: MoeBuffers) -> None:
    """``out[t] = Σ_j weight[t, j] · expert_{ids[t, j]}(x[t])`` for x, out float32 [n, d].

    Afterwards ``b.ids[:n]``/``b.weights[:n]`` hold the routing and ``b.counts`` the number of
    tokens each expert ran on (0 = not read)."""
    n = x.shape[0]
    if n > b.xs.shape[0] or out.shape != x.shape or x.shape[1] != b.xs.shape[1]:
        raise CpuinferError(f"moe_ffn: x {list(x.shape)} / out {list(out.shape)} do not fit buffers for "
                            f"{b.xs.shape[0]} tokens of {b.xs.shape[1]}")
    quant.check_matmul(w.gate_inp.raw, w.gate_inp.qtype, x, b.logits[:n], b.scratch)
    moe_kernel(x, out, c.kernel_args(), w.kernel_args(), b.kernel_args())


def route_reference(logits: np.ndarray, bias: np.ndarray, c: MoeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Naive numpy routing (float64) for tests: (ids [n, k], weights [n, k])."""
    lg = logits.astype(np.float64)
    if c.gating == Gating.SOFTMAX:
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    else:
        p = 1.0 / (1.0 + np.exp(-lg))
    sel = p + bias.astype(np.float64)
    if c.n_group > 1:
        g = sel.reshape(len(sel), c.n_group, -1)
        top2 = np.sort(g, -1)[..., -2:].sum(-1) if g.shape[-1] > 1 else g[..., -1]
        keep = np.argsort(-top2, -1, kind="stable")[:, :c.n_group_used]
        mask = np.full(g.shape[:2], True)
        np.put_along_axis(mask, keep, False, -1)
        sel = np.where(np.repeat(mask, g.shape[-1], -1), -np.inf, sel)
    ids = np.argsort(-sel, -1, kind="stable")[:, :c.n_used]
    wts = np.take_along_axis(p, ids, -1)
    if c.norm_w:
        wts = wts / np.maximum(wts.sum(-1, keepdims=True), 6.103515625e-5)
    return ids, wts * c.w_scale
