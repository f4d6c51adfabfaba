"""Shape-true synthetic GGUF models: real architectures' tensors and metadata, random weights.

Nobody can download 700 GB in a test or a benchmark, so this writes a GGUF with exactly the
tensor names, shapes, types and metadata of a preset model (:mod:`tools.shapes`) but any number
of layers::

    python -m tools.synth --preset deepseek-r1 --layers 4 --type q4_0 -o r1-4l.gguf

Weights are random *valid* blocks, written without quantizing any floats: each block is random
bytes with its fp16 scale fields overwritten by finite positive values chosen so that the
dequantized weights have a standard deviation of roughly 0.02 (norm weights are 1 ± 0.1). Block
layouts (bytes, offsets of the fp16 fields; ``d`` = scale, ``m`` = min/dmin)::

    Q4_0   18 = d@0 + 16 nibble bytes          Q4_1 20 = d@0 m@2 + 16
    Q5_0   22 = d@0 + 4 qh + 16                Q5_1 24 = d@0 m@2 + 4 qh + 16
    Q8_0   34 = d@0 + 32 int8                  IQ4_NL 18 = d@0 + 16
    Q2_K   84 = 16 scales + 64 qs + d@80 m@82  Q3_K 110 = 32 hmask + 64 qs + 12 scales + d@108
    Q4_K  144 = d@0 m@2 + 12 scales + 128 qs   Q5_K 176 = d@0 m@2 + 12 scales + 32 qh + 128 qs
    Q6_K  210 = 128 ql + 64 qh + 16 scales + d@208

To stay fast (the data rate is the disk's), one pool of 8 MiB of random blocks is made per type
and each tensor is a run through that pool starting at a random block, so data repeats every
8 MiB. F32/F16/BF16 tensors are drawn the same way from a pool of N(0, 0.02) values.

Tokenizer: a minimal byte-level GPT-2 BPE vocabulary (``tokenizer.ggml.model = gpt2``, pre
``gpt-2``) so that the file loads and any text tokenizes: ``<bos>`` (0), ``<eos>`` (1), the 256
byte symbols, a few merges, ``<think>``/``</think>`` and ``<|user|>``/``<|assistant|>``, then
``<unused_N>`` fillers up to the model's vocab rows; plus a small chat template.

``header_only=True`` writes just the header (what a partially downloaded file holds): enough for
``cpuinfer estimate`` and for ``open_gguf(path, header_only=True)``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType, GGUFWriter, TokenType

from cpuinfer.errors import CpuinferError
from cpuinfer.gguf import GGMLType, TensorInfo

from .shapes import PRESETS, ArchSpec, FTYPES, metadata, model_tensors, parse_ftype

POOL_BYTES = 8 << 20
WEIGHT_STD = 0.02

# type -> (offset of d, offset of m or None, d magnitude giving ~WEIGHT_STD, m as a multiple of d)
# Magnitudes assume uniformly random quant bits and scale bytes (see the module docstring).
_SCALE_FIELDS: dict[GGMLType, tuple[int, int | None, float, float]] = {
    GGMLType.Q4_0: (0, None, WEIGHT_STD / 4.6, 0.0),
    GGMLType.Q4_1: (0, 2, WEIGHT_STD / 4.6, -7.5),
    GGMLType.Q5_0: (0, None, WEIGHT_STD / 9.2, 0.0),
    GGMLType.Q5_1: (0, 2, WEIGHT_STD / 9.2, -15.5),
    GGMLType.Q8_0: (0, None, WEIGHT_STD / 74.0, 0.0),
    GGMLType.IQ4_NL: (0, None, WEIGHT_STD / 70.0, 0.0),
    GGMLType.Q2_K: (80, 82, WEIGHT_STD / 14.5, 1.5),
    GGMLType.Q3_K: (108, None, WEIGHT_STD / 45.0, 0.0),
    GGMLType.Q4_K: (0, 2, WEIGHT_STD / 270.0, 7.5),
    GGMLType.Q5_K: (0, 2, WEIGHT_STD / 540.0, 15.5),
    GGMLType.Q6_K: (208, None, WEIGHT_STD / 1370.0, 0.0),
}
_FLOAT_TYPES = {GGMLType.F32: np.float32, GGMLType.F16: np.float16}

# Byte-level tokenizer: merges (left, right); each result becomes a token.
_MERGES = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġt", "he"),
           ("r", "e"), ("a", "t"), ("Ġ", "s")]
_SPECIAL_USER = ["<think>", "</think>", "<|user|>", "<|assistant|>"]
_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def supported_types() -> list[GGMLType]:
    return [*_FLOAT_TYPES, GGMLType.BF16, *_SCALE_FIELDS]


def _byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable-unicode map, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def tokenizer_metadata(vocab: int) -> list[tuple[str, object, GGUFValueType]]:
    """Byte-level vocab padded to ``vocab`` entries (see the module docstring)."""
    tokens = ["<bos>", "<eos>"] + _byte_symbols()
    types = [TokenType.CONTROL, TokenType.CONTROL] + [TokenType.NORMAL] * 256
    for left, right in _MERGES:
        tokens.append(left + right)
        types.append(TokenType.NORMAL)
    tokens += _SPECIAL_USER
    types += [TokenType.USER_DEFINED] * len(_SPECIAL_USER)
    if vocab < len(tokens):
        raise CpuinferError(f"synthetic vocab needs at least {len(tokens)} rows, got {vocab}")
    n_fill = vocab - len(tokens)
    tokens += [f"<unused_{i}>" for i in range(n_fill)]
    types += [TokenType.UNUSED] * n_fill
    A, STR, U32 = GGUFValueType.ARRAY, GGUFValueType.STRING, GGUFValueType.UINT32
    return [("tokenizer.ggml.model", "gpt2", STR), ("tokenizer.ggml.pre", "gpt-2", STR),
            ("tokenizer.ggml.tokens", tokens, A), ("tokenizer.ggml.token_type", [int(t) for t in types], A),
            ("tokenizer.ggml.merges", [f"{a} {b}" for a, b in _MERGES], A),
            ("tokenizer.ggml.bos_token_id", 0, U32), ("tokenizer.ggml.eos_token_id", 1, U32),
            ("tokenizer.chat_template", _CHAT_TEMPLATE, STR)]


def _block_pool(t: GGMLType, rng: np.random.Generator) -> np.ndarray:
    """POOL_BYTES of random valid ``t`` data (uint8)."""
    if t in _FLOAT_TYPES:
        vals = rng.normal(0.0, WEIGHT_STD, POOL_BYTES // np.dtype(_FLOAT_TYPES[t]).itemsize)
        return vals.astype(_FLOAT_TYPES[t]).view(np.uint8)
    if t == GGMLType.BF16:
        f = rng.normal(0.0, WEIGHT_STD, POOL_BYTES // 2).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    if t not in _SCALE_FIELDS:
        raise CpuinferError(f"synthetic weights of type {t.name} are not supported; "
                            f"supported: {', '.join(x.name for x in supported_types())}")
    size = GGML_QUANT_SIZES[t][1]
    n = POOL_BYTES // size
    blocks = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    d_off, m_off, d_mag, m_mul = _SCALE_FIELDS[t]
    d = (d_mag * rng.uniform(0.5, 1.5, n)).astype(np.float16)
    blocks[:, d_off:d_off + 2] = d.view(np.uint8).reshape(n, 2)
    if m_off is not None:
        m = (d.astype(np.float32) * m_mul * rng.uniform(0.8, 1.2, n)).astype(np.float16)
        blocks[:, m_off:m_off + 2] = m.view(np.uint8).reshape(n, 2)
    return blocks.reshape(-1)


def _small_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """F32 vectors and routers, drawn directly: norms 1 ± 0.1, rope factors 1, others N(0, σ)."""
    if name.endswith("norm.weight"):
        v = 1.0 + rng.uniform(-0.1, 0.1, shape)
    elif name.startswith("rope_freqs"):
        v = np.ones(shape)
    else:
        v = rng.normal(0.0, WEIGHT_STD, shape)
    return np.ascontiguousarray(v, dtype=np.float32)


def write_synthetic(path: str | Path, spec: ArchSpec | str, ftype: str = "q4_0",
                    n_layers: int | None = None, leading_dense: int | None = None, *,
                    pure: bool = False, header_only: bool = False, seed: int = 0,
                    progress: bool = False) -> dict[str, TensorInfo]:
    """Write a shape-true synthetic GGUF; returns its tensor table (offsets relative to data).

    ``spec`` is a preset name or any :class:`~tools.shapes.ArchSpec`; ``ftype`` a llama.cpp file
    type name (``q4_k_m``...) whose per-tensor rules pick the types, or with ``pure=True`` the
    one type for every quantized tensor. ``leading_dense`` defaults to the spec's count, capped
    so a cut-down MoE model keeps at least one MoE layer."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise CpuinferError(f"unknown synthetic preset {spec!r}; valid: {', '.join(PRESETS)}")
        spec = PRESETS[spec]
    parse_ftype(ftype)
    tensors, _ = model_tensors(spec, ftype, n_layers, leading_dense, pure)
    for info in tensors.values():
        if info.ggml_type not in _FLOAT_TYPES and info.ggml_type not in _SCALE_FIELDS \
                and info.ggml_type != GGMLType.BF16:
            raise CpuinferError(f"{info.name}: type {info.ggml_type.name} has no synthetic block writer")
    path = Path(path)
    w = GGUFWriter(path, spec.arch)
    for key, value, vtype in metadata(spec, ftype, n_layers, leading_dense) + tokenizer_metadata(spec.vocab):
        if key == "general.architecture":
            continue  # GGUFWriter adds it
        w.add_key_value(key, value, vtype,
                        sub_type=GGUFValueType.INT32 if key == "tokenizer.ggml.token_type" else None)
    for info in tensors.values():
        w.add_tensor_info(info.name, info.shape, np.dtype(np.float32), info.nbytes, raw_dtype=info.ggml_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    w.write_padding(fout, fout.tell())
    if not header_only:
        _write_data(fout, tensors, w.data_alignment, np.random.default_rng(seed), progress)
    w.close()
    return tensors


def _write_data(fout, tensors: dict[str, TensorInfo], align: int, rng: np.random.Generator,
                progress: bool) -> None:
    pools: dict[GGMLType, np.ndarray] = {}
    total = sum(t.nbytes for t in tensors.values())
    bar = None
    if progress:
        from rich.progress import Progress
        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("writing synthetic weights", total=total)
    try:
        for info in tensors.values():
            if info.ggml_type == GGMLType.F32 and (len(info.shape) == 1 or "ffn_gate_inp" in info.name):
                _small_tensor(info.name, info.shape, rng).tofile(fout)
            else:
                pool = pools.get(info.ggml_type)
                if pool is None:
                    pool = pools[info.ggml_type] = _block_pool(info.ggml_type, rng)
                unit = GGML_QUANT_SIZES[info.ggml_type][1] if info.ggml_type in _SCALE_FIELDS \
                    else np.dtype(_FLOAT_TYPES.get(info.ggml_type, np.float16)).itemsize
                pos = int(rng.integers(0, pool.size // unit)) * unit
                left = info.nbytes
                while left:
                    k = min(left, pool.size - pos)
                    fout.write(memoryview(pool[pos:pos + k]))
                    left -= k
                    pos = 0
            pad = -info.nbytes % align
            if pad:
                fout.write(b"\0" * pad)
            if bar is not None:
                bar.update(task, advance=info.nbytes)
    finally:
        if bar is not None:
            bar.stop()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="architecture to copy")
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: the model's)")
    p.add_argument("--type", default="q4_0", choices=list(FTYPES),
                   help="llama.cpp file type whose per-tensor rules pick the types (default q4_0)")
    p.add_argument("--pure", action="store_true", help="every quantized tensor in --type's base type")
    p.add_argument("--dense-layers", type=int, default=None,
                   help="leading dense layers of a MoE model (default: the model's, keeping one MoE layer)")
    p.add_argument("--header-only", action="store_true", help="write only the header (for estimate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="output .gguf path")


def run(args: argparse.Namespace) -> int:
    tensors = write_synthetic(args.output, args.preset, args.type, args.layers, args.dense_layers,
                              pure=args.pure, header_only=args.header_only, seed=args.seed,
                              progress=sys.stderr.isatty())
    total = sum(t.nbytes for t in tensors.values())
    kind = "header of " if args.header_only else ""
    print(f"wrote {kind}{args.output}: {args.preset} {args.type}, {len(tensors)} tensors, "
          f"{total / 1e9:.3f} GB of weights")
    return 0


def main(argv: list[str] | None = None) -> int:
    from cpuinfer.cli import tool_main
    return tool_main(sys.modules[__name__], "python -m tools.synth", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
