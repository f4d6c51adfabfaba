"""``cpuinfer bench``: prompt (pp) and decode (tg) throughput, like llama-bench.

For each thread count: ``-p`` prompt tokens evaluated as one batch from an empty context, then
``-n`` tokens decoded one at a time; ``-r`` repetitions give the mean and spread. Each record also
carries the bytes one decoded token streams (weights it reads + the KV cache at the average
decode position), the achieved GB/s, and that as a fraction of the read bandwidth measured in the
same run. ``--vs-llama-cpp`` runs the same file through llama.cpp (``llama-cpp-python``, the
optional ``peers`` extra) in the same process and reports the ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from cpuinfer.errors import CpuinferError


@dataclass
class BenchRecord:
    model: str
    arch: str
    threads: int
    n_prompt: int
    n_gen: int
    pp_tps: float
    pp_tps_std: float
    tg_tps: float
    tg_tps_std: float
    bytes_per_token: int
    gbps: float
    read_gbps: float | None = None
    bw_fraction: float | None = None
    llama_cpp_pp_tps: float | None = None
    llama_cpp_tg_tps: float | None = None
    pp_ratio: float | None = None
    tg_ratio: float | None = None
    extra: dict = field(default_factory=dict)


def parse_threads(spec: str) -> list[int]:
    try:
        ts = [int(t) for t in spec.split(",") if t.strip()]
    except ValueError:
        raise CpuinferError(f"--threads expects a comma-separated list of integers, got {spec!r}") from None
    if not ts or any(t < 1 for t in ts):
        raise CpuinferError(f"--threads expects positive integers, got {spec!r}")
    return ts


def _prompt_ids(n_vocab: int, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, n_vocab, n).tolist()


def time_cpuinfer(model, n_prompt: int, n_gen: int, reps: int) -> tuple[list[float], list[float]]:
    """Per repetition: prompt tokens/s and decode tokens/s (the decode tokens follow the prompt)."""
    ids = _prompt_ids(model.n_vocab, n_prompt + n_gen)
    session = model.new_session(n_prompt + n_gen + 1)
    session.eval(ids[:2])          # compile / load kernels outside the timing
    session.reset()
    session.eval([ids[0]])
    pp, tg = [], []
    for _ in range(reps):
        session.reset()
        t0 = time.perf_counter()
        session.eval(ids[:n_prompt])
        t1 = time.perf_counter()
        for tok in ids[n_prompt:n_prompt + n_gen]:
            session.eval([tok])
        t2 = time.perf_counter()
        pp.append(n_prompt / (t1 - t0))
        tg.append(n_gen / (t2 - t1))
    return pp, tg


def time_llama_cpp(path: str, threads: int, n_prompt: int, n_gen: int, reps: int, n_vocab: int):
    """The same measurement through llama.cpp; None when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_prompt + n_gen + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=max(n_prompt, 8), verbose=False)
    ids = _prompt_ids(n_vocab, n_prompt + n_gen)
    llm.eval(ids[:2])
    pp, tg = [], []
    for _ in range(reps):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[:n_prompt])
        t1 = time.perf_counter()
        for tok in ids[n_prompt:n_prompt + n_gen]:
            llm.eval([tok])
        t2 = time.perf_counter()
        pp.append(n_prompt / (t1 - t0))
        tg.append(n_gen / (t2 - t1))
    del llm
    return pp, tg


def streamed_bytes_per_token(model, ctx: int) -> int:
    """What the runtime reads to decode one token at context ``ctx``: the weights its forward
    touches (counted from the bound tensors) plus the KV cache of ``ctx`` positions."""
    return int(model.weight_bytes_per_token + model.kv_bytes_per_token * ctx)


def _mean_std(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def bench_model(path: str, threads: list[int], n_prompt: int, n_gen: int, reps: int,
                vs_llama_cpp: bool = False, measure_bandwidth: bool = True,
                numa: str = "auto") -> list[BenchRecord]:
    import cpuinfer

    model = cpuinfer.load(path, threads=threads[0], n_ctx=n_prompt + n_gen + 1, numa=numa)
    records = []
    for t in threads:
        from quant.jit import set_threads
        if model.numa_plan is not None and t != model.threads:   # pinned threads and placed
            model = cpuinfer.load(path, threads=t, n_ctx=n_prompt + n_gen + 1, numa=numa)  # rows follow t
        else:
            set_threads(t)
        pp, tg = time_cpuinfer(model, n_prompt, n_gen, reps)
        bpt = streamed_bytes_per_token(model, n_prompt + n_gen // 2)
        (pp_m, pp_s), (tg_m, tg_s) = _mean_std(pp), _mean_std(tg)
        rec = BenchRecord(model=str(path), arch=model.arch, threads=t, n_prompt=n_prompt, n_gen=n_gen,
                          pp_tps=pp_m, pp_tps_std=pp_s, tg_tps=tg_m, tg_tps_std=tg_s,
                          bytes_per_token=bpt, gbps=bpt * tg_m / 1e9)
        rec.extra["numa"] = model.numa_plan.policy if model.numa_plan is not None else "off"
        read_gbps = measure_read_gbps(t) if measure_bandwidth else None
        if read_gbps:
            rec.read_gbps = read_gbps
            rec.bw_fraction = rec.gbps / read_gbps
        if vs_llama_cpp:
            peer = time_llama_cpp(path, t, n_prompt, n_gen, reps, model.n_vocab)
            if peer is None:
                raise CpuinferError("--vs-llama-cpp needs llama-cpp-python: pip install 'cpuinfer[peers]'")
            rec.llama_cpp_pp_tps, rec.llama_cpp_tg_tps = _mean_std(peer[0])[0], _mean_std(peer[1])[0]
            rec.pp_ratio = pp_m / rec.llama_cpp_pp_tps
            rec.tg_ratio = tg_m / rec.llama_cpp_tg_tps
        records.append(rec)
    return records


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def print_table(records: list[BenchRecord], out=sys.stdout) -> None:
    cols = ["model", "threads", "pp t/s", "tg t/s", "MB/token", "GB/s", "% of read BW",
            "llama.cpp pp", "llama.cpp tg", "pp ratio", "tg ratio"]
    rows = []
    for r in records:
        name = r.model.rsplit("/", 1)[-1]
        rows.append([name, str(r.threads), f"{r.pp_tps:.1f} ± {r.pp_tps_std:.1f}",
                     f"{r.tg_tps:.1f} ± {r.tg_tps_std:.1f}", f"{r.bytes_per_token / 1e6:.1f}",
                     f"{r.gbps:.2f}", _fmt(None if r.bw_fraction is None else 100 * r.bw_fraction),
                     _fmt(r.llama_cpp_pp_tps), _fmt(r.llama_cpp_tg_tps), _fmt(r.pp_ratio, ".2f"),
                     _fmt(r.tg_ratio, ".2f")])
    print("| " + " | ".join(cols) + " |", file=out)
    print("|" + "|".join("---" for _ in cols) + "|", file=out)
    for row in rows:
        print("| " + " | ".join(row) + " |", file=out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="*", help="GGUF file(s); default: the bundled SmolLM2-135M Q4_1")
    p.add_argument("-t", "--threads", default=None, help="comma-separated thread counts (default: physical cores)")
    p.add_argument("-p", "--n-prompt", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("-n", "--n-gen", type=int, default=32, help="decoded tokens (default 32)")
    p.add_argument("-r", "--repetitions", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON record per model × thread count")
    p.add_argument("--vs-llama-cpp", action="store_true", help="also run llama.cpp (llama-cpp-python) and print ratios")
    p.add_argument("--no-bandwidth", action="store_true", help="skip measuring the read bandwidth")
    p.add_argument("--numa", default="auto", metavar="POLICY",
                   help="NUMA placement: auto, off, interleave, distribute, isolate[:NODE] (default auto)")


def measure_read_gbps(threads: int) -> float:
    """Read bandwidth at ``threads`` threads, measured now, beside the model's own run."""
    from tools import bandwidth
    return bandwidth.quick_read_gbps(threads)


def run(args: argparse.Namespace) -> int:
    from cpuinfer.bundled import bundled_model_path
    from cpuinfer.model import default_threads

    for name, v in (("-p/--n-prompt", args.n_prompt), ("-n/--n-gen", args.n_gen), ("-r/--repetitions", args.repetitions)):
        if v < 1:
            raise CpuinferError(f"{name} must be at least 1, got {v}")
    threads = parse_threads(args.threads) if args.threads else [default_threads()]
    paths = args.model or [str(bundled_model_path())]
    records = []
    for path in paths:
        records += bench_model(path, threads, args.n_prompt, args.n_gen, args.repetitions,
                               args.vs_llama_cpp, not args.no_bandwidth, numa=args.numa)
    if not args.no_bandwidth:   # `cpuinfer estimate` takes this machine's efficiency from here
        from tools.estimate import store_bench_records
        store_bench_records([asdict(r) for r in records])
    if args.json:
        for r in records:
            print(json.dumps(asdict(r)))
    else:
        print_table(records)
    return 0
