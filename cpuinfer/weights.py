"""Weight handles over the mapped GGUF file: quantized matrices and small float vectors.

A :class:`QTensor` is a matrix's blocks plus its type; multiplying by it runs the numba kernels of
:mod:`quant` over them. The blocks are a zero-copy view of the mapped file, except where the
loader repacks them (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K with rows a multiple of 8, on CPUs with
AVX2: 8 rows interleaved, :mod:`quant.interleaved`, like llama.cpp's CPU repacking — a one-time copy at load
that streams at memory speed on one core where the GGUF row order does not) or a NUMA placement
copies them to their nodes (:mod:`numa.placement`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import quant
from numa import memory

from .gguf import GGMLType

from .errors import CpuinferError
from .gguf import GGUFFile


@dataclass(frozen=True)
class QTensor:
    name: str
    raw: np.ndarray          # uint8 [rows, row_bytes] (or [experts, rows, row_bytes])
    ggml_type: GGMLType      # the type in the file
    rows: int
    cols: int
    qtype: int = -1          # the kernels' type code: int(ggml_type), or the repacked layout's

    def __post_init__(self):
        if self.qtype < 0:
            object.__setattr__(self, "qtype", int(self.ggml_type))

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def matmul(self, x: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
        """out[n, rows] = x[n, cols] @ Wᵀ; ``scratch`` from :func:`matmul_scratch` (no allocation)."""
        quant.matmul(self.raw, self.qtype, x, out, scratch)

    def get_rows(self, ids: np.ndarray, out: np.ndarray) -> None:
        quant.get_rows(self.raw, self.qtype, ids, out)


def matmul_scratch(n_batch: int, max_cols: int) -> np.ndarray:
    """One scratch buffer, allocated once per state, large enough for :meth:`QTensor.matmul` of
    any supported type on up to ``n_batch`` tokens of up to ``max_cols`` values (quantized
    activations live there)."""
    k = -(-max_cols // 256) * 256            # a multiple of every block size
    need = max(quant.scratch_size(t, n_batch, k) for t in quant.SUPPORTED_TYPES)
    return np.zeros(max(need, 1), np.uint8)


class TensorLoader:
    """Looks tensors up by name in a GGUF file and checks their shape and type before use."""

    def __init__(self, gguf: GGUFFile, placement=None, repack: bool = True):
        """``placement`` (optional, a :class:`numa.placement.Placement`) may hand back a
        node-placed copy of a matrix's mapped bytes for the model to compute from; ``repack``
        interleaves the matrices whose type and row count allow it (:func:`quant.can_pack`)."""
        self.gguf = gguf
        self.path = gguf.path
        self.placement = placement
        self.repack = repack
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

    def matrix(self, name: str, rows: int, cols: int, pack: bool = True) -> QTensor:
        """A 2-D weight matrix; ``pack=False`` keeps the file's row order (for a table that is
        only looked up by row)."""
        return self._tensor(self._info(name, (rows, cols)), rows, cols, pack)

    def embeddings_and_output(self, embd_name: str, out_name: str, n_vocab: int,
                              d: int) -> tuple[QTensor, QTensor]:
        """The token embedding table and the output head — the same tensor when the file ties
        them (no ``out_name``); the table is repacked only then, as it is otherwise only read
        a row per token."""
        if not self.has(out_name):
            embd = self.matrix(embd_name, n_vocab, d)
            return embd, embd
        return self.matrix(embd_name, n_vocab, d, pack=False), self.matrix(out_name, n_vocab, d)

    def _tensor(self, info, rows: int, cols: int, pack: bool) -> QTensor:
        raw = self.gguf.raw(info)
        placed = self.placement.place(info, raw) if self.placement is not None else raw
        if not (pack and self.repack and quant.can_pack(info.ggml_type, rows)):
            return QTensor(info.name, placed, info.ggml_type, rows, cols)
        if placed is raw:
            packed, qtype = quant.pack(raw, info.ggml_type)
            _unmap(raw)
        else:                  # a private node-placed copy: interleave in place, pages stay put
            placed.flags.writeable = True
            packed, qtype = quant.pack(placed, info.ggml_type, out=placed)
        packed.flags.writeable = False
        if self.placement is not None:
            self.placement.replace(info.name, packed)
        return QTensor(info.name, packed, info.ggml_type, rows, cols, int(qtype))

    def joined(self, names: tuple[str, ...], rows: tuple[int, ...],
               cols: int) -> tuple[QTensor | None, tuple[QTensor, ...]]:
        """Matrices that multiply the same input (q/k/v; gate/up) as ``(whole, parts)``: when
        they share a type that repacks (and repacking is on, with no NUMA placement), their
        interleaved rows are packed into one buffer, in order, so one product over ``whole``
        gives all of their outputs side by side (one parallel region instead of one per matrix;
        the copy costs nothing beyond the repacking's) and each part is a row-slice view of it.
        Otherwise ``whole`` is None and the parts are loaded as :meth:`matrix` loads them."""
        infos = [self._info(nm, (r, cols)) for nm, r in zip(names, rows)]
        kinds = {info.ggml_type for info in infos}
        if (len(infos) < 2 or len(kinds) != 1 or not self.repack or self.placement is not None
                or not all(quant.can_pack(info.ggml_type, r) for info, r in zip(infos, rows))):
            return None, tuple(self._tensor(info, r, cols, True) for info, r in zip(infos, rows))
        ggml_type = infos[0].ggml_type            # one type and one cols: one row size
        out = np.empty((sum(rows), quant.row_bytes(ggml_type, cols)), np.uint8)
        edges = np.cumsum((0,) + tuple(rows))
        for info, a, b in zip(infos, edges[:-1], edges[1:]):
            raw = self.gguf.raw(info)
            _, qtype = quant.pack(raw, ggml_type, out=out[a:b])
            _unmap(raw)
        out.flags.writeable = False
        parts = tuple(QTensor(info.name, out[a:b], ggml_type, r, cols, int(qtype))
                      for info, r, a, b in zip(infos, rows, edges[:-1], edges[1:]))
        whole = QTensor("+".join(names), out, ggml_type, out.shape[0], cols, int(qtype))
        return whole, parts

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
        ``ffn_*_exps``, or MLA's per-head ``attn_k_b``/``attn_v_b``). ``raw`` is uint8
        [n, rows, row_bytes] (each matrix repacked on its own), so ``raw[i]`` is matrix ``i``'s
        rows; ``rows``/``cols`` describe one matrix and ``nbytes`` counts all ``n``."""
        return self._tensor(self._info(name, (n, rows, cols)), rows, cols, pack=True)


def _unmap(raw: np.ndarray) -> None:
    """Drop this process's mapped pages of a tensor now held elsewhere, so its bytes count once
    in the resident set (the kernel keeps them as reclaimable page cache: a reload is fast)."""
    try:
        memory.unmap_pages(raw)
    except OSError:
        pass
