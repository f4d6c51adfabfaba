"""NUMA topology from sysfs: nodes, their CPUs (physical cores vs SMT siblings), memory, distances.

Everything is read below a root directory (``"/"`` on a live machine, a recorded tree in tests)::

    {root}/sys/devices/system/node/online                 "0-1"      nodes that exist
    {root}/sys/devices/system/node/node{N}/cpulist        "0-95,192-287"
    {root}/sys/devices/system/node/node{N}/meminfo        "Node 0 MemTotal:  792237124 kB" ...
    {root}/sys/devices/system/node/node{N}/distance       "10 32"    (SLIT row of node N)
    {root}/sys/devices/system/cpu/online                  "0-383"
    {root}/sys/devices/system/cpu/cpu{C}/topology/thread_siblings_list   "0,192"
    {root}/sys/devices/system/cpu/cpu{C}/topology/physical_package_id    "0"
    {root}/sys/devices/system/cpu/cpu{C}/topology/core_id                "0"
    {root}/proc/meminfo                                   (only when the node directory is absent)

A physical core is identified by its lowest-numbered SMT sibling (``thread_siblings_list``);
when that file is missing, by ``(physical_package_id, core_id)``. A machine or container without
``/sys/devices/system/node`` is one node holding every online CPU and all of ``/proc/meminfo``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cpuinfer.errors import CpuinferError

_NODE_DIR = re.compile(r"node(\d+)$")
_MEMINFO = re.compile(r"^(?:Node\s+\d+\s+)?(\w+):\s+(\d+)(?:\s+kB)?\s*$")


def parse_cpulist(text: str, where: str = "cpulist") -> list[int]:
    """``"0-3,8,10-11"`` -> ``[0, 1, 2, 3, 8, 10, 11]`` (the kernel's list format; empty -> [])."""
    out: list[int] = []
    text = text.strip()
    if not text:
        return out
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?(?::(\d+))?", part)
        if not m:
            raise CpuinferError(f"{where}: cannot parse CPU/node list item {part!r} in {text!r}")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        step = int(m.group(3)) if m.group(3) is not None else 1
        if b < a or step < 1:
            raise CpuinferError(f"{where}: bad range {part!r} in {text!r}")
        out.extend(range(a, b + 1, step))
    return sorted(set(out))


def format_cpulist(ids) -> str:
    """Inverse of :func:`parse_cpulist`: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    ids = sorted(set(int(i) for i in ids))
    parts, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def parse_meminfo(text: str) -> dict[str, int]:
    """``meminfo`` (per node or ``/proc/meminfo``) -> {field: bytes} (kB values times 1024)."""
    out = {}
    for line in text.splitlines():
        m = _MEMINFO.match(line.strip())
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if "kB" in line else 1)
    return out


@dataclass(frozen=True)
class Cpu:
    id: int
    node: int
    package: int
    core: int            # physical core key: the lowest-numbered CPU among its SMT siblings
    siblings: tuple[int, ...]

    @property
    def is_primary(self) -> bool:
        """The first hardware thread of its physical core (the one used when SMT is off)."""
        return self.id == self.core


@dataclass(frozen=True)
class Node:
    id: int
    cpus: tuple[int, ...]            # every online CPU of the node (SMT siblings included)
    cores: tuple[int, ...]           # one CPU per physical core: the primary thread, ascending
    mem_total: int | None            # bytes (None when unknown)
    mem_free: int | None

    @property
    def has_memory(self) -> bool:
        return bool(self.mem_total)


@dataclass(frozen=True)
class Topology:
    nodes: tuple[Node, ...]
    cpus: dict          # int -> Cpu
    distance: dict      # (node, node) -> SLIT distance (10 = local)
    root: str
    has_node_dir: bool  # False: no /sys/devices/system/node (container / non-NUMA kernel)

    @property
    def node_ids(self) -> list[int]:
        return [n.id for n in self.nodes]

    def node(self, node_id: int) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise CpuinferError(f"NUMA node {node_id} does not exist (nodes: {format_cpulist(self.node_ids)})")

    def node_of_cpu(self, cpu: int) -> int:
        return self.cpus[cpu].node

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    def nearest_memory_node(self, node_id: int) -> int:
        """``node_id`` itself if it has memory, else the closest node (SLIT) that has some."""
        if self.node(node_id).has_memory:
            return node_id
        with_mem = [n.id for n in self.nodes if n.has_memory]
        if not with_mem:
            return node_id
        return min(with_mem, key=lambda m: (self.distance.get((node_id, m), 255), m))

    def describe(self) -> str:
        lines = [f"{self.n_nodes} NUMA node(s)" + ("" if self.has_node_dir else
                                                   " (no /sys/devices/system/node: one pseudo-node)")]
        for n in self.nodes:
            smt = len(n.cpus) - len(n.cores)
            mem = (f"{n.mem_total / 2**30:.1f} GiB, {n.mem_free / 2**30:.1f} GiB free"
                   if n.mem_total is not None and n.mem_free is not None else "memory unknown")
            lines.append(f"  node {n.id}: {len(n.cores)} cores ({format_cpulist(n.cores)})"
                         f"{f' + {smt} SMT siblings' if smt else ''}, {mem}")
        if self.n_nodes > 1:
            ids = self.node_ids
            lines.append("  distances: " + " | ".join(
                " ".join(str(self.distance.get((a, b), "?")) for b in ids) for a in ids))
        return "\n".join(lines)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None


def _read_int(path: Path) -> int | None:
    t = _read(path)
    try:
        return int(t.strip()) if t is not None else None
    except ValueError:
        raise CpuinferError(f"{path}: expected an integer, got {t.strip()!r}") from None


def read_topology(root: str | Path = "/") -> Topology:
    """The NUMA topology below ``root`` (``"/"`` = this machine)."""
    root = Path(root)
    sysnode = root / "sys/devices/system/node"
    syscpu = root / "sys/devices/system/cpu"

    online_text = _read(syscpu / "online")
    if online_text is not None:
        online = parse_cpulist(online_text, str(syscpu / "online"))
    else:
        online = sorted(int(p.name[3:]) for p in syscpu.glob("cpu[0-9]*")) if syscpu.is_dir() else []
    if not online:
        raise CpuinferError(f"{syscpu}: no online CPUs found")

    node_cpus: dict[int, list[int]] = {}
    node_mem: dict[int, dict[str, int]] = {}
    distance: dict[tuple[int, int], int] = {}
    has_node_dir = sysnode.is_dir() and any(_NODE_DIR.match(p.name) for p in sysnode.iterdir())
    if has_node_dir:
        ids_text = _read(sysnode / "online")
        ids = (parse_cpulist(ids_text, str(sysnode / "online")) if ids_text is not None else
               sorted(int(_NODE_DIR.match(p.name).group(1)) for p in sysnode.iterdir()
                      if _NODE_DIR.match(p.name)))
        for nid in ids:
            d = sysnode / f"node{nid}"
            cl = _read(d / "cpulist")
            node_cpus[nid] = [c for c in parse_cpulist(cl or "", str(d / "cpulist")) if c in set(online)]
            mi = _read(d / "meminfo")
            node_mem[nid] = parse_meminfo(mi) if mi is not None else {}
            dist = _read(d / "distance")
            if dist is not None:
                row = [int(v) for v in dist.split()]
                if len(row) != len(ids):
                    raise CpuinferError(f"{d / 'distance'}: {len(row)} distances for {len(ids)} nodes")
                for other, v in zip(ids, row):
                    distance[(nid, other)] = v
        assigned = {c for cs in node_cpus.values() for c in cs}
        stray = [c for c in online if c not in assigned]
        if stray:   # an online CPU no node lists: put it on the first node rather than lose it
            node_cpus[ids[0]].extend(stray)
    else:
        node_cpus[0] = list(online)
        mi = _read(root / "proc/meminfo")
        node_mem[0] = parse_meminfo(mi) if mi is not None else {}
        distance[(0, 0)] = 10

    cpus: dict[int, Cpu] = {}
    cpu_node = {c: nid for nid, cs in node_cpus.items() for c in cs}
    by_pkg_core: dict[tuple[int, int], list[int]] = {}
    raw: dict[int, tuple[int, int, list[int] | None]] = {}
    for c in online:
        topo = syscpu / f"cpu{c}/topology"
        pkg = _read_int(topo / "physical_package_id")
        core = _read_int(topo / "core_id")
        sib_text = _read(topo / "thread_siblings_list")
        sibs = parse_cpulist(sib_text, str(topo / "thread_siblings_list")) if sib_text is not None else None
        pkg = 0 if pkg is None else pkg
        core = c if core is None else core
        raw[c] = (pkg, core, sibs)
        by_pkg_core.setdefault((pkg, core), []).append(c)
    for c in online:
        pkg, core, sibs = raw[c]
        if sibs is None:
            sibs = by_pkg_core[(pkg, core)]
        sibs = [s for s in sibs if s in cpu_node] or [c]
        cpus[c] = Cpu(id=c, node=cpu_node[c], package=pkg, core=min(sibs), siblings=tuple(sorted(sibs)))

    nodes = []
    for nid in sorted(node_cpus):
        cs = tuple(sorted(node_cpus[nid]))
        mem = node_mem.get(nid, {})
        nodes.append(Node(id=nid, cpus=cs, cores=tuple(c for c in cs if cpus[c].is_primary),
                          mem_total=mem.get("MemTotal"), mem_free=mem.get("MemFree")))
    return Topology(nodes=tuple(nodes), cpus=cpus, distance=distance, root=str(root),
                    has_node_dir=has_node_dir)


def machine_topology() -> Topology:
    """This machine's topology."""
    return read_topology("/")
