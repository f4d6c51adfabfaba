"""Memory bandwidth meter: what decode can stream, measured with the same kind of code.

``cpuinfer bandwidth [--threads 1,2,...] [--size GB] [--reps N] [--json]``

Decode of a bandwidth-bound model is one long streaming read of the weights by every core, so
the headline figure is a *read* kernel: a vectorized float64 sum over a buffer far larger than
the last-level cache, split into one contiguous chunk per thread (numba ``prange``). Copy
(``b[i] = a[i]``) and triad (``a[i] = b[i] + s*c[i]``) are reported for comparison with
published STREAM numbers, counted the STREAM way (copy 16 bytes/element, triad 24 bytes;
write-allocate traffic not counted). Each (kernel, threads) pair runs ``reps`` times after a
warm-up; best and median are reported. numpy's ``a.sum()`` (one thread) is measured on the same
buffer as a floor the read kernel must beat.

NUMA: nodes come from ``/sys/devices/system/node``. For each node pair (A, B) the buffer is
first-touched by Python threads pinned (``os.sched_setaffinity``) to node B's CPUs, so its pages
live on B, then read by threads pinned to node A's CPUs with a GIL-free serial read kernel: A==B
is local, A!=B remote. With one node only the local figure exists and the report says so.

Results are cached in ``$CPUINFER_CACHE_DIR`` (default ``$XDG_CACHE_HOME/cpuinfer`` or
``~/.cache/cpuinfer``) as ``bandwidth.json``, keyed by the machine identity (CPU model, logical
CPUs, memory size, hostname) so ``estimate`` and ``bench`` reuse them::

    {"version": 1, "machines": {"<key>": {"machine": {...}, "timestamp": "...", "size_bytes": N,
      "reps": R, "read_gbps": best read at the most threads,
      "results": {"read"|"copy"|"triad": {"<threads>": {"best_gbps", "median_gbps", "samples_gbps"}}},
      "numpy_sum_gbps": x, "numa": {"nodes": [..], "pairs": [{"cpu_node", "mem_node", "best_gbps",
      "median_gbps"}], "note": "..."}}}}
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
from numba import prange

from cpuinfer.errors import CpuinferError
from quant.jit import fast_kernel, fast_parallel_kernel, max_threads, parallel_kernel, set_threads

CACHE_VERSION = 1
_GB = 1e9


# -- kernels -----------------------------------------------------------------------------------

@fast_parallel_kernel
def _read_kernel(a, nthreads):
    """Sum of ``a`` (float64) in ``nthreads`` contiguous chunks: a pure streaming read."""
    n = a.shape[0]
    chunk = (n + nthreads - 1) // nthreads
    partial = np.zeros(nthreads)
    for t in prange(nthreads):
        part = a[min(t * chunk, n):min((t + 1) * chunk, n)]
        s = 0.0
        for i in range(part.shape[0]):
            s += part[i]
        partial[t] = s
    return partial.sum()


@fast_kernel
def _read_serial(a):
    """Single-thread streaming sum (GIL released: used from pinned Python threads)."""
    s = 0.0
    for i in range(a.shape[0]):
        s += a[i]
    return s


@parallel_kernel
def _copy_kernel(dst, src, nthreads):
    n = src.shape[0]
    chunk = (n + nthreads - 1) // nthreads
    for t in prange(nthreads):
        lo, hi = min(t * chunk, n), min((t + 1) * chunk, n)
        d, s = dst[lo:hi], src[lo:hi]
        for i in range(s.shape[0]):
            d[i] = s[i]


@fast_parallel_kernel
def _triad_kernel(a, b, c, scalar, nthreads):
    n = a.shape[0]
    chunk = (n + nthreads - 1) // nthreads
    for t in prange(nthreads):
        lo, hi = min(t * chunk, n), min((t + 1) * chunk, n)
        x, y, z = a[lo:hi], b[lo:hi], c[lo:hi]
        for i in range(x.shape[0]):
            x[i] = y[i] + scalar * z[i]


@parallel_kernel
def _fill_kernel(a, value, nthreads):
    """Parallel first touch: each thread writes (and so places) the pages it will read."""
    n = a.shape[0]
    chunk = (n + nthreads - 1) // nthreads
    for t in prange(nthreads):
        part = a[min(t * chunk, n):min((t + 1) * chunk, n)]
        for i in range(part.shape[0]):
            part[i] = value


@fast_kernel
def _fill_serial(a, value):
    for i in range(a.shape[0]):
        a[i] = value


def read_kernel_asm() -> str:
    """Assembly of the read kernel (to check it uses vector loads), from a fresh uncached copy
    compiled with the same flags: numba cannot inspect code loaded from its cache."""
    import numba
    opts = {k: v for k, v in _read_kernel.targetoptions.items() if k not in ("cache", "nopython")}
    fresh = numba.njit(**opts)(_read_kernel.py_func)
    fresh(np.ones(64), 1)
    return "\n".join(fresh.inspect_asm().values())


# -- machine identity and cache ----------------------------------------------------------------

def cache_dir() -> Path:
    env = os.environ.get("CPUINFER_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cpuinfer"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def machine_identity() -> dict[str, Any]:
    return {"cpu_model": _cpu_model(), "logical_cpus": os.cpu_count() or 1,
            "memory_bytes": int(psutil.virtual_memory().total), "hostname": socket.gethostname()}


def machine_key(identity: dict[str, Any] | None = None) -> str:
    ident = identity or machine_identity()
    blob = json.dumps(ident, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_cache_file(name: str) -> dict[str, Any]:
    """The cache file ``name`` (``{"version", "machines"}``), empty when missing or unreadable."""
    path = cache_dir() / name
    try:
        data = json.loads(path.read_text())
        if data.get("version") == CACHE_VERSION and isinstance(data.get("machines"), dict):
            return data
    except (OSError, ValueError, AttributeError):
        pass
    return {"version": CACHE_VERSION, "machines": {}}


def store_machine_record(name: str, record: dict[str, Any]) -> Path:
    """Replace this machine's entry in cache file ``name``; returns the path."""
    data = load_cache_file(name)
    data["machines"][machine_key()] = record
    path = cache_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def load_cached_bandwidth() -> dict[str, Any] | None:
    """This machine's last ``bandwidth`` result, or None."""
    rec = load_cache_file("bandwidth.json")["machines"].get(machine_key())
    return rec if isinstance(rec, dict) and "read_gbps" in rec else None


# -- NUMA --------------------------------------------------------------------------------------

def _parse_cpulist(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def numa_nodes(root: str = "/sys/devices/system/node") -> dict[int, list[int]]:
    """node id -> CPUs this process may run on; one pseudo-node when the kernel shows none."""
    allowed = os.sched_getaffinity(0)
    nodes: dict[int, list[int]] = {}
    try:
        for entry in sorted(os.listdir(root)):
            if entry.startswith("node") and entry[4:].isdigit():
                cpus = _parse_cpulist(Path(root, entry, "cpulist").read_text())
                cpus = [c for c in cpus if c in allowed]
                if cpus:
                    nodes[int(entry[4:])] = cpus
    except OSError:
        pass
    return nodes or {0: sorted(allowed)}


def _pinned_threads(cpus: list[int], work: Callable[[int], None]) -> float:
    """Run ``work(k)`` on one Python thread per CPU (pinned), all started together; seconds."""
    barrier = threading.Barrier(len(cpus) + 1)
    errors: list[BaseException] = []

    def body(k: int, cpu: int) -> None:
        try:
            os.sched_setaffinity(0, {cpu})  # pid 0 = the calling thread on Linux
            barrier.wait()
            work(k)
        except BaseException as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(k, c)) for k, c in enumerate(cpus)]
    for th in threads:
        th.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t0
    if errors:
        raise CpuinferError(f"NUMA measurement failed: {errors[0]}")
    return dt


def measure_numa(size_bytes: int, reps: int, nodes: dict[int, list[int]] | None = None,
                 on_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Read bandwidth of each node's CPUs from each node's memory (first-touch placement)."""
    nodes = nodes or numa_nodes()
    pairs = []
    for mem_node, mem_cpus in nodes.items():
        n = max(size_bytes // 8, 1024)
        buf = np.empty(n)
        slices_w = np.array_split(buf, len(mem_cpus))
        _pinned_threads(mem_cpus, lambda k: _fill_serial(slices_w[k], 1.0))
        for cpu_node, cpus in nodes.items():
            slices_r = np.array_split(buf, len(cpus))
            _pinned_threads(cpus, lambda k: _read_serial(slices_r[k]))  # warm-up
            samples = []
            for _ in range(reps):
                dt = _pinned_threads(cpus, lambda k: _read_serial(slices_r[k]))
                samples.append(buf.nbytes / dt / _GB)
                if on_step:
                    on_step()
            pairs.append({"cpu_node": cpu_node, "mem_node": mem_node, "threads": len(cpus),
                          "best_gbps": max(samples), "median_gbps": statistics.median(samples)})
        del buf
    note = ("one NUMA node: local bandwidth only, no remote figure" if len(nodes) == 1 else
            f"{len(nodes)} NUMA nodes: cpu_node != mem_node is remote")
    return {"nodes": sorted(nodes), "pairs": pairs, "note": note}


# -- the measurement ---------------------------------------------------------------------------

def llc_bytes() -> int:
    """Largest CPU cache size reported by sysfs (the LLC), or 32 MiB when unknown."""
    best = 0
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in root.glob("index*"):
            text = (idx / "size").read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


def default_size_bytes() -> int:
    """Per-array size: 16 x LLC, at least 256 MiB, at most 4 GiB and 1/8 of available memory.
    (The cap was 1 GiB: only 3.5 LLCs on the lent 16-core Xeon with a 300 MB L3, where the
    16-thread read figure moved between 93 and 155 GB/s minutes apart; a cache serving part of
    each pass is one explanation, not verified there.)"""
    avail = psutil.virtual_memory().available
    return int(max(min(max(16 * llc_bytes(), 256 << 20), 4 << 30, avail // 8), 64 << 20))


def default_thread_counts() -> list[int]:
    top = max_threads()
    counts, k = [], 1
    while k < top:
        counts.append(k)
        k *= 2
    return counts + [top]


def _samples(fn: Callable[[], None], nbytes: int, reps: int, on_step) -> list[float]:
    fn()  # warm-up (and compile on first use)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(nbytes / (time.perf_counter() - t0) / _GB)
        if on_step:
            on_step()
    return out


def _summary(samples: list[float]) -> dict[str, Any]:
    return {"best_gbps": max(samples), "median_gbps": statistics.median(samples),
            "samples_gbps": [round(s, 3) for s in samples]}


def measure(threads: list[int] | None = None, size_bytes: int | None = None, reps: int = 5,
            kernels: tuple[str, ...] = ("read", "copy", "triad"), numa: bool = True,
            progress: bool = False) -> dict[str, Any]:
    """Measure and return a result record (see the module docstring for its fields)."""
    threads = threads or default_thread_counts()
    bad = [t for t in threads if not 1 <= t <= max_threads()]
    if bad:
        raise CpuinferError(f"--threads {bad[0]} is out of range 1..{max_threads()}")
    for k in kernels:
        if k not in ("read", "copy", "triad"):
            raise CpuinferError(f"unknown bandwidth kernel {k!r}; valid: read, copy, triad")
    if reps < 1:
        raise CpuinferError(f"--reps must be at least 1, got {reps}")
    size = size_bytes or default_size_bytes()
    if size < (1 << 20):
        raise CpuinferError(f"--size must be at least 1 MiB, got {size} bytes")
    n = size // 8
    steps = reps * (len(threads) * len(kernels) + 1)
    nodes = numa_nodes() if numa else {}
    steps += reps * len(nodes) ** 2
    bar = task = None
    if progress:
        from rich.progress import Progress
        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("measuring memory bandwidth", total=steps)
    step = (lambda: bar.update(task, advance=1)) if bar is not None else None
    top = max(threads)
    try:
        set_threads(top)
        a = np.empty(n)
        _fill_kernel(a, 1.0, top)
        arrays = [a]
        if "copy" in kernels or "triad" in kernels:
            b = np.empty(n)
            _fill_kernel(b, 2.0, top)
            arrays.append(b)
        if "triad" in kernels:
            c = np.empty(n)
            _fill_kernel(c, 0.5, top)
            arrays.append(c)
        results: dict[str, dict[str, Any]] = {k: {} for k in kernels}
        for t in threads:
            set_threads(t)
            if "read" in kernels:
                results["read"][str(t)] = _summary(_samples(lambda: _read_kernel(a, t), a.nbytes, reps, step))
            if "copy" in kernels:
                results["copy"][str(t)] = _summary(_samples(lambda: _copy_kernel(b, a, t), 2 * a.nbytes, reps, step))
            if "triad" in kernels:
                results["triad"][str(t)] = _summary(
                    _samples(lambda: _triad_kernel(a, b, c, 3.0, t), 3 * a.nbytes, reps, step))
        numpy_sum = max(_samples(lambda: a.sum(), a.nbytes, reps, step))
        del arrays, a
        numa_rec = measure_numa(size, reps, nodes, step) if numa else None
    finally:
        set_threads(max_threads())
        if bar is not None:
            bar.stop()
    read = results.get("read", {})
    rec: dict[str, Any] = {
        "machine": machine_identity(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "size_bytes": n * 8, "reps": reps, "threads": threads, "results": results,
        "numpy_sum_gbps": numpy_sum,
        "read_gbps": max(r["best_gbps"] for r in read.values()) if read else None,
        "numa": numa_rec,
    }
    return rec


def quick_read_gbps(threads: int | None = None, size_bytes: int | None = None, reps: int = 3) -> float:
    """Best read bandwidth (GB/s) at ``threads`` threads (default all), measured now; for ``bench``."""
    t = max_threads() if threads is None else int(threads)
    rec = measure([t], size_bytes, reps, kernels=("read",), numa=False)
    return float(rec["read_gbps"])


# -- CLI ---------------------------------------------------------------------------------------

def _parse_threads(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise CpuinferError(f"--threads {text!r}: expected comma-separated integers like 1,2,4") from None
    if not out:
        raise CpuinferError(f"--threads {text!r}: no thread counts given")
    return out


def format_report(rec: dict[str, Any]) -> str:
    lines = [f"memory bandwidth, {rec['size_bytes'] / 2**20:.0f} MiB per array, best / median of "
             f"{rec['reps']} runs (GB/s = 1e9 bytes/s):"]
    kernels = list(rec["results"])
    lines.append("  threads " + "".join(f"{k:>22}" for k in kernels))
    for t in rec["threads"]:
        row = f"  {t:>7} "
        for k in kernels:
            r = rec["results"][k][str(t)]
            row += f"{r['best_gbps']:>12.1f} / {r['median_gbps']:<7.1f}"
        lines.append(row)
    lines.append(f"  numpy a.sum() on one thread: {rec['numpy_sum_gbps']:.1f} GB/s")
    if rec.get("read_gbps"):
        lines.append(f"  decode-relevant read bandwidth: {rec['read_gbps']:.1f} GB/s")
    numa = rec.get("numa")
    if numa:
        lines.append(f"  NUMA ({numa['note']}):")
        for p in numa["pairs"]:
            kind = "local" if p["cpu_node"] == p["mem_node"] else "remote"
            lines.append(f"    cpus of node {p['cpu_node']} <- memory of node {p['mem_node']} ({kind}, "
                         f"{p['threads']} threads): {p['best_gbps']:.1f} / {p['median_gbps']:.1f} GB/s")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default 1,2,4..all)")
    p.add_argument("--size", type=float, default=None,
                   help="GB per array (default 16 x last-level cache, 0.25..1 GiB)")
    p.add_argument("--reps", type=int, default=5, help="repetitions per measurement (default 5)")
    p.add_argument("--no-numa", action="store_true", help="skip the per-NUMA-node measurement")
    p.add_argument("--no-cache", action="store_true", help="do not store the result")
    p.add_argument("--json", action="store_true", help="print the result record as JSON")


def run(args: argparse.Namespace) -> int:
    if args.size is not None and not args.size > 0:
        raise CpuinferError(f"--size must be a positive number of GB, got {args.size}")
    size = int(args.size * _GB) if args.size is not None else None
    rec = measure(_parse_threads(args.threads), size, args.reps, numa=not args.no_numa,
                  progress=sys.stderr.isatty() and not args.json)
    if not args.no_cache:
        rec["cache_path"] = str(store_machine_record("bandwidth.json", rec))
    print(json.dumps(rec, indent=1) if args.json else format_report(rec))
    return 0


def main(argv: list[str] | None = None) -> int:
    from cpuinfer.cli import tool_main
    return tool_main(sys.modules[__name__], "python -m tools.bandwidth", "Measure memory bandwidth.", argv)


if __name__ == "__main__":
    sys.exit(main())
