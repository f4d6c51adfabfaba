"""``cpuinfer run [MODEL] [-p PROMPT] ...``: load a model (progress shown while the file is
mapped and the kernels compile or load from numba's disk cache), then chat."""
from __future__ import annotations

import argparse
import sys
import time

from .errors import CpuinferError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="GGUF file (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-p", "--prompt", help="answer this prompt once and exit (reads stdin when '-')")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k (default 40; 0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p (default 0.95; 1 = off)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p (default 0.05; 0 = off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (default 1.0 = off)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the penalty looks back on (default 64)")
    p.add_argument("--max-tokens", type=int, default=None, help="longest reply in tokens (default: until done)")
    p.add_argument("--ctx", type=int, default=None, help="context size in tokens (default min(4096, trained))")
    p.add_argument("--seed", type=int, default=None, help="random seed (reproducible sampling)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("--numa", default="auto", metavar="POLICY",
                   help="NUMA placement: auto, off, interleave, distribute, isolate[:NODE] (default auto)")
    p.add_argument("--no-repack", action="store_true",
                   help="compute from the file's row order (default: Q4_0..Q5_1/Q8_0/Q2_K..Q6_K "
                        "matrices are copied 8 rows interleaved at load, for speed)")
    p.add_argument("--hide-think", action="store_true", help="hide <think>…</think> reasoning")
    p.add_argument("--verbose", action="store_true", help="print load details")


def load_with_progress(path: str, threads: int | None, n_ctx: int | None, show: bool, numa: str = "auto",
                       repack: bool = True):
    """Load the model and warm the kernels, with a progress display on a terminal."""
    import cpuinfer

    if not show:
        m = cpuinfer.load(path, threads=threads, n_ctx=n_ctx, numa=numa, repack=repack)
        m.warmup()
        return m
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  transient=True, console=_stderr_console()) as prog:
        task = prog.add_task(f"mapping {path}", total=2)
        m = cpuinfer.load(path, threads=threads, n_ctx=n_ctx, numa=numa, repack=repack)
        prog.update(task, advance=1, description="compiling kernels (cached on disk after the first run)")
        m.warmup()
        prog.update(task, advance=1)
    return m


def _stderr_console():
    from rich.console import Console
    return Console(stderr=True)


def run(args: argparse.Namespace) -> int:
    from .bundled import bundled_model_path
    from .chat_cli import ChatOptions, run_chat
    from .sampling import SamplerParams

    if args.ctx is not None and args.ctx < 16:
        raise CpuinferError(f"--ctx must be at least 16, got {args.ctx}")
    if args.threads is not None and args.threads < 1:
        raise CpuinferError(f"--threads must be at least 1, got {args.threads}")
    if args.max_tokens is not None and args.max_tokens < 0:
        raise CpuinferError(f"--max-tokens must be ≥ 0, got {args.max_tokens}")
    params = SamplerParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                           repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed)
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    path = args.model or str(bundled_model_path())
    t0 = time.perf_counter()
    model = load_with_progress(path, args.threads, args.ctx, show=sys.stderr.isatty(), numa=args.numa,
                               repack=not args.no_repack)
    if args.verbose:
        print(f"{model!r} loaded in {time.perf_counter() - t0:.2f} s; KV cache "
              f"{model.kv_bytes_per_token} bytes/token", file=sys.stderr)
    opts = ChatOptions(prompt=prompt, sampler=params, max_tokens=args.max_tokens, system=args.system,
                       hide_think=args.hide_think)
    return run_chat(model, opts)
