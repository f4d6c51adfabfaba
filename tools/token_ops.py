"""The serial per-token work of a dense llama-family layer: what one decoded token costs outside
the parallel mat-mul and attention regions, per operation, on one core.

    python -m tools.token_ops [--shape llama-3-8b]

For one token these run on the calling thread while the other threads wait (RMSNorm, RoPE,
SwiGLU, the residual adds, and the activation quantization before each mat-vec: Q8 tables for
the legacy formats Q4_0..Q8_0, Q8_K for the K-quants), so at many threads they are the Amdahl
term of a token. Each op's best time over ~0.3 s of calls, times its calls per layer and the layers.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from cpuinfer import ops
from cpuinfer.errors import CpuinferError
from cpuinfer.gguf import GGMLType
from quant.kernels import act_scratch_bytes, prepare_acts
from tools.kernel_speed import _time
from tools.shapes import PRESETS


def _ops(spec, rng):
    """(name, calls per layer, zero-argument callable, activation tables or None: "Q8" / "Q8_K"
    for the quantization a file of that family runs) for one token of ``spec``'s shape."""
    d, ff, hd = spec.hidden, spec.ffn, spec.head_dim
    f32 = np.float32
    x = rng.standard_normal((1, d)).astype(f32)
    out = np.zeros((1, d), f32)
    w = np.ones(d, f32)
    q = rng.standard_normal((1, spec.n_head, hd)).astype(f32)
    k = rng.standard_normal((1, spec.n_head_kv, hd)).astype(f32)
    cos, sin = ops.rope_table(8, hd, spec.rope_base)
    gu = rng.standard_normal((1, 2 * ff)).astype(f32)
    hidden = np.zeros((1, ff), f32)

    def quantize(ggml_type, n):                   # the tables a one-token mat-vec prepares
        v = rng.standard_normal((1, n)).astype(f32)
        scratch = np.zeros(act_scratch_bytes(int(ggml_type), 1, n), np.uint8)
        return lambda: prepare_acts(int(ggml_type), v, scratch, 0)

    return [
        (f"rmsnorm {d}", 2, lambda: ops.rmsnorm_serial(x, w, np.float32(1e-5), out), None),
        (f"rope q+k {spec.n_head}+{spec.n_head_kv} x {hd}", 1,
         lambda: (ops.rope_serial(q, cos, sin, 5, True), ops.rope_serial(k, cos, sin, 5, True)), None),
        (f"swiglu {ff}", 1, lambda: ops.swiglu_serial(gu, gu, ff, hidden), None),
        (f"residual add {d}", 2, lambda: ops.add_into(out, x), None),
        *[(f"quantize {acts} {n}", calls, quantize(t, n), acts)
          for acts, t in (("Q8", GGMLType.Q4_0), ("Q8_K", GGMLType.Q4_K))
          for n, calls in ((d, 3), (ff, 1))],
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3-8b", help="a dense preset of tools.shapes")
    args = ap.parse_args(argv)
    try:
        dense = [name for name, s in PRESETS.items() if s.arch in ("llama", "qwen2")]
        if args.shape not in dense:
            raise CpuinferError(f"unknown or not dense shape {args.shape!r}; valid: {', '.join(dense)}")
        spec = PRESETS[args.shape]
    except CpuinferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows = [(name, calls, _time(fn, 0.3) * 1e6, acts)
            for name, calls, fn, acts in _ops(spec, np.random.default_rng(0))]
    print(f"{spec.title}: {spec.n_layer} layers, one token, one core")
    print("| op | µs per call | calls per layer | ms per token |")
    print("|---|---|---|---|")
    for name, calls, us, _ in rows:
        print(f"| {name} | {us:.1f} | {calls} | {us * calls * spec.n_layer / 1e3:.2f} |")
    for fmt in ("Q8", "Q8_K"):
        per_layer = sum(us * calls for _, calls, us, acts in rows if acts in (None, fmt))
        print(f"total with {fmt} activations: {per_layer * spec.n_layer / 1e3:.2f} ms per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
