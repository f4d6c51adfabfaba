"""``cpuinfer numa [MODEL] [--numa POLICY] [--check]``: the NUMA topology and placement plan.

Without ``--check`` only headers are read: the topology, the threads per node and (with a MODEL)
the weight bytes each node would hold. ``--check MODEL`` loads the model under the policy, runs
a few tokens, and reports per tensor group the fraction of resident pages on the node the plan
intends (queried with ``move_pages``), and warns when automatic NUMA balancing is on.
"""
from __future__ import annotations

import argparse
import warnings

from .errors import CpuinferError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="GGUF file: also show the bytes per node for it")
    p.add_argument("--numa", default="auto", metavar="POLICY",
                   help="auto, off, interleave, distribute, isolate or isolate:NODE (default auto)")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: physical cores)")
    p.add_argument("--smt", action="store_true", help="use SMT siblings as workers too")
    p.add_argument("--check", action="store_true", help="load MODEL, run a few tokens, report page residency")
    p.add_argument("--sysfs-root", default="/", help=argparse.SUPPRESS)   # recorded trees (tests)


def _spec(args):
    from numa.plan import NumaSpec

    s = NumaSpec.parse(args.numa)
    return NumaSpec(s.policy, s.node, smt=args.smt)


def run(args: argparse.Namespace) -> int:
    import os

    from numa.memory import numa_balancing
    from numa.placement import matrix_specs
    from numa.plan import make_plan
    from numa.topology import read_topology

    if args.threads is not None and args.threads < 1:
        raise CpuinferError(f"--threads must be at least 1, got {args.threads}")
    if args.check and not args.model:
        raise CpuinferError("--check needs a MODEL")
    spec = _spec(args)
    topo = read_topology(args.sysfs_root)
    live = args.sysfs_root == "/"
    print(topo.describe())
    matrices = []
    if args.model:
        from .gguf import open_gguf
        matrices = matrix_specs(open_gguf(args.model, header_only=True))
    allowed = os.sched_getaffinity(0) if live and hasattr(os, "sched_getaffinity") else None
    plan = make_plan(topo, spec, threads=args.threads, allowed_cpus=allowed, matrices=matrices)
    print(plan.describe(matrices))
    if live:
        bal = numa_balancing()
        if bal:
            print("warning: /proc/sys/kernel/numa_balancing is on: the kernel may migrate pages "
                  "(placed weights are bound and stay; set it to 0 for steady timings)")
    if not args.check:
        return 0
    return _check(args, spec)


def _check(args, spec) -> int:
    import cpuinfer
    from numa.placement import NumaWarning, model_tensors, residency

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NumaWarning)
        m = cpuinfer.load(args.model, threads=args.threads, n_ctx=64, numa=spec)
        m.logits(list(range(1, 9)))          # a few tokens: every dense matrix is read
    for w in caught:
        print(f"warning: {w.message}")
    plan = m.numa_plan
    print(f"\ncheck: {m!r}, policy {plan.policy if plan else 'off'}"
          + ("" if plan is None or plan.copy else " (weights not copied: file pages)"))
    rep = residency(model_tensors(m), plan)
    print(f"  {'group':<11} {'tensors':>7} {'pages':>9} {'resident':>9} {'on intended node':>17}  pages per node")
    worst = 1.0
    for g in ("attention", "ffn", "experts", "output", "embeddings", "other"):
        r = rep.get(g)
        if r is None:
            continue
        frac = r.fraction
        if frac is not None:
            worst = min(worst, frac)
        nodes = " ".join(f"N{k}={v}" for k, v in sorted(r.by_node.items()))
        print(f"  {g:<11} {r.tensors:>7} {r.pages:>9} {r.resident:>9} "
              f"{'-' if frac is None else f'{100 * frac:.2f}%':>17}  {nodes}")
    if all(r.fraction is None for r in rep.values()):
        print("  no intended node: the policy does not place weights (off) on this machine")
    return 0
