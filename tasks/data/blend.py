"""A weighted blend of tokenized sources: one stream of documents whose tokens follow the weights.

The rule (`Blend`): documents are taken whole, each source in its own order, and the next document
always comes from the source furthest below its share, i.e. the one with the fewest tokens taken per
unit of weight (ties: the earlier source). The blend ends when the source it needs next has no
document left. So:

* each source's share of the blend's tokens (EOS included, what a document occupies once packed)
  is its normalised weight to within one document of that source;
* nothing is repeated: the blend holds `min_i(tokens_i / share_i)` tokens, limited by the source that
  is smallest for its weight, and the other sources' remaining documents are left unread (the manifest
  says how many tokens each source gave and which one ran out). Repeating a small source instead
  would put the same documents into the teacher's cache several times, which the stages' epochs
  already do;
* the order depends only on the sources' documents and the tokenizer, never on how Ray cut or
  scheduled the work: the output stays reproducible.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import numpy as np

CHUNK_DOCUMENTS = 4096  # documents per table handed to the packer


class Blend:
    """Interleave tables of tokenized documents (`split`: int8, `input_ids`: list<int32>) from several
    sources by the rule above. `skipped` is the split code of a placeholder for a file a worker skipped:
    passed on (the packer counts it), never counted as tokens."""

    def __init__(self, streams: list[Iterable], weights: list[float], skipped: int):
        total = float(sum(weights))
        self.shares = [w / total for w in weights]
        self.skipped = skipped
        self.tokens = [0] * len(streams)
        self.documents = [0] * len(streams)
        self.exhausted: int | None = None  # the source whose end ended the blend
        self._streams = [iter(s) for s in streams]
        self._pending: list[deque] = [deque() for _ in streams]

    def _next(self, i: int):
        """The next (split, token ids) of source i, or None at its end."""
        while not self._pending[i]:
            batch = next(self._streams[i], None)
            if batch is None:
                return None
            ids = batch.column("input_ids").combine_chunks()
            offsets = ids.offsets.to_numpy()
            flat = ids.flatten().to_numpy(zero_copy_only=False)
            docs = np.split(flat, (offsets - offsets[0])[1:-1])
            self._pending[i].extend(zip(batch.column("split").to_numpy(zero_copy_only=False).tolist(), docs))
        return self._pending[i].popleft()

    def _neediest(self) -> int:
        return min(range(len(self.shares)), key=lambda i: (self.tokens[i] / self.shares[i], i))

    def __iter__(self) -> Iterator:
        splits: list[int] = []
        docs: list[np.ndarray] = []
        while True:
            i = self._neediest()
            doc = self._next(i)
            if doc is None:
                self.exhausted = i
                break
            split, ids = doc
            if split != self.skipped:
                self.tokens[i] += len(ids) + 1  # + EOS
                self.documents[i] += 1
            splits.append(split)
            docs.append(ids)
            if len(splits) >= CHUNK_DOCUMENTS:
                yield _table(splits, docs)
                splits, docs = [], []
        self.close()
        if splits:
            yield _table(splits, docs)

    def close(self) -> None:
        """Stop the sources' readers: the blend leaves what it did not need unread."""
        for stream in self._streams:
            getattr(stream, "close", lambda: None)()

    def report(self, paths: list[str], weights: list[float]) -> list[dict]:
        """Per source: its weight, target and realised share of the tokens, documents and tokens taken."""
        total = sum(self.tokens) or 1
        return [{"path": path, "weight": weight, "target_share": round(share, 6),
                 "share": round(tokens / total, 6), "tokens": tokens, "documents": docs,
                 "exhausted": i == self.exhausted}
                for i, (path, weight, share, tokens, docs) in
                enumerate(zip(paths, weights, self.shares, self.tokens, self.documents))]


def _table(splits: list[int], docs: list[np.ndarray]):
    import pyarrow as pa

    lengths = np.fromiter((len(d) for d in docs), dtype=np.int32, count=len(docs))
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int32)]).astype(np.int32)
    values = np.concatenate(docs).astype(np.int32) if docs else np.zeros(0, np.int32)
    return pa.table({"split": pa.array(splits, pa.int8()),
                     "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))})
