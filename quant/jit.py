"""The one place for numba flags and thread control.

Every compiled function in the project is decorated with one of these, so flags stay consistent
and ``cache=True`` is never forgotten:

* :data:`kernel` — serial, GIL-free helper or kernel (dot products, row dequantizers).
* :data:`fast_kernel` — like :data:`kernel`, plus the float-reassociation and FMA-contraction
  flags that let LLVM vectorize float reductions (results differ from a strict left-to-right sum
  only by rounding; the tests use tolerances), and numpy's error model: a division is the IEEE
  one, without the Python model's branch that raises on a zero divisor, which otherwise keeps
  any loop that divides from being vectorized (SiLU's ``g / (1 + e^−g)``).
* :data:`parallel_kernel` — a driver with ``numba.prange`` loops.
* :data:`inline_kernel` — a helper inlined into its callers' numba IR, so it is not a function
  of its own: for small pieces that call the mat-mul drivers. numba links a callee's LLVM module
  into every compiled function that calls it and optimizes the result again, so each separate
  function above ``matmul_kernel`` costs seconds of compile time (``tools.compile_time``).

Cache freshness: numba keys a cached function on its own source file only, so a kernel that calls
compiled code from another module would be loaded stale after that module changed. Functions
defined in the project packages therefore use :class:`_ProjectCacheLocator`, whose stamp covers
every project module that contains compiled code: editing any of them recompiles them all.

Threading layer: ``omp`` launches a ``prange`` region ~10x cheaper than ``workqueue`` (2–4 µs vs
35–40 µs), which matters at hundreds of mat-vecs per token. It is chosen here, before any parallel
region runs, when numba's OpenMP pool can be loaded; otherwise ``tbb``, otherwise numba's default.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

import numba
from llvmlite import ir as llvm_ir
from numba import njit, types
from numba.core import caching, cgutils
from numba.extending import intrinsic

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_PROJECT_PACKAGES = ("quant", "cpuinfer", "numa")
_COMPILED_CODE = re.compile(rb"^\s*(from|import)\s+(numba|quant\.jit|\.jit)\b", re.M)


@functools.lru_cache(maxsize=None)
def _project_modules() -> tuple[Path, ...]:
    """The project's source files, listed once per process (every cached function's stamp
    reads them: walking the packages again each time, numba's cache files included, cost
    ~0.4 s of import and load on a tree with a few thousand of them). Their stamps are still
    taken per function."""
    return tuple(sorted(p for pkg in _PROJECT_PACKAGES for p in (_PROJECT_ROOT / pkg).rglob("*.py")
                        if "__pycache__" not in p.parts))


# Public names since numba 0.61, underscored before.
_InTree = getattr(caching, "InTreeCacheLocator", None) or caching._InTreeCacheLocator
_CacheImpl = getattr(caching, "CacheImpl", None) or caching._CacheImpl


class _ProjectCacheLocator(_InTree):
    """In-tree numba cache whose freshness stamp covers all project modules with compiled code."""

    def get_source_stamp(self):
        h = hashlib.sha256()
        for path in _project_modules():
            st = os.stat(path)
            if path == Path(self._py_file).resolve() or _has_compiled_code(str(path), st.st_mtime,
                                                                            st.st_size):
                digest = caching._hash_source_file(str(path), st.st_mtime, st.st_size)
                h.update(str(path).encode() + digest)
        return h.digest()

    @classmethod
    def from_function(cls, py_func, py_file):
        if numba.config.CACHE_DIR:
            return None
        try:
            rel = Path(py_file).resolve().relative_to(_PROJECT_ROOT)
        except (ValueError, OSError):
            return None
        if rel.parts[0] not in _PROJECT_PACKAGES:
            return None
        return super().from_function(py_func, py_file)


@functools.lru_cache(maxsize=None)
def _has_compiled_code(path: str, st_mtime: float, st_size: int) -> bool:
    """Whether a module imports numba or the project's jit flags (memoized per file version)."""
    return bool(_COMPILED_CODE.search(Path(path).read_bytes()))


if _ProjectCacheLocator not in _CacheImpl._locator_classes:
    _CacheImpl._locator_classes.insert(0, _ProjectCacheLocator)

_FAST = {"contract", "reassoc", "nsz", "arcp"}  # numba wants a set (not frozenset)

kernel = njit(cache=True, nogil=True)
fast_kernel = njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
parallel_kernel = njit(cache=True, nogil=True, parallel=True)
fast_parallel_kernel = njit(cache=True, nogil=True, parallel=True, fastmath=_FAST, error_model="numpy")
inline_kernel = njit(cache=True, nogil=True, inline="always")


def _pick_threading_layer() -> str:
    """Select the cheapest available threading layer (must run before the first prange)."""
    for layer, module in (("omp", "numba.np.ufunc.omppool"), ("tbb", "numba.np.ufunc.tbbpool")):
        try:
            __import__(module)
        except Exception:  # missing OpenMP/TBB runtime: try the next one
            continue
        numba.config.THREADING_LAYER = layer
        return layer
    return numba.config.THREADING_LAYER


THREADING_LAYER = _pick_threading_layer()


def set_threads(n: int) -> int:
    """Use ``n`` threads for the following parallel kernels (clamped to 1..available); returns it."""
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def get_threads() -> int:
    """Number of threads parallel kernels currently use."""
    return numba.get_num_threads()


def max_threads() -> int:
    """Largest value :func:`set_threads` accepts (numba's pool size)."""
    return numba.config.NUMBA_NUM_THREADS


@intrinsic
def num_threads(typingctx):
    """Thread count the next ``prange`` of the calling thread will use (numba's
    ``get_num_threads()``, which compiled code can call but not cache: it goes through a ctypes
    pointer). This calls the threading layer's ``get_num_threads`` symbol by name, as numba's own
    parfor lowering does, so kernels using it stay cacheable."""
    from numba.np.ufunc.parallel import _launch_threads
    _launch_threads()                  # registers the symbol with LLVM

    def codegen(context, builder, sig, args):
        fnty = llvm_ir.FunctionType(llvm_ir.IntType(types.intp.bitwidth), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "get_num_threads")
        return builder.call(fn, [])

    return types.intp(), codegen
