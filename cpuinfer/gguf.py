"""GGUF reader: header, metadata and tensor table parsed with validation; tensor data by mmap.

File layout (little-endian, GGUF v2/v3)::

    magic  "GGUF"          4 bytes
    version                u32   (2 or 3)
    n_tensors              u64
    n_kv                   u64
    n_kv × (key: string, value_type: u32, value)
    n_tensors × (name: string, n_dims: u32, ne: u64[n_dims], ggml_type: u32, offset: u64)
    padding to general.alignment (default 32)
    tensor data            (each tensor at data_start + offset, offset % alignment == 0)

    string = u64 length + UTF-8 bytes;  array = u32 item type + u64 count + items

``ne[0]`` is the fastest-varying dimension (a row); :attr:`TensorInfo.shape` is the numpy order
(``ne`` reversed), so a matrix of ``ne = (k, n)`` has ``shape = (n, k)``: n rows of k values.
Nothing is copied: :meth:`GGUFFile.raw` returns a read-only uint8 view into the mapped file.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as GGMLType

from .errors import CpuinferError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Value types of the key/value section: type id -> (struct format, size); 8 = string, 9 = array.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NP_SCALARS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
               6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_MAX_DIMS = 4
_MAX_COUNT = 1 << 40  # no real file has more keys, tensors or array items than this


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]      # numpy order: shape[-1] is the row length (ggml ne[0])
    ggml_type: GGMLType
    offset: int                 # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Bounds-checked little-endian reads over the header bytes."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise CpuinferError(f"{self.path}: truncated GGUF header while reading {what} "
                                f"(needs {n} bytes at offset {self.pos}, file has {len(self.buf)})")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def scalar(self, fmt: str, size: int, what: str):
        return struct.unpack(fmt, self.take(size, what))[0]

    def u32(self, what): return self.scalar("<I", 4, what)
    def u64(self, what): return self.scalar("<Q", 8, what)

    def count(self, what: str) -> int:
        n = self.u64(what)
        if n > _MAX_COUNT or n > len(self.buf):
            raise CpuinferError(f"{self.path}: absurd {what} {n} (file is {len(self.buf)} bytes)")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"length of {what}")
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(raw).decode("utf-8", errors="replace")

    def strings(self, n: int, what: str) -> list[str]:
        """``n`` consecutive strings: the same checks as :meth:`string` in one tight loop, since
        tokenizer vocabularies and merges hold 10^5 of them."""
        buf, pos, size = self.buf, self.pos, len(self.buf)
        unpack_len = _U64.unpack_from
        out = []
        for i in range(n):
            if pos + 8 > size:
                self.pos = pos
                self.take(8, f"length of {what} {i}")
            (k,) = unpack_len(buf, pos)
            pos += 8
            if pos + k > size:
                self.pos = pos
                self.take(k, f"{what} {i}")
            out.append(str(buf[pos:pos + k], "utf-8", "replace"))
            pos += k
        self.pos = pos
        return out

    def value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            return self.scalar(fmt, size, f"value of {key}")
        if vtype == _STRING:
            return self.string(f"value of {key}")
        if vtype == _ARRAY:
            itype = self.u32(f"array item type of {key}")
            n = self.count(f"array length of {key}")
            if itype in _NP_SCALARS:
                dt = np.dtype(_NP_SCALARS[itype]).newbyteorder("<")
                raw = self.take(n * dt.itemsize, f"array {key}")
                return np.frombuffer(raw, dtype=dt, count=n).copy()
            if itype == _STRING:
                return self.strings(n, f"item of {key}")
            if itype == _ARRAY:
                return [self.value(_ARRAY, key) for _ in range(n)]
            raise CpuinferError(f"{self.path}: metadata key {key}: unknown array item type {itype}")
        raise CpuinferError(f"{self.path}: metadata key {key}: unknown value type {vtype}")


class GGUFFile:
    """A parsed, validated GGUF file whose tensor data stays in the mapped page cache."""

    def __init__(self, path: str | os.PathLike, header_only: bool = False):
        self.path = str(path)
        p = Path(path)
        if not p.exists():
            raise CpuinferError(f"{self.path}: no such file")
        if p.is_dir():
            raise CpuinferError(f"{self.path}: is a directory, expected a .gguf file")
        self.file_size = p.stat().st_size
        if self.file_size < 24:
            raise CpuinferError(f"{self.path}: not a GGUF file (only {self.file_size} bytes)")
        with open(p, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.data = np.frombuffer(self._mmap, dtype=np.uint8)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse(header_only)

    # -- parsing -------------------------------------------------------------------------------
    def _parse(self, header_only: bool) -> None:
        c = _Cursor(memoryview(self._mmap), self.path)
        magic = bytes(c.take(4, "magic"))
        if magic != GGUF_MAGIC:
            raise CpuinferError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        self.version = c.u32("version")
        if self.version not in (2, 3):
            raise CpuinferError(f"{self.path}: unsupported GGUF version {self.version}, expected 2 or 3")
        n_tensors = c.count("tensor count")
        n_kv = c.count("metadata key count")
        for _ in range(n_kv):
            key = c.string("metadata key")
            vtype = c.u32(f"value type of {key}")
            self.metadata[key] = c.value(vtype, key)
        infos = []
        for i in range(n_tensors):
            name = c.string(f"name of tensor {i}")
            n_dims = c.u32(f"dimension count of tensor {name}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise CpuinferError(f"{self.path}: tensor {name}: {n_dims} dimensions, expected 1..{_MAX_DIMS}")
            ne = [c.u64(f"shape of tensor {name}") for _ in range(n_dims)]
            tcode = c.u32(f"type of tensor {name}")
            offset = c.u64(f"offset of tensor {name}")
            infos.append((name, ne, tcode, offset))
        self.alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise CpuinferError(f"{self.path}: general.alignment = {self.alignment}, expected a power of two")
        self.data_start = -(-c.pos // self.alignment) * self.alignment
        self.header_size = c.pos
        for name, ne, tcode, offset in infos:
            self.tensors[name] = self._tensor_info(name, ne, tcode, offset, header_only)

    def _tensor_info(self, name, ne, tcode, offset, header_only) -> TensorInfo:
        try:
            gtype = GGMLType(tcode)
        except ValueError:
            raise CpuinferError(f"{self.path}: tensor {name}: unknown ggml type id {tcode}") from None
        if gtype not in GGML_QUANT_SIZES:
            raise CpuinferError(f"{self.path}: tensor {name}: ggml type {gtype.name} has no known block size")
        block, type_size = GGML_QUANT_SIZES[gtype]
        if any(d == 0 or d > _MAX_COUNT for d in ne):
            raise CpuinferError(f"{self.path}: tensor {name}: absurd shape {tuple(ne)}")
        if ne[0] % block:
            raise CpuinferError(f"{self.path}: tensor {name}: row length {ne[0]} is not a multiple "
                                f"of the {gtype.name} block size {block}")
        n = 1
        for d in ne:
            n *= d
        nbytes = n // block * type_size
        if offset % self.alignment:
            raise CpuinferError(f"{self.path}: tensor {name}: offset {offset} is not aligned to {self.alignment}")
        start = self.data_start + offset
        if not header_only and start + nbytes > self.file_size:
            raise CpuinferError(f"{self.path}: tensor {name}: data [{start}, {start + nbytes}) lies past "
                                f"the end of the file ({self.file_size} bytes): truncated file?")
        return TensorInfo(name, tuple(int(d) for d in reversed(ne)), gtype, start, nbytes)

    # -- access --------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise CpuinferError(f"{self.path}: metadata key {key} is missing")
        return self.metadata[key]

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CpuinferError(f"{self.path}: tensor {name} is missing")
        return self.tensors[name]

    def raw(self, name: str | TensorInfo) -> np.ndarray:
        """Zero-copy uint8 view of a tensor's bytes, shaped ``shape[:-1] + (row_bytes,)``."""
        info = name if isinstance(name, TensorInfo) else self.tensor(name)
        if info.offset + info.nbytes > self.file_size:
            raise CpuinferError(f"{self.path}: tensor {info.name}: data lies past the end of the file")
        flat = self.data[info.offset:info.offset + info.nbytes]
        rows = info.n_elements // info.shape[-1]
        return flat.reshape(info.shape[:-1] + (info.nbytes // max(rows, 1),))

    def close(self) -> None:
        self.data = None
        try:
            self._mmap.close()
        except BufferError:  # views still alive: the mapping closes when they go
            pass


def open_gguf(path: str | os.PathLike, header_only: bool = False) -> GGUFFile:
    """Open and validate a GGUF file (``header_only`` accepts a file cut after its header)."""
    return GGUFFile(path, header_only=header_only)
