"""Tokens/s estimator: bytes per token, header-only reading, presets, RAM/context, CLI errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cpuinfer.errors import CpuinferError
from cpuinfer.gguf import open_gguf
from tools import bandwidth as bw
from tools import estimate as est
from tools import synth

DATA = Path(__file__).parent / "data" / "estimate"
FULL = Path(__file__).parent / "data" / "tiny" / "deepseek3" / "deepseek3-Q4_0.gguf"
REQUIRED_JSON = {"weight_bytes", "bytes_per_token", "bandwidth_gbps", "bound_tps", "efficiency",
                 "expected_tps", "ram_needed_bytes", "max_ctx"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CPUINFER_CACHE_DIR", str(tmp_path / "cache"))


def test_header_only_estimate_equals_full_file(tmp_path):
    cut = tmp_path / "partial.gguf"
    g = open_gguf(FULL)
    data_start = g.data_start
    g.close()
    # a partial download: the header plus a little of the data
    cut.write_bytes(FULL.read_bytes()[:data_start + 1000])
    with pytest.raises(CpuinferError, match="past the end"):
        open_gguf(cut)
    full = est.estimate(str(FULL), bandwidth=100, ram_gb=64, ctx=1000).as_json()
    part = est.estimate(str(cut), bandwidth=100, ram_gb=64, ctx=1000).as_json()
    for d in (full, part):
        d.pop("model")
    assert full == part
    assert full["weight_bytes"] == sum(t.nbytes for t in open_gguf(FULL).tensors.values())


def _independent_bytes_per_token(path, ctx, kv_bytes):
    """The bytes-per-token rule written out by hand, from the raw tensor table."""
    g = open_gguf(path, header_only=True)
    n_exp, n_used = g.get("deepseek2.expert_count"), g.get("deepseek2.expert_used_count")
    total = 0
    for name, t in g.tensors.items():
        if name == "token_embd.weight":
            total += t.nbytes // t.shape[0]
        elif "_exps" in name:
            total += t.nbytes * n_used // n_exp
        else:
            total += t.nbytes
    return total + ctx * kv_bytes


def test_synthetic_r1_bytes_per_token(tmp_path):
    path = tmp_path / "r1.gguf"
    synth.write_synthetic(path, "deepseek-r1", "q4_k_m", 5, header_only=True)
    g = open_gguf(path, header_only=True)
    kv = (512 + 64) * 5 * 2                  # MLA latent + rope key, f16 like the runtime
    b = est.decode_bytes_per_token(g.tensors, g.metadata, 2048)
    assert b.kv_bytes_per_token == kv
    assert b.total == _independent_bytes_per_token(path, 2048, kv)
    assert b.n_expert == 256 and b.n_expert_used == 8
    # 2 MoE layers: 8 of 256 experts of gate/up/down are read
    exps = sum(t.nbytes for n, t in g.tensors.items() if "_exps" in n)
    assert b.routed_experts == exps // 256 * 8


def test_kv_cache_sizes():
    r1 = est.load_model_source("deepseek-r1:q8_0")
    assert est.kv_bytes_per_token(r1.meta) == 576 * 61 * 2                # f16, as the runtime
    assert est.kv_bytes_per_token(r1.meta, "f32") == 576 * 61 * 4
    llama = open_gguf(DATA / "llama-Q8_0.header.gguf", header_only=True)
    assert est.kv_bytes_per_token(llama.metadata) == 2 * (32 + 32) * 3 * 2      # 2 KV heads x (K+V), f16
    # the MLA latent cache: 100 GB hold far more than 100k tokens of R1 context
    assert 100e9 / est.kv_bytes_per_token(r1.meta) > 700_000
    with pytest.raises(CpuinferError, match="KV cache dtype"):
        est.kv_bytes_per_token(r1.meta, "int3")


def test_tied_embeddings_count_as_head():
    src = est.load_model_source("qwen2-1.5b:q8_0")
    b = est.decode_bytes_per_token(src.tensors, src.meta, 0)
    embd = src.tensors["token_embd.weight"]
    assert b.output == embd.nbytes and b.embedding == embd.nbytes // embd.shape[0]
    assert b.routed_experts == 0 and b.shared_experts == 0 and b.kv_cache == 0
    assert b.weights == sum(t.nbytes for t in src.tensors.values()) + b.embedding


def test_r1_q8_estimate_numbers():
    e = est.estimate("deepseek-r1:q8_0", channels=12, mts=4800, sockets=2, ram_gb=768, ctx=4096)
    assert e.theoretical_gbps == pytest.approx(921.6)
    assert e.bandwidth_gbps == pytest.approx(921.6 * est.TYPICAL_MEASURED_FRACTION)
    # ~37B active parameters at 8.5 bits, plus the cache
    assert 36e9 < e.bytes_per_token < 42e9
    assert e.bound_tps == pytest.approx(e.bandwidth_gbps * 1e9 / e.bytes_per_token)
    assert e.expected_tps == pytest.approx(e.bound_tps * est.DEFAULT_EFFICIENCY)
    assert e.fits and e.max_ctx == 163840 and e.max_ctx_unbounded > 163840
    assert e.ram_needed_bytes == e.weight_bytes + 4096 * 576 * 61 * 2 + e.overhead_bytes
    small = est.estimate("deepseek-r1:q8_0", bandwidth=500, ram_gb=600)
    assert not small.fits and small.max_ctx == 0
    tight = est.estimate("deepseek-r1:q8_0", bandwidth=500, ram_gb=720)
    free = 720e9 - tight.weight_bytes - tight.overhead_bytes
    assert tight.max_ctx == int(free // (576 * 61 * 2)) < 163840


def test_bench_efficiency_round_trip():
    assert est.bench_efficiency() is None
    est.store_bench_records([
        {"model": "a.gguf", "threads": 1, "tg_tps": 5, "bytes_per_token": 10, "gbps": 1, "read_gbps": 10,
         "bw_fraction": 0.1},
        {"model": "a.gguf", "threads": 2, "tg_tps": 9, "bytes_per_token": 10, "gbps": 1.8, "read_gbps": 3,
         "bw_fraction": 0.6},
        {"model": "b.gguf", "threads": 2, "tg_tps": 9, "bytes_per_token": 10, "gbps": 1.8, "read_gbps": 3,
         "bw_fraction": 0.8}])
    eff, src = est.bench_efficiency()
    assert eff == pytest.approx(0.7) and "bench" in src
    e = est.estimate(str(FULL), bandwidth=10, ram_gb=8)
    assert e.efficiency == pytest.approx(0.7) and "bench" in e.efficiency_source
    assert est.estimate(str(FULL), bandwidth=10, ram_gb=8, efficiency=0.5).efficiency == 0.5


def test_cached_bandwidth_is_used():
    bw.store_machine_record("bandwidth.json", {"read_gbps": 42.0, "timestamp": "t"})
    e = est.estimate(str(FULL), ram_gb=8, measure_if_missing=False)
    assert e.bandwidth_gbps == 42.0 and "cached" in e.bandwidth_source


def test_no_bandwidth_anywhere_is_an_error():
    with pytest.raises(CpuinferError, match="--bandwidth"):
        est.estimate(str(FULL), ram_gb=8, measure_if_missing=False)


def test_cli_json(capsys):
    assert est.main(["deepseek-r1-distill-qwen-1.5b:q4_k_m", "--bandwidth", "60", "--ram", "16",
                     "--ctx", "8192", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert REQUIRED_JSON <= set(d)
    assert 1.0e9 < d["weight_bytes"] < 1.2e9
    assert d["bytes_per_token"] == d["breakdown"]["total"]
    assert d["expected_tps"] == pytest.approx(d["bound_tps"] * d["efficiency"])
    assert d["max_ctx"] == 131072


def test_cli_text(capsys):
    assert est.main([str(FULL), "--bandwidth", "20", "--ram", "8"]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "read per token", "bound", "efficiency", "expected", "RAM needed", "max context"):
        assert word in out
    assert "default" in out          # the efficiency's source is always printed


@pytest.mark.parametrize("argv,message", [
    (["nope:q4_0", "--bandwidth", "1"], "deepseek-r1-distill-qwen-1.5b"),   # lists valid presets
    (["deepseek-r1:q9", "--bandwidth", "1"], "q4_k_m"),
    (["deepseek-r1", "--bandwidth", "1"], "deepseek-r1:q8_0"),
    (["deepseek-r1:q8_0", "--bandwidth", "100", "--channels", "8", "--mts", "4800"], "contradicts"),
    (["deepseek-r1:q8_0", "--channels", "8"], "--mts"),
    (["deepseek-r1:q8_0", "--sockets", "2", "--mts", "4800"], "--channels"),
    (["deepseek-r1:q8_0", "--bandwidth", "-3"], "positive"),
    (["deepseek-r1:q8_0", "--bandwidth", "100", "--efficiency", "1.5"], "efficiency"),
    (["deepseek-r1:q8_0", "--bandwidth", "100", "--ctx", "0"], "--ctx"),
    (["deepseek-r1:q8_0", "--bandwidth", "100", "--ram", "0"], "--ram"),
    (["deepseek-r1:q8_0", "--bandwidth", "100", "--cores", "0"], "--cores"),
    (["deepseek-r1:q8_0", "--bandwidth", "100", "--cores", "8", "--attn-rate", "-1"], "--attn-rate"),
])
def test_cli_errors(argv, message, capsys):
    assert est.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("cpuinfer: ") and message in err and err.count("\n") == 1


def test_cli_file_errors(tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    assert est.main([str(bad), "--bandwidth", "1"]) == 1
    assert "not a GGUF file" in capsys.readouterr().err
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(FULL.read_bytes()[:5000])          # cut inside the header
    assert est.main([str(cut), "--bandwidth", "1"]) == 1
    assert "truncated GGUF header" in capsys.readouterr().err
    assert est.main([str(tmp_path / "missing.gguf"), "--bandwidth", "1"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_every_preset_estimates():
    from tools.shapes import PRESETS
    for name in PRESETS:
        e = est.estimate(f"{name}:q4_k_m", bandwidth=100, ram_gb=1000)
        assert 0 < e.breakdown.weights <= e.weight_bytes + e.breakdown.embedding
        assert e.bound_tps > 0 and e.max_ctx > 0


def test_copy_of_fixture_same_as_fixture(tmp_path):
    """Estimating a file is a pure function of its header (no path-dependent state)."""
    cp = tmp_path / "copy.gguf"
    shutil.copy(FULL, cp)
    a = est.estimate(str(cp), bandwidth=5, ram_gb=4).as_json()
    b = est.estimate(str(FULL), bandwidth=5, ram_gb=4).as_json()
    a.pop("model"), b.pop("model")
    assert a == b


def test_attention_arithmetic_per_token():
    r1 = est.load_model_source("deepseek-r1:q8_0")
    # absorbed MLA: 128 heads dot the 576-value latent+rope key and sum the 512-value latent
    assert est.attention_shape(r1.meta) == (128, 1, 576, 512, True)
    assert est.attention_macs_per_token(r1.meta, 4096) == 61 * 128 * 4096 * (576 + 512)
    llama = open_gguf(DATA / "llama-Q8_0.header.gguf", header_only=True).metadata
    n_head = llama["llama.attention.head_count"]
    hd = llama["llama.embedding_length"] // n_head
    assert est.attention_macs_per_token(llama, 100) == llama["llama.block_count"] * n_head * 100 * 2 * hd


def test_attention_time_adds_to_the_bandwidth_time():
    e = est.estimate("deepseek-r1:q8_0", bandwidth=700, ram_gb=768, ctx=131072, efficiency=0.7,
                     cores=192, attn_rate=40)
    att = 61 * 128 * 131072 * 1088 / (192 * 40e9)
    assert e.attention_seconds == pytest.approx(att)
    assert e.bandwidth_tps == pytest.approx(700e9 / e.bytes_per_token * 0.7)
    assert e.expected_tps == pytest.approx(1 / (1 / e.bandwidth_tps + att))
    assert e.expected_tps < 0.5 * e.bandwidth_tps          # 1.1 T multiply-adds per token
    d = e.as_json()
    assert d["attention_ms_per_token"] == pytest.approx(att * 1e3) and d["cores"] == 192
    # a described machine without --cores: printed, not counted
    e = est.estimate("deepseek-r1:q8_0", bandwidth=700, ram_gb=768, ctx=131072, efficiency=0.7)
    assert e.attention_seconds is None and e.expected_tps == pytest.approx(e.bandwidth_tps)
    assert "--cores" in est.format_estimate(e)


def test_attention_rate_measured_on_this_machine():
    """This machine's bandwidth (cached): its physical cores and a rate measured now."""
    import psutil
    bw.store_machine_record("bandwidth.json", {"read_gbps": 42.0, "timestamp": "t"})
    e = est.estimate(str(FULL), ram_gb=8, ctx=300)
    assert e.cores == psutil.cpu_count(logical=False) and e.attn_rate > 0.1
    assert "measured now" in e.attn_rate_source
    assert e.expected_tps < e.bandwidth_tps
    out = est.format_estimate(e)
    assert "attention math" in out and "measured now" in out
