"""Memory policy system calls, node-local anonymous memory and page residency queries.

``mbind``, ``set_mempolicy``, ``get_mempolicy`` and ``move_pages`` are called through libnuma's
thin wrappers when ``libnuma.so.1`` is installed, else as raw system calls through libc's
``syscall`` (numbers for x86_64 and aarch64). Failures raise ``OSError`` with the errno; the
placement code turns a refusal (EPERM in a container, ENOSYS, no backend) into one warning.

What places page-cache pages of a mapped file: nothing reliable. ``mbind`` on a shared file
mapping does not move page-cache pages that already exist, and those pages are shared by every
process and may be evicted and re-read later on whatever node the reader runs. So weights that
must live on a node are copied once into *anonymous* private memory (:class:`Arena`) by a thread
pinned on that node under ``set_mempolicy(MPOL_BIND, {node})`` — anonymous pages are allocated on
first touch under the touching thread's policy and stay there (``MPOL_BIND`` pages are not
migrated by automatic NUMA balancing). Where the policy call is refused, first touch from the
pinned thread still allocates locally (the default policy is local allocation). The
file's own cached pages for the copied range are dropped afterwards (``MADV_DONTNEED`` on this
process's mapping, then ``POSIX_FADV_DONTNEED``), so each weight byte lives in RAM once.

Residency: ``move_pages(pid 0, pages, nodes=NULL)`` returns each page's node (or ``-ENOENT`` when
the page is not resident); ``mincore`` says which pages of a mapping are in memory;
:func:`numa_maps` parses ``/proc/<pid>/numa_maps`` (per-mapping page counts per node).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE

# <linux/mempolicy.h>
MPOL_DEFAULT = 0
MPOL_PREFERRED = 1
MPOL_BIND = 2
MPOL_INTERLEAVE = 3
MPOL_LOCAL = 4
MPOL_MF_STRICT = 1 << 0
MPOL_MF_MOVE = 1 << 1
MPOL_F_NODE = 1 << 0        # get_mempolicy flags
MPOL_F_ADDR = 1 << 1
MADV_DONTNEED = 4

_SYSCALLS = {   # machine -> (mbind, set_mempolicy, get_mempolicy, move_pages)
    "x86_64": (237, 238, 239, 279),
    "amd64": (237, 238, 239, 279),
    "aarch64": (235, 237, 236, 239),
    "arm64": (235, 237, 236, 239),
}
_MAX_NODES = 1024           # node mask bits passed to the kernel (CONFIG_NODES_SHIFT <= 10)
_MASK_WORDS = _MAX_NODES // 64


def _nodemask(nodes) -> ctypes.Array:
    mask = (ctypes.c_ulong * _MASK_WORDS)()
    for n in nodes:
        if not 0 <= n < _MAX_NODES:
            raise ValueError(f"node {n} out of range")
        mask[n // 64] |= 1 << (n % 64)
    return mask


def _mask_nodes(mask) -> list[int]:
    return [w * 64 + b for w in range(_MASK_WORDS) for b in range(64) if mask[w] >> b & 1]


class Syscalls:
    """The four memory-policy calls, bound once per process (see the module docstring)."""

    def __init__(self):
        self.backend = "none"
        self.reason = ""
        self._fns = None
        numa_name = ctypes.util.find_library("numa") or "libnuma.so.1"
        try:
            lib = ctypes.CDLL(numa_name, use_errno=True)
            self._fns = (lib.mbind, lib.set_mempolicy, lib.get_mempolicy, lib.move_pages)
            self.backend = "libnuma"
        except (OSError, AttributeError):
            nums = _SYSCALLS.get(platform.machine().lower())
            if nums is None:
                self.reason = f"no libnuma and no system call numbers for {platform.machine()}"
                return
            libc = ctypes.CDLL(None, use_errno=True)
            sc = libc.syscall
            sc.restype = ctypes.c_long

            def call(nr):
                return lambda *a: sc(ctypes.c_long(nr), *a)
            self._fns = tuple(call(nr) for nr in nums)
            self.backend = "syscall"
        for f in (self._fns if self.backend == "libnuma" else ()):
            f.restype = ctypes.c_long

    @property
    def available(self) -> bool:
        return self._fns is not None

    def _check(self, rc, what):
        if rc < 0 or rc == -1:
            e = ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")
        return rc

    def _need(self):
        if self._fns is None:
            raise OSError(errno.ENOSYS, f"memory policy calls unavailable: {self.reason}")

    def mbind(self, addr: int, length: int, mode: int, nodes=(), flags: int = 0) -> None:
        """Set the policy of ``[addr, addr+length)`` (addr page-aligned)."""
        self._need()
        mask = _nodemask(nodes)
        self._check(self._fns[0](ctypes.c_void_p(addr), ctypes.c_ulong(length), ctypes.c_int(mode),
                                 mask if nodes else None, ctypes.c_ulong(_MAX_NODES + 1 if nodes else 0),
                                 ctypes.c_uint(flags)), "mbind")

    def set_mempolicy(self, mode: int, nodes=()) -> None:
        """Set the calling thread's policy for its future allocations."""
        self._need()
        mask = _nodemask(nodes)
        self._check(self._fns[1](ctypes.c_int(mode), mask if nodes else None,
                                 ctypes.c_ulong(_MAX_NODES + 1 if nodes else 0)), "set_mempolicy")

    def get_mempolicy(self, addr: int | None = None) -> tuple[int, list[int]]:
        """(mode, nodes) of the calling thread, or of the mapping containing ``addr``."""
        self._need()
        mode = ctypes.c_int(0)
        mask = (ctypes.c_ulong * _MASK_WORDS)()
        self._check(self._fns[2](ctypes.byref(mode), mask, ctypes.c_ulong(_MAX_NODES + 1),
                                 ctypes.c_void_p(addr or 0), ctypes.c_ulong(MPOL_F_ADDR if addr else 0)),
                    "get_mempolicy")
        return mode.value, _mask_nodes(mask)

    def node_of_address(self, addr: int) -> int:
        """Node of the page at ``addr`` (faulting it in if needed) via ``MPOL_F_NODE|MPOL_F_ADDR``."""
        self._need()
        node = ctypes.c_int(-1)
        self._check(self._fns[2](ctypes.byref(node), None, ctypes.c_ulong(0), ctypes.c_void_p(addr),
                                 ctypes.c_ulong(MPOL_F_NODE | MPOL_F_ADDR)), "get_mempolicy")
        return node.value

    def move_pages(self, pages: np.ndarray, nodes: np.ndarray | None = None, flags: int = 0) -> np.ndarray:
        """``move_pages`` for this process: with ``nodes`` None, query; returns int32 status per
        page (node id, or ``-errno``: ``-ENOENT`` not resident, ``-EFAULT`` not mapped)."""
        self._need()
        pages = np.ascontiguousarray(pages, np.uint64)
        status = np.full(pages.shape[0], -errno.ENOENT, np.int32)
        nd = None
        if nodes is not None:
            nd = np.ascontiguousarray(nodes, np.int32)
        self._check(self._fns[3](ctypes.c_int(0), ctypes.c_ulong(pages.shape[0]),
                                 ctypes.c_void_p(pages.ctypes.data),
                                 ctypes.c_void_p(nd.ctypes.data) if nd is not None else None,
                                 ctypes.c_void_p(status.ctypes.data), ctypes.c_int(flags)), "move_pages")
        return status


_SYS: Syscalls | None = None


def syscalls() -> Syscalls:
    """The process's :class:`Syscalls` (bound on first use)."""
    global _SYS
    if _SYS is None:
        _SYS = Syscalls()
    return _SYS


def array_address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def page_span(addr: int, nbytes: int) -> tuple[int, int]:
    """(first page address, page count) of the pages ``[addr, addr+nbytes)`` touches."""
    first = addr - addr % PAGE
    last = addr + max(nbytes, 1) - 1
    return first, (last - last % PAGE - first) // PAGE + 1


def page_nodes(addr: int, nbytes: int, sys: Syscalls | None = None, batch: int = 1 << 16) -> np.ndarray:
    """int32 node (or ``-errno``) of every page of ``[addr, addr+nbytes)``, via ``move_pages``."""
    sys = sys or syscalls()
    first, n = page_span(addr, nbytes)
    out = np.empty(n, np.int32)
    for i in range(0, n, batch):
        k = min(batch, n - i)
        pages = first + (np.arange(i, i + k, dtype=np.uint64) * np.uint64(PAGE))
        out[i:i + k] = sys.move_pages(pages)
    return out


def mincore(addr: int, nbytes: int) -> np.ndarray:
    """bool per page of ``[addr, addr+nbytes)``: resident in memory (``mincore(2)``)."""
    first, n = page_span(addr, nbytes)
    vec = np.zeros(n, np.uint8)
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mincore(ctypes.c_void_p(first), ctypes.c_size_t(n * PAGE), ctypes.c_void_p(vec.ctypes.data))
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mincore: {os.strerror(e)}")
    return (vec & 1).astype(bool)


def madvise(addr: int, nbytes: int, advice: int) -> None:
    """``madvise`` over the whole pages inside ``[addr, addr+nbytes)`` (no-op when none)."""
    start = -(-addr // PAGE) * PAGE
    end = (addr + nbytes) // PAGE * PAGE
    if end <= start:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(advice)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"madvise: {os.strerror(e)}")


def unmap_pages(a: np.ndarray) -> None:
    """Drop this process's pages of a file-mapped array (``MADV_DONTNEED`` over the whole pages
    inside it): the next touch maps them from the file again. Raises OSError."""
    madvise(array_address(a), a.nbytes, MADV_DONTNEED)


class Arena:
    """A private anonymous mapping of ``nbytes`` (page-aligned start), nothing allocated until
    touched. ``array`` is its uint8 view; the mapping lives as long as any view of it."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self._map = mmap.mmap(-1, max(self.nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.array = np.frombuffer(self._map, np.uint8, count=self.nbytes)
        self.addr = array_address(self.array)

    def bind(self, mode: int, nodes, sys: Syscalls | None = None, offset: int = 0,
             length: int | None = None) -> None:
        """``mbind`` pages ``[offset, offset+length)`` of the arena (offsets page-aligned)."""
        length = self.nbytes - offset if length is None else length
        (sys or syscalls()).mbind(self.addr + offset, -(-length // PAGE) * PAGE, mode, nodes)


def numa_balancing(root: str | Path = "/") -> int | None:
    """``/proc/sys/kernel/numa_balancing`` (1 = the kernel migrates pages toward their users)."""
    try:
        return int((Path(root) / "proc/sys/kernel/numa_balancing").read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass
class NumaMapsEntry:
    start: int
    policy: str
    file: str | None = None
    anon: bool = False
    pages: dict = field(default_factory=dict)     # node -> pages resident there
    fields: dict = field(default_factory=dict)


_NODE_COUNT = re.compile(r"^N(\d+)=(\d+)$")


def parse_numa_maps(text: str) -> list[NumaMapsEntry]:
    """``/proc/<pid>/numa_maps`` lines: ``<hex start> <policy> [file=…] [anon=n] [N<k>=pages]…``."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        try:
            start = int(parts[0], 16)
        except ValueError:
            continue
        e = NumaMapsEntry(start=start, policy=parts[1])
        for tok in parts[2:]:
            m = _NODE_COUNT.match(tok)
            if m:
                e.pages[int(m.group(1))] = int(m.group(2))
            elif tok.startswith("file="):
                e.file = tok[5:]
            elif "=" in tok:
                k, _, v = tok.partition("=")
                e.fields[k] = v
                if k == "anon":
                    e.anon = True
            else:
                e.fields[tok] = True
        out.append(e)
    return out


def numa_maps(pid: int | str = "self") -> list[NumaMapsEntry]:
    return parse_numa_maps(Path(f"/proc/{pid}/numa_maps").read_text())
