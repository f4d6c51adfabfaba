"""The loaded model and its sessions: the public Python API behind :func:`cpuinfer.load`.

A :class:`Model` maps the GGUF file, checks every tensor, binds the architecture family's
weights and allocates the activation state once. A :class:`Session` owns one KV cache (allocated
once for ``n_ctx`` tokens) and the token history in it, so a conversation only evaluates the
tokens it has not seen yet.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import psutil

from quant.jit import set_threads

from .arch import ARCHITECTURES
from .errors import CpuinferError
from .gguf import GGUFFile, open_gguf
from .weights import TensorLoader

DEFAULT_CTX = 4096
DEFAULT_BATCH = 256


def default_threads() -> int:
    """One thread per physical core this process may run on."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    physical = psutil.cpu_count(logical=False) or allowed
    return max(1, min(allowed, physical))


def common_prefix(cached: Sequence[int], ids: Sequence[int]) -> int:
    """How many leading tokens of ``ids`` are already in a cache holding ``cached``."""
    n = 0
    for a, b in zip(cached, ids):
        if a != b:
            break
        n += 1
    return n


def reusable_prefix(cached: Sequence[int], prompt_ids: Sequence[int]) -> int:
    """Cached tokens a new prompt can keep: the common prefix, leaving at least the prompt's last
    token to evaluate (its logits start the reply)."""
    return min(common_prefix(cached, prompt_ids), len(prompt_ids) - 1)


class Session:
    """A KV cache of ``model.n_ctx`` positions and the tokens currently held in it."""

    def __init__(self, model: "Model", n_ctx: int | None = None):
        self.model = model
        self.n_ctx = n_ctx or model.n_ctx
        if self.n_ctx > model.n_ctx:
            raise CpuinferError(f"session context {self.n_ctx} exceeds the model's context {model.n_ctx}")
        self.cache = model.family.new_cache(self.n_ctx)
        self.tokens: list[int] = []

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        self.tokens.clear()

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` cached tokens (positions past them are overwritten later)."""
        del self.tokens[max(0, n):]

    def common_prefix(self, ids: Sequence[int]) -> int:
        return common_prefix(self.tokens, ids)

    def eval(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append ``ids`` to the context (prompt batches through the mat-mat kernels) and return
        the logits of the last one, float32 [n_vocab] — or of every one, [len(ids), n_vocab],
        with ``all_logits``. The returned last-token array is reused by the next call."""
        m = self.model
        ids = list(ids)
        if not ids:
            raise CpuinferError("eval needs at least one token")
        if self.n_past + len(ids) > self.n_ctx:
            raise CpuinferError(f"context full: {self.n_past} cached + {len(ids)} new tokens exceed "
                                f"the context of {self.n_ctx} tokens")
        bad = [t for t in ids if not 0 <= t < m.n_vocab]
        if bad:
            raise CpuinferError(f"token id {bad[0]} is out of range for a vocabulary of {m.n_vocab}")
        if m._numa is not None:
            m._numa.enter()     # pinned pool and thread count for the calling thread
        state = m._state
        out_all = np.empty((len(ids), m.n_vocab), np.float32) if all_logits else None
        for i0 in range(0, len(ids), state.n_batch):
            chunk = ids[i0:i0 + state.n_batch]
            n = len(chunk)
            state.tokens[:n] = chunk
            dest = out_all[i0:i0 + n] if all_logits else state.logits
            m.family.forward(state, self.cache, m._rope, n, self.n_past, dest)
            self.tokens.extend(chunk)
        return out_all if all_logits else state.logits[0]


class Model:
    """A GGUF model ready to run. Use :func:`cpuinfer.load`."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, n_ctx: int | None = None,
                 n_batch: int = DEFAULT_BATCH, numa="auto", repack: bool = True):
        from numa.placement import setup as numa_setup

        from .tokenizer import load_tokenizer

        self.path = str(path)
        self.gguf: GGUFFile = open_gguf(path)
        arch = self.gguf.get("general.architecture")
        if arch is None:
            raise CpuinferError(f"{self.path}: metadata key general.architecture is missing")
        if arch not in ARCHITECTURES:
            raise CpuinferError(f"{self.path}: architecture {arch!r} is not supported "
                                f"(supported: {', '.join(sorted(ARCHITECTURES))})")
        self.info = ARCHITECTURES[arch]
        family = importlib.import_module(f".models.{self.info.family}", __package__)
        # NUMA placement (numa/): None when there is nothing to do (off, or auto on one node)
        self._numa = numa_setup(self.gguf, numa, threads)
        loader = TensorLoader(self.gguf, placement=self._numa, repack=repack)
        self.family = family.Family(self.gguf, self.info, loader)
        if self._numa is not None:
            self._numa.close()      # copy threads are done once the weights are bound
        self.config = self.family.config
        self.tokenizer = load_tokenizer(self.gguf)
        self.threads = (self._numa.plan.n_threads if self._numa is not None
                        else set_threads(threads or default_threads()))
        self.n_ctx = int(n_ctx or min(DEFAULT_CTX, self.n_ctx_train))
        if self.n_ctx < 1:
            raise CpuinferError(f"context size must be at least 1, got {self.n_ctx}")
        self._state = self.family.new_state(n_batch)
        self._rope = self.family.rope_tables(self.n_ctx)
        self._session: Session | None = None

    # -- facts from the file ---------------------------------------------------------------------
    @property
    def arch(self) -> str:
        return self.info.name

    @property
    def n_vocab(self) -> int:
        return self.config.n_vocab

    @property
    def n_ctx_train(self) -> int:
        return self.config.n_ctx_train

    @property
    def kv_bytes_per_token(self) -> int:
        return self.config.kv_bytes_per_token

    @property
    def chat_template(self) -> str | None:
        return self.gguf.get("tokenizer.chat_template")

    @property
    def numa_plan(self):
        """The :class:`numa.plan.Plan` in force, or None (policy off / one node under auto)."""
        return self._numa.plan if self._numa is not None else None

    @property
    def weight_bytes_per_token(self) -> int:
        """Weight bytes one decoded token reads (every matrix once + one embedding row)."""
        return self.family.weights.streamed_bytes()

    def __repr__(self) -> str:
        return f"<cpuinfer.Model {Path(self.path).name} arch={self.arch} ctx={self.n_ctx} threads={self.threads}>"

    # -- tokens ------------------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = False, add_bos: bool = False) -> list[int]:
        return self.tokenizer.encode(text, special=special, add_bos=add_bos)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(ids)

    # -- evaluation ----------------------------------------------------------------------------------
    def new_session(self, n_ctx: int | None = None) -> Session:
        return Session(self, n_ctx)

    @property
    def session(self) -> Session:
        """The session ``generate`` and ``chat`` use; its cache is reused across calls."""
        if self._session is None:
            self._session = Session(self)
        return self._session

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), n_vocab]: the logits at every position, from an empty context."""
        ids = list(ids)
        if len(ids) > self.n_ctx:
            raise CpuinferError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        return Session(self, max(1, len(ids))).eval(ids, all_logits=True)

    def warmup(self) -> None:
        """Compile (or load from the disk cache) the decode and prompt kernels."""
        s = Session(self, 4)
        s.eval([0, 0])
        s.eval([0])

    # -- generation ----------------------------------------------------------------------------------
    def generate_ids(self, prompt_ids: Sequence[int], max_tokens: int = 256, session: Session | None = None,
                     **sampling) -> Iterator[int]:
        """Yield sampled token ids after ``prompt_ids``, stopping at an end-of-generation token,
        ``max_tokens`` or a full context. The session's cached prefix is reused."""
        from .sampling import Sampler, SamplerParams

        s = session or self.session
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise CpuinferError("the prompt is empty")
        if len(prompt_ids) >= s.n_ctx:
            raise CpuinferError(f"the prompt is {len(prompt_ids)} tokens, the context holds {s.n_ctx}: "
                                f"use a larger context (--ctx) or a shorter prompt")
        sampler = Sampler(SamplerParams(**sampling), self.n_vocab)
        keep = reusable_prefix(s.tokens, prompt_ids)
        s.truncate(keep)
        logits = s.eval(prompt_ids[keep:])
        stop = self.tokenizer.stop_ids
        for _ in range(max_tokens):
            tok = sampler.sample(logits, s.tokens)
            if tok in stop:
                return
            yield tok
            if s.n_past >= s.n_ctx:
                return
            logits = s.eval([tok])

    def generate(self, prompt: str, max_tokens: int = 256, temperature: float = 0.0, **sampling) -> Iterator[str]:
        """Stream the continuation of ``prompt`` (special tokens in it are parsed; one BOS when
        the file asks for it) as text pieces."""
        from .tokenizer import StreamDecoder, encode_prompt

        ids = encode_prompt(self.tokenizer, prompt)
        dec = StreamDecoder(self.tokenizer)
        for tok in self.generate_ids(ids, max_tokens, temperature=temperature, **sampling):
            piece = dec.add(tok)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from .chat_template import render_chat

        tok = self.tokenizer
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=tok.token_text(tok.bos_id) if tok.bos_id is not None else "",
                           eos_token=tok.token_text(tok.eos_id) if tok.eos_id is not None else "")

    def chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0, **sampling) -> Iterator[str]:
        """Stream the assistant's reply to ``messages`` ([{"role", "content"}]) rendered with the
        file's chat template; the KV cache of the previous turn's common prefix is reused."""
        return self.generate(self.render_chat(messages), max_tokens, temperature=temperature, **sampling)


def load(path: str | os.PathLike, threads: int | None = None, n_ctx: int | None = None,
         numa="auto", repack: bool = True) -> Model:
    """Map a GGUF model and prepare it to run. The weights stay in the file's page cache unless
    ``numa`` (``auto``, ``off``, ``interleave``, ``distribute``, ``isolate[:NODE]`` or a
    :class:`numa.plan.NumaSpec`) places them on several NUMA nodes; ``auto`` = ``distribute``
    when this process can run on more than one node, else nothing at all. See the README, section NUMA.
    ``repack`` (default on, as llama.cpp's CPU repacking) copies Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q2_K..Q6_K matrices into an
    8-row interleaved layout at load where the CPU has AVX2 (README, section Speed)."""
    return Model(path, threads=threads, n_ctx=n_ctx, numa=numa, repack=repack)
