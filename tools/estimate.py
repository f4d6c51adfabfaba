"""Tokens/s and RAM estimator: know the speed before buying the RAM.

``cpuinfer estimate MODEL.gguf|PRESET [--bandwidth GB/s | --channels N --mts MT/s [--sockets S]]
[--ram GB] [--ctx N] [--efficiency F] [--kv-dtype f32|f16|bf16] [--cores N] [--attn-rate G] [--json]``

Decode of one token reads every weight it uses once and the whole KV cache once, so on a CPU it
is bound by memory bandwidth: ``tokens/s <= bandwidth / bytes_per_token``. This module computes
``bytes_per_token`` from the tensor table alone (:func:`decode_bytes_per_token`), which comes
from the GGUF header (only the header is read, so a partially downloaded file works) or from a
preset built from the real architecture's shapes (:mod:`tools.shapes`).

What one decoded token streams (the rules :func:`decode_bytes_per_token` applies by name):

* every dense weight (attention projections, dense FFN, shared experts ``*_shexp``, norms,
  biases, routers ``ffn_gate_inp`` / ``exp_probs_b``, ``rope_freqs``): all bytes;
* routed experts ``*_exps`` (``[n_expert, rows, cols]``): ``n_expert_used / n_expert`` of the
  bytes, i.e. exactly ``n_expert_used`` experts' slices;
* ``output.weight`` (the head): all bytes; ``token_embd.weight``: one row (a gather), plus all of
  it when there is no ``output.weight`` (tied embeddings: it *is* the head);
* the KV cache at the given context: ``ctx × kv_bytes_per_token``, where per token and layer
  the cache holds ``n_head_kv × (key_length + value_length)`` values (llama, qwen2, ...), or for
  ``deepseek2`` the MLA latent ``kv_lora_rank + rope.dimension_count`` values (576 for R1, instead
  of 128 heads × (192 + 128)) — in ``kv_dtype``: default ``f16`` (IEEE half), what cpuinfer's
  runtime keeps and llama.cpp's default; ``f32`` sizes a float32 cache (twice the bytes).

Efficiency (the fraction of the measured read bandwidth decode achieves) defaults to the median
``bw_fraction`` of this machine's ``cpuinfer bench`` runs cached in ``bench.json`` (see
:func:`store_bench_records`), else :data:`DEFAULT_EFFICIENCY`; the source is always printed.

Attention is arithmetic as well as bytes: every query head dots every cached key and sums every
cached value, ``layers × n_head × ctx × (key dims + value dims)`` multiply-adds per token
(:func:`attention_macs_per_token`; DeepSeek's absorbed MLA: 128 heads × (576 + 512) per cached
token, 35 G per R1 token at 4096 positions, 1.1 T at 131072). cpuinfer runs it after the weight
products, so the expected time per token is the bandwidth time plus ``macs / (cores × rate)``.
The rate per core is measured on this machine (:mod:`cpuinfer.attention` on one thread, the
model's head shape) unless ``--attn-rate`` gives it; cores are this machine's physical cores when
the bandwidth is this machine's (measured or cached), else ``--cores`` (a machine described by
``--bandwidth`` or ``--channels``): without it the arithmetic is printed but not counted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import psutil

from cpuinfer.errors import CpuinferError
from cpuinfer.gguf import TensorInfo, open_gguf

from . import bandwidth as bw
from .shapes import model_tensors, parse_preset, preset_names

DEFAULT_EFFICIENCY = 0.7
TYPICAL_MEASURED_FRACTION = 0.8   # streaming read / theoretical peak on multi-channel servers
DEFAULT_CTX = 4096
PREFILL_BATCH = 512               # tokens per prefill batch (scratch buffers scale with it)
BASE_OVERHEAD = 512 << 20         # interpreter, numpy/numba/llvmlite, compiled kernels
KV_DTYPES = {"f32": 4, "float32": 4, "f16": 2, "float16": 2, "bf16": 2}
_GB = 1e9


@dataclass(frozen=True)
class Breakdown:
    """Bytes one decoded token reads, by kind (see the module docstring for the rules)."""

    embedding: int        # one token_embd row
    attention: int        # attn_* weights and biases (norms are in ``other``)
    dense_ffn: int        # ffn_gate/up/down of dense layers
    shared_experts: int   # *_shexp
    routed_experts: int   # n_used / n_expert of *_exps
    output: int           # output head (token_embd when tied)
    other: int            # norms, routers, exp_probs_b, rope_freqs, anything unrecognised
    kv_cache: int         # ctx × kv_bytes_per_token
    ctx: int
    kv_bytes_per_token: int
    n_expert: int
    n_expert_used: int

    @property
    def weights(self) -> int:
        """Weight bytes read per token (everything but the KV cache)."""
        return (self.embedding + self.attention + self.dense_ffn + self.shared_experts
                + self.routed_experts + self.output + self.other)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    def as_dict(self) -> dict[str, int]:
        d = asdict(self)
        d.update(weights=self.weights, total=self.total)
        return d


def _arch(meta: Mapping[str, Any]) -> str:
    a = meta.get("general.architecture")
    if not isinstance(a, str) or not a:
        raise CpuinferError("metadata key general.architecture is missing")
    return a


def _int(meta: Mapping[str, Any], key: str, default: int | None = None) -> int:
    v = meta.get(key, default)
    if v is None:
        raise CpuinferError(f"metadata key {key} is missing")
    if isinstance(v, (list, tuple)) or getattr(v, "ndim", 0):  # per-layer arrays: use the max
        v = max(int(x) for x in v)
    return int(v)


def kv_dtype_size(kv_dtype: str) -> int:
    key = str(kv_dtype).lower()
    if key not in KV_DTYPES:
        raise CpuinferError(f"unknown KV cache dtype {kv_dtype!r}; valid: f32, f16, bf16")
    return KV_DTYPES[key]


def kv_values_per_token_layer(meta: Mapping[str, Any]) -> int:
    """Cache values stored per token per layer (MLA latent + rope key for deepseek2)."""
    a = _arch(meta)
    if a == "deepseek2":
        return _int(meta, f"{a}.attention.kv_lora_rank") + _int(meta, f"{a}.rope.dimension_count")
    n_head = _int(meta, f"{a}.attention.head_count")
    n_kv = _int(meta, f"{a}.attention.head_count_kv", n_head) or n_head
    head_dim = _int(meta, f"{a}.embedding_length") // n_head
    k = _int(meta, f"{a}.attention.key_length", head_dim)
    v = _int(meta, f"{a}.attention.value_length", head_dim)
    return n_kv * (k + v)


def kv_bytes_per_token(meta: Mapping[str, Any], kv_dtype: str = "f16") -> int:
    """KV cache bytes one cached token takes over all layers."""
    a = _arch(meta)
    return kv_values_per_token_layer(meta) * _int(meta, f"{a}.block_count") * kv_dtype_size(kv_dtype)


def attention_shape(meta: Mapping[str, Any]) -> tuple[int, int, int, int, bool]:
    """(n_head, n_kv, key dims, value dims, V = the first value dims of each K row) of the
    attention kernel the runtime runs for this model (deepseek2: absorbed MLA over the latent)."""
    a = _arch(meta)
    n_head = _int(meta, f"{a}.attention.head_count")
    if a == "deepseek2":
        lora = _int(meta, f"{a}.attention.kv_lora_rank")
        return n_head, 1, lora + _int(meta, f"{a}.rope.dimension_count"), lora, True
    n_kv = _int(meta, f"{a}.attention.head_count_kv", n_head) or n_head
    head_dim = _int(meta, f"{a}.embedding_length") // n_head
    return (n_head, n_kv, _int(meta, f"{a}.attention.key_length", head_dim),
            _int(meta, f"{a}.attention.value_length", head_dim), False)


def attention_macs_per_token(meta: Mapping[str, Any], ctx: int) -> int:
    """Multiply-adds of one decoded token's attention over ``ctx`` cached tokens:
    layers × n_head × ctx × (key dims + value dims)."""
    n_head, _, k, v, _ = attention_shape(meta)
    return _int(meta, f"{_arch(meta)}.block_count") * n_head * ctx * (k + v)


ATTN_RATE_POSITIONS = 2048        # cached positions the per-core rate is measured at


def measure_attention_rate(meta: Mapping[str, Any], ctx: int) -> float:
    """G multiply-adds/s of :func:`cpuinfer.attention.attention` on one thread of this machine,
    for the model's head shape at min(ctx, ATTN_RATE_POSITIONS) cached positions."""
    from quant.jit import get_threads, set_threads
    from tools.attention_speed import time_case
    import numpy as np
    before = get_threads()
    try:
        r = time_case(attention_shape(meta), max(1, min(ctx, ATTN_RATE_POSITIONS)), 1, 1,
                      np.random.default_rng(0))
    finally:
        set_threads(before)
    return r["gmacs"]


def decode_bytes_per_token(tensors: Mapping[str, TensorInfo] | Iterable[TensorInfo],
                           meta: Mapping[str, Any], ctx: int, kv_dtype: str = "f16") -> Breakdown:
    """Bytes read to decode one token with ``ctx`` tokens in the KV cache.

    ``tensors``: name -> :class:`~cpuinfer.gguf.TensorInfo` (``GGUFFile.tensors`` or
    :func:`tools.shapes.model_tensors`); ``meta``: the GGUF metadata dict."""
    if ctx < 0:
        raise CpuinferError(f"context must be >= 0, got {ctx}")
    infos = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    a = _arch(meta)
    n_expert = _int(meta, f"{a}.expert_count", 0)
    n_used = _int(meta, f"{a}.expert_used_count", 0)
    names = {t.name for t in infos}
    tied = "output.weight" not in names
    acc = dict(embedding=0, attention=0, dense_ffn=0, shared_experts=0, routed_experts=0, output=0, other=0)
    for t in infos:
        n = t.name
        base = n.split(".", 2)[2] if n.startswith("blk.") else n
        if n == "token_embd.weight":
            rows = t.n_elements // t.shape[-1]
            acc["embedding"] += t.nbytes // rows
            if tied:
                acc["output"] += t.nbytes
        elif n == "output.weight":
            acc["output"] += t.nbytes
        elif "_exps." in base:
            if not n_expert or t.shape[0] != n_expert:
                raise CpuinferError(f"tensor {n}: shape {t.shape} does not match expert_count {n_expert}")
            acc["routed_experts"] += t.nbytes // n_expert * min(n_used, n_expert)
        elif "_shexp." in base:
            acc["shared_experts"] += t.nbytes
        elif base.endswith("norm.weight") or base.startswith(("ffn_gate_inp.", "exp_probs_b.", "rope_freqs.")):
            acc["other"] += t.nbytes
        elif base.startswith("attn_"):
            acc["attention"] += t.nbytes
        elif base.startswith(("ffn_gate.", "ffn_up.", "ffn_down.")):
            acc["dense_ffn"] += t.nbytes
        else:
            acc["other"] += t.nbytes
    kvpt = kv_bytes_per_token(meta, kv_dtype)
    return Breakdown(**acc, kv_cache=ctx * kvpt, ctx=ctx, kv_bytes_per_token=kvpt,
                     n_expert=n_expert, n_expert_used=n_used)


def runtime_overhead_bytes(meta: Mapping[str, Any]) -> int:
    """RAM beyond weights and KV cache: a fixed base (interpreter, libraries, compiled kernels)
    plus float32 scratch for a PREFILL_BATCH-token batch (residual, norms, q/k/v/attention
    outputs ~ 4 × hidden, FFN/expert activations ~ 3 × the widest FFN) and the logits."""
    a = _arch(meta)
    hidden = _int(meta, f"{a}.embedding_length")
    ffn = max(_int(meta, f"{a}.feed_forward_length", 0),
              _int(meta, f"{a}.expert_feed_forward_length", 0) * max(_int(meta, f"{a}.expert_used_count", 0), 1))
    vocab = _int(meta, f"{a}.vocab_size", 0) or len(meta.get("tokenizer.ggml.tokens", ())) or 0
    return BASE_OVERHEAD + PREFILL_BATCH * 4 * (4 * hidden + 3 * ffn) + 2 * 4 * vocab


# -- model sources -----------------------------------------------------------------------------

@dataclass
class ModelSource:
    label: str
    description: str
    tensors: dict[str, TensorInfo]
    meta: dict[str, Any]

    @property
    def trained_ctx(self) -> int:
        return _int(self.meta, f"{_arch(self.meta)}.context_length", 0)


def load_model_source(spec: str) -> ModelSource:
    """A GGUF path (header only) or a ``MODEL:QUANT`` preset."""
    p = Path(spec)
    if p.exists() or spec.endswith(".gguf") or "/" in spec:
        g = open_gguf(p, header_only=True)
        try:
            a = _arch(g.metadata)
            desc = f"{g.get('general.name', p.name)} ({a}, {g.get(f'{a}.block_count')} layers, file header)"
            return ModelSource(str(p), desc, dict(g.tensors), dict(g.metadata))
        finally:
            g.close()
    if ":" not in spec:
        raise CpuinferError(f"{spec}: no such file, and not a MODEL:QUANT preset; valid presets: "
                            f"{', '.join(preset_names())}")
    arch_spec, quant = parse_preset(spec)
    tensors, meta = model_tensors(arch_spec, quant)
    desc = f"{arch_spec.title} {quant.upper()} ({arch_spec.arch}, {arch_spec.n_layer} layers, preset)"
    return ModelSource(f"{arch_spec.name}:{quant}", desc, tensors, meta)


# -- bench cache (efficiency) ------------------------------------------------------------------

BENCH_FILE = "bench.json"


def store_bench_records(records: Iterable[Mapping[str, Any]]) -> Path:
    """Cache this machine's ``cpuinfer bench`` records for the estimator.

    ``bench.json`` = ``{"version": 1, "machines": {"<machine key>": {"machine": {...identity},
    "timestamp": iso, "runs": [{"model", "threads", "tg_tps", "bytes_per_token", "gbps",
    "read_gbps", "bw_fraction"}, ...]}}}`` (the fields of ``tools.bench.BenchRecord``; a new
    call replaces this machine's runs)."""
    keep = ("model", "threads", "tg_tps", "bytes_per_token", "gbps", "read_gbps", "bw_fraction")
    runs = [{k: r.get(k) for k in keep} for r in records]
    rec = {"machine": bw.machine_identity(),
           "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": runs}
    return bw.store_machine_record(BENCH_FILE, rec)


def bench_efficiency() -> tuple[float, str] | None:
    """(median bw_fraction at each model's largest thread count, description) or None."""
    rec = bw.load_cache_file(BENCH_FILE)["machines"].get(bw.machine_key())
    if not isinstance(rec, dict):
        return None
    best: dict[str, dict] = {}
    for r in rec.get("runs", []):
        if isinstance(r, dict) and isinstance(r.get("bw_fraction"), (int, float)) and r["bw_fraction"] > 0:
            m = str(r.get("model"))
            if m not in best or (r.get("threads") or 0) > (best[m].get("threads") or 0):
                best[m] = r
    if not best:
        return None
    eff = statistics.median(r["bw_fraction"] for r in best.values())
    return float(eff), f"this machine's cpuinfer bench ({len(best)} model(s), {rec.get('timestamp', '?')})"


# -- the estimate ------------------------------------------------------------------------------

@dataclass
class Estimate:
    model: str
    description: str
    ctx: int
    trained_ctx: int
    kv_dtype: str
    breakdown: Breakdown
    weight_bytes: int
    bandwidth_gbps: float
    bandwidth_source: str
    theoretical_gbps: float | None
    efficiency: float
    efficiency_source: str
    overhead_bytes: int
    ram_bytes: int
    ram_source: str
    attention_macs: int                # multiply-adds of one token's attention at ctx
    cores: int | None = None           # None: the attention arithmetic is not counted
    cores_source: str = ""
    attn_rate: float | None = None     # G multiply-adds/s per core
    attn_rate_source: str = ""

    @property
    def bytes_per_token(self) -> int:
        return self.breakdown.total

    @property
    def attention_seconds(self) -> float | None:
        """Time of one token's attention arithmetic on all cores, or None when not counted."""
        if self.cores is None or self.attn_rate is None:
            return None
        return self.attention_macs / (self.cores * self.attn_rate * 1e9)

    @property
    def bound_tps(self) -> float:
        return self.bandwidth_gbps * _GB / self.bytes_per_token

    @property
    def bandwidth_tps(self) -> float:
        """Tokens/s the bandwidth allows at the efficiency (attention arithmetic not counted)."""
        return self.bound_tps * self.efficiency

    @property
    def expected_tps(self) -> float:
        """1 / (bandwidth time + attention arithmetic time) per token."""
        att = self.attention_seconds
        return self.bandwidth_tps if att is None else 1.0 / (1.0 / self.bandwidth_tps + att)

    @property
    def ram_needed_bytes(self) -> int:
        return self.weight_bytes + self.breakdown.kv_cache + self.overhead_bytes

    @property
    def max_ctx_unbounded(self) -> int:
        free = self.ram_bytes - self.weight_bytes - self.overhead_bytes
        return max(free // self.breakdown.kv_bytes_per_token, 0) if free > 0 else 0

    @property
    def fits(self) -> bool:
        return self.ram_bytes >= self.weight_bytes + self.overhead_bytes

    @property
    def max_ctx(self) -> int:
        return min(self.max_ctx_unbounded, self.trained_ctx) if self.trained_ctx else self.max_ctx_unbounded

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "description": self.description,
            "weight_bytes": self.weight_bytes, "bytes_per_token": self.bytes_per_token,
            "bandwidth_gbps": self.bandwidth_gbps, "bound_tps": self.bound_tps,
            "efficiency": self.efficiency, "bandwidth_tps": self.bandwidth_tps,
            "expected_tps": self.expected_tps,
            "attention_macs_per_token": self.attention_macs, "cores": self.cores,
            "cores_source": self.cores_source, "attn_gmacs_per_core": self.attn_rate,
            "attn_rate_source": self.attn_rate_source,
            "attention_ms_per_token": (None if self.attention_seconds is None
                                       else self.attention_seconds * 1e3),
            "ram_needed_bytes": self.ram_needed_bytes, "max_ctx": self.max_ctx,
            "ctx": self.ctx, "trained_ctx": self.trained_ctx, "kv_dtype": self.kv_dtype,
            "kv_bytes_per_token": self.breakdown.kv_bytes_per_token,
            "kv_cache_bytes": self.breakdown.kv_cache, "overhead_bytes": self.overhead_bytes,
            "ram_bytes": self.ram_bytes, "ram_source": self.ram_source, "fits": self.fits,
            "max_ctx_unbounded": self.max_ctx_unbounded,
            "bandwidth_source": self.bandwidth_source, "theoretical_gbps": self.theoretical_gbps,
            "efficiency_source": self.efficiency_source, "breakdown": self.breakdown.as_dict(),
        }


def resolve_bandwidth(bandwidth: float | None = None, channels: int | None = None,
                      mts: float | None = None, sockets: int | None = None,
                      measure_if_missing: bool = True) -> tuple[float, str, float | None]:
    """(GB/s used for the bound, where it came from, theoretical peak or None)."""
    if bandwidth is not None and (channels is not None or mts is not None or sockets is not None):
        raise CpuinferError("--bandwidth contradicts --channels/--mts/--sockets: give one or the other")
    if bandwidth is not None:
        if not bandwidth > 0:
            raise CpuinferError(f"--bandwidth must be a positive GB/s figure, got {bandwidth}")
        return float(bandwidth), "given (--bandwidth)", None
    if channels is not None or mts is not None or sockets is not None:
        if channels is None or mts is None:
            raise CpuinferError("--channels and --mts go together (and --sockets needs both)")
        s = 1 if sockets is None else sockets
        if channels < 1 or s < 1 or not mts > 0:
            raise CpuinferError(f"--channels, --mts and --sockets must be positive, got {channels}, {mts}, {s}")
        peak = channels * mts * 8 * s / 1000.0
        used = peak * TYPICAL_MEASURED_FRACTION
        src = (f"{channels} channels x {mts:g} MT/s x 8 bytes x {s} socket(s) = {peak:.1f} GB/s theoretical, "
               f"x {TYPICAL_MEASURED_FRACTION:.2f} typical measured fraction")
        return used, src, peak
    cached = bw.load_cached_bandwidth()
    if cached:
        return float(cached["read_gbps"]), f"this machine, measured {cached.get('timestamp', '?')} (cached)", None
    if not measure_if_missing:
        raise CpuinferError("no bandwidth given and none cached: pass --bandwidth or --channels/--mts, "
                            "or run `cpuinfer bandwidth` first")
    rec = bw.measure(kernels=("read",), numa=False, reps=3)
    bw.store_machine_record("bandwidth.json", rec)
    return float(rec["read_gbps"]), "this machine, measured now (read kernel, all threads)", None


def estimate(model: str, *, ctx: int = DEFAULT_CTX, bandwidth: float | None = None,
             channels: int | None = None, mts: float | None = None, sockets: int | None = None,
             ram_gb: float | None = None, efficiency: float | None = None,
             kv_dtype: str = "f16", cores: int | None = None, attn_rate: float | None = None,
             measure_if_missing: bool = True) -> Estimate:
    """Everything ``cpuinfer estimate`` reports, for a GGUF path or ``MODEL:QUANT`` preset."""
    if cores is not None and cores < 1:
        raise CpuinferError(f"--cores must be at least 1, got {cores}")
    if attn_rate is not None and not attn_rate > 0:
        raise CpuinferError(f"--attn-rate must be a positive G multiply-adds/s figure, got {attn_rate}")
    if ctx < 1:
        raise CpuinferError(f"--ctx must be at least 1, got {ctx}")
    if efficiency is not None and not 0 < efficiency <= 1:
        raise CpuinferError(f"--efficiency must be in (0, 1], got {efficiency}")
    if ram_gb is not None and not ram_gb > 0:
        raise CpuinferError(f"--ram must be a positive number of GB, got {ram_gb}")
    kv_dtype_size(kv_dtype)
    src = load_model_source(model)
    breakdown = decode_bytes_per_token(src.tensors, src.meta, ctx, kv_dtype)
    gbps, bw_src, peak = resolve_bandwidth(bandwidth, channels, mts, sockets, measure_if_missing)
    if efficiency is not None:
        eff, eff_src = float(efficiency), "given (--efficiency)"
    else:
        cached = bench_efficiency()
        eff, eff_src = cached if cached else (
            DEFAULT_EFFICIENCY, "default; run `cpuinfer bench` on the target machine to measure it")
    if ram_gb is not None:
        ram, ram_src = int(ram_gb * _GB), "given (--ram)"
    else:
        ram, ram_src = int(psutil.virtual_memory().total), "this machine's total memory"
    this_machine = bandwidth is None and channels is None and mts is None and sockets is None
    if cores is not None:
        cores_src = "given (--cores)"
    elif this_machine:
        cores, cores_src = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1, "this machine's physical cores"
    else:
        cores_src = "no --cores for the machine given by --bandwidth/--channels"
    if attn_rate is not None:
        rate, rate_src = float(attn_rate), "given (--attn-rate)"
    elif cores is not None and measure_if_missing:
        rate = measure_attention_rate(src.meta, ctx)
        rate_src = f"this machine's core, measured now at {min(ctx, ATTN_RATE_POSITIONS):,} positions"
    else:
        rate, rate_src = None, "not measured"
    return Estimate(
        model=src.label, description=src.description, ctx=ctx, trained_ctx=src.trained_ctx,
        kv_dtype=kv_dtype, breakdown=breakdown,
        weight_bytes=sum(t.nbytes for t in src.tensors.values()),
        bandwidth_gbps=gbps, bandwidth_source=bw_src, theoretical_gbps=peak,
        efficiency=eff, efficiency_source=eff_src, overhead_bytes=runtime_overhead_bytes(src.meta),
        ram_bytes=ram, ram_source=ram_src, attention_macs=attention_macs_per_token(src.meta, ctx),
        cores=cores, cores_source=cores_src, attn_rate=rate, attn_rate_source=rate_src)


def _gb(n: float) -> str:
    return f"{n / _GB:,.2f} GB"


def format_estimate(e: Estimate) -> str:
    b = e.breakdown
    kvpt = b.kv_bytes_per_token
    parts = [("attention", b.attention), ("dense FFN", b.dense_ffn), ("shared experts", b.shared_experts),
             (f"routed experts ({b.n_expert_used} of {b.n_expert})", b.routed_experts),
             ("output head", b.output), ("embedding row", b.embedding), ("norms/routers", b.other),
             (f"KV cache ({e.ctx:,} tokens x {kvpt / 1e3:,.1f} KB, {e.kv_dtype})", b.kv_cache)]
    lines = [f"model            {e.description}",
             f"weights          {_gb(e.weight_bytes)}",
             f"read per token   {_gb(e.bytes_per_token)} at context {e.ctx:,}"]
    lines += [f"  {name:<40} {_gb(v):>14}" for name, v in parts if v or name.startswith("KV")]
    lines += [f"bandwidth        {e.bandwidth_gbps:,.1f} GB/s ({e.bandwidth_source})"]
    if e.theoretical_gbps:
        lines.append(f"                 at the theoretical peak the bound would be "
                     f"{e.theoretical_gbps * _GB / e.bytes_per_token:,.2f} tokens/s")
    lines += [f"bound            {e.bound_tps:,.2f} tokens/s (bandwidth / bytes per token)",
              f"efficiency       {e.efficiency:.2f} ({e.efficiency_source})"]
    lines.append(f"attention math   {e.attention_macs / 1e9:,.1f} G multiply-adds per token at context {e.ctx:,}")
    att = e.attention_seconds
    if att is None:
        lines += [f"                 not counted: {e.cores_source}",
                  f"expected         {e.expected_tps:,.2f} tokens/s (bandwidth only)"]
    else:
        lines += [f"                 {e.cores} cores ({e.cores_source}) x {e.attn_rate:,.1f} G/s per core "
                  f"({e.attn_rate_source}) = {att * 1e3:,.1f} ms per token",
                  f"expected         {e.expected_tps:,.2f} tokens/s ({e.bandwidth_tps:,.2f} from the bandwidth, "
                  f"then {att * 1e3:,.1f} ms of attention arithmetic per token)"]
    lines += [
              f"RAM needed       {_gb(e.ram_needed_bytes)} at context {e.ctx:,} (weights {_gb(e.weight_bytes)}"
              f" + KV cache {_gb(b.kv_cache)} + runtime {_gb(e.overhead_bytes)})"]
    if not e.fits:
        lines.append(f"max context      the weights alone do not fit in {_gb(e.ram_bytes)} ({e.ram_source})")
    else:
        capped = e.trained_ctx and e.max_ctx_unbounded > e.trained_ctx
        note = (f"the trained context; {e.max_ctx_unbounded:,} would fit" if capped else "fits")
        lines.append(f"max context      {e.max_ctx:,} tokens in {_gb(e.ram_bytes)} ({e.ram_source}; {note})")
    if e.ctx > e.trained_ctx > 0:
        lines.append(f"note             --ctx {e.ctx:,} exceeds the trained context {e.trained_ctx:,}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a GGUF file (only its header is read) or a preset MODEL:QUANT, "
                                 "e.g. deepseek-r1:q4_k_m")
    p.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in GB/s")
    p.add_argument("--channels", type=int, default=None, help="memory channels per socket")
    p.add_argument("--mts", type=float, default=None, help="memory speed in MT/s (e.g. 4800 for DDR5-4800)")
    p.add_argument("--sockets", type=int, default=None, help="sockets (default 1)")
    p.add_argument("--ram", type=float, default=None, help="RAM in GB (default: this machine's)")
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"context length (default {DEFAULT_CTX})")
    p.add_argument("--efficiency", type=float, default=None,
                   help=f"fraction of the bandwidth decode achieves (default: from bench, else {DEFAULT_EFFICIENCY})")
    p.add_argument("--kv-dtype", default="f16", choices=sorted(KV_DTYPES),
                   help="KV cache element type (default f16: IEEE half, what cpuinfer's runtime keeps and "
                        "llama.cpp's default; f32 for a float32 cache, twice the bytes)")
    p.add_argument("--cores", type=int, default=None,
                   help="cores for the attention arithmetic (default: this machine's physical cores when the "
                        "bandwidth is this machine's; a machine given by --bandwidth/--channels needs it)")
    p.add_argument("--attn-rate", type=float, default=None,
                   help="attention G multiply-adds/s per core (default: measured on this machine's core)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")


def run(args: argparse.Namespace) -> int:
    e = estimate(args.model, ctx=args.ctx, bandwidth=args.bandwidth, channels=args.channels, mts=args.mts,
                 sockets=args.sockets, ram_gb=args.ram, efficiency=args.efficiency, kv_dtype=args.kv_dtype,
                 cores=args.cores, attn_rate=args.attn_rate)
    print(json.dumps(e.as_json(), indent=1) if args.json else format_estimate(e))
    return 0


def main(argv: list[str] | None = None) -> int:
    from cpuinfer.cli import tool_main
    return tool_main(sys.modules[__name__], "python -m tools.estimate", "Estimate decode tokens/s and RAM.", argv)


if __name__ == "__main__":
    sys.exit(main())
