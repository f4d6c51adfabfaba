"""Applying a :class:`numa.plan.Plan` to a model, and checking where its pages are.

:func:`setup` is what :class:`cpuinfer.Model` calls before binding weights. It returns None when
there is nothing to do (``off``, or ``auto`` on one node: no pinning, no copies, no cost), else a
:class:`Placement` that

1. sets numba's thread count to the plan's and pins the pool (:func:`numa.threads.pin_pool`);
   for ``distribute`` it first checks that the pool really runs ``prange`` iterations on the
   threads :func:`numa.plan.static_schedule` predicts (:func:`numa.threads.check_schedule`);
2. when the plan copies (more than one node, or ``copy=True``), gives every weight matrix a
   private anonymous copy (:class:`numa.memory.Arena`) whose pages are written by one worker
   thread per memory node, pinned on that node's CPUs under ``set_mempolicy(MPOL_BIND, {node})``
   — ``distribute``: each page goes to the node whose threads compute its rows;
   ``isolate``: all pages to the one node; ``interleave``: the arena is ``mbind``-ed
   ``MPOL_INTERLEAVE`` over the nodes — then drops the file's cached pages of that range;
3. re-pins when a model is run from another Python thread (:meth:`Placement.enter`: numba keeps
   a separate OpenMP team, and a separate thread count, per calling thread).

Refusals degrade with one warning (:class:`NumaWarning`) and the run goes on: a refused memory
policy falls back to first touch by the pinned worker (local allocation by default); a pool that
cannot be pinned, or whose schedule is not the predicted one, turns ``distribute`` into
``interleave`` (no claim about which thread reads which rows).
"""
from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cpuinfer.errors import CpuinferError

from . import memory
from .plan import MatrixSpec, NumaSpec, Plan, make_plan, page_partition, tensor_group
from .topology import Topology, machine_topology


class NumaWarning(RuntimeWarning):
    """A NUMA request could not be honoured in full; the run goes on."""


def matrix_specs(gguf) -> list[MatrixSpec]:
    """The placeable tensors of a GGUF file (2-D matrices and 3-D stacks), from its header."""
    out = []
    for info in gguf.tensors.values():
        shape = tuple(int(s) for s in info.shape)
        if len(shape) < 2:
            continue
        n_stack = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        rows = shape[-2]
        out.append(MatrixSpec(info.name, rows, info.nbytes // max(1, n_stack * rows), n_stack))
    return out


@dataclass
class PlacedTensor:
    name: str
    spec: MatrixSpec
    array: np.ndarray                  # what the model computes from
    copied: bool
    pages: list | None = None          # [(node, p0, p1)] page owners of the copy (None: no owner map)
    repacked: bool = False             # rows interleaved at load (quant.interleaved)

    @property
    def group(self) -> str:
        return tensor_group(self.name)


class Placement:
    """A plan in force for one model (see the module docstring)."""

    def __init__(self, plan: Plan, path: str | None = None, sys: memory.Syscalls | None = None):
        self.plan = plan
        self.sys = sys or memory.syscalls()
        self.tensors: dict[str, PlacedTensor] = {}
        self.warnings: list[str] = []
        self._warned: set[str] = set()
        self._pinned: set[int] = set()
        self._workers: dict[int, ThreadPoolExecutor] = {}
        self._worker_policy: dict[int, str] = {}
        self._fd = os.open(path, os.O_RDONLY) if path and plan.copy else None
        self._lock = threading.Lock()

    # -- warnings -------------------------------------------------------------------------------
    def warn(self, key: str, msg: str) -> None:
        """Warn once per cause."""
        if key in self._warned:
            return
        self._warned.add(key)
        self.warnings.append(msg)
        warnings.warn(f"numa: {msg}", NumaWarning, stacklevel=3)

    def _degrade(self, why: str) -> None:
        if self.plan.policy == "distribute":
            p = self.plan
            mem = tuple(n.id for n in p.topology.nodes if n.has_memory) or tuple(p.topology.node_ids)
            self.plan = dataclasses.replace(p, policy="interleave", mem_nodes=mem,
                                            notes=p.notes + [f"distribute -> interleave: {why}"])
            self.warn("degrade", f"{why}; placing weights interleaved instead of by thread")
        else:
            self.warn("degrade", why)

    # -- threads --------------------------------------------------------------------------------
    def activate(self) -> "Placement":
        """Set the thread count and pin the calling thread's pool (call before placing)."""
        self.enter()
        if self.plan.policy == "distribute" and self.plan.pinned:
            from .threads import check_schedule
            bad = check_schedule(self.plan.n_threads)
            if bad:
                self._degrade(f"thread schedule is not the predicted static one ({bad})")
        return self

    def enter(self) -> None:
        """Make the calling thread's numba pool use the plan's threads, pinned (cheap when done)."""
        ident = threading.get_ident()
        if ident in self._pinned:
            return
        from quant.jit import set_threads
        got = set_threads(self.plan.n_threads)
        if got != self.plan.n_threads:
            raise CpuinferError(f"numa: the plan needs {self.plan.n_threads} threads, numba's pool has "
                                f"{got} (set NUMBA_NUM_THREADS)")
        if self.plan.pinned:
            from .threads import pin_pool
            try:
                res = pin_pool(self.plan.thread_cpus)
                if not res.ok:
                    self._degrade(f"threads could not be pinned: {res.problem}")
            except (OSError, RuntimeError) as e:
                self._degrade(f"threads could not be pinned: {e}")
        self._pinned.add(ident)

    # -- memory ---------------------------------------------------------------------------------
    def _worker(self, node: int) -> ThreadPoolExecutor:
        """One copy thread per memory node, pinned on that node's CPUs, allocating there."""
        ex = self._workers.get(node)
        if ex is None:
            p = self.plan
            cpus = [c for c, n in zip(p.thread_cpus, p.thread_nodes) if p.shard_node(n) == node]
            cpus = cpus or list(p.topology.node(node).cpus)

            def init():
                try:
                    if cpus:
                        os.sched_setaffinity(0, cpus)
                except OSError as e:
                    self._worker_policy[node] = f"affinity refused ({e.strerror})"
                    return
                try:
                    self.sys.set_mempolicy(memory.MPOL_BIND, [node])
                    self._worker_policy[node] = "bind"
                except OSError as e:
                    self._worker_policy[node] = f"set_mempolicy refused ({e.strerror})"
            ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"numa-node{node}", initializer=init)
            self._workers[node] = ex
        return ex

    def place(self, info, raw: np.ndarray) -> np.ndarray:
        """The array the model should compute from for tensor ``info`` (a GGUF TensorInfo) whose
        mapped bytes are ``raw``: ``raw`` itself, or a node-placed copy of it."""
        rows = raw.shape[-2] if raw.ndim >= 2 else 1
        n_stack = int(np.prod(raw.shape[:-2])) if raw.ndim > 2 else 1
        spec = MatrixSpec(info.name, rows, raw.shape[-1], n_stack)
        if not self.plan.copy or raw.nbytes == 0:
            self.tensors[info.name] = PlacedTensor(info.name, spec, raw, False,
                                                   self._one_node_pages(raw))
            return raw
        arena = memory.Arena(raw.nbytes)
        src = raw.reshape(-1)
        dst = arena.array
        plan = self.plan
        pages = None
        if plan.policy == "interleave":
            try:
                arena.bind(memory.MPOL_INTERLEAVE, plan.mem_nodes, self.sys)
            except OSError as e:
                self.warn("mbind", f"mbind(MPOL_INTERLEAVE) refused ({e.strerror}): pages land where they are first touched")
            np.copyto(dst, src)
        else:
            ranges = plan.byte_ranges(spec)
            pages = page_partition(ranges, raw.nbytes, memory.PAGE)
            futs = []
            for node, p0, p1 in pages:
                b0, b1 = p0 * memory.PAGE, min(p1 * memory.PAGE, raw.nbytes)
                futs.append(self._worker(node).submit(np.copyto, dst[b0:b1], src[b0:b1]))
            for f in futs:
                f.result()
            for node, state in self._worker_policy.items():
                if state != "bind":
                    self.warn("worker-policy", f"node {node} copy thread: {state}; relying on first touch "
                                               f"from the pinned thread")
        self._drop_file_pages(info, raw)
        out = dst.reshape(raw.shape)
        out.flags.writeable = False
        self.tensors[info.name] = PlacedTensor(info.name, spec, out, True, pages)
        return out

    def replace(self, name: str, array: np.ndarray) -> None:
        """Record that the model computes tensor ``name`` from ``array`` now (the loader repacked
        it: in place in a copy, which keeps its page owners, or into new memory)."""
        t = self.tensors[name]
        if array is not t.array and not t.copied:
            t.pages = self._one_node_pages(array)
        t.array = array
        t.repacked = True

    def _one_node_pages(self, a: np.ndarray) -> list | None:
        """The page owners of an array nobody placed: on one node every page is on it, wherever
        it is; on several, unknown (None)."""
        if self.plan.topology.n_nodes != 1:
            return None
        _, n = memory.page_span(memory.array_address(a), a.nbytes)
        return [(self.plan.topology.node_ids[0], 0, n)]

    def _drop_file_pages(self, info, raw: np.ndarray) -> None:
        """Forget the file's copy of a tensor that now lives in anonymous memory: unmap our pages
        of it, then ask the kernel to drop them from the page cache (no-op for pages someone
        else maps; never fails the load)."""
        try:
            memory.unmap_pages(raw)
            if self._fd is not None and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd, int(info.offset), int(raw.nbytes), os.POSIX_FADV_DONTNEED)
        except OSError as e:
            self.warn("drop-cache", f"could not drop the file's cached pages ({e.strerror})")

    def close(self) -> None:
        for ex in self._workers.values():
            ex.shutdown(wait=True)
        self._workers.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def describe(self) -> str:
        return self.plan.describe([t.spec for t in self.tensors.values()])


def setup(gguf, spec="auto", threads: int | None = None, topology: Topology | None = None,
          max_threads: int | None = None) -> Placement | None:
    """Plan and apply NUMA placement for a model about to be bound from ``gguf``; None when the
    resolved policy is ``off`` (the caller then sets its threads as usual)."""
    from quant.jit import max_threads as pool_size

    spec = NumaSpec.parse(spec)
    if spec.policy == "off":
        return None
    topo = topology or machine_topology()
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    plan = make_plan(topo, spec, threads=threads, allowed_cpus=allowed, matrices=matrix_specs(gguf),
                     max_threads=max_threads or pool_size())
    if plan.policy == "off":
        return None
    return Placement(plan, gguf.path).activate()


# -- residency ------------------------------------------------------------------------------------

def model_tensors(model) -> list[PlacedTensor]:
    """Every weight matrix a loaded :class:`cpuinfer.Model` computes from (deduplicated)."""
    from cpuinfer.weights import QTensor

    placed = getattr(model, "_numa", None)
    found: dict[str, PlacedTensor] = {}
    seen: set[int] = set()

    def walk(obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, QTensor):
            if obj.name in found:
                return
            if placed is not None and obj.name in placed.tensors:
                found[obj.name] = placed.tensors[obj.name]
            else:
                raw = obj.raw
                rows = raw.shape[-2] if raw.ndim >= 2 else 1
                n_stack = int(np.prod(raw.shape[:-2])) if raw.ndim > 2 else 1
                found[obj.name] = PlacedTensor(obj.name, MatrixSpec(obj.name, rows, raw.shape[-1], n_stack),
                                               raw, False, None)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name))
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x)
        elif isinstance(obj, dict):
            for x in obj.values():
                walk(x)

    walk(model.family.weights)
    return list(found.values())


@dataclass
class GroupResidency:
    group: str
    tensors: int = 0
    pages: int = 0
    resident: int = 0
    on_intended: int = 0
    with_intent: int = 0                 # resident pages that have an intended node
    by_node: dict = dataclasses.field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        """Resident pages on their intended node / resident pages that have one."""
        return self.on_intended / self.with_intent if self.with_intent else None


def intended_nodes(t: PlacedTensor, n_pages: int, plan: Plan | None) -> np.ndarray | None:
    """int32 intended node per page of ``t`` (-1: no single intended node), or None."""
    if t.pages is not None:
        out = np.full(n_pages, -1, np.int32)
        for node, p0, p1 in t.pages:
            out[p0:min(p1, n_pages)] = node
        return out
    return None


def residency(tensors, plan: Plan | None = None, sys: memory.Syscalls | None = None) -> dict[str, GroupResidency]:
    """Page residency per tensor group from ``move_pages`` queries (see :class:`GroupResidency`).
    For ``interleave`` copies a page counts as on its intended node when it is on any node of
    the interleave set."""
    sys = sys or memory.syscalls()
    out: dict[str, GroupResidency] = {}
    for t in tensors:
        g = out.setdefault(t.group, GroupResidency(t.group))
        status = memory.page_nodes(memory.array_address(t.array), t.array.nbytes, sys)
        g.tensors += 1
        g.pages += status.shape[0]
        res = status >= 0
        g.resident += int(res.sum())
        for node, cnt in zip(*np.unique(status[res], return_counts=True)):
            g.by_node[int(node)] = g.by_node.get(int(node), 0) + int(cnt)
        want = intended_nodes(t, status.shape[0], plan)
        if want is not None:
            m = res & (want >= 0)
            g.with_intent += int(m.sum())
            g.on_intended += int((status[m] == want[m]).sum())
        elif plan is not None and t.copied and plan.policy == "interleave":
            g.with_intent += int(res.sum())
            g.on_intended += int(np.isin(status[res], plan.mem_nodes).sum())
    return out
