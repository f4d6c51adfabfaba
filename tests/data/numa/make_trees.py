"""Write the sysfs trees the NUMA tests read (only the files :mod:`numa.topology` reads).

The layouts follow what Linux shows on these machines:

* ``epyc9004_2s_nps1`` — dual-socket EPYC 9654 (96 cores, SMT2 each), BIOS NPS1: one node per
  socket. CPU numbering as the kernel enumerates it: first thread of every core, socket 0 then
  socket 1 (0-95, 96-191), then the SMT siblings in the same order (192-287, 288-383), so core
  ``k`` of socket ``s`` is CPUs ``96s+k`` and ``192+96s+k``. SLIT 10 local / 32 remote socket.
* ``epyc9004_2s_nps4`` — same box in NPS4: four nodes per socket of 24 cores (three CCDs) each;
  SLIT 10 local, 12 same socket, 32 other socket.
* ``epyc9004_1s_nps1`` — single EPYC 9554 (64 cores, SMT2), one node.
* ``container_no_node`` — 4 cores × 2 threads and no ``/sys/devices/system/node`` at all
  (containers that hide it, kernels without CONFIG_NUMA): memory from ``/proc/meminfo``.

Memory figures are 12 × 64 GB DIMMs per socket; MemFree is 95% of it. Run as a script to write
all trees under a directory: ``python tests/data/numa/make_trees.py DEST``.
"""
from __future__ import annotations

import sys
from pathlib import Path

GIB_KB = 1024 * 1024
SOCKET_MEM_KB = 12 * 64 * 10**9 // 1024      # 12 × 64 GB DIMMs, in kB


def _cpulist(ids):
    ids = sorted(ids)
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def _w(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _write(dest: Path, sockets: int, cores: int, smt: int, nodes_per_socket: int | None,
           distance) -> None:
    """``nodes_per_socket=None``: no node directory. ``distance(a, b)`` gives the SLIT entry."""
    n_cpus = sockets * cores * smt
    syscpu = dest / "sys/devices/system/cpu"
    _w(syscpu / "online", _cpulist(range(n_cpus)))
    cpu_node = {}
    for t in range(smt):
        for s in range(sockets):
            for k in range(cores):
                cpu = t * sockets * cores + s * cores + k
                sibs = [u * sockets * cores + s * cores + k for u in range(smt)]
                topo = syscpu / f"cpu{cpu}/topology"
                _w(topo / "thread_siblings_list", _cpulist(sibs))
                _w(topo / "physical_package_id", str(s))
                _w(topo / "core_id", str(k))
                if nodes_per_socket:
                    cpu_node[cpu] = s * nodes_per_socket + k // (cores // nodes_per_socket)
    if nodes_per_socket is None:
        total = sockets * SOCKET_MEM_KB
        _w(dest / "proc/meminfo", f"MemTotal:       {total} kB\nMemFree:        {total * 95 // 100} kB\n"
                                  f"MemAvailable:   {total * 96 // 100} kB")
        return
    n_nodes = sockets * nodes_per_socket
    sysnode = dest / "sys/devices/system/node"
    _w(sysnode / "online", _cpulist(range(n_nodes)))
    _w(sysnode / "possible", _cpulist(range(n_nodes)))
    for nid in range(n_nodes):
        d = sysnode / f"node{nid}"
        _w(d / "cpulist", _cpulist(c for c, n in cpu_node.items() if n == nid))
        mem = SOCKET_MEM_KB // nodes_per_socket
        _w(d / "meminfo", f"Node {nid} MemTotal:       {mem} kB\nNode {nid} MemFree:        "
                          f"{mem * 95 // 100} kB\nNode {nid} MemUsed:        {mem - mem * 95 // 100} kB")
        _w(d / "distance", " ".join(str(distance(nid, o, nodes_per_socket)) for o in range(n_nodes)))


def _slit(a: int, b: int, per_socket: int) -> int:
    if a == b:
        return 10
    return 12 if a // per_socket == b // per_socket else 32


TREES = {
    "epyc9004_2s_nps1": dict(sockets=2, cores=96, smt=2, nodes_per_socket=1),
    "epyc9004_2s_nps4": dict(sockets=2, cores=96, smt=2, nodes_per_socket=4),
    "epyc9004_1s_nps1": dict(sockets=1, cores=64, smt=2, nodes_per_socket=1),
    "container_no_node": dict(sockets=1, cores=4, smt=2, nodes_per_socket=None),
}


def write_tree(name: str, dest: Path) -> Path:
    """Write tree ``name`` under ``dest`` (created) and return ``dest``."""
    _write(Path(dest), distance=_slit, **TREES[name])
    return Path(dest)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    for name in TREES:
        write_tree(name, out / name)
        print(out / name)
