"""Where a decoded token's time goes (dense llama-family models): the whole token against its
matrix products alone, on the same loaded weights, with the read bandwidth measured beside them.

    python -m tools.token_profile MODEL.gguf [-t 1] [--tokens 24] [--no-repack]

Decodes ``--tokens`` tokens one at a time after an 8-token prompt (best and median ms per
token). Then runs every matrix once per pass in the forward's order (each layer's q, k, v, o,
gate, up, down, then the output head) with 1-token activations, each matmul a separate compiled
call, best of 5 passes, and prints the pass, the split per matrix role with GB/s of weight
bytes, and best token − best pass: the token's non-matmul work (norms, RoPE, attention, SwiGLU,
embedding) plus whatever the host's load moved between the two measurements — run it twice.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import cpuinfer
from cpuinfer.errors import CpuinferError
from cpuinfer.models import llama
from cpuinfer.weights import QTensor, matmul_scratch
from quant.kernels import matmul_kernel
from tools.bandwidth import quick_read_gbps
from tools.bench import _prompt_ids


def _matrices(weights: llama.Weights) -> tuple[list[str], list[QTensor]]:
    """(role of each product, its matrix) in the forward's order: per layer its products (q/k/v
    and gate/up as one each where the loader joined them), then the output head."""
    pairs = [p for layer in weights.layers for p in layer.products()] + [("output", weights.output)]
    return [r for r, _ in pairs], [m for _, m in pairs]


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


def _matmul_pass_ms(mats: list[QTensor], passes: int = 5) -> np.ndarray:
    """Best-of-``passes`` ms per matrix, each a 1-token ``matmul_kernel`` call."""
    rng = np.random.default_rng(0)
    xs = {m.cols: rng.standard_normal((1, m.cols)).astype(np.float32) for m in mats}
    outs = [np.empty((1, m.rows), np.float32) for m in mats]
    scratch = matmul_scratch(1, max(m.cols for m in mats))
    best = np.full(len(mats), np.inf)
    for _ in range(passes + 1):                      # the first pass compiles and warms up
        for i, m in enumerate(mats):
            t0 = time.perf_counter()
            matmul_kernel(m.qtype, m.raw, xs[m.cols], outs[i], scratch)
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
        if not isinstance(model.family, llama.Family):
            raise CpuinferError(f"{args.model}: token_profile handles the dense llama family "
                                f"(llama, qwen2, ...), not {model.info.name}")
        roles, mats = _matrices(model.family.weights)
        token, median = _token_ms(model, args.tokens)
        per = _matmul_pass_ms(mats)
        read = quick_read_gbps(args.threads)
    except CpuinferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = sum(m.nbytes for m in mats)
    print(f"{args.model}, {args.threads} thread(s), read bandwidth {read:.1f} GB/s")
    print(f"whole token   {token:7.1f} ms  {total / token / 1e6:5.1f} GB/s of weights "
          f"(best; median {median:.1f} ms)")
    print(f"matmuls alone {per.sum():7.1f} ms  {total / per.sum() / 1e6:5.1f} GB/s")
    for role in dict.fromkeys(roles):
        mine = [i for i, r in enumerate(roles) if r == role]
        ms = per[mine].sum()
        b = sum(mats[i].nbytes for i in mine)
        m = mats[mine[0]]
        print(f"  {role:9s} {ms:7.1f} ms  {b / ms / 1e6:5.1f} GB/s  {m.rows} x {m.cols}")
    print(f"rest of token {token - per.sum():7.1f} ms  ({(token - per.sum()) / token:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
