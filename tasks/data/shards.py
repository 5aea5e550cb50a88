"""Writing token shards: fixed-name Parquet files of (row_id, input_ids), each written to a temporary
name and renamed, then the manifest, last. Ray's `write_parquet` gives uuid names and no atomicity,
so the tokenize node writes its files itself; tests and benchmarks make shards the same way. Each
file carries Parquet page checksums and its manifest entry a checksum of its bytes (see
`slimmoe.tasks.data.formats`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slimmoe.tasks.core.storage import ensure_free_output
from slimmoe.tasks.data.formats import TokenizedDatasetManifest, TokenShardsManifest, write_parquet_file


class ShardWriter:
    """Writes rows of one split as `part-NNNNN.parquet` files of `rows_per_file` rows (row_id, input_ids),
    each file atomically; `finish` writes the manifest, last."""

    def __init__(self, split_dir: str | Path, seq_len: int, rows_per_file: int):
        self.dir = Path(split_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.seq_len = seq_len
        self.rows_per_file = rows_per_file
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.rows = 0
        self.files: list[dict] = []

    def add(self, rows: np.ndarray) -> None:
        if len(rows):
            self.pending.append(np.asarray(rows, dtype=np.int32).reshape(-1, self.seq_len))
            self.pending_rows += len(rows)
        while self.pending_rows >= self.rows_per_file:
            self._flush(self.rows_per_file)

    def _flush(self, n: int) -> None:
        import pyarrow as pa

        block = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        out, rest = block[:n], block[n:]
        self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)
        offsets = pa.array(np.arange(0, n * self.seq_len + 1, self.seq_len, dtype=np.int32))
        table = pa.table({
            "row_id": pa.array(np.arange(self.rows, self.rows + n, dtype=np.int64)),
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(out.reshape(-1), pa.int32())),
        })
        name = f"part-{len(self.files):05d}.parquet"
        written = write_parquet_file(table, self.dir / name)
        self.files.append({"path": name, "rows": n, **written})
        self.rows += n

    def finish(self, tokenizer_fp: str, eos_token_id: int | None, extra: dict | None = None) -> dict:
        if self.pending_rows:
            self._flush(self.pending_rows)
        return TokenShardsManifest(seq_len=self.seq_len, rows=self.rows, tokens=self.rows * self.seq_len,
                                   tokenizer_fingerprint=tokenizer_fp, eos_token_id=eos_token_id, files=self.files,
                                   **(extra or {})).write(self.dir)


def write_token_shards(split_dir: str | Path, rows, tokenizer_fp: str, eos_token_id: int | None = None,
                       rows_per_file: int = 8192, extra: dict | None = None) -> dict:
    """Token shards from ready rows ([N, T] ints): for tests, benchmarks and hand-made data."""
    rows = np.asarray(rows, dtype=np.int32)
    writer = ShardWriter(split_dir, rows.shape[1], rows_per_file)
    writer.add(rows)
    return writer.finish(tokenizer_fp, eos_token_id, extra)


def write_tokenized_dataset(out_dir: str | Path, splits: dict[str, Any], tokenizer_fp: str, eos_token_id: int | None = None,
                            vocab_size: int | None = None, tokenizer_path: str | None = None, rows_per_file: int = 8192) -> dict:
    """A tokenize-node output from ready rows per split ({"train": [N, T] ints, ...}): for tests,
    benchmarks and data tokenized elsewhere."""
    out_dir = Path(out_dir)
    ensure_free_output(out_dir)
    info, seq_len = {}, None
    for name, rows in splits.items():
        m = write_token_shards(out_dir / name, rows, tokenizer_fp, eos_token_id, rows_per_file, {"split": name})
        seq_len = m["seq_len"]
        info[name] = {"rows": m["rows"], "tokens": m["tokens"]}
    return TokenizedDatasetManifest(seq_len=seq_len, tokenizer_fingerprint=tokenizer_fp, tokenizer_path=tokenizer_path,
                                    eos_token_id=eos_token_id, vocab_size=vocab_size, splits=info).write(out_dir)
