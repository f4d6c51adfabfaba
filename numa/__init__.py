"""NUMA placement for cpuinfer (see the README, section NUMA).

* :mod:`numa.topology` — nodes, cores/SMT siblings, memory, distances from sysfs (root is a parameter).
* :mod:`numa.plan` — policies, pinned thread layout, row shards derived from numba's static schedule.
* :mod:`numa.memory` — mbind/set_mempolicy/get_mempolicy/move_pages (libnuma or raw syscalls),
  anonymous arenas, residency (move_pages, mincore, numa_maps).
* :mod:`numa.threads` — pinning numba's OpenMP team and checking its schedule.
* :mod:`numa.placement` — applying a plan to a model (``cpuinfer.load(..., numa=...)``) and residency reports.
"""
