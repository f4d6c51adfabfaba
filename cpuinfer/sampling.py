"""Token sampling: llama.cpp's default chain without sorting the vocabulary.

The chain, in llama.cpp's order::

    repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw

* **repetition penalty** — every distinct id among the last ``repeat_last_n`` history ids has
  its logit divided by ``repeat_penalty`` when positive, multiplied when zero or negative.
* **top-k** — keep the ``top_k`` largest logits (``top_k <= 0`` keeps all).
* **top-p** — softmax over the top-k survivors (temperature 1); keep the shortest best-first
  prefix whose probability mass reaches ``top_p`` (the token that crosses it is kept).
* **min-p** — keep tokens with ``p_i >= min_p * p_max``, i.e. ``logit_i >= max + ln(min_p)``.
* **temperature** — divide the survivors' logits by ``temperature`` and draw from their softmax.
  ``temperature <= 0`` is greedy: the argmax of the penalized logits.

Top-p and min-p both keep a best-first prefix, and min-p's threshold is relative to the largest
probability, so "top-p then min-p" equals "the shorter of the two prefixes". The kernel uses that
to avoid a full sort: it selects the top-k with a bounded heap (O(V log k)), sums the softmax mass
of all top-k survivors (top-p's denominator), drops everything under the min-p threshold and sorts
only what is left. With top-k disabled, top-p is pre-filtered by a one-pass histogram of the
probability mass by distance below the max logit, so only the buckets that hold the top-p prefix
are sorted (for a flat distribution that can still be most of the vocabulary).

Ordering is deterministic: equal logits rank by ascending token id, so ``top_k = 1`` and greedy
both return ``np.argmax``'s answer.

All vocab-sized buffers (the penalized copy of the logits and the candidate id/value arrays) are
allocated once per :class:`Sampler`; a call to :meth:`Sampler.sample` allocates nothing of vocab
size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from quant.jit import kernel

from .errors import CpuinferError


@dataclass
class SamplerParams:
    """Sampling settings; :meth:`validate` checks them (the CLI flags are named in messages)."""
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def validate(self) -> "SamplerParams":
        """Raise :class:`CpuinferError` naming the first bad field; return ``self`` when fine."""
        def number(name: str, flag: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise CpuinferError(f"{flag} must be a number, got {v!r}")
            if not math.isfinite(float(v)):
                raise CpuinferError(f"{flag} must be finite, got {v!r}")
            return float(v)

        def integer(name: str, flag: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise CpuinferError(f"{flag} must be an integer, got {v!r}")
            return int(v)

        number("temperature", "--temperature")
        if integer("top_k", "--top-k") < 0:
            raise CpuinferError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")
        top_p = number("top_p", "--top-p")
        if not 0.0 < top_p <= 1.0:
            raise CpuinferError(f"--top-p must be in (0, 1], got {self.top_p}")
        min_p = number("min_p", "--min-p")
        if not 0.0 <= min_p < 1.0:
            raise CpuinferError(f"--min-p must be in [0, 1), got {self.min_p}")
        if number("repeat_penalty", "--repeat-penalty") <= 0.0:
            raise CpuinferError(f"--repeat-penalty must be > 0 (1 disables it), "
                                f"got {self.repeat_penalty}")
        if integer("repeat_last_n", "--repeat-last-n") < -1:
            raise CpuinferError(f"--repeat-last-n must be >= -1 (-1 = whole history, 0 disables), "
                                f"got {self.repeat_last_n}")
        if self.seed is not None:
            if integer("seed", "--seed") < 0:
                raise CpuinferError(f"--seed must be >= 0, got {self.seed}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


# Top-p pre-filter (top-k disabled): mass histogram by distance below the max logit, in buckets of
# _BUCKET_WIDTH logits; the last bucket collects everything further down.
_BUCKET_WIDTH = 0.5
_N_BUCKETS = 64

# ----------------------------------------------------------------------------------------------
# Kernels. Candidates live in two parallel arrays (ids, vals). "a is worse than b" means a lower
# logit, or the same logit and a higher token id; heaps below are min-heaps on that order, so the
# root is the worst candidate kept.

@kernel
def _worse(vals, ids, a, b):
    return vals[a] < vals[b] or (vals[a] == vals[b] and ids[a] > ids[b])


@kernel
def _sift_down(vals, ids, root, n):
    """Restore the worst-at-root heap property below ``root`` in ``vals/ids[:n]``."""
    while True:
        child = 2 * root + 1
        if child >= n:
            return
        if child + 1 < n and _worse(vals, ids, child + 1, child):
            child += 1
        if not _worse(vals, ids, child, root):
            return
        vals[root], vals[child] = vals[child], vals[root]
        ids[root], ids[child] = ids[child], ids[root]
        root = child


@kernel
def _sort_best_first(vals, ids, n):
    """Heap-sort ``vals/ids[:n]`` in place, best candidate first (O(n log n), no allocation)."""
    for i in range(n // 2 - 1, -1, -1):
        _sift_down(vals, ids, i, n)
    for end in range(n - 1, 0, -1):     # move the worst remaining to the back
        vals[0], vals[end] = vals[end], vals[0]
        ids[0], ids[end] = ids[end], ids[0]
        _sift_down(vals, ids, 0, end)


@kernel
def _apply_repeat_penalty(buf, history, penalty):
    """Penalize each distinct id of ``history`` once (llama.cpp's rule), in place."""
    n = history.shape[0]
    for j in range(n):
        t = history[j]
        seen = False
        for i in range(j):
            if history[i] == t:
                seen = True
                break
        if seen or t < 0 or t >= buf.shape[0]:
            continue
        if buf[t] <= 0.0:
            buf[t] = buf[t] * penalty
        else:
            buf[t] = buf[t] / penalty


@kernel
def _argmax(buf):
    best = 0
    for i in range(1, buf.shape[0]):
        if buf[i] > buf[best]:
            best = i
    return best


@kernel
def _select_candidates(buf, top_k, top_p, min_p, ids, vals, bucket_mass):
    """Apply top-k, top-p and min-p to the logits ``buf``; return the number kept.

    On return ``ids/vals[:n_kept]`` hold the survivors best first. ``top_k <= 0`` or
    ``>= len(buf)`` disables top-k; ``min_p <= 0`` disables min-p; ``top_p >= 1`` disables top-p.
    ``bucket_mass`` is scratch space for the top-p pre-filter used when top-k is disabled.
    """
    n_vocab = buf.shape[0]
    m = buf[_argmax(buf)]
    thresh = m + math.log(min_p) if min_p > 0.0 else -np.inf
    mass = 0.0                              # softmax denominator over the top-k survivors
    n = 0
    if 0 < top_k < n_vocab:
        for i in range(top_k):              # bounded heap of the k best, worst at the root
            vals[i] = buf[i]
            ids[i] = i
        for i in range(top_k // 2 - 1, -1, -1):
            _sift_down(vals, ids, i, top_k)
        for i in range(top_k, n_vocab):
            v = buf[i]
            if v > vals[0]:                 # ties keep the lower id already held
                vals[0] = v
                ids[0] = i
                _sift_down(vals, ids, 0, top_k)
        for i in range(top_k):              # mass of all k, then keep those over min-p's cut
            mass += math.exp(vals[i] - m)
            if vals[i] >= thresh:
                vals[n] = vals[i]
                ids[n] = ids[i]
                n += 1
    else:
        if top_p < 1.0:
            # Histogram the mass by distance below the max; the first buckets whose mass
            # reaches top_p * total hold the whole top-p prefix, so nothing below them needs
            # sorting. One bucket of margin absorbs rounding at the bucket edges.
            nb = bucket_mass.shape[0]
            bucket_mass[:] = 0.0
            for i in range(n_vocab):
                w = math.exp(buf[i] - m)
                mass += w
                b = int((m - buf[i]) * (1.0 / _BUCKET_WIDTH))
                bucket_mass[min(b, nb - 1)] += w
            cum = 0.0
            for b in range(nb - 1):
                cum += bucket_mass[b]
                if cum >= top_p * mass:
                    thresh = max(thresh, m - (b + 2) * _BUCKET_WIDTH)
                    break
            for i in range(n_vocab):
                if buf[i] >= thresh:
                    vals[n] = buf[i]
                    ids[n] = i
                    n += 1
        else:
            for i in range(n_vocab):
                v = buf[i]
                mass += math.exp(v - m)
                if v >= thresh:
                    vals[n] = v
                    ids[n] = i
                    n += 1
    _sort_best_first(vals, ids, n)
    if top_p < 1.0:
        target = top_p * mass
        cum = 0.0
        for i in range(n):
            cum += math.exp(vals[i] - m)
            if cum >= target:
                return i + 1
    return n


@kernel
def _draw(vals, ids, n, inv_temp, u):
    """Draw from softmax(vals[:n] * inv_temp) (vals best first) with the uniform number ``u``."""
    m = vals[0]
    total = 0.0
    for i in range(n):
        total += math.exp((vals[i] - m) * inv_temp)
    target = u * total
    cum = 0.0
    for i in range(n):
        cum += math.exp((vals[i] - m) * inv_temp)
        if cum > target:
            return ids[i]
    return ids[n - 1]                       # rounding: u * total landed past the last sum


class Sampler:
    """Picks the next token from logits; holds its work buffers and random generator."""

    def __init__(self, params: SamplerParams, n_vocab: int):
        self.params = params.validate()
        if isinstance(n_vocab, bool) or not isinstance(n_vocab, (int, np.integer)) or n_vocab < 1:
            raise CpuinferError(f"sampler: n_vocab must be a positive integer, got {n_vocab!r}")
        self.n_vocab = int(n_vocab)
        self.rng = np.random.default_rng(params.seed)
        self._buf = np.empty(self.n_vocab, np.float32)      # penalized copy of the logits
        self._ids = np.empty(self.n_vocab, np.int64)        # candidate ids, best first
        self._vals = np.empty(self.n_vocab, np.float32)     # candidate logits, best first
        self._buckets = np.empty(_N_BUCKETS, np.float64)   # top-p pre-filter histogram
        self._hist = np.empty(max(params.repeat_last_n, 0), np.int64)

    def _prepare(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """Validate ``logits``, copy them into the work buffer and apply the repetition penalty."""
        if not isinstance(logits, np.ndarray) or logits.shape != (self.n_vocab,):
            shape = getattr(logits, "shape", type(logits).__name__)
            raise CpuinferError(f"sampler: logits must be a float32 array of shape "
                                f"({self.n_vocab},), got {shape}")
        np.copyto(self._buf, logits, casting="same_kind")
        p = self.params
        if p.repeat_penalty != 1.0 and p.repeat_last_n != 0 and len(history):
            tail = history if p.repeat_last_n < 0 else history[-p.repeat_last_n:]
            if p.repeat_last_n > 0:
                hist = self._hist[:len(tail)]
                hist[:] = tail
            else:                           # whole history: no fixed bound to preallocate
                hist = np.asarray(tail, np.int64)
            _apply_repeat_penalty(self._buf, hist, np.float32(p.repeat_penalty))
        return self._buf

    def candidates(self, logits: np.ndarray, history: Sequence[int] = ()):
        """The final distribution: ``(ids, probs)`` best first, after the whole chain.

        For greedy settings that is the single argmax with probability 1. The arrays are fresh
        copies (this is for inspection and tests, not the token path).
        """
        buf = self._prepare(logits, history)
        p = self.params
        if p.greedy:
            return np.array([_argmax(buf)], np.int64), np.ones(1, np.float64)
        n = _select_candidates(buf, p.top_k, p.top_p, p.min_p, self._ids, self._vals,
                               self._buckets)
        z = (self._vals[:n].astype(np.float64) - float(self._vals[0])) / p.temperature
        w = np.exp(z)
        return self._ids[:n].copy(), w / w.sum()

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """Return the next token id for ``logits`` (float32 ``[n_vocab]``) after ``history``."""
        buf = self._prepare(logits, history)
        p = self.params
        if p.greedy:
            return int(_argmax(buf))
        n = _select_candidates(buf, p.top_k, p.top_p, p.min_p, self._ids, self._vals,
                               self._buckets)
        return int(_draw(self._vals, self._ids, n, 1.0 / p.temperature, self.rng.random()))
