"""What numba compiles, and for how long, to load a model and run its first forward pass.

    NUMBA_CACHE_DIR=$(mktemp -d) python -m tools.compile_time MODEL.gguf [--top 8]

With an empty ``NUMBA_CACHE_DIR`` every kernel is compiled (what a first start on a new machine
pays); without it, the project's on-disk cache is used and the figures are what a later start
pays. Prints the wall time of ``cpuinfer.load`` + ``logits`` of a 2-token prompt, then the
compiled functions that took longest, each **inclusive** of the functions compiled while it
was (numba's ``numba:compile`` events, nested).
"""
from __future__ import annotations

import argparse
import collections
import sys
import time

from numba.core import event

import cpuinfer
from cpuinfer.errors import CpuinferError


class _CompileTimes(event.Listener):
    """Seconds per compiled function (by qualified name), inclusive of nested compiles."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._started: list[float] = []

    def on_start(self, ev):
        self._started.append(time.perf_counter())

    def on_end(self, ev):
        took = time.perf_counter() - self._started.pop()
        disp = ev.data.get("dispatcher") if isinstance(ev.data, dict) else None
        self.seconds[disp.py_func.__qualname__ if disp is not None else str(ev.kind)] += took


def measure(path: str, threads: int = 1) -> tuple[float, dict[str, float]]:
    """(wall seconds of load + first logits, seconds per compiled function)."""
    times = _CompileTimes()
    with event.install_listener("numba:compile", times):
        t0 = time.perf_counter()
        model = cpuinfer.load(path, threads=threads)
        model.logits(model.tokenize("hello world")[:2] or [0])
        wall = time.perf_counter() - t0
    return wall, dict(times.seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.compile_time", description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--top", type=int, default=8, help="functions listed (default 8)")
    args = ap.parse_args(argv)
    try:
        wall, seconds = measure(args.model)
    except CpuinferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.model}: load + first logits {wall:.1f} s, {len(seconds)} functions compiled")
    for name, s in sorted(seconds.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {s:8.1f} s  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
