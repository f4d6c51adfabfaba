"""Shared pieces of the quantization formats: the registry record and scalar bit helpers.

A GGUF tensor row of ``k`` values of a block format is ``k / block_size`` blocks of
``type_size`` bytes each, stored back to back (``row_bytes = k / block_size * type_size``).
Every format module (``floats``, ``legacy``, ``kquants``) provides, for each format ``<f>``:

* ``dequantize_<f>(blocks uint8[n_blocks, type_size]) -> float32[n_blocks, block_size]`` — a
  naive numpy reference, bit-exact against ``gguf.quants.dequantize``;
* ``_dequant_row_<f>(row uint8[::1], out float32[::1])`` — compiled, one row of ``k`` values;
* ``_dot_<f>(row uint8[::1], x float32[::1]) -> float32`` — compiled dot of one quantized row
  with float32 activations;

and one :class:`QuantFormat` per format in its ``FORMATS`` table. Half-precision scales are read
with :func:`load_f16` (numba has no float16 on the CPU; the conversion is done in LLVM IR and
compiles to ``vcvtph2ps`` on x86 with F16C).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any, Callable

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from cpuinfer.gguf import GGMLType

from .jit import kernel


@dataclass(frozen=True)
class QuantFormat:
    """One GGML tensor type: block geometry plus its reference and compiled row functions."""
    ggml_type: GGMLType
    name: str
    block_size: int          # values per block
    type_size: int           # bytes per block
    dequantize_ref: Callable[[np.ndarray], np.ndarray]  # uint8[nb, type_size] -> f32[nb, block_size]
    dequant_row: Any         # njit (row uint8[::1], out float32[::1]) -> None
    dot: Any                 # njit (row uint8[::1], x float32[::1]) -> float32

    def row_bytes(self, k: int) -> int:
        """Bytes of one row of ``k`` values (``k`` must be a multiple of ``block_size``)."""
        return k // self.block_size * self.type_size


# --- scalar conversions usable from compiled code -------------------------------------------

@intrinsic
def _half_bits_to_f32(typingctx, bits):
    """IEEE half (low 16 bits of an integer) -> float32, via LLVM ``fpext half``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        h16 = builder.trunc(args[0], ir.IntType(16)) if bits.bitwidth > 16 else args[0]
        if bits.bitwidth < 16:
            h16 = builder.zext(args[0], ir.IntType(16))
        return builder.fpext(builder.bitcast(h16, ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def bits_to_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (for bfloat16 and float32 bytes)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if bits.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif bits.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


@kernel
def _half_bits_to_f32_portable(h):
    """IEEE half -> float32 by arithmetic, for x86 CPUs without F16C (no libcall needed)."""
    h = np.int64(h) & 0xFFFF
    sign = np.float32(-1.0) if h & 0x8000 else np.float32(1.0)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        return sign * np.float32(m) * np.float32(2.0 ** -24)
    if e == 31:
        return sign * np.float32(np.inf) if m == 0 else np.float32(np.nan)
    return sign * np.float32(np.ldexp(np.float32(1024 + m), e - 25))


def _native_half() -> bool:
    """True when LLVM converts half natively (F16C on x86; always on other targets)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":   # e.g. a portable build
        return "+f16c" in (numba.config.CPU_FEATURES or "")
    try:
        return bool(llvm.get_host_cpu_features().get("f16c", False))
    except Exception:
        return False


half_bits_to_f32 = _half_bits_to_f32 if _native_half() else _half_bits_to_f32_portable


@intrinsic
def _f32_to_half_bits(typingctx, x):
    """float32 -> IEEE half bits (uint16), round to nearest even, via LLVM ``fptrunc``."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if x.bitwidth > 32:
            v = builder.fptrunc(v, ir.FloatType())
        h = builder.fptrunc(v, ir.HalfType())
        return builder.bitcast(h, ir.IntType(16))

    return types.uint16(x), codegen


@intrinsic
def f32_to_bits(typingctx, x):
    """Reinterpret a float32 as its uint32 bit pattern."""
    if not isinstance(x, types.Float) or x.bitwidth != 32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(x), codegen


@kernel
def _f32_to_half_bits_portable(x):
    """float32 -> IEEE half bits by integer arithmetic (round to nearest even), without F16C."""
    bits = np.int64(f32_to_bits(np.float32(x)))
    sign = (bits >> 16) & 0x8000
    e = ((bits >> 23) & 0xFF) - 127 + 15
    m = bits & 0x7FFFFF
    if ((bits >> 23) & 0xFF) == 0xFF:                       # inf / nan
        return np.uint16(sign | 0x7C00 | (0x200 if m else 0))
    if e >= 31:                                              # overflow -> inf
        return np.uint16(sign | 0x7C00)
    if e <= 0:                                               # subnormal half or zero
        if e < -10:
            return np.uint16(sign)
        m = m | 0x800000
        shift = 14 - e
        half_m = m >> shift
        rem = m & ((1 << shift) - 1)
        mid = 1 << (shift - 1)
        if rem > mid or (rem == mid and (half_m & 1)):
            half_m += 1
        return np.uint16(sign | half_m)
    half = (e << 10) | (m >> 13)
    rem = m & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (half & 1)):
        half += 1                                            # may carry into the exponent: still right
    return np.uint16(sign | half)


f32_to_half_bits = _f32_to_half_bits if _native_half() else _f32_to_half_bits_portable


@kernel
def load_f16(buf, pos):
    """float32 value of the little-endian IEEE half at ``buf[pos:pos + 2]`` (uint8 array)."""
    return half_bits_to_f32(np.uint16(buf[pos]) | (np.uint16(buf[pos + 1]) << np.uint16(8)))


def f16_scales(blocks: np.ndarray, offset: int) -> np.ndarray:
    """Reference helper: the half at byte ``offset`` of each block, as float32 [n_blocks, 1]."""
    return blocks[:, offset:offset + 2].copy().view(np.float16).astype(np.float32)


@intrinsic
def fma32(typingctx, a, b, c):
    """``a·b + c`` with one rounding (LLVM ``fma.f32``: ``vfmadd`` with FMA, else libm ``fmaf``),
    as ggml's ``_mm256_fmadd_ps`` lanes compute it."""
    if not all(isinstance(t, types.Float) for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        vals = [context.cast(builder, v, t, types.float32) for v, t in zip(args, signature.args)]
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3),
                                            "llvm.fma.f32")
        return builder.call(fn, vals)

    return types.float32(a, b, c), codegen
