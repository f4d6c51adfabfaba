"""NUMA: topology and plans on recorded sysfs trees; placement, residency and logits on this machine."""
from __future__ import annotations

import errno
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from cpuinfer.errors import CpuinferError
from numa import memory
from quant import interleaved
from numa.plan import (ROW_TILE, MatrixSpec, NumaSpec, assign_experts, expert_imbalance, make_plan,
                       page_partition, split_proportional, static_schedule)
from numa.topology import format_cpulist, parse_cpulist, parse_meminfo, read_topology

DATA = Path(__file__).parent / "data" / "numa"
TINY = Path(__file__).parent / "data" / "tiny" / "llama" / "llama-Q8_0.gguf"
_spec = importlib.util.spec_from_file_location("make_trees", DATA / "make_trees.py")
make_trees = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_trees)

GIB = 2**30
# a 7B-like model: 32 layers of attention + ffn, plus embeddings/output, Q4_0 row bytes
MODEL = ([MatrixSpec(f"blk.{i}.attn_q.weight", 4096, 2304) for i in range(32)]
         + [MatrixSpec(f"blk.{i}.ffn_down.weight", 4096, 6192) for i in range(32)]
         + [MatrixSpec(f"blk.{i}.ffn_up.weight", 11008, 2304) for i in range(32)]
         + [MatrixSpec("output.weight", 152064, 2304), MatrixSpec("token_embd.weight", 152064, 2304)]
         + [MatrixSpec("blk.0.ffn_gate_exps.weight", 1407, 2304, n_stack=64)]   # ragged rows, experts
         + [MatrixSpec("blk.0.attn_k.weight", 7, 34)])                          # fewer rows than a tile


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("numa_trees")
    out = {name: read_topology(make_trees.write_tree(name, root / name)) for name in make_trees.TREES}
    out["kvm_1node"] = read_topology(DATA / "kvm_1node")
    return out


# -- topology -----------------------------------------------------------------------------------

def test_cpulist_roundtrip():
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("") == []
    assert parse_cpulist("0-6:2") == [0, 2, 4, 6]
    assert format_cpulist([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    with pytest.raises(CpuinferError, match="cannot parse"):
        parse_cpulist("0-x")
    assert parse_meminfo("Node 1 MemTotal:  2048 kB\nNode 1 MemFree: 1024 kB")["MemFree"] == 1024 * 1024


def test_topology_dual_socket_nps1(trees):
    t = trees["epyc9004_2s_nps1"]
    assert t.node_ids == [0, 1] and t.has_node_dir
    n0, n1 = t.nodes
    assert n0.cores == tuple(range(96)) and n1.cores == tuple(range(96, 192))
    assert set(n0.cpus) == set(range(96)) | set(range(192, 288))
    assert t.cpus[200].core == 8 and t.cpus[200].siblings == (8, 200) and not t.cpus[200].is_primary
    assert t.cpus[100].package == 1 and t.node_of_cpu(300) == 1
    assert t.distance[(0, 1)] == 32 and t.distance[(1, 1)] == 10
    assert n0.mem_total == make_trees.SOCKET_MEM_KB * 1024


def test_topology_nps4_single_and_container(trees):
    t = trees["epyc9004_2s_nps4"]
    assert t.n_nodes == 8
    assert [len(n.cores) for n in t.nodes] == [24] * 8
    assert t.nodes[5].cores == tuple(range(120, 144)) and 192 + 120 in t.nodes[5].cpus
    assert t.distance[(0, 3)] == 12 and t.distance[(0, 4)] == 32 and t.distance[(6, 6)] == 10
    s = trees["epyc9004_1s_nps1"]
    assert s.n_nodes == 1 and len(s.nodes[0].cores) == 64 and len(s.nodes[0].cpus) == 128
    c = trees["container_no_node"]
    assert not c.has_node_dir and c.node_ids == [0]
    assert c.nodes[0].cores == (0, 1, 2, 3) and c.nodes[0].mem_total is not None
    k = trees["kvm_1node"]
    assert k.node_ids == [0] and k.nodes[0].cores == (0, 1) and k.nodes[0].mem_total > 0


def test_topology_live_machine():
    t = read_topology("/")
    assert set(os.sched_getaffinity(0)) <= set(t.cpus)
    assert sum(len(n.cpus) for n in t.nodes) == len(t.cpus)


# -- plans ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,t", [(1, 4), (7, 2), (10, 3), (257, 16), (2048, 192), (5, 5)])
def test_static_schedule_partition(n, t):
    s = static_schedule(n, t)
    assert s[0, 0] == 0 and s[-1, 1] == n
    assert (s[1:, 0] == s[:-1, 1]).all() and (s[:, 1] >= s[:, 0]).all()
    sizes = s[:, 1] - s[:, 0]
    assert sizes.max() - sizes[sizes > 0].min() <= 1


def test_split_proportional():
    assert split_proportional(10, {0: 96, 1: 96}) == {0: 5, 1: 5}
    assert split_proportional(7, {0: 3, 1: 1}) == {0: 3, 1: 1}
    got = split_proportional(40, {k: 24 for k in range(8)})
    assert sum(got.values()) == 40 and max(got.values()) - min(got.values()) <= 1


@pytest.mark.parametrize("tree", ["epyc9004_2s_nps1", "epyc9004_2s_nps4", "epyc9004_1s_nps1",
                                  "container_no_node", "kvm_1node"])
@pytest.mark.parametrize("threads", [None, 3, 13])
def test_distribute_plan_on_recorded_trees(trees, tree, threads):
    t = trees[tree]
    plan = make_plan(t, "distribute", threads=threads, matrices=MODEL)
    # threads: one per physical core, grouped by node, consecutive ids, each on its node's core
    cores = sum(len(n.cores) for n in t.nodes)
    want = min(threads or cores, cores)                   # never more workers than cores
    assert plan.n_threads == want == len(plan.thread_cpus)
    assert len(set(plan.thread_cpus)) == plan.n_threads
    for cpu, node in zip(plan.thread_cpus, plan.thread_nodes):
        assert t.cpus[cpu].is_primary and t.node_of_cpu(cpu) == node
    assert list(plan.thread_nodes) == sorted(plan.thread_nodes)
    assert plan.copy == (t.n_nodes > 1)
    # rows: every matrix covered exactly once, tile-aligned, by the nodes whose threads compute them
    for m in MODEL:
        shards = plan.row_shards(m.rows)
        assert shards[0][1] == 0 and shards[-1][2] == m.rows
        for (_, _, b), (_, a, _) in zip(shards, shards[1:]):
            assert a == b and a % ROW_TILE == 0
        assert len({n for n, _, _ in shards}) == len(shards)      # one contiguous shard per node
        sched = static_schedule(-(-m.rows // ROW_TILE), plan.n_threads)
        for th in range(plan.n_threads):
            c0, c1 = sched[th]
            for r in (c0 * ROW_TILE, min(m.rows, c1 * ROW_TILE) - 1) if c1 > c0 else ():
                owner = next(n for n, a, b in shards if a <= r < b)
                assert owner == plan.thread_nodes[th]
        rng = plan.byte_ranges(m)
        assert sum(b - a for _, a, b in rng) == m.nbytes
        assert all(r[2] == n[1] for r, n in zip(rng, rng[1:]))
    # bytes per node: proportional to threads on big matrices, total exact, within budget
    per = plan.bytes_per_node(MODEL)
    assert sum(per.values()) == sum(m.nbytes for m in MODEL)
    if t.n_nodes > 1 and threads is None:
        # proportional to threads where a matrix has many row tiles per thread (numba gives the
        # first threads one tile more, so small matrices lean towards the first node)
        big = [m for m in MODEL if m.rows // ROW_TILE >= 10 * plan.n_threads]
        per_big = plan.bytes_per_node(big)
        share = np.array([per_big[n] for n in sorted(per_big)], float) / sum(per_big.values())
        assert np.allclose(share, 1 / t.n_nodes, atol=0.05 / t.n_nodes)
    for n, b in per.items():
        assert plan.budget[n] is None or b <= plan.budget[n]


def test_smt_and_affinity(trees):
    t = trees["epyc9004_2s_nps1"]
    p = make_plan(t, NumaSpec("distribute", smt=True))
    assert p.n_threads == 384 and p.thread_cpus[:96] == tuple(range(96)) and p.thread_cpus[96:192] == tuple(range(192, 288))
    allowed = set(range(8)) | {96 + 3, 192 + 4}            # a cpuset: 8 cores on node 0, one sibling-only core... on node 1
    p = make_plan(t, "distribute", allowed_cpus=allowed)
    assert p.thread_cpus == (0, 1, 2, 3, 4, 5, 6, 7, 99) and p.thread_nodes == (0,) * 8 + (1,)
    p = make_plan(t, "distribute", max_threads=10)
    assert p.n_threads == 10 and p.node_threads() == {0: 5, 1: 5}


def test_policies_resolve(trees):
    two, one = trees["epyc9004_2s_nps1"], trees["epyc9004_1s_nps1"]
    assert make_plan(two, "auto").policy == "distribute"
    auto1 = make_plan(one, "auto")
    assert auto1.policy == "off" and not auto1.pinned and not auto1.copy
    d1 = make_plan(one, "distribute")
    assert d1.pinned and not d1.copy                              # one node: pin only, no copies
    iso = make_plan(trees["epyc9004_2s_nps4"], "isolate:5", matrices=MODEL)
    assert set(iso.thread_cpus) == set(range(120, 144)) and iso.mem_nodes == (5,)
    assert iso.bytes_per_node(MODEL) == {5: sum(m.nbytes for m in MODEL)}
    il = make_plan(two, "interleave", matrices=MODEL)
    assert il.mem_nodes == (0, 1) and abs(il.bytes_per_node(MODEL)[0] - il.bytes_per_node(MODEL)[1]) <= 1
    assert make_plan(two, "off").policy == "off"
    for bad in ("bogus", "distribute:1", "isolate:x"):
        with pytest.raises(CpuinferError):
            NumaSpec.parse(bad)
    with pytest.raises(CpuinferError, match="does not exist"):
        make_plan(two, "isolate:7")


def test_budget_moves_threads_or_refuses(trees):
    t = trees["epyc9004_2s_nps1"]
    total = sum(m.nbytes for m in MODEL)
    budget = {0: int(total * 0.3), 1: total}
    p = make_plan(t, "distribute", matrices=MODEL, budget=budget)
    per = p.bytes_per_node(MODEL)
    assert per[0] <= budget[0] and p.node_threads()[0] < p.node_threads()[1] and p.notes
    with pytest.raises(CpuinferError, match="GiB on node"):
        make_plan(t, "distribute", matrices=MODEL, budget={0: total // 10, 1: total // 10})
    with pytest.raises(CpuinferError, match="GiB on node 0"):
        make_plan(t, "isolate:0", matrices=MODEL, budget={0: total // 2, 1: total})


def test_page_partition_exact():
    ranges = [(0, 0, 5000), (1, 5000, 9000), (0, 9000, 20000), (1, 20000, 20001)]
    pages = page_partition(ranges, 20001, 4096)
    assert pages[0][1] == 0 and pages[-1][2] == 5
    assert all(a[2] == b[1] for a, b in zip(pages, pages[1:]))
    owner = {p: n for n, p0, p1 in pages for p in range(p0, p1)}
    for p in range(5):          # page p belongs to the owner of its first byte
        assert owner[p] == next(n for n, a, b in ranges if a <= p * 4096 < b)


def test_assign_experts_and_balance():
    a = assign_experts(256, 10, {0: 96, 1: 96})
    assert (np.bincount(a) == [128, 128]).all() and (np.diff(a) >= 0).all()
    a = assign_experts(64, 10, {k: 24 for k in range(8)}, budget={0: 35, **{k: 10**9 for k in range(1, 8)}})
    assert np.bincount(a, minlength=8)[0] == 3 and a.shape[0] == 64
    with pytest.raises(CpuinferError, match="do not fit"):
        assign_experts(8, 10, {0: 1, 1: 1}, budget={0: 20, 1: 20})
    # whole experts: with 8 of 256 experts per token on 8 nodes the busiest node holds >2x the mean
    imb = expert_imbalance(assign_experts(256, 1, {k: 24 for k in range(8)}), 8, trials=500)
    assert imb > 2.0
    assert expert_imbalance(np.zeros(16, np.int64), 4, trials=50) == 1.0


# -- memory calls on this machine -----------------------------------------------------------------

def test_mempolicy_calls_and_residency():
    sys_ = memory.syscalls()
    if not sys_.available:
        pytest.skip(sys_.reason)
    a = memory.Arena(64 * memory.PAGE)
    assert a.addr % memory.PAGE == 0
    assert (memory.page_nodes(a.addr, a.nbytes) == -errno.ENOENT).all()     # nothing touched yet
    node = read_topology("/").node_ids[0]
    try:
        a.bind(memory.MPOL_BIND, [node])
    except OSError as e:
        pytest.skip(f"mbind refused here: {e}")
    assert sys_.get_mempolicy(a.addr) == (memory.MPOL_BIND, [node])
    a.array[: 10 * memory.PAGE] = 1
    st = memory.page_nodes(a.addr, a.nbytes)
    assert (st[:10] == node).all() and (st[10:] == -errno.ENOENT).all()
    assert memory.mincore(a.addr, a.nbytes)[:10].all()
    entry = [e for e in memory.numa_maps() if e.start == a.addr]
    assert entry and entry[0].policy.startswith("bind") and entry[0].pages.get(node) == 10


def test_syscall_backend_matches_libnuma(monkeypatch):
    import ctypes.util
    if memory.syscalls().backend != "libnuma":
        pytest.skip("libnuma not installed")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libnuma-not-here.so")
    raw = memory.Syscalls()
    assert raw.backend == "syscall"
    a = memory.Arena(4 * memory.PAGE)
    raw.mbind(a.addr, a.nbytes, memory.MPOL_INTERLEAVE, [0])
    assert raw.get_mempolicy(a.addr) == (memory.MPOL_INTERLEAVE, [0])
    a.array[:] = 7
    assert (raw.move_pages(np.array([a.addr], np.uint64)) == 0).all()


def test_parse_numa_maps():
    text = ("7f0000000000 bind:0 anon=3 dirty=3 N0=3 kernelpagesize_kB=4\n"
            "7f0000100000 interleave:0-1 file=/m.gguf mapped=5 N0=2 N1=3\n")
    e = memory.parse_numa_maps(text)
    assert e[0].anon and e[0].pages == {0: 3} and e[1].file == "/m.gguf" and e[1].pages == {0: 2, 1: 3}


# -- pinned threads and the schedule, on this machine ----------------------------------------------

def test_pool_pinning_and_schedule():
    import numba
    from quant.jit import max_threads, set_threads
    from numa.threads import allowed_cpus_of, check_schedule, member_cpus, pin_pool

    cpus = sorted(os.sched_getaffinity(0))
    n = min(len(cpus), max_threads())
    set_threads(n)
    try:
        assert check_schedule(n) == ""
        order = cpus[:n][::-1]                       # deliberately reversed: not where they started
        res = pin_pool(order)
        assert res.ok, res.problem
        assert [allowed_cpus_of(t) for t in res.tids] == [[c] for c in order]
        assert member_cpus(n).tolist() == order
    finally:
        for tid in pin_pool(cpus[:n]).tids:
            os.sched_setaffinity(tid, cpus)
        numba.set_num_threads(n)


# -- models under every policy, on this machine ---------------------------------------------------

POLICIES = ["off", "auto", "distribute", "isolate", "interleave",
            NumaSpec("distribute", copy=True), NumaSpec("isolate", copy=True),
            NumaSpec("interleave", copy=True)]


@pytest.fixture(scope="module")
def reference_logits():
    import cpuinfer
    return cpuinfer.load(TINY, threads=2, numa="off").logits([1, 5, 9, 13, 2])


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_model_pages_and_logits_under_policy(policy, reference_logits):
    import cpuinfer
    from numa.placement import model_tensors, residency

    topo = read_topology("/")
    if topo.n_nodes != 1:
        pytest.skip("the one-node expectations below are for single-node machines")
    allowed = os.sched_getaffinity(0)
    m = cpuinfer.load(TINY, threads=2, numa=policy)
    try:
        logits = m.logits([1, 5, 9, 13, 2])
        np.testing.assert_array_equal(logits, reference_logits)
        plan = m.numa_plan
        spec = NumaSpec.parse(policy)
        if spec.policy in ("off", "auto"):
            assert plan is None and m._numa is None                # strictly nothing done
            return
        assert plan.policy == spec.policy and plan.pinned
        tensors = model_tensors(m)
        assert {t.copied for t in tensors} == {bool(spec.copy)}
        assert any(t.repacked for t in tensors) == interleaved.HAVE_X8   # Q8_0 matrices
        if spec.copy:
            for t in tensors:          # the model computes from the anonymous copies, not the file
                assert not t.array.flags.writeable and memory.array_address(t.array) % memory.PAGE == 0
                info = m.gguf.tensors[t.name]
                raw = m.gguf.raw(info)
                want = interleaved.pack_ref(raw, info.ggml_type) if t.repacked else raw
                assert np.array_equal(t.array.reshape(-1), want.reshape(-1))
        if not memory.syscalls().available:
            return
        rep = residency(tensors, plan)
        assert {"attention", "ffn", "embeddings"} <= set(rep)
        for g in rep.values():
            assert g.resident == g.pages and g.by_node == {topo.node_ids[0]: g.pages}
            assert g.fraction == 1.0
    finally:
        from numa.threads import pool_thread_ids
        for tid in pool_thread_ids():
            os.sched_setaffinity(int(tid), allowed)


def test_refused_mempolicy_warns_once_and_runs(monkeypatch, reference_logits):
    import cpuinfer
    from numa.placement import NumaWarning

    def refuse(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(memory.Syscalls, "set_mempolicy", refuse)
    monkeypatch.setattr(memory.Syscalls, "mbind", refuse)
    allowed = os.sched_getaffinity(0)
    for policy in ("distribute", "interleave"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = cpuinfer.load(TINY, threads=2, numa=NumaSpec(policy, copy=True))
            np.testing.assert_array_equal(m.logits([1, 5, 9, 13, 2]), reference_logits)
        numa_w = [w for w in caught if issubclass(w.category, NumaWarning)]
        assert len(numa_w) == 1, [str(w.message) for w in numa_w]
        assert "refused" in str(numa_w[0].message)
    from numa.threads import pool_thread_ids
    for tid in pool_thread_ids():
        os.sched_setaffinity(int(tid), allowed)


def test_unpinnable_pool_degrades_distribute(monkeypatch):
    import cpuinfer
    import numa.threads
    from numa.placement import NumaWarning

    def boom(tid, cpus):
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(numa.threads.os, "sched_setaffinity", boom)
    with pytest.warns(NumaWarning, match="could not be pinned"):
        m = cpuinfer.load(TINY, threads=2, numa="distribute")
    assert m.numa_plan.policy == "interleave"


def test_cli_numa(capsys, tmp_path):
    from cpuinfer.cli import main

    tree = make_trees.write_tree("epyc9004_2s_nps4", tmp_path / "t")
    assert main(["numa", "--sysfs-root", str(tree), str(TINY), "--threads", "16"]) == 0
    out = capsys.readouterr().out
    assert "8 NUMA node(s)" in out and "node 7: threads 14-15 on CPUs 168-169" in out
    assert main(["numa", str(TINY), "--check", "--numa", "distribute"]) == 0
    out = capsys.readouterr().out
    if memory.syscalls().available and read_topology("/").n_nodes == 1:
        assert "attention" in out and "100.00%" in out
    assert main(["numa", "--numa", "nope"]) == 1
    assert main(["numa", "--check"]) == 1
    assert "needs a MODEL" in capsys.readouterr().err
