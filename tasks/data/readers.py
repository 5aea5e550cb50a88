"""Reading token shards and teacher logit caches (the outputs of the tokenize / teacher_logits nodes).

Both are directories of Parquet files plus a `manifest.json` written last. A reader trusts the
manifest's file list, never a directory listing (Ray's `write_parquet` may leave extra files from a
retried write), and refuses a directory whose manifest is missing (the writer did not finish),
whose files differ from the manifest (missing, other size or row count), or whose teacher /
tokenizer fingerprints differ from what the caller expects.

Memory trade-off of the reader: a file is decoded whole on first use and kept in an LRU bounded
by `cache_bytes`. Shuffling is windowed: the files are shuffled, then rows are shuffled within
windows of about `shuffle_window_bytes` of decoded data, so a window fits in memory. At demo
scale (a few thousand rows) one window holds everything, i.e. a full shuffle. At paper scale the
window bounds memory and makes the shuffle local; a rank reads a contiguous slice of the order,
so it only ever decodes ~1/world_size of the files. The order depends on (seed, epoch, window
size) only, so a resumed run sees the same batches.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from slimmoe.tasks.data.formats import (FORMAT_VERSION, MANIFEST, MULTI_SPLIT_KINDS, LogitCacheError, binary_column_to_numpy,
                                      ids_dtype, list_column_to_numpy, read_manifest)

DEFAULT_CACHE_BYTES = 2 << 30
DEFAULT_SHUFFLE_WINDOW_BYTES = 1 << 30


# -- manifests and files ---------------------------------------------------------------------------


def _refuse_multi_split(path: Path, manifest: dict, wanted: str) -> None:
    if manifest.get("kind") in MULTI_SPLIT_KINDS:
        splits = manifest.get("splits")
        names = list(splits) if isinstance(splits, (dict, list)) else []
        raise LogitCacheError(
            f"{path} is a {manifest['kind']} output holding the splits {', '.join(map(str, names))}: "
            f"open one of them as {wanted}, e.g. {path / (names[0] if names else 'train')}"
        )


def verify_files(path: Path, manifest: dict) -> list[tuple[Path, int, int]]:
    """(absolute path, rows, bytes) of every manifest file, after checking each against the manifest."""
    import pyarrow.parquet as pq

    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise LogitCacheError(f"{path / MANIFEST} lists no files; rebuild {path}")
    out = []
    for entry in files:
        f = path / entry["path"]
        if not f.exists():
            raise LogitCacheError(f"{path}: file {entry['path']} listed in the manifest is missing; the directory is damaged, rebuild it")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise LogitCacheError(
                f"{path}: file {entry['path']} has {size} bytes, the manifest says {entry['bytes']} "
                "(truncated or overwritten); rebuild the directory"
            )
        try:
            rows = pq.ParquetFile(f).metadata.num_rows
        except Exception as err:  # a damaged footer: pyarrow raises ArrowInvalid / OSError
            raise LogitCacheError(f"{path}: file {entry['path']} is not readable Parquet ({err}); rebuild the directory") from err
        if rows != entry["rows"]:
            raise LogitCacheError(f"{path}: file {entry['path']} holds {rows} rows, the manifest says {entry['rows']}; rebuild the directory")
        out.append((f, rows, size))
    total = sum(r for _, r, _ in out)
    if total != manifest.get("rows"):
        raise LogitCacheError(f"{path}: files hold {total} rows, the manifest says {manifest.get('rows')}; rebuild the directory")
    return out


def tile_files(directory: str | Path, spans: list[dict], expected_rows: int) -> list[dict]:
    """Writer side: from written files described as {"path", "first", "rows", "bytes"} (each holding
    row ids first..first+rows-1 in order), choose files that hold rows 0..expected_rows-1 exactly
    once, in row order, and return their manifest entries; delete the others (copies a retried
    write task left behind). Every row is a pure function of its row id, so any tiling is as good as
    another; a gap means rows were lost and raises."""
    directory = Path(directory)
    by_start: dict[int, list[dict]] = {}
    for s in spans:
        by_start.setdefault(int(s["first"]), []).append(s)
    entries, nxt, used = [], 0, set()
    while nxt < expected_rows:
        options = by_start.get(nxt)
        if not options:
            raise RuntimeError(f"{directory}: no written file starts at row {nxt}; rows were lost (expected {expected_rows})")
        best = max(options, key=lambda s: (int(s["rows"]), s["path"]))
        entries.append({"path": best["path"], "rows": int(best["rows"]), "bytes": int(best["bytes"])})
        used.add(best["path"])
        nxt += int(best["rows"])
    if nxt != expected_rows:
        raise RuntimeError(f"{directory}: written files overrun the expected {expected_rows} rows")
    for s in spans:
        if s["path"] not in used:
            (directory / s["path"]).unlink(missing_ok=True)
    return entries


# -- decoding --------------------------------------------------------------------------------------


# -- readers ---------------------------------------------------------------------------------------


class _ParquetRows:
    """Shared machinery: a manifest-listed, row-id ordered set of Parquet files, read by row index."""

    kind = ""
    columns: tuple[str, ...] = ()

    def __init__(self, path: str | Path, manifest: dict, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 shuffle_window_bytes: int = DEFAULT_SHUFFLE_WINDOW_BYTES):
        self.path = Path(path)
        self.manifest = manifest
        self.seq_len = int(manifest["seq_len"])
        self._files = verify_files(self.path, manifest)
        rows = np.array([r for _, r, _ in self._files], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(rows)])
        self.num_rows = int(self._starts[-1])
        self._cache: collections.OrderedDict[int, dict[str, np.ndarray]] = collections.OrderedDict()
        self._cache_used = 0
        self.cache_bytes = int(cache_bytes)
        self.shuffle_window_bytes = int(shuffle_window_bytes)

    # subclasses: decode one Parquet table into numpy arrays keyed like `columns`
    def _decode(self, table) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _to_torch(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _row_bytes(self) -> int:
        raise NotImplementedError

    @property
    def files(self) -> list[Path]:
        return [f for f, _, _ in self._files]

    def _file_arrays(self, i: int) -> dict[str, np.ndarray]:
        import pyarrow.parquet as pq

        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        path, rows, _ = self._files[i]
        table = pq.read_table(path, columns=list(self.columns))
        if table.num_rows != rows:
            raise LogitCacheError(f"{path} holds {table.num_rows} rows, the manifest says {rows}; rebuild {self.path}")
        arrays = self._decode(table)
        want = np.arange(self._starts[i], self._starts[i] + rows)
        if not np.array_equal(arrays["row_id"], want):
            raise LogitCacheError(f"{path} does not hold rows {want[0]}..{want[-1]} in order as the manifest implies; rebuild {self.path}")
        size = sum(a.nbytes for a in arrays.values())
        self._cache[i] = arrays
        self._cache_used += size
        while self._cache_used > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_used -= sum(a.nbytes for a in old.values())
        return arrays

    def read_numpy(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """Rows by index (= row id), in the given order, as numpy arrays in their stored dtypes."""
        idx = np.asarray(indices.cpu().numpy() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"row index out of range 0..{self.num_rows - 1}")
        which = np.searchsorted(self._starts, idx, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for f in np.unique(which):
            arrays = self._file_arrays(int(f))
            sel = np.nonzero(which == f)[0]
            local = idx[sel] - self._starts[f]
            for name, a in arrays.items():
                if name not in out:
                    out[name] = np.empty((idx.size,) + a.shape[1:], dtype=a.dtype)
                out[name][sel] = a[local]
        if not out:  # no indices: empty arrays of the right trailing shapes
            out = {name: a[:0] for name, a in self._file_arrays(0).items()}
        return out

    def read_rows(self, indices) -> dict[str, torch.Tensor]:
        return self._to_torch(self.read_numpy(indices))

    # -- batching ----------------------------------------------------------------------------------

    def num_batches(self, batch_size: int, world_size: int = 1) -> int:
        if batch_size < 1 or world_size < 1:
            raise ValueError("batch_size and world_size must be >= 1")
        return self.num_rows // (batch_size * world_size)

    def order(self, shuffle: bool = True, seed: int = 0, epoch: int = 0) -> np.ndarray:
        """The row order of one epoch: fixed by (seed, epoch) and the shuffle window size."""
        if not shuffle:
            return np.arange(self.num_rows, dtype=np.int64)
        rng = np.random.default_rng([int(seed), int(epoch)])
        window_rows = max(1, self.shuffle_window_bytes // max(1, self._row_bytes()))
        pieces, window, window_len = [], [], 0
        for f in rng.permutation(len(self._files)):
            window.append(np.arange(self._starts[f], self._starts[f + 1], dtype=np.int64))
            window_len += len(window[-1])
            if window_len >= window_rows:
                pieces.append(rng.permutation(np.concatenate(window)))
                window, window_len = [], 0
        if window:
            pieces.append(rng.permutation(np.concatenate(window)))
        return np.concatenate(pieces)

    def rank_indices(self, batch_size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                     seed: int = 0, epoch: int = 0) -> np.ndarray:
        """The rows rank `rank` reads this epoch: a contiguous, disjoint slice of the epoch order, the
        same length on every rank (the remainder is dropped so collectives stay in lockstep)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        nb = self.num_batches(batch_size, world_size)
        if nb == 0:
            raise LogitCacheError(
                f"{self.path} holds {self.num_rows} rows, fewer than batch_size*world_size = {batch_size * world_size}; "
                "lower the batch size or give more data"
            )
        per_rank = nb * batch_size
        return self.order(shuffle, seed, epoch)[rank * per_rank : (rank + 1) * per_rank]

    def iter_batches(self, batch_size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                     seed: int = 0, epoch: int = 0, start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of this rank, deterministic for (seed, epoch); `start_batch` skips batches a resumed
        run already consumed."""
        mine = self.rank_indices(batch_size, rank, world_size, shuffle, seed, epoch)
        for b in range(max(0, int(start_batch)), len(mine) // batch_size):
            yield self.read_rows(mine[b * batch_size : (b + 1) * batch_size])

    def to_ray_dataset(self, decode: bool = True, **read_kwargs):
        """A Ray Dataset over exactly the manifest's files (for streaming into Ray Train).
        With `decode`, per-token columns come back as fixed-shape numpy arrays."""
        import ray

        from slimmoe.tasks.core.runtime import ensure_ray

        ensure_ray()
        ds = ray.data.read_parquet([str(f) for f in self.files], file_extensions=None, **read_kwargs)
        ds = ds.select_columns(list(self.columns))
        if decode:
            ds = ds.map_batches(_DecodeBatch(self), batch_format="pyarrow")
        return ds


class _DecodeBatch:
    """Picklable batch decoder for `to_ray_dataset` (holds only the shape information)."""

    def __init__(self, reader: _ParquetRows):
        self.decode = type(reader)._decode_table
        self.info = reader._shape_info()

    def __call__(self, table):
        arrays = self.decode(table, **self.info)
        return {k: (v.astype(np.int32) if v.dtype == np.uint16 else v) for k, v in arrays.items()}


class TokenShards(_ParquetRows):
    kind = "token_shards"
    columns = ("row_id", "input_ids")

    def _shape_info(self) -> dict:
        return {"seq_len": self.seq_len}

    @staticmethod
    def _decode_table(table, seq_len: int) -> dict[str, np.ndarray]:
        return {
            "row_id": table.column("row_id").to_numpy().astype(np.int64, copy=False),
            "input_ids": list_column_to_numpy(table.column("input_ids"), seq_len),
        }

    def _decode(self, table):
        return self._decode_table(table, **self._shape_info())

    def _row_bytes(self) -> int:
        return 8 + 4 * self.seq_len

    def _to_torch(self, a):
        return {"row_id": torch.from_numpy(a["row_id"]), "input_ids": torch.from_numpy(a["input_ids"].astype(np.int64))}


class LogitCache(_ParquetRows):
    kind = "logit_cache"
    columns = ("row_id", "input_ids", "topk_ids", "topk_logprobs", "rest_logprob")

    def __init__(self, path, manifest, **kw):
        super().__init__(path, manifest, **kw)
        self.k = int(manifest["k"])
        self.vocab_size = int(manifest["vocab_size"])
        self.teacher_fingerprint = manifest.get("teacher_fingerprint")
        self.tokenizer_fingerprint = manifest.get("tokenizer_fingerprint")

    def _shape_info(self) -> dict:
        return {"seq_len": self.seq_len, "k": self.k, "ids": ids_dtype(self.vocab_size).name}

    @staticmethod
    def _decode_table(table, seq_len: int, k: int, ids: str) -> dict[str, np.ndarray]:
        n = table.num_rows
        return {
            "row_id": table.column("row_id").to_numpy().astype(np.int64, copy=False),
            "input_ids": list_column_to_numpy(table.column("input_ids"), seq_len),
            "topk_ids": binary_column_to_numpy(table.column("topk_ids"), ids, seq_len * k).reshape(n, seq_len, k),
            "topk_logprobs": binary_column_to_numpy(table.column("topk_logprobs"), np.float16, seq_len * k).reshape(n, seq_len, k),
            "rest_logprob": binary_column_to_numpy(table.column("rest_logprob"), np.float32, seq_len),
        }

    def _decode(self, table):
        return self._decode_table(table, **self._shape_info())

    def _row_bytes(self) -> int:
        return 8 + self.seq_len * (4 + self.k * (ids_dtype(self.vocab_size).itemsize + 2) + 4)

    def _to_torch(self, a):
        return {
            "row_id": torch.from_numpy(a["row_id"]),
            "input_ids": torch.from_numpy(a["input_ids"].astype(np.int64)),
            "topk_ids": torch.from_numpy(a["topk_ids"].astype(np.int64)),
            "topk_logprobs": torch.from_numpy(a["topk_logprobs"].astype(np.float32)),
            "rest_logprob": torch.from_numpy(np.ascontiguousarray(a["rest_logprob"], dtype=np.float32)),
        }

    def full_logits_bytes_per_token(self) -> int:
        return 2 * self.vocab_size

    def disk_bytes(self) -> int:
        return sum(b for _, _, b in self._files)


def _check_kind(path: Path, manifest: dict, kind: str) -> None:
    _refuse_multi_split(path, manifest, "a single split")
    if manifest.get("kind") != kind:
        raise LogitCacheError(f"{path} holds {manifest.get('kind')!r}, not a {kind} directory")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LogitCacheError(
            f"{path} has format_version {manifest.get('format_version')}, this reader reads {FORMAT_VERSION}; rebuild it"
        )


def open_logit_cache(path: str | Path, expect_teacher_fingerprint: str | None = None,
                     expect_tokenizer_fingerprint: str | None = None, **reader_kwargs) -> LogitCache:
    """Open one split of a teacher logit cache, refusing it if incomplete, damaged or from another
    teacher / tokenizer than the caller expects. `reader_kwargs`: cache_bytes, shuffle_window_bytes."""
    path = Path(path)
    manifest = read_manifest(path)
    _check_kind(path, manifest, "logit_cache")
    for what, expected in (("teacher", expect_teacher_fingerprint), ("tokenizer", expect_tokenizer_fingerprint)):
        got = manifest.get(f"{what}_fingerprint")
        if expected is not None and got != expected:
            raise LogitCacheError(
                f"logit cache {path} was made with {what} fingerprint {got}, but {expected} is expected: "
                f"the {what} changed since the cache was built. Rebuild the cache for this {what} "
                "(rerun the teacher_logits node) or point at the cache made for it"
            )
    return LogitCache(path, manifest, **reader_kwargs)


def open_token_shards(path: str | Path, expect_tokenizer_fingerprint: str | None = None, **reader_kwargs) -> TokenShards:
    path = Path(path)
    manifest = read_manifest(path)
    _check_kind(path, manifest, "token_shards")
    got = manifest.get("tokenizer_fingerprint")
    if expect_tokenizer_fingerprint is not None and got != expect_tokenizer_fingerprint:
        raise LogitCacheError(
            f"token shards {path} were made with tokenizer fingerprint {got}, but {expect_tokenizer_fingerprint} "
            "is expected; tokenize the data again with this tokenizer"
        )
    return TokenShards(path, manifest, **reader_kwargs)


def split_dirs(path: str | Path) -> dict[str, Path]:
    """Split name -> directory, for a node output holding several splits (tokenize, teacher_logits)
    or for a single split directory (named by its manifest's `split`, else by the directory)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("kind") in MULTI_SPLIT_KINDS:
        return {name: path / name for name in manifest["splits"]}
    return {manifest.get("split") or path.name: path}


def split_dir(path: str | Path, split: str, kind: str, missing_ok: bool = False) -> Path | None:
    """The `split` directory of a node output that holds several splits, or `path` itself when it is
    already a single directory of `kind` (token_shards or logit_cache). A node output without that
    split raises, or gives None with `missing_ok`."""
    path = Path(path)
    manifest = read_manifest(path)
    got = manifest.get("kind")
    if got == kind:
        return path
    if MULTI_SPLIT_KINDS.get(got) != kind:
        raise LogitCacheError(f"{path} holds {got!r}, not {kind} (nor a node output made of {kind} splits)")
    sub = path / split
    if split not in manifest.get("splits", ()) or not (sub / MANIFEST).exists():
        if missing_ok:
            return None
        raise LogitCacheError(f"{path} has no {split} split (splits: {', '.join(manifest.get('splits', ()))})")
    return sub
