"""Tokenizer built from a GGUF file's ``tokenizer.*`` metadata, matching llama.cpp token for token.

Two tokenizer models are supported (``tokenizer.ggml.model``):

* ``gpt2`` — byte-level BPE. Text is split by the pre-tokenizer regexes chosen by
  ``tokenizer.ggml.pre`` (the table :data:`PRE_TOKENIZERS`, transcribed from llama.cpp's
  ``llm_tokenizer_bpe``), each piece's UTF-8 bytes are mapped to printable characters with the
  GPT-2 byte table (:data:`BYTE_TO_UNICODE`), and ``tokenizer.ggml.merges`` are applied lowest
  rank first, leftmost first on ties. The merges run in Hugging Face ``tokenizers`` (Rust); the
  regexes run in its Oniguruma engine, one ``Split(behavior="isolated")`` per regex, so several
  regexes apply in sequence exactly as llama.cpp's ``unicode_regex_split`` does (each regex splits
  every piece left by the previous one; matched and unmatched stretches both become pieces).
* ``llama`` — SentencePiece BPE (llama.cpp ``llm_tokenizer_spm``): spaces become ``▁``, a space is
  prefixed to each text fragment that starts the input or follows a special token
  (``tokenizer.ggml.add_space_prefix``, default on), adjacent symbols are merged highest
  ``tokenizer.ggml.scores`` first, and symbols that are not tokens fall back to ``<0xXX>`` byte
  tokens.

Special tokens (llama.cpp ``tokenizer_st_partition``): before the model runs, the text is cut at
every occurrence of a special token's text, longest token text first, and those pieces become the
token ids directly. With ``special=True`` control, unknown and user-defined tokens are cut out;
with ``special=False`` control and unknown tokens are ordinary text, but user-defined tokens are
still cut out (llama.cpp and Hugging Face both do this; for most vocabularies no user-defined
token occurs in ordinary text).

Decoding renders each token as llama.cpp's ``token_to_piece(special=True)``: control, unknown and
user-defined tokens as their text, normal tokens through the reversed byte table (BPE) or with
``▁`` turned back into spaces (SPM), byte tokens as their byte, unused tokens as nothing. Bytes
that are not valid UTF-8 become U+FFFD. llama.cpp's optional ``clean_spaces`` post-processing
(``" ,"`` -> ``","`` and friends) is not applied, so ``decode(encode(text)) == text``.
"""
from __future__ import annotations

import codecs
import heapq
import os
import re
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Iterable

import numpy as np
from gguf import Keys

from .errors import CpuinferError
from .gguf import GGUFFile, open_gguf

__all__ = ["Tokenizer", "StreamDecoder", "load_tokenizer", "pre_split", "TokenType", "PreTokenizer",
           "PRE_TOKENIZERS", "BYTE_TO_UNICODE"]

K = Keys.Tokenizer


class TokenType(IntEnum):
    """Values of ``tokenizer.ggml.token_type`` (llama.cpp ``llama_token_type``)."""
    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# --------------------------------------------------------------------------------------------
# GPT-2 byte <-> printable character table
# --------------------------------------------------------------------------------------------

def _byte_to_unicode() -> tuple[str, ...]:
    """GPT-2's reversible byte map: printable Latin-1 bytes map to themselves, the other 68 bytes
    (controls, space, 0x7F-0xA0, 0xAD) to U+0100.. in byte order, so ``' '`` becomes ``'Ġ'``."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, n = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + n))
            n += 1
    return tuple(out)


BYTE_TO_UNICODE: tuple[str, ...] = _byte_to_unicode()
_UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_UNICODE)}
# str.translate table: byte-level character -> the Latin-1 character of its byte value.
_BYTELEVEL_TO_LATIN1 = {ord(c): b for c, b in _UNICODE_TO_BYTE.items()}

_SPM_SPACE = "\u2581"  # '▁', SentencePiece's escaped space


# --------------------------------------------------------------------------------------------
# Pre-tokenizers: tokenizer.ggml.pre -> regexes (llama.cpp src/llama-vocab.cpp, llm_tokenizer_bpe)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreTokenizer:
    """One row of llama.cpp's pre-tokenizer table.

    ``regexes`` are applied in sequence; ``ignore_merges`` looks a whole piece up in the vocab
    before merging (Llama 3); ``add_bos`` is the BOS default when ``tokenizer.ggml.add_bos_token``
    is absent.
    """
    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


# GPT-2's regex. llama.cpp's copy omits the final "|\s+" but its hand-written matcher for this
# exact string (unicode_regex_split_custom_gpt2) emits leftover whitespace as one piece, which is
# what the trailing alternative does here (and what Hugging Face's ByteLevel regex has).
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_RE_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
              r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
             r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek LLM: cased letters (Unicode LC ranges), ASCII/fullwidth punctuation, CJK + Hangul.
_CASED_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd"
    "\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d"
    "\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec"
    "\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b"
    "\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787"
    "\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943")
_DEEPSEEK_LLM = (
    "[\r\n]",
    r"\s?[" + _CASED_LETTERS + "]+",
    r"\s?[!-/:-~" + "\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002" + "]+",
    r"\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}+",
)
_DEEPSEEK3 = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!" + '"' + r"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)

_P_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))
_P_GPT2 = PreTokenizer((_RE_GPT2,))
_P_LLAMA3 = PreTokenizer((_RE_LLAMA3,), ignore_merges=True, add_bos=True)
_P_QWEN2 = PreTokenizer((_RE_QWEN2,))
_P_DEEPSEEK_LLM = PreTokenizer(_DEEPSEEK_LLM)
_P_DEEPSEEK3 = PreTokenizer(_DEEPSEEK3)
_P_STARCODER = PreTokenizer((r"\p{N}", _RE_GPT2))  # digits one by one, then GPT-2

#: ``tokenizer.ggml.pre`` value -> pre-tokenizer, the names llama.cpp maps to each regex family.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _P_DEFAULT,
    "gpt-2": _P_GPT2, "mpt": _P_GPT2, "olmo": _P_GPT2, "phi-2": _P_GPT2, "jais": _P_GPT2,
    "llama-bpe": _P_LLAMA3, "llama3": _P_LLAMA3, "llama-v3": _P_LLAMA3, "falcon3": _P_LLAMA3,
    "dbrx": PreTokenizer((_RE_LLAMA3,)), "smaug-bpe": PreTokenizer((_RE_LLAMA3,)),
    "qwen2": _P_QWEN2, "deepseek-r1-qwen": _P_QWEN2, "stablelm2": _P_QWEN2, "megrez": _P_QWEN2,
    "deepseek-llm": _P_DEEPSEEK_LLM,
    "deepseek-v3": _P_DEEPSEEK3,
    "smollm": _P_STARCODER, "starcoder": _P_STARCODER, "refact": _P_STARCODER,
    "command-r": _P_STARCODER, "codeshell": _P_STARCODER, "exaone": _P_STARCODER,
}

# --------------------------------------------------------------------------------------------
# Special-token conventions (llama.cpp llama_vocab::impl::load)
# --------------------------------------------------------------------------------------------

#: Per tokenizer model: default special ids (used when the metadata key is absent), the default
#: of add_bos, and whether a space is prefixed to the text.
_MODEL_DEFAULTS = {
    "gpt2": dict(bos=11, eos=11, unk=None, add_space_prefix=False, add_bos=False),
    "llama": dict(bos=1, eos=2, unk=0, add_space_prefix=True, add_bos=True),
}
SUPPORTED_MODELS = tuple(_MODEL_DEFAULTS)

# Token texts llama.cpp recognises when the file does not name the id (first match wins here).
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>",
              "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PRE_TEXTS = ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>",
                  "<PRE>", "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>")
_FIM_SUF_TEXTS = ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>",
                  "<SUF>", "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>")
_FIM_MID_TEXTS = ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>",
                  "<MID>", "\u2581<MID>", "<|code_middle|>", "<|middle|>")
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
# Any token with one of these texts ends generation (special_eog_ids).
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~["))
# gpt-oss: these control tokens are always rendered and parsed as user-defined.
_FORCE_USER_DEFINED = frozenset(("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"))

_SURROGATES = re.compile("[\ud800-\udfff]")


def _clean_text(text: str) -> str:
    """Replace lone surrogates (not encodable as UTF-8) by U+FFFD, as llama.cpp does for bad UTF-8."""
    if not isinstance(text, str):
        raise CpuinferError(f"tokenizer input must be str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", text)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

class Tokenizer:
    """Encode text to token ids and back, with llama.cpp's rules for one GGUF vocabulary.

    Build it with :func:`load_tokenizer`. Attributes: ``n_vocab``, ``model`` (``"gpt2"`` or
    ``"llama"``), ``pre`` (pre-tokenizer name; ``""`` for SPM), ``bos_id``, ``eos_id``,
    ``eot_id``, ``eom_id``, ``unk_id``, ``pad_id`` (int or None), ``add_bos`` (default for
    :meth:`encode`), ``stop_ids`` (frozenset of ids that end generation).
    """

    def __init__(self, gg: GGUFFile):
        self.path = gg.path
        md = gg.metadata
        self.model = self._require(md, K.MODEL, str)
        if self.model not in _MODEL_DEFAULTS:
            raise CpuinferError(f"{self.path}: {K.MODEL} = {self.model!r} is not supported "
                                f"(supported: {', '.join(SUPPORTED_MODELS)})")
        defaults = _MODEL_DEFAULTS[self.model]

        tokens = self._require(md, K.LIST, list)
        if not tokens:
            raise CpuinferError(f"{self.path}: {K.LIST} is empty")
        self.n_vocab = len(tokens)
        # llama.cpp renames empty tokens so every text is a distinct dictionary key.
        self._texts: list[str] = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self._text_to_id: dict[str, int] = {t: i for i, t in enumerate(self._texts)}
        if len(self._text_to_id) != self.n_vocab:
            seen: dict[str, int] = {}
            for i, t in enumerate(self._texts):
                if t in seen:
                    raise CpuinferError(f"{self.path}: {K.LIST}: duplicate token {t!r} "
                                        f"at ids {seen[t]} and {i}")
                seen[t] = i

        self._types = self._int_array(md, K.TOKEN_TYPE, np.int32, TokenType.NORMAL)
        self._scores = self._int_array(md, K.SCORES, np.float32, 0.0)

        self._read_special_ids(md, defaults)

        # -- flags ----------------------------------------------------------------------------
        if self.model == "gpt2":
            pre = md.get(K.PRE)
            self.pre = "default" if pre is None else str(pre)
            if self.pre not in PRE_TOKENIZERS:
                raise CpuinferError(f"{self.path}: {K.PRE} = {self.pre!r} is not supported "
                                    f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
            self._pre = PRE_TOKENIZERS[self.pre]
            add_bos_default = self._pre.add_bos
        else:
            self.pre = ""
            self._pre = None
            add_bos_default = defaults["add_bos"]
        self.add_bos = bool(md.get(K.ADD_BOS, add_bos_default))
        self.add_space_prefix = bool(md.get(K.ADD_PREFIX, defaults["add_space_prefix"]))
        if self.add_bos and self.bos_id is None:
            raise CpuinferError(f"{self.path}: {K.ADD_BOS} is true but {K.BOS_ID} is not set")

        # -- special-token partition tables (longest text first) -----------------------------
        parse_all = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
        ids = np.nonzero(np.isin(self._types, parse_all))[0].tolist()
        ids.sort(key=lambda i: -len(self._texts[i].encode("utf-8")))  # stable: ties by id
        self._specials_all = [(self._texts[i], i) for i in ids]
        self._specials_user = [(t, i) for t, i in self._specials_all
                               if self._types[i] == TokenType.USER_DEFINED]

        self._pieces: list[bytes | None] = [None] * self.n_vocab
        if self.model == "gpt2":
            self._hf = self._build_bpe(md)
        else:
            self._hf = None

    # -- loading helpers -------------------------------------------------------------------------
    def _require(self, md, key: str, kind: type):
        if key not in md:
            raise CpuinferError(f"{self.path}: metadata key {key} is missing")
        v = md[key]
        if kind is list and isinstance(v, np.ndarray):
            raise CpuinferError(f"{self.path}: {key} must be an array of strings, got numbers")
        if not isinstance(v, kind):
            raise CpuinferError(f"{self.path}: {key} must be a {kind.__name__}, got {type(v).__name__}")
        return v

    def _int_array(self, md, key: str, dtype, fill) -> np.ndarray:
        v = md.get(key)
        if v is None:
            return np.full(self.n_vocab, fill, dtype=dtype)
        if not isinstance(v, np.ndarray) or v.dtype.kind not in "iuf":
            raise CpuinferError(f"{self.path}: {key} must be a numeric array")
        if len(v) < self.n_vocab:
            raise CpuinferError(f"{self.path}: {key} has {len(v)} entries, expected {self.n_vocab} "
                                f"(one per token of {K.LIST})")
        return np.array(v[:self.n_vocab], dtype=dtype)

    def _read_special_ids(self, md, defaults) -> None:
        """Special ids from the metadata, else llama.cpp's defaults, else found by token text;
        the set of ids that end generation (llama.cpp ``special_eog_ids``).

        Like llama.cpp, tokens recognised by their text (EOT, EOM, FIM, the end-of-generation
        list) become control tokens, so ``special=True`` parses them and ``special=False`` does not.
        """
        def special(key: str, default: int | None, texts: tuple[str, ...] = ()) -> int | None:
            if default is not None and not 0 <= default < self.n_vocab:
                default = None
            v = md.get(key)
            if v is not None and 0 <= int(v) < self.n_vocab:
                return int(v)
            return default if default is not None else self._find_text(texts)

        self.bos_id = special(K.BOS_ID, defaults["bos"])
        self.eos_id = special(K.EOS_ID, defaults["eos"])
        self.unk_id = special(K.UNK_ID, defaults["unk"])
        self.pad_id = special(K.PAD_ID, None)
        self.eot_id = special(K.EOT_ID, None, _EOT_TEXTS)
        self.eom_id = special(K.EOM_ID, None, _EOM_TEXTS)
        fim_stop = [special(K.FIM_PAD_ID, None, _FIM_PAD_TEXTS), special(K.FIM_REP_ID, None, _FIM_REP_TEXTS),
                    special(K.FIM_SEP_ID, None, _FIM_SEP_TEXTS)]
        fim_other = [special(K.FIM_PRE_ID, None, _FIM_PRE_TEXTS), special(K.FIM_SUF_ID, None, _FIM_SUF_TEXTS),
                     special(K.FIM_MID_ID, None, _FIM_MID_TEXTS)]
        stop = {i for i in fim_stop + [self.eot_id, self.eom_id] if i is not None}
        stop |= {i for i in map(self._text_to_id.get, _EOG_TEXTS) if i is not None}
        for i in stop.union(fim_other) - {None}:
            self._types[i] = TokenType.CONTROL
        for i in map(self._text_to_id.get, _FORCE_USER_DEFINED):
            if i is not None:
                self._types[i] = TokenType.USER_DEFINED
        if self.eos_id is not None:
            stop.add(self.eos_id)
        # o200k_harmony / solar-open: "<|end|>" ends a message, not the generation.
        texts_in_stop = {self._texts[i] for i in stop}
        if "<|end|>" in texts_in_stop and (
                {"<|return|>", "<|call|>"} <= texts_in_stop or {"<|calls|>", "<|flush|>"} <= texts_in_stop):
            end = self._text_to_id["<|end|>"]
            stop.discard(end)
            self._types[end] = TokenType.USER_DEFINED
        # gemma4 / paddleocr: "</s>" is not a stop token when "<|tool_response>" exists.
        if "<|tool_response>" in texts_in_stop and "</s>" in texts_in_stop:
            eos_text = self._text_to_id["</s>"]
            stop.discard(eos_text)
            self._types[eos_text] = TokenType.NORMAL
        self.stop_ids: frozenset[int] = frozenset(stop)

    def _find_text(self, texts: Iterable[str]) -> int | None:
        for t in texts:
            i = self._text_to_id.get(t)
            if i is not None:
                return i
        return None

    def _build_bpe(self, md):
        """Hugging Face BPE model + pre-tokenizer pipeline for this vocabulary."""
        from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers

        merges_raw = self._require(md, K.MERGES, list)
        vocab = self._text_to_id
        ignore_merges = self._pre.ignore_merges
        # llama.cpp splits each entry at the first space after position 0.
        if any(m[:1] == " " or " " not in m for m in merges_raw):
            merges = []
            for m in merges_raw:
                p = m.find(" ", 1)
                if p < 0:
                    raise CpuinferError(f"{self.path}: {K.MERGES}: entry {m!r} is not 'left right'")
                merges.append((m[:p], m[p + 1:]))
        else:
            merges = [tuple(m.split(" ", 1)) for m in merges_raw]
        try:
            model = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
        except Exception:  # noqa: BLE001 - the Rust side raises a bare Exception
            # A merge whose parts or result are not tokens can never produce a token in
            # llama.cpp either; the Rust model rejects such entries, so drop them (the
            # remaining merges keep their relative ranks).
            merges = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
            try:
                model = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
            except Exception as e:  # noqa: BLE001
                raise CpuinferError(f"{self.path}: cannot build the BPE tokenizer: {e}") from None
        try:
            steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in self._pre.regexes]
        except Exception as e:  # noqa: BLE001
            raise CpuinferError(f"{self.path}: pre-tokenizer {self.pre!r}: bad regex: {e}") from None
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
        hf = HFTokenizer(model)
        hf.pre_tokenizer = pre_tokenizers.Sequence(steps)
        return hf

    # -- encoding --------------------------------------------------------------------------------
    def _partition(self, text: str, special: bool) -> list[str | int]:
        """Cut ``text`` at special-token texts (llama.cpp ``tokenizer_st_partition``).

        Tokens are taken longest text first; each one splits every remaining text fragment at all
        its non-overlapping occurrences. Returns text fragments (str) and token ids (int) in order.
        """
        frags: list[str | int] = [text]
        for tok_text, tok_id in (self._specials_all if special else self._specials_user):
            if not any(isinstance(f, str) and tok_text in f for f in frags):
                continue
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok_text not in f:
                    out.append(f)
                    continue
                parts = f.split(tok_text)
                for k, part in enumerate(parts):
                    if k:
                        out.append(tok_id)
                    if part:
                        out.append(part)
            frags = out
        return frags

    def encode(self, text: str, special: bool = False, add_bos: bool | None = False) -> list[int]:
        """Token ids of ``text``.

        ``special``: parse control/unknown token texts such as ``<|im_start|>`` into their ids
        (user-defined tokens are always parsed). ``add_bos``: prepend BOS; ``None`` follows the
        file (``tokenizer.ggml.add_bos_token``, else llama.cpp's default for this tokenizer).
        """
        text = _clean_text(text)
        if add_bos is None:
            add_bos = self.add_bos
        out: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise CpuinferError(f"{self.path}: cannot add BOS: the vocabulary has no BOS token")
            out.append(self.bos_id)
        frags = self._partition(text, special) if text else []
        if self.model == "gpt2":
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                else:
                    out.extend(self._hf.encode(f, add_special_tokens=False).ids)
        else:
            prev_special = True  # the first fragment, and any after a special token, get a space
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                    prev_special = True
                else:
                    if self.add_space_prefix and prev_special:
                        f = " " + f
                    self._spm_encode(f.replace(" ", _SPM_SPACE), out)
                    prev_special = False
        return out

    def _spm_encode(self, text: str, out: list[int]) -> None:
        """SentencePiece BPE over the characters of ``text`` (llama.cpp ``llm_tokenizer_spm``).

        Symbols form a linked list; the work queue holds adjacent pairs whose concatenation is a
        token, best score first, leftmost first on ties. A popped pair is stale when either
        symbol has been merged since (its length changed). Final symbols that are not tokens
        are emitted as ``<0xXX>`` byte tokens.
        """
        n = len(text)
        if n == 0:
            return
        start = list(range(n))
        length = [1] * n
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        vocab, scores = self._text_to_id, self._scores
        heap: list[tuple[float, int, int, int]] = []

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            s = start[left]
            size = length[left] + length[right]
            tid = vocab.get(text[s:s + size])
            if tid is not None:
                heapq.heappush(heap, (-float(scores[tid]), left, right, size))

        for i in range(1, n):
            push(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if length[left] == 0 or length[right] == 0 or length[left] + length[right] != size:
                continue
            length[left] = size
            length[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])
        i = 0
        while i != -1:
            piece = text[start[i]:start[i] + length[i]]
            tid = vocab.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                for byte in piece.encode("utf-8"):
                    out.append(self._byte_to_token(byte))
            i = nxt[i]

    def _byte_to_token(self, byte: int) -> int:
        tid = self._text_to_id.get(f"<0x{byte:02X}>")
        if tid is None:
            tid = self._text_to_id.get(chr(byte))
        if tid is None:
            if self.unk_id is None:
                raise CpuinferError(f"{self.path}: byte 0x{byte:02X} has no token (<0x{byte:02X}>) "
                                    f"and the vocabulary has no unknown token")
            tid = self.unk_id
        return tid

    # -- decoding --------------------------------------------------------------------------------
    def _check_id(self, tid) -> int:
        i = int(tid)
        if not 0 <= i < self.n_vocab:
            raise CpuinferError(f"{self.path}: token id {i} is out of range [0, {self.n_vocab})")
        return i

    def piece(self, tid: int) -> bytes:
        """The bytes token ``tid`` stands for (llama.cpp ``token_to_piece`` with special=True)."""
        i = self._check_id(tid)
        p = self._pieces[i]
        if p is None:
            p = self._pieces[i] = self._make_piece(i)
        return p

    def _make_piece(self, i: int) -> bytes:
        ttype, text = self._types[i], self._texts[i]
        if ttype in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED):
            return text.encode("utf-8")
        if ttype == TokenType.BYTE:
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", text)
            return bytes([int(m.group(1), 16)]) if m else text.encode("utf-8")
        if ttype != TokenType.NORMAL:
            return b""  # unused / undefined tokens render as nothing
        if self.model == "llama":
            return text.replace(_SPM_SPACE, " ").encode("utf-8")
        latin = text.translate(_BYTELEVEL_TO_LATIN1)
        try:
            return latin.encode("latin-1")
        except UnicodeEncodeError:  # a character outside the byte table (llama_decode_text)
            out = bytearray()
            for c in text:
                b = _UNICODE_TO_BYTE.get(c)
                if b is not None:
                    out.append(b)
                else:
                    cb = c.encode("utf-8")
                    out += b"[UNK_BYTE_0x" + cb.hex().encode() + text.encode("utf-8") + b"]"
            return bytes(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens appear as their text, invalid UTF-8 as U+FFFD.

        For SPM vocabularies with ``add_space_prefix`` the first token's leading space is dropped,
        like llama.cpp's ``detokenize``.
        """
        data = b"".join(self.piece(i) for i in ids)
        if self.add_space_prefix and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def token_text(self, tid: int) -> str:
        """Printable form of one token: its text, or ``<0xXX>`` for bytes that are not UTF-8."""
        p = self.piece(tid)
        try:
            return p.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"<0x{b:02X}>" for b in p)

    def is_control(self, tid: int) -> bool:
        return self._types[self._check_id(tid)] == TokenType.CONTROL

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, "
                f"bos={self.bos_id}, eos={self.eos_id}, stop={sorted(self.stop_ids)})")


class StreamDecoder:
    """Incremental decoder for generated tokens: ``add(id)`` returns the newly completed text.

    Bytes of a UTF-8 sequence split across tokens are held back until the sequence is complete;
    invalid bytes become U+FFFD. ``flush()`` returns whatever is still held (as U+FFFD if it is
    an incomplete sequence). Pieces are emitted verbatim (no leading-space removal), so the
    stream continues a prompt's text.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, tid: int) -> str:
        return self._dec.decode(self.tokenizer.piece(tid))

    def flush(self) -> str:
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out


def pre_split(pre: str, text: str) -> list[str]:
    """The pieces pre-tokenizer ``pre`` cuts ``text`` into (before byte mapping and merges)."""
    from tokenizers import Regex, pre_tokenizers

    if pre not in PRE_TOKENIZERS:
        raise CpuinferError(f"unknown pre-tokenizer {pre!r} (supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    seq = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated")
                                   for r in PRE_TOKENIZERS[pre].regexes])
    return [piece for piece, _ in seq.pre_tokenize_str(_clean_text(text))]


def load_tokenizer(path_or_gguf: str | os.PathLike | GGUFFile) -> Tokenizer:
    """Tokenizer of a GGUF file (a path, or an already-open :class:`GGUFFile`); vocab-only files
    work too."""
    if isinstance(path_or_gguf, GGUFFile):
        return Tokenizer(path_or_gguf)
    if isinstance(path_or_gguf, (str, Path, os.PathLike)):
        return Tokenizer(open_gguf(path_or_gguf, header_only=True))
    raise CpuinferError(f"load_tokenizer: expected a path or GGUFFile, got {type(path_or_gguf).__name__}")


def encode_prompt(tok, text: str) -> list[int]:
    """Ids of a prompt or rendered chat: special tokens parsed, and exactly one BOS when the file
    asks for one — a template that writes BOS itself (Llama 3, DeepSeek-R1) does not get two."""
    ids = list(tok.encode(text, special=True, add_bos=False))
    bos = tok.bos_id
    if getattr(tok, "add_bos", False) and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids
