"""cpuinfer bench: records, and its bytes-per-token count against the header-only estimator."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import cpuinfer
import quant
from cpuinfer.cli import main
from cpuinfer.gguf import open_gguf
from tools import bench
from tools.estimate import decode_bytes_per_token

TINY = Path(__file__).parent / "data" / "tiny"
FILES = [TINY / "llama" / "llama-Q8_0.gguf", TINY / "qwen2" / "qwen2-Q4_K_M.gguf",
         TINY / "deepseek3" / "deepseek3-Q4_0.gguf", TINY / "qwen3moe" / "qwen3moe-Q8_0.gguf"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_runtime_streamed_bytes_equal_the_estimate(path):
    """Two independent counts: the runtime's bound tensors vs the estimator's header reading."""
    m = cpuinfer.load(path)
    g = open_gguf(path, header_only=True)
    for ctx in (0, 100, 1000):
        est = decode_bytes_per_token(g.tensors, g.metadata, ctx).total
        got = bench.streamed_bytes_per_token(m, ctx)
        assert abs(got - est) <= 0.02 * est, (ctx, got, est)


def test_bench_json_records(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CPUINFER_CACHE_DIR", str(tmp_path))
    rc = main(["bench", str(FILES[0]), "-t", "1", "-p", "8", "-n", "4", "-r", "2", "--json", "--no-bandwidth"])
    assert rc == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(recs) == 1
    r = recs[0]
    for key in ("threads", "pp_tps", "tg_tps", "bytes_per_token", "gbps", "bw_fraction"):
        assert key in r
    assert r["threads"] == 1 and r["pp_tps"] > 0 and r["tg_tps"] > 0
    assert r["gbps"] == pytest.approx(r["bytes_per_token"] * r["tg_tps"] / 1e9)


@pytest.mark.parametrize("argv,msg", [(["-t", "0"], "positive"), (["-t", "a"], "comma-separated"),
                                      (["-p", "0"], "at least 1")])
def test_bench_bad_flags(argv, msg, capsys):
    assert main(["bench", str(FILES[0]), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cpuinfer: ") and msg in err and err.count("\n") == 1


def test_ttft_times_a_fresh_process():
    starts = bench.time_to_first_token(str(FILES[0]), threads=1, starts=1, prompt="hi")
    assert len(starts) == 1 and 0 < starts[0]["ttft_s"] <= starts[0]["exit_s"]
    with pytest.raises(bench.CpuinferError, match="--ttft: cpuinfer run .*missing.gguf failed"):
        bench.time_to_first_token("/nonexistent/missing.gguf", starts=1)


def test_bench_markdown_readme_table(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CPUINFER_CACHE_DIR", str(tmp_path))
    assert main(["bench", str(FILES[0]), "-t", "1", "-p", "4", "-n", "2", "-r", "1", "--markdown",
                 "--no-bandwidth"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| machine | model | threads | tg t/s |") and lines[1].startswith("|---")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == bench.machine_description() and cells[1] == FILES[0].name and cells[2] == "1"
    assert float(cells[3]) > 0 and cells[6] == "-" and cells[7] == "-"
    assert lines[-1] == f"`cpuinfer bench {FILES[0]} -t 1 -p 4 -n 2 -r 1 --no-bandwidth --markdown`"


def test_bench_markdown_and_json_from_one_run(capsys, tmp_path, monkeypatch):
    """--markdown --json: the README table, then one JSON record per row, with the same figures
    (one measurement: a lent machine's minutes are too few to run the bench twice)."""
    monkeypatch.setenv("CPUINFER_CACHE_DIR", str(tmp_path))
    assert main(["bench", str(FILES[0]), "-t", "1", "-p", "4", "-n", "2", "-r", "1", "--markdown",
                 "--json", "--no-bandwidth"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| machine | model |") and lines[3] == ""
    assert lines[4].endswith("--no-bandwidth --markdown`")
    rec = json.loads(lines[5])
    assert len(lines) == 6 and rec["threads"] == 1
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[3] == f"{rec['tg_tps']:.1f}" and cells[4] == f"{rec['pp_tps']:.1f}"


def test_compile_time_reports_wall_time_and_functions(capsys):
    """tools.compile_time: one header line (wall time, functions compiled), then at most --top
    lines of seconds and a name; a missing file is one error line and exit 1."""
    import re
    from tools import compile_time
    assert compile_time.main([str(FILES[0]), "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(rf"{re.escape(str(FILES[0]))}: load \+ first logits [0-9.]+ s, \d+ functions compiled",
                        lines[0])
    assert len(lines) <= 4 and all(re.fullmatch(r"\s+[0-9.]+ s  \S+", ln) for ln in lines[1:])
    assert compile_time.main(["/nonexistent/missing.gguf"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing.gguf" in err[0]


def test_token_profile_splits_a_dense_token_and_refuses_qwen3moe(capsys):
    """tools.token_profile: every matrix role and the output head listed with their bytes'
    GB/s, the matmul pass no longer than what it adds up to; MoE files get one error line."""
    from tools import token_profile
    assert token_profile.main([str(TINY / "qwen2" / "qwen2-Q4_K_M.gguf"), "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    # joined at load: q/k/v (not where attn_v is Q6_K) and gate/up multiply as one matrix each
    for role in ("wqkv", "wq", "wk", "wv", "wo", "w_gate_up", "w_down", "output"):
        assert f"  {role} " in out
    assert "  w_gate " not in out
    total = float(out.split("matmuls alone")[1].split("ms")[0])
    parts = [float(line.split()[1]) for line in out.splitlines() if line.startswith("  ")]
    assert abs(sum(parts) - total) <= 0.05 * (len(parts) + 1) and "rest of token" in out
    assert token_profile.main([str(TINY / "qwen3moe" / "qwen3moe-Q8_0.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dense llama family" in err and "qwen3moe" in err


def test_token_profile_splits_a_deepseek_token(capsys):
    """deepseek2: the MLA products (per-head k_b / v_b stacks as one call), the dense FFN, the
    router, n_used routed experts and the shared experts, each role with its GB/s."""
    from tools import token_profile
    path = TINY / "deepseek3" / "deepseek3-Q4_0.gguf"
    assert token_profile.main([str(path), "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    for role in ("w_in", "wq_b", "wk_b", "wv_b", "wo", "w_gate_up", "w_down", "router",
                 "exp_gate", "exp_up", "exp_down", "sh_gate_up", "sh_down", "output"):
        assert f"  {role} " in out
    m = cpuinfer.load(path)
    w = m.family.weights
    n_head, n_used = w.layers[0].wk_b.raw.shape[0], w.n_used
    assert f"{n_head} x " in out.split("  wk_b ")[1].splitlines()[0]
    assert f"{n_used} x " in out.split("  exp_gate ")[1].splitlines()[0]
    total = float(out.split("matmuls alone")[1].split("ms")[0])
    parts = [float(line.split()[1]) for line in out.splitlines() if line.startswith("  ")]
    assert abs(sum(parts) - total) <= 0.05 * (len(parts) + 1)


@pytest.mark.skipif(not quant.interleaved.HAVE_X8, reason="no AVX2: nothing is interleaved")
def test_kernel_speed_times_the_decode_tile_per_group_count(capsys):
    """tools.kernel_speed --groups: one GB/s line per interleaved format and group count; a
    format that is not interleaved says so."""
    from tools import kernel_speed
    kernel_speed.main(["--rows", "64", "--k", "256", "--types", "Q4_0,F16", "--groups", "1,2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["Q4_0_X8", "Q4_0_X8", "F16:"]
    for g, ln in zip((1, 2), lines):
        assert re.search(rf"64x256 n=1 groups={g} threads=1: +[0-9.]+ GB/s$", ln)
    assert "not interleaved" in lines[2]
