"""The logit cache's size on disk, from its encoding (`slimmoe.tasks.data.formats`).

Per token: the token id (int32, the `input_ids` list), k top-k ids (uint16, or int32 above a
65,536-token vocabulary), k float16 log-probs, and one float32 rest log-mass; per row of seq_len
tokens one int64 row id. Parquet's own framing and zstd's compression are left out: they move the
total by a few percent either way (zstd gains little on top-k ids and float16 log-probs), so the
figure is the encoded bytes, not a measurement of a written cache.
"""

from __future__ import annotations

import numpy as np

from slimmoe.tasks.data.formats import ids_dtype


def cache_bytes_per_token(k: int, vocab_size: int, seq_len: int) -> float:
    ids = np.dtype(ids_dtype(vocab_size)).itemsize
    return 4 + k * ids + k * 2 + 4 + 8 / seq_len


def cache_bytes(tokens: int, k: int, vocab_size: int, seq_len: int) -> int:
    return int(round(tokens * cache_bytes_per_token(k, vocab_size, seq_len)))


__all__ = ["cache_bytes", "cache_bytes_per_token"]
