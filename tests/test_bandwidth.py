"""Bandwidth meter: kernel correctness, vector code, quick runs, JSON schema, cache, CLI."""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from cpuinfer.errors import CpuinferError
from quant.jit import max_threads, set_threads
from tools import bandwidth as bw

SMALL = 8 << 20


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CPUINFER_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernels_compute_the_right_thing(threads):
    rng = np.random.default_rng(threads)
    a = rng.standard_normal(100_003)
    b, c = np.empty_like(a), rng.standard_normal(a.size)
    assert bw._read_kernel(a, threads) == pytest.approx(a.sum(), rel=1e-9, abs=1e-9)
    assert bw._read_serial(a) == pytest.approx(a.sum(), rel=1e-9, abs=1e-9)
    bw._copy_kernel(b, a, threads)
    assert np.array_equal(a, b)
    out = np.empty_like(a)
    bw._triad_kernel(out, b, c, 3.0, threads)
    np.testing.assert_allclose(out, a + 3.0 * c, rtol=1e-12, atol=1e-15)  # FMA rounding
    bw._fill_kernel(out, 2.5, threads)
    assert np.all(out == 2.5)


def _has_avx2() -> bool:
    try:
        return " avx2" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx2(), reason="needs an AVX2 CPU")
def test_read_kernel_uses_vector_loads():
    asm = bw.read_kernel_asm()
    # packed double adds straight from memory into 256/512-bit registers
    assert re.search(r"vaddpd\s+-?\d*\(%\w+(,%\w+,\d)?\),\s*%[yz]mm\d+", asm), "read kernel is not vectorized"


def test_quick_measurement_schema():
    rec = bw.measure([1, max_threads()], SMALL, reps=2)
    assert rec["size_bytes"] == SMALL and rec["reps"] == 2
    for kernel in ("read", "copy", "triad"):
        for t in {1, max_threads()}:
            r = rec["results"][kernel][str(t)]
            assert r["best_gbps"] >= r["median_gbps"] > 0 and len(r["samples_gbps"]) == 2
    assert rec["read_gbps"] == max(r["best_gbps"] for r in rec["results"]["read"].values())
    assert rec["numpy_sum_gbps"] > 0
    numa = rec["numa"]
    nodes = bw.numa_nodes()
    assert numa["nodes"] == sorted(nodes) and len(numa["pairs"]) == len(nodes) ** 2
    assert all(p["best_gbps"] > 0 for p in numa["pairs"])
    if len(nodes) == 1:
        assert "one NUMA node" in numa["note"]
    assert set(rec["machine"]) == {"cpu_model", "logical_cpus", "memory_bytes", "hostname"}
    json.dumps(rec)  # serialisable as is
    assert "threads" in bw.format_report(rec)


def test_numa_parsing(tmp_path):
    assert bw._parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    for node, cpus in (("node0", "0"), ("node1", "1")):
        (tmp_path / node).mkdir()
        (tmp_path / node / "cpulist").write_text(cpus)
    allowed = sorted(__import__("os").sched_getaffinity(0))
    nodes = bw.numa_nodes(str(tmp_path))
    assert all(set(c) <= set(allowed) for c in nodes.values())
    assert bw.numa_nodes(str(tmp_path / "missing")) == {0: allowed}


def test_numa_pinned_threads_measure_each_pair():
    cpus = sorted(__import__("os").sched_getaffinity(0))
    fake = {0: cpus[:1], 1: cpus[-1:]}      # two pseudo nodes: exercises the remote pairs too
    rec = bw.measure_numa(SMALL, 1, fake)
    assert {(p["cpu_node"], p["mem_node"]) for p in rec["pairs"]} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert "remote" in rec["note"]


def test_cache_round_trip():
    assert bw.load_cached_bandwidth() is None
    rec = bw.measure([1], SMALL, reps=1, kernels=("read",), numa=False)
    path = bw.store_machine_record("bandwidth.json", rec)
    assert path.parent == bw.cache_dir() and path.name == "bandwidth.json"
    again = bw.load_cached_bandwidth()
    assert again["read_gbps"] == rec["read_gbps"] and again["machine"] == bw.machine_identity()
    data = json.loads(path.read_text())
    assert data["version"] == bw.CACHE_VERSION and list(data["machines"]) == [bw.machine_key()]
    path.write_text("{not json")
    assert bw.load_cached_bandwidth() is None


def test_cli(capsys):
    assert bw.main(["--threads", "1", "--size", "0.01", "--reps", "1", "--no-numa", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["results"]["read"]["1"]["best_gbps"] > 0 and "cache_path" in d
    assert bw.load_cached_bandwidth()["read_gbps"] == d["read_gbps"]
    for argv, msg in ((["--threads", "a,b"], "comma-separated"),
                      (["--threads", str(max_threads() + 1)], "out of range"),
                      (["--size", "0"], "--size"), (["--reps", "0"], "--reps")):
        assert bw.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("cpuinfer: ") and msg in err


def test_bad_kernel_name():
    with pytest.raises(CpuinferError, match="kernel"):
        bw.measure([1], SMALL, kernels=("scale",))


@pytest.mark.perf
def test_read_kernel_at_least_numpy_sum():
    """The meter must stream at least as fast as numpy's SIMD sum (else it measures itself).

    Up to 3 rounds, each judged on its own (as ``make perf`` does): on the shared dev host one
    round of 7 interleaved pairs read 25.8 against numpy's 27.3 GB/s (0.945), a meter slower
    by design stays below in every round."""
    a = np.empty(bw.default_size_bytes() // 8)
    bw._fill_kernel(a, 1.0, 1)
    set_threads(1)
    rounds = []
    try:
        bw._read_kernel(a, 1)
        for _ in range(3):
            ours, theirs = [], []
            for _ in range(7):   # interleaved, so both see the same machine noise
                t0 = time.perf_counter()
                bw._read_kernel(a, 1)
                ours.append(a.nbytes / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                a.sum()
                theirs.append(a.nbytes / (time.perf_counter() - t0))
            rounds.append((max(ours) / 1e9, max(theirs) / 1e9))
            if max(ours) >= 0.95 * max(theirs):
                return
    finally:
        set_threads(max_threads())
    pytest.fail(f"read kernel below 0.95 x numpy's sum in every round (ours, numpy GB/s): {rounds}")
