"""The GGUF reader: metadata and tensor table against gguf-py, zero-copy views, and every kind of
bad file ending in one CpuinferError line that names the file and the field."""
from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from cpuinfer.errors import CpuinferError
from cpuinfer.gguf import GGMLType, open_gguf

DATA = Path(__file__).parent / "data" / "tiny"
LLAMA = DATA / "llama" / "llama-Q8_0.gguf"


def test_matches_gguf_py():
    g = open_gguf(LLAMA)
    r = gguf.GGUFReader(LLAMA)
    assert set(g.tensors) == {t.name for t in r.tensors}
    for t in r.tensors:
        info = g.tensors[t.name]
        assert info.shape == tuple(int(d) for d in reversed(t.shape))
        assert info.ggml_type == t.tensor_type and info.nbytes == t.n_bytes
        assert info.offset == t.data_offset
        np.testing.assert_array_equal(g.raw(info).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
    assert g.get("general.architecture") == "llama"
    assert g.get("llama.block_count") == r.fields["llama.block_count"].contents()


def test_views_are_zero_copy_and_read_only():
    g = open_gguf(LLAMA)
    w = g.raw("blk.0.attn_q.weight")
    assert w.dtype == np.uint8 and not w.flags.writeable and not w.flags.owndata
    assert w.shape == (256, 256 // 32 * 34)


def _header(n_tensors=0, n_kv=0, version=3, magic=b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _write(tmp_path, data: bytes) -> Path:
    p = tmp_path / "x.gguf"
    p.write_bytes(data)
    return p


def _tensor_entry(name, ne, gtype, offset) -> bytes:
    return _string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", gtype, offset)


@pytest.mark.parametrize("case,data,msg", [
    ("empty", b"", "not a GGUF file"),
    ("magic", b"GGML" + b"\0" * 40, "not a GGUF file (magic"),
    ("version", _header(version=7) + b"\0" * 16, "unsupported GGUF version 7"),
    ("absurd tensor count", _header(n_tensors=1 << 50), "absurd tensor count"),
    ("absurd kv count", _header(n_kv=1 << 62), "absurd metadata key count"),
    ("truncated key", _header(n_kv=1) + struct.pack("<Q", 50) + b"abc" + b"\0" * 20, "truncated GGUF header"),
    ("absurd key length", _header(n_kv=1) + struct.pack("<Q", 1000) + b"abc" + b"\0" * 20, "absurd length of metadata key"),
    ("bad value type", _header(n_kv=1) + _string("k") + struct.pack("<I", 99) + b"\0" * 16, "unknown value type 99"),
    ("absurd dims", _header(n_tensors=1) + _string("t") + struct.pack("<I", 9) + b"\0" * 64, "9 dimensions"),
    ("unknown type", _header(n_tensors=1) + _tensor_entry("t", [32], 250, 0) + b"\0" * 64, "unknown ggml type id 250"),
    ("row not blocks", _header(n_tensors=1) + _tensor_entry("t", [33], int(GGMLType.Q8_0), 0) + b"\0" * 64, "not a multiple"),
    ("misaligned", _header(n_tensors=1) + _tensor_entry("t", [32], 0, 3) + b"\0" * 64, "not aligned"),
    ("past the end", _header(n_tensors=1) + _tensor_entry("t", [1 << 20], 0, 0) + b"\0" * 64, "past the end"),
])
def test_bad_files(tmp_path, case, data, msg):
    p = _write(tmp_path, data)
    with pytest.raises(CpuinferError) as e:
        open_gguf(p)
    text = str(e.value)
    assert msg in text and str(p) in text and "\n" not in text


def test_header_only_accepts_a_file_cut_after_its_header(tmp_path):
    full = open_gguf(LLAMA)
    cut = _write(tmp_path, LLAMA.read_bytes()[:full.data_start + 100])
    with pytest.raises(CpuinferError, match="past the end"):
        open_gguf(cut)
    g = open_gguf(cut, header_only=True)
    assert {n: t.nbytes for n, t in g.tensors.items()} == {n: t.nbytes for n, t in full.tensors.items()}


def test_unsupported_tensor_type_names_the_tensor(tmp_path):
    import cpuinfer
    w = gguf.GGUFWriter(tmp_path / "iq.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 66), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(CpuinferError, match=r"tensor token_embd.weight has type IQ2_XXS, which cpuinfer does not support"):
        cpuinfer.load(tmp_path / "iq.gguf")
