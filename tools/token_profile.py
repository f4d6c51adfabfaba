"""Where a decoded token's time goes: the whole token against its matrix products alone, on
the same loaded weights, with the read bandwidth measured beside them (dense llama-family models
and DeepSeek's deepseek2).

    python -m tools.token_profile MODEL.gguf [-t 1] [--tokens 24] [--no-repack]

Decodes ``--tokens`` tokens one at a time after an 8-token prompt (best and median ms per
token). Then runs every product once per pass in the forward's order, with 1-token activations,
each product a separate compiled call, best of 5 passes, and prints the pass, the split per
matrix role with GB/s of weight bytes, and best token − best pass: the token's non-matmul work
(norms, RoPE, attention, SwiGLU, embedding, routing) plus whatever the host's load moved between
the two measurements — run it twice.

llama family: per layer q/k/v (or their joined matrix), o, gate/up (or joined), down; then the
output head. deepseek2: per layer the MLA products — q_a ‖ kv_a (``w_in`` where joined), q_b,
the per-head ``wk_b``/``wv_b`` stacks (one call over all heads, as the forward runs them), o —
then the dense FFN or the router, ``n_used`` routed experts (``exp_*``, one call per matrix
kind over the experts, as for a decoded token) and the shared experts (``sh_*``); then the
output head. The routed experts timed are the first ``n_used`` of each layer (a token's own
choice varies; their bytes are what a token streams).
"""
from __future__ import annotations

import argparse
import sys
import time

from dataclasses import dataclass
from typing import Callable

import numpy as np

import cpuinfer
from cpuinfer.errors import CpuinferError
from cpuinfer.models import deepseek2, llama
from cpuinfer.weights import QTensor, matmul_scratch
from quant.kernels import matmul_kernel, matvec_stack
from tools.bandwidth import quick_read_gbps
from tools.bench import _prompt_ids


@dataclass(frozen=True)
class _Product:
    role: str
    nbytes: int              # weight bytes one decoded token reads
    shape: str
    run: Callable[[], None]  # one 1-token product, a compiled call


def _matvec(role: str, m: QTensor, rng) -> _Product:
    x = rng.standard_normal((1, m.cols)).astype(np.float32)
    out = np.empty((1, m.rows), np.float32)
    scratch = matmul_scratch(1, m.cols)
    return _Product(role, m.nbytes, f"{m.rows} x {m.cols}",
                    lambda: matmul_kernel(m.qtype, m.raw, x, out, scratch))


def _llama_products(weights: llama.Weights, rng) -> list[_Product]:
    """Per layer its products (q/k/v and gate/up as one each where the loader joined them)."""
    return [_matvec(role, m, rng) for layer in weights.layers for role, m in layer.products()]


def _per_head(role: str, m: QTensor, rng) -> _Product:
    """A stacked [n_head, rows, cols] matrix times each head's own input (MLA's k_b / v_b)."""
    n_head = m.raw.shape[0]
    src = rng.standard_normal((1, n_head, m.cols)).astype(np.float32)
    dst = np.empty((1, n_head, m.rows), np.float32)
    xbuf = np.empty(n_head * m.cols, np.float32)
    ybuf = np.empty(n_head * m.rows, np.float32)
    hscratch = matmul_scratch(n_head, m.cols)
    return _Product(role, m.nbytes, f"{n_head} x {m.rows} x {m.cols}",
                    lambda: deepseek2._per_head_matvec(m.qtype, m.raw, src, dst, xbuf, ybuf, hscratch))


def _experts(role: str, m: QTensor, n_used: int, x: np.ndarray) -> _Product:
    """``n_used`` experts of a stacked [n_expert, rows, cols] tensor in one call, as a decoded
    token's gate, up or down runs (``x`` [1, cols] shared, or one row per expert)."""
    sel = np.arange(n_used, dtype=np.int64)
    out = np.empty((n_used, m.rows), np.float32)
    per = m.nbytes // m.raw.shape[0]
    scratch = matmul_scratch(n_used, m.cols)
    return _Product(role, per * n_used, f"{n_used} x {m.rows} x {m.cols}",
                    lambda: matvec_stack(m.qtype, m.raw, sel, x, out, scratch))


def _ffn_products(prefix: str, f, rng) -> list[_Product]:
    mats = ((("gate_up", f.gate_up),) if f.gate_up is not None
            else (("gate", f.gate), ("up", f.up)))
    return [_matvec(f"{prefix}{r}", m, rng) for r, m in (*mats, ("down", f.down))]


def _deepseek_products(weights: deepseek2.Weights, rng) -> list[_Product]:
    """Per layer the MLA products, then its dense FFN or router, routed and shared experts."""
    out = []
    for L in weights.layers:
        attn = ([("w_in", L.w_in)] if L.w_in is not None
                else [("wq_a", L.wq_a), ("wq", L.wq), ("wkv_a", L.wkv_a)])
        out += [_matvec(r, m, rng) for r, m in attn + [("wq_b", L.wq_b)] if m is not None]
        out += [_per_head("wk_b", L.wk_b, rng), _per_head("wv_b", L.wv_b, rng),
                _matvec("wo", L.wo, rng)]
        if L.moe is None:
            out += _ffn_products("w_", L.ffn, rng)
            continue
        m, k = L.moe, weights.n_used
        x = rng.standard_normal((1, m.gate.cols)).astype(np.float32)
        hidden = rng.standard_normal((k, m.down.cols)).astype(np.float32)
        out += [_matvec("router", m.gate_inp, rng),
                _experts("exp_gate", m.gate, k, x), _experts("exp_up", m.up, k, x),
                _experts("exp_down", m.down, k, hidden)]
        if L.shexp is not None:
            out += _ffn_products("sh_", L.shexp, rng)
    return out


_PRODUCTS = {llama.Family: _llama_products, deepseek2.Family: _deepseek_products}


def _products(family) -> list[_Product]:
    """Every product of one decoded token in the forward's order, then the output head."""
    rng = np.random.default_rng(0)
    w = family.weights
    return _PRODUCTS[type(family)](w, rng) + [_matvec("output", w.output, rng)]


def _token_ms(model, n_tokens: int) -> tuple[float, float]:
    """(best, median) ms of one decoded token."""
    session = model.new_session(8 + n_tokens + 1)
    ids = _prompt_ids(model.n_vocab, 8 + n_tokens)
    session.eval(ids[:8])
    times = []
    for tok in ids[8:]:
        t0 = time.perf_counter()
        session.eval([tok])
        times.append(time.perf_counter() - t0)
    times = times[2:] if len(times) > 4 else times
    return float(np.min(times)) * 1e3, float(np.median(times)) * 1e3


def _pass_ms(products: list[_Product], passes: int = 5) -> np.ndarray:
    """Best-of-``passes`` ms per product."""
    best = np.full(len(products), np.inf)
    for _ in range(passes + 1):                      # the first pass compiles and warms up
        for i, p in enumerate(products):
            t0 = time.perf_counter()
            p.run()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=24, help="decoded tokens timed (default 24)")
    ap.add_argument("--no-repack", action="store_true", help="the file's row order")
    args = ap.parse_args(argv)
    try:
        model = cpuinfer.load(args.model, threads=args.threads, repack=not args.no_repack)
        if type(model.family) not in _PRODUCTS:
            raise CpuinferError(f"{args.model}: token_profile handles the dense llama family "
                                f"(llama, qwen2, ...) and deepseek2, not {model.info.name}")
        products = _products(model.family)
        token, median = _token_ms(model, args.tokens)
        per = _pass_ms(products)
        read = quick_read_gbps(args.threads)
    except CpuinferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = sum(p.nbytes for p in products)
    print(f"{args.model}, {args.threads} thread(s), read bandwidth {read:.1f} GB/s")
    print(f"whole token   {token:7.1f} ms  {total / token / 1e6:5.1f} GB/s of weights "
          f"(best; median {median:.1f} ms)")
    print(f"matmuls alone {per.sum():7.1f} ms  {total / per.sum() / 1e6:5.1f} GB/s")
    roles = [p.role for p in products]
    for role in dict.fromkeys(roles):
        mine = [i for i, r in enumerate(roles) if r == role]
        ms = per[mine].sum()
        b = sum(products[i].nbytes for i in mine)
        print(f"  {role:10s} {ms:7.1f} ms  {b / ms / 1e6:5.1f} GB/s  {products[mine[0]].shape}")
    print(f"rest of token {token - per.sum():7.1f} ms  ({(token - per.sum()) / token:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
