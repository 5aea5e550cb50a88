"""One document packer: documents joined with EOS after each, cut into full rows of `seq_len`.

Every producer of fixed-length rows (the tokenize node, calibration batches, the demo teacher's
corpus) packs through this, so a row means the same thing everywhere. The incomplete tail is kept
across calls and dropped at the end: a row never mixes padding into the stream.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


class Packer:
    """Concatenates documents (EOS after each) and cuts full `seq_len` rows; keeps the partial tail."""

    def __init__(self, seq_len: int, eos_token_id: int | None):
        self.seq_len = seq_len
        self.eos = eos_token_id
        self.tail = np.zeros(0, np.int32)
        self.documents = 0
        self.tokens = 0

    def add(self, flat: np.ndarray, doc_ends: np.ndarray) -> np.ndarray:
        """`flat`: the documents' tokens back to back; `doc_ends`: where each document ends in `flat`."""
        if self.eos is not None and len(doc_ends):
            flat = np.insert(flat, doc_ends, np.int32(self.eos))
        self.documents += len(doc_ends)
        self.tokens += len(flat)
        stream = np.concatenate([self.tail, flat.astype(np.int32, copy=False)])
        n = len(stream) // self.seq_len
        self.tail = stream[n * self.seq_len :]
        return stream[: n * self.seq_len].reshape(n, self.seq_len)


def pack_documents(token_lists: Iterable[list[int]], seq_len: int, eos_token_id: int | None,
                   max_rows: int | None = None) -> np.ndarray:
    """[N, seq_len] int32 rows from documents given as token-id lists; stops once `max_rows` are full."""
    packer, parts, n = Packer(seq_len, eos_token_id), [], 0
    for ids in token_lists:
        rows = packer.add(np.asarray(ids, dtype=np.int32), np.array([len(ids)], dtype=np.int64))
        if len(rows):
            parts.append(rows)
            n += len(rows)
        if max_rows is not None and n >= max_rows:
            break
    out = np.concatenate(parts) if parts else np.zeros((0, seq_len), np.int32)
    return out if max_rows is None else out[:max_rows]
