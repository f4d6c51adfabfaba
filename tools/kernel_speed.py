"""Mat-vec / mat-mat throughput per format: GB/s of weight bytes (and G weights/s).

    python -m tools.kernel_speed [--rows 4096] [--k 4096] [--n 1] [--types Q8_0,Q4_0,Q4_1] [--repack]
    python -m tools.kernel_speed --rows 16384 --k 14336 --types Q4_0,Q4_K --groups 2,4

``--groups`` times the interleaved decode tile alone on one thread, walking G groups of 8 rows at
once for each G given (:data:`quant.interleaved.TILE_GROUPS` picks G per format and row length).

Runs quant.matmul on a random read-only matrix (like the mmap'd weights) at 1 and 2 threads and
prints one line per format and thread count. Also measures a plain memory read (numpy sum over a
buffer larger than the caches) in the same run, because this machine's bandwidth varies.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import quant
from cpuinfer.gguf import GGMLType
from quant.jit import max_threads, set_threads

DEFAULT_TYPES = "Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q4_K,Q6_K,F16"


def _random_matrix(rng, t: GGMLType, rows: int, k: int) -> np.ndarray:
    fmt = quant.FORMATS[t]
    rb = fmt.row_bytes(k)
    w = rng.integers(0, 256, size=(rows, rb), dtype=np.uint8)
    if fmt.block_size == 1:   # float formats: small finite values
        vals = (rng.standard_normal((rows, k)) * 0.05).astype(np.float32)
        if t == GGMLType.F32:
            w = vals.view(np.uint8)
        elif t == GGMLType.F16:
            w = vals.astype(np.float16).view(np.uint8)
        else:
            w = (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    w = np.ascontiguousarray(w)
    w.flags.writeable = False
    return w


def _time(fn, min_seconds: float = 0.5) -> float:
    """Best time of one call over ~min_seconds of calls (the minimum resists a busy machine)."""
    fn()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=1, help="tokens (1 = mat-vec)")
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--repack", action="store_true",
                    help="interleave rows 8 at a time as the loader does (quant.interleaved)")
    ap.add_argument("--groups", default="",
                    help="comma-separated group counts: time the interleaved decode tile with each "
                         "(one thread, one token; implies --repack)")
    args = ap.parse_args(argv)
    if args.groups:
        _groups_main(args)
        return
    rng = np.random.default_rng(0)
    threads = [t for t in (1, 2) if t <= max_threads()]

    buf = np.ones(64 << 20, np.uint8).view(np.float64)
    bw = buf.nbytes / _time(lambda: buf.sum())
    print(f"memory read (numpy sum, 1 thread): {bw / 1e9:6.1f} GB/s")
    for name in args.types.split(","):
        t = GGMLType[name.strip().upper()]
        w = _random_matrix(rng, t, args.rows, args.k)
        code, label = t, name
        if args.repack and quant.can_pack(t, args.rows):
            w, code = quant.pack(w, t)
            label = code.name
        x = rng.standard_normal((args.n, args.k)).astype(np.float32)
        out = np.empty((args.n, args.rows), np.float32)
        scratch = np.empty(max(quant.scratch_size(t, args.n, args.k), 1), np.uint8)
        for nt in threads:
            set_threads(nt)
            dt = _time(lambda: quant.matmul(w, code, x, out, scratch=scratch))
            print(f"{label:7s} {args.rows}x{args.k} n={args.n} threads={nt}: "
                  f"{w.nbytes / dt / 1e9:6.2f} GB/s  {args.rows * args.k * args.n / dt / 1e9:6.2f} "
                  f"G weights/s  {dt * 1e6:8.1f} us")


def _groups_main(args) -> None:
    """One line per format and group count: the decode tile over every row, one thread."""
    from numba import njit

    from quant import interleaved as il
    from quant import kernels as qk
    rng = np.random.default_rng(0)
    set_threads(1)
    for name in args.types.split(","):
        t = GGMLType[name.strip().upper()]
        if not quant.can_pack(t, args.rows):
            print(f"{t.name}: not interleaved (or rows not a multiple of 8)")
            continue
        w, code = quant.pack(_random_matrix(rng, t, args.rows, args.k), t)
        w.flags.writeable = False
        x = rng.standard_normal((1, args.k)).astype(np.float32)
        scratch = np.zeros(quant.scratch_size(t, 1, args.k), np.uint8)
        qk.prepare_acts(int(code), x, scratch, 0)
        k_tile = t in il._K_TILES
        tables = (qk.act_tables_k if k_tile else qk.act_tables)(scratch, 1, args.k)
        out = np.zeros((1, args.rows), np.float32)
        for g in (int(v) for v in args.groups.split(",")):
            tile = il.rows_intrinsic(f"_speed_{t.name}_{g}", il._rows_codegen(t, (g, g)),
                                     il._K_TABLES if k_tile else il._TABLES)

            @njit
            def run(w, xq, xd, xs, out):
                tile(w, 0, w.shape[0], xq, xd, xs, out)
            dt = _time(lambda: run(w, *tables, out))
            print(f"{code.name:7s} {args.rows}x{args.k} n=1 groups={g} threads=1: "
                  f"{w.nbytes / dt / 1e9:6.2f} GB/s")


if __name__ == "__main__":
    main()
