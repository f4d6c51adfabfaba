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
import dataclasses
import json
import shlex
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


def parse_counts(spec: str, flag: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]; a clear error naming ``flag`` for anything but positive integers."""
    try:
        ts = [int(t) for t in spec.split(",") if t.strip()]
    except ValueError:
        raise CpuinferError(f"{flag} expects a comma-separated list of integers, got {spec!r}") from None
    if not ts or any(t < 1 for t in ts):
        raise CpuinferError(f"{flag} expects positive integers, got {spec!r}")
    return ts


def parse_threads(spec: str) -> list[int]:
    return parse_counts(spec, "--threads")


def _prompt_ids(n_vocab: int, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, n_vocab, n).tolist()


class _Timer:
    """Timed repetitions of one engine on a fixed token list: the prompt as one batch from an
    empty context, then the decode tokens one at a time. ``rep()`` -> (prompt t/s, decode t/s)."""

    def __init__(self, eval_batch, reset, ids: list[int], n_prompt: int):
        self.eval, self.reset, self.ids, self.n_prompt = eval_batch, reset, ids, n_prompt
        self.eval(ids[:2])          # compile / load kernels and touch the weights outside the timing
        self.reset()

    def rep(self) -> tuple[float, float]:
        ids, n_prompt = self.ids, self.n_prompt
        self.reset()
        t0 = time.perf_counter()
        self.eval(ids[:n_prompt])
        t1 = time.perf_counter()
        for tok in ids[n_prompt:]:
            self.eval([tok])
        t2 = time.perf_counter()
        return n_prompt / (t1 - t0), (len(ids) - n_prompt) / (t2 - t1)


def cpuinfer_timer(model, n_prompt: int, n_gen: int) -> _Timer:
    ids = _prompt_ids(model.n_vocab, n_prompt + n_gen)
    session = model.new_session(n_prompt + n_gen + 1)
    return _Timer(session.eval, session.reset, ids, n_prompt)


def llama_cpp_timer(path: str, threads: int, n_prompt: int, n_gen: int, n_vocab: int) -> _Timer | None:
    """The same measurement through llama.cpp; None when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_prompt + n_gen + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=max(n_prompt, 8), verbose=False)
    return _Timer(llm.eval, llm.reset, _prompt_ids(n_vocab, n_prompt + n_gen), n_prompt)


def time_interleaved(timers: list[_Timer], reps: int) -> list[tuple[list[float], list[float]]]:
    """``reps`` repetitions of every timer, alternating between them, so that load from other
    processes on a shared machine hits all engines alike; per timer (prompt t/s, decode t/s) lists."""
    res = [([], []) for _ in timers]
    for _ in range(reps):
        for tm, (pp, tg) in zip(timers, res):
            a, b = tm.rep()
            pp.append(a)
            tg.append(b)
    return res


def streamed_bytes_per_token(model, ctx: int) -> int:
    """What the runtime reads to decode one token at context ``ctx``: the weights its forward
    touches (counted from the bound tensors) plus the KV cache of ``ctx`` positions."""
    return int(model.weight_bytes_per_token + model.kv_bytes_per_token * ctx)


def _mean_std(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def bench_model(path: str, threads: list[int], n_prompt: int, n_gen: int, reps: int,
                vs_llama_cpp: bool = False, measure_bandwidth: bool = True,
                numa: str = "auto", repack: bool = True) -> list[BenchRecord]:
    """One record per thread count. Means ± spread are over ``reps``; ``extra`` carries the best
    repetition (``pp_tps_best``, ``tg_tps_best``, and with llama.cpp ``llama_cpp_*_best``), which
    the throughput regression tests compare because it is the least disturbed by other load."""
    import cpuinfer

    model = cpuinfer.load(path, threads=threads[0], n_ctx=n_prompt + n_gen + 1, numa=numa, repack=repack)
    records = []
    for t in threads:
        from quant.jit import set_threads
        if model.numa_plan is not None and t != model.threads:   # pinned threads and placed
            model = cpuinfer.load(path, threads=t, n_ctx=n_prompt + n_gen + 1, numa=numa,
                                  repack=repack)                                    # rows follow t
        else:
            set_threads(t)
        timers, peer = [cpuinfer_timer(model, n_prompt, n_gen)], None
        if vs_llama_cpp:
            peer = llama_cpp_timer(path, t, n_prompt, n_gen, model.n_vocab)
            if peer is None:
                raise CpuinferError("--vs-llama-cpp needs llama-cpp-python: pip install 'cpuinfer[peers]'")
            timers.append(peer)
        results = time_interleaved(timers, reps)
        pp, tg = results[0]
        bpt = streamed_bytes_per_token(model, n_prompt + n_gen // 2)
        (pp_m, pp_s), (tg_m, tg_s) = _mean_std(pp), _mean_std(tg)
        rec = BenchRecord(model=str(path), arch=model.arch, threads=t, n_prompt=n_prompt, n_gen=n_gen,
                          pp_tps=pp_m, pp_tps_std=pp_s, tg_tps=tg_m, tg_tps_std=tg_s,
                          bytes_per_token=bpt, gbps=bpt * tg_m / 1e9)
        rec.extra["numa"] = model.numa_plan.policy if model.numa_plan is not None else "off"
        rec.extra["pp_tps_best"], rec.extra["tg_tps_best"] = max(pp), max(tg)
        read_gbps = measure_read_gbps(t) if measure_bandwidth else None
        if read_gbps:
            rec.read_gbps = read_gbps
            rec.bw_fraction = rec.gbps / read_gbps
        if vs_llama_cpp:
            lpp, ltg = results[1]
            rec.llama_cpp_pp_tps, rec.llama_cpp_tg_tps = _mean_std(lpp)[0], _mean_std(ltg)[0]
            rec.pp_ratio = pp_m / rec.llama_cpp_pp_tps
            rec.tg_ratio = tg_m / rec.llama_cpp_tg_tps
            rec.extra["llama_cpp_pp_tps_best"], rec.extra["llama_cpp_tg_tps_best"] = max(lpp), max(ltg)
        timers = peer = None    # frees llama.cpp's copy of the model before the next thread count
        records.append(rec)
    return records


# -- throughput regression checks (tests/test_perf.py, ``make perf``) -----------------------------

def efficiency(rec: BenchRecord) -> dict[str, float]:
    """Machine-independent ratios of one record, each measured within one run (best repetitions):

    * ``bw_fraction`` — decode GB/s ÷ the read bandwidth measured beside it,
    * ``pp_over_tg`` — prompt t/s ÷ decode t/s (how much batching the mat-mat path gains),
    * ``tg_ratio`` / ``pp_ratio`` — cpuinfer ÷ llama.cpp, when llama.cpp ran.
    """
    x = rec.extra
    out = {"pp_over_tg": x["pp_tps_best"] / x["tg_tps_best"]}
    if rec.read_gbps:
        out["bw_fraction"] = rec.bytes_per_token * x["tg_tps_best"] / 1e9 / rec.read_gbps
    if "llama_cpp_tg_tps_best" in x:
        out["tg_ratio"] = x["tg_tps_best"] / x["llama_cpp_tg_tps_best"]
        out["pp_ratio"] = x["pp_tps_best"] / x["llama_cpp_pp_tps_best"]
    return out


def best_of(records: list[BenchRecord]) -> BenchRecord:
    """Records of the same case from several runs merged into one whose best throughputs and
    read bandwidth are the best of all runs (ratios are then formed from those, so a run slowed
    on one side by other processes does not skew them)."""
    out = dataclasses.replace(records[0], extra=dict(records[0].extra))
    out.read_gbps = max((r.read_gbps for r in records if r.read_gbps), default=None)
    for key in ("pp_tps_best", "tg_tps_best", "llama_cpp_pp_tps_best", "llama_cpp_tg_tps_best"):
        vals = [r.extra[key] for r in records if key in r.extra]
        if vals:
            out.extra[key] = max(vals)
    return out


def regressions(measured: dict[str, float], baseline: dict[str, float],
                tolerance: float | dict[str, float]) -> list[str]:
    """One message per ratio in ``baseline`` that ``measured`` has and that fell below
    ``baseline × tolerance`` (ratios not measured this time, e.g. without llama.cpp, are skipped).
    ``tolerance`` is one factor, or per ratio name with a ``"default"`` for the others."""
    tol = tolerance if isinstance(tolerance, dict) else {"default": tolerance}
    if "default" not in tol or not all(0 < v <= 1 for v in tol.values()):
        raise CpuinferError(f"tolerance must be in (0, 1] (per ratio, with a default), got {tolerance}")
    out = []
    for key, base in sorted(baseline.items()):
        got = measured.get(key)
        t = tol.get(key, tol["default"])
        if got is not None and got < base * t:
            out.append(f"{key} = {got:.3f} < {t:g} × baseline {base:.3f}")
    return out


# -- time to first token of a fresh process (``--ttft``) -----------------------------------------

TTFT_PROMPT = "What is the capital of France?"


def time_to_first_token(path: str, threads: int | None = None, starts: int = 2,
                        prompt: str = TTFT_PROMPT) -> list[dict[str, float]]:
    """Start ``cpuinfer run MODEL -p PROMPT --max-tokens 1 --temp 0`` ``starts`` times in a
    new process and time, per start, the first byte of the answer on stdout (``ttft_s``) and the
    exit (``exit_s``) from the moment the process is spawned — imports, file mapping, numba's
    cache loads (or compilation on a first start), the prompt and one sampled token. The first
    start fills numba's disk cache and the page cache; later ones are what a user sees again."""
    import subprocess

    cmd = [sys.executable, "-c", "import sys; from cpuinfer.cli import main; sys.exit(main())",
           "run", str(path), "-p", prompt, "--max-tokens", "1", "--temp", "0"]
    if threads:
        cmd += ["--threads", str(threads)]
    out = []
    for _ in range(starts):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = proc.stdout.read(1)
        t1 = time.perf_counter()
        rest, err = proc.communicate()
        t2 = time.perf_counter()
        if proc.returncode != 0 or not first:
            msg = err.decode(errors="replace").strip().splitlines()
            raise CpuinferError(f"--ttft: cpuinfer run {path} failed (exit {proc.returncode}): "
                                f"{msg[-1] if msg else 'no output'}")
        out.append({"ttft_s": t1 - t0, "exit_s": t2 - t0})
    return out


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def print_table(records: list[BenchRecord], out=None) -> None:
    out = out or sys.stdout
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


def machine_description() -> str:
    """``<lscpu model name>, <n> cores, <GB> GB`` of this machine, for the README table."""
    from tools.bandwidth import machine_identity
    ident = machine_identity()
    return f"{ident['cpu_model']}, {ident['logical_cpus']} cores, {ident['memory_bytes'] / 1e9:.0f} GB"


def print_readme_table(records: list[BenchRecord], command: str, out=None) -> None:
    out = out or sys.stdout
    """The README results table: machine, model, threads, tg/pp t/s, GB/s, % of the read
    bandwidth, ratios vs llama.cpp, and the command line that produced it."""
    machine = machine_description()
    cols = ["machine", "model", "threads", "tg t/s", "pp t/s", "GB/s", "% of read BW",
            "tg vs llama.cpp", "pp vs llama.cpp"]
    print("| " + " | ".join(cols) + " |", file=out)
    print("|" + "|".join("---" for _ in cols) + "|", file=out)
    for r in records:
        row = [machine, r.model.rsplit("/", 1)[-1], str(r.threads), f"{r.tg_tps:.1f}", f"{r.pp_tps:.1f}",
               f"{r.gbps:.1f}", _fmt(None if r.bw_fraction is None else 100 * r.bw_fraction, ".0f"),
               _fmt(r.tg_ratio, ".2f") + ("×" if r.tg_ratio is not None else ""),
               _fmt(r.pp_ratio, ".2f") + ("×" if r.pp_ratio is not None else "")]
        print("| " + " | ".join(row) + " |", file=out)
    print(f"\n`{command}`", file=out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="*", help="GGUF file(s); default: the bundled SmolLM2-135M Q4_1")
    p.add_argument("-t", "--threads", default=None, help="comma-separated thread counts (default: physical cores)")
    p.add_argument("-p", "--n-prompt", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("-n", "--n-gen", type=int, default=32, help="decoded tokens (default 32)")
    p.add_argument("-r", "--repetitions", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON record per model × thread count")
    p.add_argument("--vs-llama-cpp", action="store_true", help="also run llama.cpp (llama-cpp-python) and print ratios")
    p.add_argument("--no-bandwidth", action="store_true", help="skip measuring the read bandwidth")
    p.add_argument("--markdown", action="store_true",
                   help="the README results table (machine column, ratios, the command line) instead; "
                        "with --json, the table and then the JSON records of the same run")
    p.add_argument("--ttft", action="store_true",
                   help="instead: time to first token of `cpuinfer run -p` in a new process, first and second start")
    p.add_argument("--numa", default="auto", metavar="POLICY",
                   help="NUMA placement: auto, off, interleave, distribute, isolate[:NODE] (default auto)")
    p.add_argument("--no-repack", action="store_true",
                   help="run the file's row order (default: Q4_0..Q5_1/Q8_0/Q2_K..Q6_K interleaved at load)")


def run_ttft(paths: list[str], threads: list[int], as_json: bool, out=None) -> int:
    out = out or sys.stdout
    rows = []
    for path in paths:
        for t in threads:
            starts = time_to_first_token(path, t)
            rows.append({"model": str(path), "threads": t, "ttft_first_s": starts[0]["ttft_s"],
                         "ttft_second_s": starts[1]["ttft_s"], "exit_second_s": starts[1]["exit_s"]})
    if as_json:
        for r in rows:
            print(json.dumps(r), file=out)
        return 0
    print("| model | threads | first start: first token (s) | second start: first token (s) |"
          " second start: exit (s) |", file=out)
    print("|---|---|---|---|---|", file=out)
    for r in rows:
        print(f"| {r['model'].rsplit('/', 1)[-1]} | {r['threads']} | {r['ttft_first_s']:.2f} | "
              f"{r['ttft_second_s']:.2f} | {r['exit_second_s']:.2f} |", file=out)
    return 0


def measure_read_gbps(threads: int) -> float:
    """Read bandwidth at ``threads`` threads, measured now, beside the model's own run."""
    from tools import bandwidth
    return bandwidth.quick_read_gbps(threads)


def command_line(args: argparse.Namespace, threads: list[int]) -> str:
    """The ``cpuinfer bench`` command that reproduces this run (model paths as given)."""
    parts = ["cpuinfer", "bench", *args.model, "-t", ",".join(map(str, threads)), "-p", str(args.n_prompt),
             "-n", str(args.n_gen), "-r", str(args.repetitions)]
    parts += ["--vs-llama-cpp"] * bool(args.vs_llama_cpp) + ["--no-bandwidth"] * bool(args.no_bandwidth)
    if args.numa != "auto":
        parts += ["--numa", args.numa]
    parts += ["--no-repack"] * bool(args.no_repack)
    return " ".join(shlex.quote(p) for p in parts + ["--markdown"])


def run(args: argparse.Namespace) -> int:
    from cpuinfer.bundled import bundled_model_path
    from cpuinfer.model import default_threads

    for name, v in (("-p/--n-prompt", args.n_prompt), ("-n/--n-gen", args.n_gen), ("-r/--repetitions", args.repetitions)):
        if v < 1:
            raise CpuinferError(f"{name} must be at least 1, got {v}")
    threads = parse_threads(args.threads) if args.threads else [default_threads()]
    paths = args.model or [str(bundled_model_path())]
    if args.ttft:
        return run_ttft(paths, threads, args.json)
    records = []
    for path in paths:
        records += bench_model(path, threads, args.n_prompt, args.n_gen, args.repetitions,
                               args.vs_llama_cpp, not args.no_bandwidth, numa=args.numa,
                               repack=not args.no_repack)
    if not args.no_bandwidth:   # `cpuinfer estimate` takes this machine's efficiency from here
        from tools.estimate import store_bench_records
        store_bench_records([asdict(r) for r in records])
    if args.markdown:           # with --json too: the table, then the records it was made from
        print_readme_table(records, command_line(args, threads))
    if args.json:
        for r in records:
            print(json.dumps(asdict(r)))
    if not (args.json or args.markdown):
        print_table(records)
    return 0
