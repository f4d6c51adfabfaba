"""The one place for numba flags and thread control.

Every compiled function in the project is decorated with one of these, so flags stay consistent
and ``cache=True`` is never forgotten:

* :data:`kernel` — serial, GIL-free helper or kernel (dot products, row dequantizers).
* :data:`fast_kernel` — like :data:`kernel`, plus the float-reassociation and FMA-contraction
  flags that let LLVM vectorize float reductions (results differ from a strict left-to-right sum
  only by rounding; the tests use tolerances).
* :data:`parallel_kernel` — a driver with ``numba.prange`` loops.

Threading layer: ``omp`` launches a ``prange`` region ~10x cheaper than ``workqueue`` (2–4 µs vs
35–40 µs), which matters at hundreds of mat-vecs per token. It is chosen here, before any parallel
region runs, when numba's OpenMP pool can be loaded; otherwise ``tbb``, otherwise numba's default.
"""
from __future__ import annotations

import numba
from numba import njit

_FAST = {"contract", "reassoc", "nsz", "arcp"}  # numba wants a set (not frozenset)

kernel = njit(cache=True, nogil=True)
fast_kernel = njit(cache=True, nogil=True, fastmath=_FAST)
parallel_kernel = njit(cache=True, nogil=True, parallel=True)
fast_parallel_kernel = njit(cache=True, nogil=True, parallel=True, fastmath=_FAST)


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
