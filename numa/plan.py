"""Placement plans: which threads run on which cores, and which node holds which weight bytes.

Threads. One worker per physical core (its first hardware thread; SMT siblings only with
``smt=True``), restricted to the CPUs this process may use, grouped by node with consecutive ids:
threads ``0..t0-1`` on node A's cores, ``t0..t0+t1-1`` on node B's, ... Thread ``t`` is pinned to
the single CPU ``thread_cpus[t]``.

Rows. The mat-vec kernel (:func:`quant.kernels.matmul_kernel`) runs ``prange`` over chunks of
``ROW_TILE`` = 16 rows, and numba's OpenMP layer gives thread ``t`` the ``t``-th contiguous block
of chunks (:func:`static_schedule`, a model of numba's ``gufunc_scheduler`` checked at run time
against the real pool by :func:`numa.threads.check_schedule`). ``distribute`` therefore does not
choose the split and then hope the threads follow it: it *derives* each matrix's node shards from
that schedule, so the rows thread ``t`` computes are exactly the rows placed on thread ``t``'s node.
Each matrix is split by output rows into one contiguous shard per node, boundaries at multiples of
16 rows (whole rows are whole quant blocks, so every boundary is block-aligned), sized in
proportion to the node's thread count. Stacked expert tensors ``[E, rows, row_bytes]`` are split
the same way inside every expert, because the expert loop multiplies each selected expert with
all threads. (Whole experts per node — :func:`assign_experts` — would need a node-parallel
expert loop; see the README (NUMA, known limits) for why row shards are used now.)

Pages. Bytes are placed per page: page ``p`` of a tensor's copy belongs to the node that owns the
byte at ``p · PAGE`` (:func:`page_partition`), so every page has exactly one owner and at most one
page per shard boundary holds a few rows of a neighbouring shard.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cpuinfer.errors import CpuinferError
from quant.kernels import ROW_TILE, schedule_block   # the mat-vec kernel's work split

from .topology import Topology, format_cpulist

POLICIES = ("auto", "off", "interleave", "distribute", "isolate")
DEFAULT_BUDGET_FRACTION = 0.9  # of a node's MemFree that copied weights may take


@dataclass(frozen=True)
class NumaSpec:
    """What the user asked for: ``auto``, ``off``, ``interleave``, ``distribute``, ``isolate``
    (``isolate:N`` picks node N). ``smt`` adds SMT siblings as worker threads; ``copy`` forces
    (True) or forbids (False) node-local anonymous copies of the weights — by default they are
    made exactly when the plan spans more than one node."""
    policy: str = "auto"
    node: int | None = None
    smt: bool = False
    copy: bool | None = None

    @classmethod
    def parse(cls, value) -> "NumaSpec":
        if value is None:
            return cls()
        if isinstance(value, NumaSpec):
            return value
        if not isinstance(value, str):
            raise CpuinferError(f"numa policy must be a string, got {type(value).__name__}")
        name, _, arg = value.strip().lower().partition(":")
        if name not in POLICIES:
            raise CpuinferError(f"unknown numa policy {value!r} (expected one of {', '.join(POLICIES)}, "
                                f"or isolate:NODE)")
        if arg and name != "isolate":
            raise CpuinferError(f"numa policy {name} takes no argument, got {value!r}")
        node = None
        if arg:
            try:
                node = int(arg)
            except ValueError:
                raise CpuinferError(f"numa policy {value!r}: node must be an integer") from None
        return cls(policy=name, node=node)


@dataclass(frozen=True)
class MatrixSpec:
    """A weight matrix (``n_stack = 1``) or a stack of equal matrices (experts), as stored."""
    name: str
    rows: int
    row_bytes: int
    n_stack: int = 1

    @property
    def nbytes(self) -> int:
        return self.n_stack * self.rows * self.row_bytes

    @property
    def group(self) -> str:
        return tensor_group(self.name)


def tensor_group(name: str) -> str:
    """Report group of a GGUF tensor name: attention, ffn, experts, output, embeddings, other."""
    if name.startswith("token_embd"):
        return "embeddings"
    if name.startswith("output."):
        return "output"
    if "_exps" in name:
        return "experts"
    if ".attn_" in name:
        return "attention"
    if ".ffn_" in name:
        return "ffn"
    return "other"


def static_schedule(n_iter: int, n_threads: int) -> np.ndarray:
    """int64 [n_threads, 2]: the half-open iteration range numba's parallel layer gives each
    thread for a 1-D ``prange(n_iter)`` (``gufunc_scheduler.cpp``, ``create_schedule``, with the
    default chunk size 0). Fewer iterations than threads: thread ``i < n_iter`` runs iteration
    ``i``. Otherwise thread ``i`` takes ``ceil(left / threads_left)`` iterations in turn."""
    if n_threads < 1:
        raise CpuinferError(f"static_schedule needs at least one thread, got {n_threads}")
    out = np.full((n_threads, 2), n_iter, np.int64)
    parts = min(n_threads, n_iter)
    for i in range(parts):
        out[i] = schedule_block(n_iter, parts, i)
    return out


def split_proportional(total: int, capacity: dict[int, int]) -> dict[int, int]:
    """Split ``total`` into integer parts proportional to ``capacity`` (largest remainder),
    never above a key's capacity; keys with capacity 0 get 0."""
    cap_sum = sum(capacity.values())
    total = min(total, cap_sum)
    if cap_sum == 0:
        return {k: 0 for k in capacity}
    exact = {k: total * c / cap_sum for k, c in capacity.items()}
    out = {k: min(capacity[k], int(v)) for k, v in exact.items()}
    order = sorted(capacity, key=lambda k: (-(exact[k] - int(exact[k])), k))
    while sum(out.values()) < total:
        for k in order:
            if sum(out.values()) >= total:
                break
            if out[k] < capacity[k]:
                out[k] += 1
    return out


def page_partition(ranges, nbytes: int, page: int) -> list[tuple[int, int, int]]:
    """Turn an ordered exact byte partition ``[(node, b0, b1)]`` of ``[0, nbytes)`` into a page
    partition ``[(node, p0, p1)]`` (page indices) of ``ceil(nbytes / page)`` pages: page ``p``
    belongs to the owner of byte ``p · page``. Empty page ranges are dropped."""
    n_pages = -(-nbytes // page)
    out = []
    for node, b0, b1 in ranges:
        p0 = -(-b0 // page)
        p1 = n_pages if b1 >= nbytes else -(-b1 // page)
        if p1 > p0:
            if out and out[-1][0] == node and out[-1][2] == p0:
                out[-1] = (node, out[-1][1], p1)
            else:
                out.append((node, p0, p1))
    return out


@dataclass
class Plan:
    """Where threads run and where weight bytes live (see the module docstring)."""
    requested: str                       # policy as asked (auto, ...)
    policy: str                          # resolved: off, interleave, distribute, isolate
    topology: Topology
    n_threads: int
    thread_cpus: tuple[int, ...] = ()    # CPU of thread t; empty = threads are not pinned
    thread_nodes: tuple[int, ...] = ()   # node of thread t
    mem_nodes: tuple[int, ...] = ()      # interleave set / isolate node / every shard node
    copy: bool = False                   # weights copied into node-local anonymous memory
    budget: dict = field(default_factory=dict)   # node -> bytes copied weights may take (None = no limit)
    notes: list = field(default_factory=list)

    # -- threads --------------------------------------------------------------------------------
    @property
    def pinned(self) -> bool:
        return bool(self.thread_cpus)

    def node_threads(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for n in self.thread_nodes:
            out[n] = out.get(n, 0) + 1
        return out

    def shard_node(self, node: int) -> int:
        """Node whose memory holds the rows computed by ``node``'s threads."""
        return self.topology.nearest_memory_node(node)

    # -- rows -----------------------------------------------------------------------------------
    def row_shards(self, rows: int) -> list[tuple[int, int, int]]:
        """``[(mem_node, r0, r1)]``: one contiguous row range per node that computes some rows of a
        ``rows``-row matrix under the kernel's static schedule, in row order, covering
        ``[0, rows)`` exactly once; boundaries are multiples of ``ROW_TILE``."""
        n_chunks = -(-rows // ROW_TILE)
        sched = static_schedule(n_chunks, self.n_threads)
        out: list[tuple[int, int, int]] = []
        for t in range(self.n_threads):
            c0, c1 = int(sched[t, 0]), int(sched[t, 1])
            if c1 <= c0:
                continue
            node = self.shard_node(self.thread_nodes[t])
            r0, r1 = c0 * ROW_TILE, min(rows, c1 * ROW_TILE)
            if out and out[-1][0] == node and out[-1][2] == r0:
                out[-1] = (node, out[-1][1], r1)
            else:
                out.append((node, r0, r1))
        return out

    def byte_ranges(self, m: MatrixSpec) -> list[tuple[int, int, int]] | None:
        """Exact ordered partition ``[(node, b0, b1)]`` of the tensor's bytes by owning node, or
        None when the policy does not assign bytes to nodes (off, interleave)."""
        if self.policy == "isolate":
            return [(self.mem_nodes[0], 0, m.nbytes)]
        if self.policy != "distribute":
            return None
        shards = self.row_shards(m.rows)
        per = m.rows * m.row_bytes
        return [(node, e * per + r0 * m.row_bytes, e * per + r1 * m.row_bytes)
                for e in range(m.n_stack) for node, r0, r1 in shards]

    def bytes_per_node(self, matrices) -> dict[int, int]:
        """Weight bytes each memory node holds for these matrices (interleave: an even share)."""
        out = {n: 0 for n in self.mem_nodes}
        total = 0
        for m in matrices:
            rng = self.byte_ranges(m)
            total += m.nbytes
            if rng is None:
                continue
            for node, b0, b1 in rng:
                out[node] = out.get(node, 0) + (b1 - b0)
        if self.policy == "interleave" and self.mem_nodes:
            k = len(self.mem_nodes)
            out = {n: total // k + (1 if i < total % k else 0) for i, n in enumerate(self.mem_nodes)}
        return out

    def check_budget(self, matrices) -> None:
        """Raise when copied weights exceed a node's budget."""
        if not self.copy:
            return
        for node, need in self.bytes_per_node(matrices).items():
            cap = self.budget.get(node)
            if cap is not None and need > cap:
                raise CpuinferError(
                    f"numa {self.policy}: the weights need {need / 2**30:.2f} GiB on node {node}, "
                    f"which has {cap / 2**30:.2f} GiB to spare (try --numa interleave or fewer threads)")

    # -- report ---------------------------------------------------------------------------------
    def describe(self, matrices=()) -> str:
        head = f"policy {self.policy}" + (f" (from {self.requested})" if self.requested != self.policy else "")
        lines = [head + f": {self.n_threads} threads" + ("" if self.pinned else " (not pinned)")
                 + (", weights copied into node-local memory" if self.copy else
                    ", weights stay in the file's page cache")]
        if self.pinned:
            for node, count in sorted(self.node_threads().items()):
                cpus = [c for c, n in zip(self.thread_cpus, self.thread_nodes) if n == node]
                ids = [t for t, n in enumerate(self.thread_nodes) if n == node]
                lines.append(f"  node {node}: threads {ids[0]}-{ids[-1]} on CPUs {format_cpulist(cpus)}")
        matrices = list(matrices)
        if matrices:
            total = sum(m.nbytes for m in matrices)
            lines.append(f"  weight matrices: {len(matrices)} tensors, {_size(total)}")
            per = self.bytes_per_node(matrices)
            if per and self.policy != "off":
                for node, b in sorted(per.items()):
                    cap = self.budget.get(node)
                    lines.append(f"  node {node}: {_size(b)} of weights"
                                 + (f" (budget {_size(cap)})" if cap is not None and self.copy else ""))
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _node_cpus(topo: Topology, node_id: int, allowed: set[int], smt: bool) -> list[int]:
    """Worker CPUs of a node: allowed physical cores first, then (smt) their allowed siblings."""
    n = topo.node(node_id)
    cores = [c for c in n.cores if c in allowed]
    if not smt:
        # a core whose primary thread is not allowed may still offer an allowed sibling
        have = {topo.cpus[c].core for c in cores}
        for c in n.cpus:
            if c in allowed and topo.cpus[c].core not in have:
                cores.append(c)
                have.add(topo.cpus[c].core)
        return sorted(cores)
    rest = [c for c in n.cpus if c in allowed and c not in cores]
    return sorted(cores) + sorted(rest)


def make_plan(topology: Topology, spec="auto", threads: int | None = None,
              allowed_cpus=None, matrices=(), budget: dict | None = None,
              max_threads: int | None = None) -> Plan:
    """Build the placement plan for ``spec`` (a policy string or :class:`NumaSpec`) on
    ``topology``. ``allowed_cpus`` (default: every CPU) restricts the workers to the process's
    affinity mask; ``threads`` caps the worker count (split over nodes in proportion to their
    cores); ``max_threads`` is the thread pool's size. ``budget`` maps node -> bytes copied
    weights may take (default: 90% of MemFree). ``matrices`` (:class:`MatrixSpec`) are checked
    against the budget; ``distribute`` moves threads away from a node that would overflow."""
    spec = NumaSpec.parse(spec)
    if threads is not None and threads < 1:
        raise CpuinferError(f"threads must be at least 1, got {threads}")
    allowed = set(topology.cpus) if allowed_cpus is None else set(allowed_cpus) & set(topology.cpus)
    if not allowed:
        raise CpuinferError("numa: none of the allowed CPUs is in the topology")
    cap = max_threads if max_threads is not None else len(allowed)
    per_node = {n.id: _node_cpus(topology, n.id, allowed, spec.smt) for n in topology.nodes}
    cpu_nodes = [nid for nid, cs in per_node.items() if cs]
    matrices = list(matrices)

    policy = spec.policy
    if policy == "auto":
        policy = "distribute" if len(cpu_nodes) > 1 else "off"
    if budget is None:
        budget = {n.id: (int(n.mem_free * DEFAULT_BUDGET_FRACTION) if n.mem_free is not None else None)
                  for n in topology.nodes}

    if policy == "off":
        n = min(threads or len(_all_cores(per_node)), cap)
        return Plan(spec.policy, "off", topology, max(1, n), budget=budget)

    if policy == "isolate":
        if spec.node is not None:
            node = topology.node(spec.node).id
            if not per_node[node]:
                raise CpuinferError(f"numa isolate:{node}: node {node} has none of this process's CPUs")
        else:
            node = max(cpu_nodes, key=lambda k: (len(per_node[k]), topology.node(k).mem_free or 0, -k))
        cpus = per_node[node][:min(threads or len(per_node[node]), cap)]
        mem = topology.nearest_memory_node(node)
        plan = Plan(spec.policy, "isolate", topology, len(cpus), tuple(cpus), (node,) * len(cpus),
                    (mem,), _copy(spec, topology), budget)
        plan.check_budget(matrices)
        return plan

    # interleave / distribute: threads over every node with usable CPUs
    want = min(threads or sum(len(per_node[k]) for k in cpu_nodes), cap)
    counts = split_proportional(want, {k: len(per_node[k]) for k in cpu_nodes})
    notes = []
    if policy == "distribute" and matrices and _copy(spec, topology):
        counts = _fit_budget(topology, counts, per_node, matrices, budget, notes)
    cpus, nodes = [], []
    for k in sorted(counts):
        cpus += per_node[k][:counts[k]]
        nodes += [k] * counts[k]
    if policy == "interleave":
        mem = tuple(n.id for n in topology.nodes if n.has_memory) or tuple(topology.node_ids)
    else:
        mem = tuple(sorted({topology.nearest_memory_node(k) for k in nodes}))
    plan = Plan(spec.policy, policy, topology, len(cpus), tuple(cpus), tuple(nodes), mem,
                _copy(spec, topology), budget, notes)
    plan.check_budget(matrices)
    return plan


def _all_cores(per_node: dict[int, list[int]]) -> list[int]:
    return [c for cs in per_node.values() for c in cs]


def _copy(spec: NumaSpec, topology: Topology) -> bool:
    return spec.copy if spec.copy is not None else topology.n_nodes > 1


def _fit_budget(topo, counts, per_node, matrices, budget, notes) -> dict[int, int]:
    """Take threads from nodes whose row shards would not fit their budget (their shard shrinks
    with their thread count) until every node fits; the caller raises if none does."""
    counts = dict(counts)
    for _ in range(sum(counts.values())):
        cpus, nodes = [], []
        for k in sorted(counts):
            cpus += per_node[k][:counts[k]]
            nodes += [k] * counts[k]
        trial = Plan("distribute", "distribute", topo, len(cpus), tuple(cpus), tuple(nodes),
                     tuple(sorted(set(nodes))), True, budget)
        per = trial.bytes_per_node(matrices)
        over = [(per[n] / budget[n], n) for n in per if budget.get(n) is not None and per[n] > budget[n]]
        if not over:
            return counts
        _, worst = max(over)
        worst_cpu_nodes = [k for k in counts if topo.nearest_memory_node(k) == worst and counts[k] > 0]
        if not worst_cpu_nodes or sum(counts.values()) <= 1:
            return counts
        k = max(worst_cpu_nodes, key=lambda x: counts[x])
        counts[k] -= 1
        notes.append(f"node {worst} budget: one thread fewer on node {k}")
    return counts


# -- whole experts per node (plan logic; see the README, NUMA, for why runs use row shards) ----------

def assign_experts(n_expert: int, expert_bytes: int, node_threads: dict[int, int],
                   budget: dict | None = None) -> np.ndarray:
    """int64 [n_expert]: node of each expert when experts are placed whole, as contiguous
    blocks of expert ids in proportion to each node's threads, never above a node's ``budget``
    (bytes; None = unlimited). Raises when the experts do not fit."""
    nodes = sorted(k for k, t in node_threads.items() if t > 0)
    if not nodes:
        raise CpuinferError("assign_experts: no node has threads")
    cap = {k: n_expert if budget is None or budget.get(k) is None else
           min(n_expert, int(budget[k] // max(1, expert_bytes))) for k in nodes}
    # weights scaled by n_expert so the split is proportional and never capacity-limited
    share = split_proportional(n_expert, {k: node_threads[k] * n_expert for k in nodes})
    share = {k: min(share[k], cap[k]) for k in nodes}
    left = n_expert - sum(share.values())
    for k in sorted(nodes, key=lambda x: (-(cap[x] - share[x]), x)):   # overflow to nodes with room
        add = min(left, cap[k] - share[k])
        share[k] += add
        left -= add
    if left:
        raise CpuinferError(f"assign_experts: {n_expert} experts of {expert_bytes} bytes do not fit the node budgets")
    out = np.empty(n_expert, np.int64)
    e = 0
    for k in nodes:
        out[e:e + share[k]] = k
        e += share[k]
    return out


def expert_imbalance(assignment: np.ndarray, n_used: int, trials: int = 2000, seed: int = 0) -> float:
    """Expected (busiest node's selected experts) / (mean per node) for one decoded token whose
    ``n_used`` experts are drawn uniformly without replacement — the slowdown of whole-expert
    placement against row shards (which always split each expert evenly), when routing is uniform."""
    rng = np.random.default_rng(seed)
    nodes = np.unique(assignment)
    idx = {int(k): i for i, k in enumerate(nodes)}
    node_of = np.array([idx[int(k)] for k in assignment])
    worst = 0.0
    for _ in range(trials):
        sel = rng.choice(assignment.shape[0], n_used, replace=False)
        worst += np.bincount(node_of[sel], minlength=nodes.shape[0]).max()
    return float(worst / trials / (n_used / nodes.shape[0]))
