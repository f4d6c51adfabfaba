"""Attention kernel throughput over the f16 KV cache, per model shape and context depth.

    python -m tools.attention_speed [--shapes deepseek-v3,llama-7b,smollm2] [--positions 512,4096]
                                    [--tokens 1] [-t 1,2]

Times :func:`cpuinfer.attention.attention` (best call over ~0.5 s) for ``--tokens`` query
tokens at the end of ``--positions`` cached positions, on a random cache, and prints a markdown
row per case: ms per layer, G multiply-adds/s (n_head × keys × (key + value dims), the causal
key count per token) and GB/s of the K/V bytes one layer's call reads.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from cpuinfer.attention import attention
from cpuinfer.errors import CpuinferError
from quant.jit import set_threads
from tools.bench import parse_counts, parse_threads
from tools.kernel_speed import _time

# name -> (n_head, n_kv, key dims, value dims, V = the first value dims of each K row (MLA))
SHAPES = {
    "deepseek-v3": (128, 1, 576, 512, True),
    "llama-7b": (32, 8, 128, 128, False),
    "qwen2-7b": (28, 4, 128, 128, False),
    "smollm2": (9, 3, 64, 64, False),
}


def time_case(shape, positions: int, n: int, threads: int, rng) -> dict:
    """Best time of one call for ``shape`` (a :data:`SHAPES` name or its tuple)."""
    nh, nkv, hd, hdv, mla = SHAPES[shape] if isinstance(shape, str) else shape
    k = rng.standard_normal((positions, nkv, hd)).astype(np.float16).view(np.uint16)
    v = k if mla else rng.standard_normal((positions, nkv, hdv)).astype(np.float16).view(np.uint16)
    q = rng.standard_normal((n, nh, hd)).astype(np.float32)
    out = np.zeros((n, nh, hdv), np.float32)
    scores = np.zeros((nh, positions), np.float32)
    qh = np.zeros((nh, hd), np.float32)
    p0 = positions - n
    set_threads(threads)
    sec = _time(lambda: attention(q, k, v, p0, np.float32(0.1), scores, qh, out))
    keys = sum(p0 + t + 1 for t in range(n))
    kv_bytes = k.nbytes + (0 if mla else v.nbytes)
    return dict(shape=shape, threads=threads, positions=positions, tokens=n, ms=sec * 1e3,
                gmacs=nh * keys * (hd + hdv) / sec / 1e9, kv_gbps=kv_bytes / sec / 1e9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="deepseek-v3,llama-7b,smollm2",
                    help=f"comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--positions", default="512,4096", help="cached positions (comma-separated)")
    ap.add_argument("--tokens", type=int, default=1, help="query tokens (1 = decode)")
    ap.add_argument("-t", "--threads", default="1")
    args = ap.parse_args(argv)
    try:
        shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
        bad = [s for s in shapes if s not in SHAPES]
        if bad:
            raise CpuinferError(f"unknown shape {bad[0]!r}; valid: {', '.join(SHAPES)}")
        positions = parse_counts(args.positions, "--positions")
        threads = parse_threads(args.threads)
        if args.tokens < 1 or args.tokens > min(positions):
            raise CpuinferError(f"--tokens must be in 1..{min(positions)} (the smallest --positions)")
    except CpuinferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    print("| shape | threads | positions | query tokens | ms | G mul-add/s | K/V GB/s |")
    print("|---|---|---|---|---|---|---|")
    for s in shapes:
        for p in positions:
            for t in threads:
                r = time_case(s, p, args.tokens, t, rng)
                print(f"| {s} | {t} | {p} | {r['tokens']} | {r['ms']:.2f} | {r['gmacs']:.1f} | "
                      f"{r['kv_gbps']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
