"""Pinning numba's worker threads and checking which thread runs which iterations.

numba's OpenMP layer keeps one team of worker threads per calling thread; team member ``t``
(``numba.get_thread_id()``) is the same OS thread in every parallel region of that caller, and a
``prange(T)`` over ``T`` = ``numba.get_num_threads()`` iterations runs iteration ``t`` on member
``t``. :func:`pool_thread_ids` uses that to learn the OS thread id (``gettid``) of every member,
then :func:`pin_pool` pins each with ``os.sched_setaffinity(tid, {cpu})`` — the calling Python
thread is member 0 and gets ``cpus[0]``. Environment variables (``OMP_PLACES``,
``GOMP_CPU_AFFINITY``) would have to be set before the OpenMP runtime loads, i.e. before
:mod:`quant` is imported; pinning by thread id works at any time and is verified by reading each
thread's ``Cpus_allowed_list`` and the CPU each member reports (``sched_getcpu``) afterwards.

:func:`check_schedule` runs ``prange(n)`` for a few ``n`` and compares the member that ran every
iteration with :func:`numa.plan.static_schedule` — the row-to-thread mapping ``distribute``
places memory by. The probes are compiled, cached kernels calling libc through numba's
``ExternalFunction`` (resolved by symbol name, so they cache across processes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numba
import numpy as np
from numba import prange, types

from quant.jit import parallel_kernel

from .plan import static_schedule
from .topology import format_cpulist, parse_cpulist

_gettid = types.ExternalFunction("gettid", types.int32())
_sched_getcpu = types.ExternalFunction("sched_getcpu", types.int32())


@parallel_kernel
def _probe_members(member, tid, cpu):
    """Iteration i (one per team member when len == num_threads) records who ran it and where."""
    for i in prange(member.shape[0]):
        member[i] = numba.get_thread_id()
        tid[i] = _gettid()
        cpu[i] = _sched_getcpu()


@parallel_kernel
def _probe_schedule(member):
    """``member[i]`` = team member that ran iteration ``i`` of a plain ``prange``."""
    for i in prange(member.shape[0]):
        member[i] = numba.get_thread_id()


def pool_thread_ids(n_threads: int | None = None) -> np.ndarray:
    """int64 [T]: OS thread id of team member t of the calling thread's pool (T = threads now)."""
    n = n_threads or numba.get_num_threads()
    member = np.full(n, -1, np.int64)
    tid = np.zeros(n, np.int64)
    cpu = np.zeros(n, np.int64)
    _probe_members(member, tid, cpu)
    if sorted(member.tolist()) != list(range(n)):
        raise RuntimeError(f"prange({n}) did not run once on every one of {n} threads "
                           f"(members {member.tolist()}; threading layer {numba.threading_layer()})")
    out = np.zeros(n, np.int64)
    out[member] = tid
    return out


def member_cpus(n_threads: int | None = None) -> np.ndarray:
    """int64 [T]: CPU each team member is running on right now."""
    n = n_threads or numba.get_num_threads()
    member = np.full(n, -1, np.int64)
    tid = np.zeros(n, np.int64)
    cpu = np.zeros(n, np.int64)
    _probe_members(member, tid, cpu)
    out = np.full(n, -1, np.int64)
    out[member] = cpu
    return out


def allowed_cpus_of(tid: int) -> list[int]:
    """``Cpus_allowed_list`` of one of this process's threads."""
    for line in open(f"/proc/self/task/{tid}/status"):
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpulist(line.split(":", 1)[1], f"/proc/self/task/{tid}/status")
    return []


@dataclass
class PinResult:
    tids: list[int]
    cpus: list[int]
    ok: bool
    problem: str = ""


def pin_pool(cpus, rounds: int = 3) -> PinResult:
    """Pin team member t of the calling thread's pool to ``cpus[t]`` (numba must already use
    ``len(cpus)`` threads) and verify: every thread's affinity is exactly its CPU and, over
    ``rounds`` parallel regions, every member reports running there from the same OS thread."""
    cpus = [int(c) for c in cpus]
    if numba.get_num_threads() != len(cpus):
        raise RuntimeError(f"pin_pool: numba uses {numba.get_num_threads()} threads, {len(cpus)} CPUs given")
    tids = [int(t) for t in pool_thread_ids(len(cpus))]
    for tid, cpu in zip(tids, cpus):
        os.sched_setaffinity(tid, {cpu})
    problems = []
    for tid, cpu in zip(tids, cpus):
        got = allowed_cpus_of(tid)
        if got != [cpu]:
            problems.append(f"thread {tid} allowed on {format_cpulist(got)}, wanted {cpu}")
    for _ in range(rounds):
        again = pool_thread_ids(len(cpus)).tolist()
        if again != tids:
            problems.append(f"team members changed OS threads ({tids} -> {again})")
            break
        where = member_cpus(len(cpus)).tolist()
        if where != cpus:
            problems.append(f"members ran on CPUs {where}, pinned to {cpus}")
            break
    return PinResult(tids, cpus, not problems, "; ".join(problems))


def check_schedule(n_threads: int | None = None, sizes=(1, 2, 3, 7, 64, 257, 1000)) -> str:
    """'' when every ``prange(n)`` ran its iterations on the members
    :func:`numa.plan.static_schedule` predicts, else a one-line description of the mismatch."""
    t = n_threads or numba.get_num_threads()
    if numba.get_parallel_chunksize() != 0:
        return f"numba parallel chunk size is {numba.get_parallel_chunksize()}, not the default 0"
    for n in sizes:
        member = np.full(n, -1, np.int64)
        _probe_schedule(member)
        want = np.full(n, -1, np.int64)
        for k, (a, b) in enumerate(static_schedule(n, t)):
            want[a:b] = k
        if not np.array_equal(member, want):
            bad = int(np.nonzero(member != want)[0][0])
            return (f"prange({n}) on {t} threads ran iteration {bad} on thread {member[bad]}, "
                    f"expected {want[bad]} (threading layer {numba.threading_layer()})")
    return ""
