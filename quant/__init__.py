"""Quantized tensor formats of GGUF files and the compiled kernels that multiply by them.

Public API (all validation raises :class:`cpuinfer.errors.CpuinferError` with a one-line message)::

    FORMATS: dict[GGMLType, QuantFormat]       # every format with a reference + compiled kernels
    SUPPORTED_TYPES: tuple[GGMLType, ...]
    check_supported(ggml_type, tensor_name, path) -> None
    row_bytes(ggml_type, k) -> int
    dequantize(raw uint8[..., row_bytes], ggml_type, k) -> float32[..., k]      # numpy reference
    matmul(w uint8[rows, row_bytes], ggml_type, x float32[n, k], out float32[n, rows], scratch=None)
    get_rows(w uint8[rows, row_bytes], ggml_type, ids int[n], out float32[n, k])
    scratch_size(ggml_type, n, k) -> int      # bytes of uint8 scratch matmul may be given
    set_threads(n), get_threads()
    can_pack(ggml_type, rows) -> bool         # whether pack() gives these matrices a faster layout
    pack(raw uint8[..., rows, row_bytes], ggml_type, out=None) -> (packed, PackedType)

``matmul`` and ``get_rows`` take a GGUF type, or a :class:`PackedType` for rows that
:func:`pack` interleaved 8 at a time (:mod:`quant.interleaved`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
Q2_K..Q6_K where the CPU has AVX2; same byte count, a different order).

Formats live one family per module: :mod:`quant.floats` (F32, F16, BF16), :mod:`quant.legacy`
(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), :mod:`quant.kquants` (Q2_K..Q6_K). The compiled drivers, callable
from other compiled code, are in :mod:`quant.kernels`.

``matmul`` on the legacy formats quantizes the activations to int8 per 32 values with an f16
scale (as llama.cpp does); the result then differs from ``x @ dequantize(W).T`` by at most
``Σ_blocks (max|x_block| / 127) · (1/2 + 127·2^-11) · Σ_block |w|`` per output. The K-quants
(Q2_K..Q6_K) quantize them to Q8_K per 256 values with a float32 scale (llama.cpp's
``quantize_row_q8_K``): at most ``Σ_blocks (max|x_block| / 127) / 2 · Σ_block |w|``.
"""
from __future__ import annotations

import numpy as np

from cpuinfer.errors import CpuinferError
from cpuinfer.gguf import GGMLType

from . import floats, interleaved, kernels, kquants, legacy
from .base import QuantFormat
from .interleaved import PackedType, can_pack
from .jit import get_threads, set_threads

FORMATS: dict[GGMLType, QuantFormat] = {**floats.FORMATS, **legacy.FORMATS, **kquants.FORMATS}
SUPPORTED_TYPES: tuple[GGMLType, ...] = tuple(t for t in kernels.KERNEL_TYPES if t in FORMATS)

__all__ = ["FORMATS", "SUPPORTED_TYPES", "GGMLType", "PackedType", "QuantFormat", "can_pack",
           "check_supported", "dequantize", "get_rows", "get_threads", "matmul", "pack", "row_bytes",
           "scratch_size", "set_threads"]


def _type_name(ggml_type) -> str:
    for enum in (GGMLType, PackedType):
        try:
            return enum(int(ggml_type)).name
        except (ValueError, TypeError):
            pass
    return f"unknown type {ggml_type!r}"


def _packed(ggml_type) -> PackedType | None:
    try:
        return PackedType(int(ggml_type))
    except (ValueError, TypeError):
        return None


def _format(ggml_type, where: str = "quant") -> QuantFormat:
    """The block geometry of a GGUF type, or of the type a :class:`PackedType` was packed from."""
    packed = _packed(ggml_type)
    if packed is not None:
        if not interleaved.HAVE_X8:
            raise CpuinferError(f"{where}: {packed.name} needs AVX2, FMA and F16C, which this "
                                f"CPU lacks")
        return FORMATS[interleaved.BASE[packed]]
    try:
        fmt = FORMATS.get(GGMLType(int(ggml_type)))
    except (ValueError, TypeError):
        fmt = None
    if fmt is None:
        raise CpuinferError(f"{where}: type {_type_name(ggml_type)} is not supported "
                            f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")
    return fmt


def check_supported(ggml_type, tensor_name: str, path: str) -> None:
    """Raise CpuinferError unless tensors of ``ggml_type`` can be read and multiplied."""
    try:
        ok = GGMLType(int(ggml_type)) in SUPPORTED_TYPES
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise CpuinferError(f"{path}: tensor {tensor_name} has type {_type_name(ggml_type)}, "
                            f"which cpuinfer does not support "
                            f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")


def row_bytes(ggml_type, k: int) -> int:
    """Bytes of one row of ``k`` values; ``k`` must be a multiple of the block size."""
    fmt = _format(ggml_type, "row_bytes")
    if k <= 0 or k % fmt.block_size:
        raise CpuinferError(f"row_bytes: row length {k} is not a positive multiple of the "
                            f"{fmt.name} block size {fmt.block_size}")
    return fmt.row_bytes(k)


def scratch_size(ggml_type, n: int, k: int) -> int:
    """Bytes of the uint8 ``scratch`` that :func:`matmul` uses for ``n`` tokens of ``k`` values."""
    _format(ggml_type, "scratch_size")
    return int(kernels.act_scratch_bytes(int(ggml_type), n, k))


def pack(raw: np.ndarray, ggml_type, out: np.ndarray | None = None):
    """``(packed, PackedType)``: GGUF rows ``raw`` uint8 [..., rows, row_bytes] interleaved 8 at
    a time into ``out`` (a new array when None, or ``raw`` itself when it is writable), for
    :func:`matmul` to run with the :class:`PackedType`. Needs ``can_pack(ggml_type, rows)``."""
    fmt = _format(ggml_type, "pack")
    raw = np.asarray(raw)
    if (raw.dtype != np.uint8 or raw.ndim < 2 or not raw.flags.c_contiguous
            or not can_pack(ggml_type, raw.shape[-2]) or raw.shape[-1] % fmt.type_size):
        raise CpuinferError(f"pack: cannot interleave {fmt.name} {raw.dtype} {list(raw.shape)} "
                            f"(needs C-contiguous uint8 [..., rows, row_bytes] with rows a multiple "
                            f"of {interleaved.GROUP}, a type among "
                            f"{', '.join(GGMLType(interleaved.BASE[p]).name for p in PackedType)} "
                            f"and AVX2)")
    if out is not None and (out.shape != raw.shape or out.dtype != np.uint8
                            or not out.flags.c_contiguous or not out.flags.writeable):
        raise CpuinferError(f"pack: out must be a writable C-contiguous uint8 {list(raw.shape)}")
    return interleaved.pack(raw, ggml_type, out), interleaved.PACKED[GGMLType(int(ggml_type))]


def dequantize(raw: np.ndarray, ggml_type, k: int) -> np.ndarray:
    """Numpy reference dequantization: uint8 [..., row_bytes] -> float32 [..., k] (a new array)."""
    fmt = _format(ggml_type, "dequantize")
    rb = row_bytes(ggml_type, k)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim < 1 or raw.shape[-1] != rb:
        raise CpuinferError(f"dequantize: expected uint8 [..., {rb}] for {k} {fmt.name} values per "
                            f"row, got {raw.dtype} {list(raw.shape)}")
    packed = _packed(ggml_type)
    if packed is not None:
        if raw.ndim < 2 or raw.shape[-2] % interleaved.GROUP:
            raise CpuinferError(f"dequantize: {packed.name} needs [..., rows, {rb}] with rows a "
                                f"multiple of {interleaved.GROUP}, got {list(raw.shape)}")
        raw = interleaved.unpack_ref(raw, interleaved.BASE[packed])
    blocks = np.ascontiguousarray(raw).reshape(-1, fmt.type_size)
    return fmt.dequantize_ref(blocks).astype(np.float32, copy=False).reshape(*raw.shape[:-1], k)


def _check_array(a, name: str, dtype, ndim: int, where: str, writeable: bool = False) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != ndim:
        got = f"{a.dtype} {list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
        raise CpuinferError(f"{where}: {name} must be a {ndim}-d {np.dtype(dtype).name} array, "
                            f"got {got}")
    if not a.flags.c_contiguous:
        raise CpuinferError(f"{where}: {name} must be C-contiguous")
    if writeable and not a.flags.writeable:
        raise CpuinferError(f"{where}: {name} must be writeable")


def _check_weights(w, ggml_type, k: int, where: str) -> QuantFormat:
    fmt = _format(ggml_type, where)
    _check_array(w, "w", np.uint8, 2, where)
    if k <= 0 or k % fmt.block_size or w.shape[1] != fmt.row_bytes(k):
        raise CpuinferError(f"{where}: {fmt.name} rows of {k} values need {fmt.row_bytes(k)} bytes "
                            f"(k a multiple of {fmt.block_size}), w has {w.shape[1]} bytes per row")
    if _packed(ggml_type) is not None and w.shape[0] % interleaved.GROUP:
        raise CpuinferError(f"{where}: {_type_name(ggml_type)} needs a multiple of "
                            f"{interleaved.GROUP} rows, w has {w.shape[0]}")
    return fmt


def check_matmul(w: np.ndarray, ggml_type, x: np.ndarray, out: np.ndarray,
                 scratch: np.ndarray | None = None) -> np.ndarray:
    """Validate :func:`matmul`'s arguments (one-line :class:`CpuinferError` otherwise) and return
    the scratch to use (``scratch``, or a new one when None) — for callers that then run
    ``kernels.matmul_kernel`` from compiled code."""
    _check_array(x, "x", np.float32, 2, "matmul")
    _check_array(out, "out", np.float32, 2, "matmul", writeable=True)
    n, k = x.shape
    _check_weights(w, ggml_type, k, "matmul")
    if out.shape != (n, w.shape[0]):
        raise CpuinferError(f"matmul: out must be [{n}, {w.shape[0]}] for x {list(x.shape)} and "
                            f"{w.shape[0]} weight rows, got {list(out.shape)}")
    need = int(kernels.act_scratch_bytes(int(ggml_type), n, k))
    if scratch is None:
        return np.empty(max(need, 1), np.uint8)
    _check_array(scratch, "scratch", np.uint8, 1, "matmul", writeable=True)
    if scratch.shape[0] < need:
        raise CpuinferError(f"matmul: scratch has {scratch.shape[0]} bytes, needs {need} "
                            f"(scratch_size({_type_name(ggml_type)}, {n}, {k}))")
    return scratch


def matmul(w: np.ndarray, ggml_type, x: np.ndarray, out: np.ndarray,
           scratch: np.ndarray | None = None) -> None:
    """``out[:] = x @ W.T`` for quantized rows ``w`` [rows, row_bytes], ``x`` [n, k], ``out`` [n, rows].

    ``scratch`` (optional, uint8 1-d of at least ``scratch_size(ggml_type, n, k)`` bytes) holds the
    quantized activations; pass a preallocated one on the hot path, otherwise one is allocated.
    """
    scratch = check_matmul(w, ggml_type, x, out, scratch)
    if x.shape[0]:
        kernels.matmul_kernel(int(ggml_type), w, x, out, scratch)


def get_rows(w: np.ndarray, ggml_type, ids: np.ndarray, out: np.ndarray) -> None:
    """Embedding lookup: ``out[i] = dequantize(w[ids[i]])`` for ``out`` float32 [n, k]."""
    _check_array(out, "out", np.float32, 2, "get_rows", writeable=True)
    n, k = out.shape
    _check_weights(w, ggml_type, k, "get_rows")
    if not isinstance(ids, np.ndarray) or ids.dtype not in (np.int64, np.int32) or ids.ndim != 1:
        raise CpuinferError("get_rows: ids must be a 1-d int64 or int32 array")
    if ids.shape[0] != n:
        raise CpuinferError(f"get_rows: {ids.shape[0]} ids but out has {n} rows")
    if n and (ids.min() < 0 or ids.max() >= w.shape[0]):
        bad = ids[(ids < 0) | (ids >= w.shape[0])][0]
        raise CpuinferError(f"get_rows: id {int(bad)} out of range [0, {w.shape[0]})")
    if n:
        kernels.get_rows_kernel(int(ggml_type), w, np.ascontiguousarray(ids), out)
