"""Weight handles over the mapped GGUF file: quantized matrices and small float vectors.

A :class:`QTensor` is a zero-copy view of a matrix's blocks plus its type; multiplying by it runs
the numba kernels of :mod:`quant` straight over the mapped bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import quant
from .gguf import GGMLType

from .errors import CpuinferError
from .gguf import GGUFFile


@dataclass(frozen=True)
class QTensor:
    name: str
    raw: np.ndarray          # uint8 [rows, row_bytes] (or [experts, rows, row_bytes])
    ggml_type: GGMLType
    rows: int
    cols: int

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def matmul(self, x: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
        """out[n, rows] = x[n, cols] @ Wᵀ; ``scratch`` from :func:`matmul_scratch` (no allocation)."""
        quant.matmul(self.raw, self.ggml_type, x, out, scratch)

    def get_rows(self, ids: np.ndarray, out: np.ndarray) -> None:
        quant.get_rows(self.raw, self.ggml_type, ids, out)


def matmul_scratch(n_batch: int, max_cols: int) -> np.ndarray:
    """One scratch buffer, allocated once per state, large enough for :meth:`QTensor.matmul` of
    any supported type on up to ``n_batch`` tokens of up to ``max_cols`` values (quantized
    activations live there)."""
    k = -(-max_cols // 256) * 256            # a multiple of every block size
    need = max(quant.scratch_size(t, n_batch, k) for t in quant.SUPPORTED_TYPES)
    return np.zeros(max(need, 1), np.uint8)


class TensorLoader:
    """Looks tensors up by name in a GGUF file and checks their shape and type before use."""

    def __init__(self, gguf: GGUFFile, place=None):
        """``place(info, raw) -> array`` (optional, from :mod:`numa.placement`) may hand back a
        node-placed copy of a matrix's mapped bytes for the model to compute from."""
        self.gguf = gguf
        self.path = gguf.path
        self.place = place
        for info in gguf.tensors.values():
            quant.check_supported(info.ggml_type, info.name, gguf.path)

    def has(self, name: str) -> bool:
        return name in self.gguf.tensors

    def _info(self, name: str, shape: tuple[int, ...]):
        info = self.gguf.tensor(name)
        if tuple(info.shape) != tuple(shape):
            raise CpuinferError(f"{self.path}: tensor {name} has shape {list(info.shape)}, "
                                f"expected {list(shape)} from the metadata")
        return info

    def matrix(self, name: str, rows: int, cols: int) -> QTensor:
        info = self._info(name, (rows, cols))
        return QTensor(name, self._raw(info), info.ggml_type, rows, cols)

    def _raw(self, info) -> np.ndarray:
        raw = self.gguf.raw(info)
        return self.place(info, raw) if self.place is not None else raw

    def vector(self, name: str, n: int) -> np.ndarray:
        """A small 1-D float tensor (norm weight, bias) as float32: a view when stored as F32."""
        info = self._info(name, (n,))
        raw = self.gguf.raw(info)
        if info.ggml_type == GGMLType.F32:
            return raw.view(np.float32)
        return quant.dequantize(raw, info.ggml_type, n).astype(np.float32)

    def optional_vector(self, name: str, n: int) -> np.ndarray | None:
        return self.vector(name, n) if self.has(name) else None

    def stacked(self, name: str, n: int, rows: int, cols: int) -> QTensor:
        """A stack of ``n`` equally shaped matrices stored as one 3-D tensor (the routed experts
        ``ffn_*_exps``, or MLA's per-head ``attn_k_b``/``attn_v_b``). ``raw`` is the zero-copy
        uint8 view [n, rows, row_bytes], so ``raw[i]`` is matrix ``i``'s rows; ``rows``/``cols``
        describe one matrix and ``nbytes`` counts all ``n``."""
        info = self._info(name, (n, rows, cols))
        return QTensor(name, self._raw(info), info.ggml_type, rows, cols)
