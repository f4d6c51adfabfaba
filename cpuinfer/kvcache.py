"""The KV cache of a session: K and V of every layer for ``n_ctx`` positions, stored as IEEE
half (uint16 bits; numba has no float16), allocated once — llama.cpp's default ``f16`` cache type,
half the memory of float32. Attention scratch (one score row per head) lives here too, so
nothing is allocated per token.
"""
from __future__ import annotations

import numpy as np

BYTES_PER_VALUE = 2  # f16


class KVCache:
    def __init__(self, n_layer: int, n_ctx: int, n_head: int, n_head_kv: int, head_dim_k: int, head_dim_v: int):
        self.n_ctx = n_ctx
        self.k = np.zeros((n_layer, n_ctx, n_head_kv, head_dim_k), np.uint16)
        self.v = np.zeros((n_layer, n_ctx, n_head_kv, head_dim_v), np.uint16)
        self.scores = np.zeros((n_head, n_ctx), np.float32)
        self.qh = np.zeros((n_head, head_dim_k), np.float32)

    @staticmethod
    def bytes_per_token(n_layer: int, n_head_kv: int, head_dim_k: int, head_dim_v: int) -> int:
        return n_layer * n_head_kv * (head_dim_k + head_dim_v) * BYTES_PER_VALUE

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
