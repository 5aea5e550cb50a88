"""Reading token shards and teacher logit caches (the outputs of the tokenize / teacher_logits nodes).

Both are directories of Parquet files plus a `manifest.json` written last. A reader trusts the
manifest's file list, never a directory listing (Ray's `write_parquet` may leave extra files from a
retried write), and refuses a directory whose manifest is missing (the writer did not finish),
whose files differ from the manifest (missing, other size or row count, content checksum, Parquet
page checksums), whose logit cache holds NaN or inf log-probs, whose manifest contradicts its
files' stamped fingerprints or its node output's manifest, or whose teacher / tokenizer
fingerprints differ from what the caller expects. Every refusal names the file or manifest and how
to rebuild it. The content checksum is checked where a file is read whole anyway (on its first
decode), not at open: opening reads footers only, so a large cache still opens in milliseconds.

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
import json
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from slimmoe.tasks.data.formats import (FORMAT_VERSION, MANIFEST, MULTI_SPLIT_KINDS, LogitCacheError, binary_column_to_numpy,
                                        checksum_mismatch, file_checksum, footer_provenance, ids_dtype, list_column_to_numpy,
                                        read_manifest, rebuild_hint)

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


class ManifestFile(NamedTuple):
    """One manifest-listed file, as checked against its manifest entry."""

    path: Path
    rows: int
    bytes: int
    checksum: str | None  # None in manifests written before file checksums were recorded
    provenance: dict[str, str]  # what its writer stamped into the footer (fingerprints)


def verify_files(path: Path, manifest: dict, kind: str | None = None) -> list[ManifestFile]:
    """Every manifest file, after checking its size, footer and row count against the manifest (the
    content checksum is checked where a file is read whole: `_ParquetRows._read_file`)."""
    import pyarrow.parquet as pq

    rebuild = rebuild_hint(kind or manifest.get("kind"))
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise LogitCacheError(f"{path / MANIFEST} lists no files. {rebuild}")
    out = []
    for entry in files:
        f = path / entry["path"]
        if not f.exists():
            raise LogitCacheError(f"{path}: file {entry['path']} listed in the manifest is missing; the directory is damaged. {rebuild}")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise LogitCacheError(
                f"{path}: file {entry['path']} has {size} bytes, the manifest says {entry['bytes']} "
                f"(truncated or overwritten). {rebuild}"
            )
        try:
            meta = pq.ParquetFile(f).metadata
        except Exception as err:  # a damaged footer: pyarrow raises ArrowInvalid / OSError
            raise LogitCacheError(f"{path}: file {entry['path']} is not readable Parquet ({err}). {rebuild}") from err
        if meta.num_rows != entry["rows"]:
            raise LogitCacheError(f"{path}: file {entry['path']} holds {meta.num_rows} rows, the manifest says {entry['rows']}. {rebuild}")
        out.append(ManifestFile(f, meta.num_rows, size, entry.get("checksum"), footer_provenance(meta.metadata)))
    total = sum(f.rows for f in out)
    if total != manifest.get("rows"):
        raise LogitCacheError(f"{path}: files hold {total} rows, the manifest says {manifest.get('rows')}. {rebuild}")
    return out


def parent_manifest(path: str | Path) -> dict | None:
    """The manifest of the node output (teacher_logits, tokenized_dataset) that lists `path` as one of
    its splits, or None for a directory standing on its own."""
    path = Path(path).resolve()
    mf = path.parent / MANIFEST
    if not mf.exists():
        return None
    try:
        parent = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    splits = parent.get("splits") if isinstance(parent, dict) else None
    if parent.get("kind") in MULTI_SPLIT_KINDS and isinstance(splits, (dict, list)) and path.name in splits:
        return parent
    return None


def provenance_problems(path: Path, manifest: dict, files: Sequence[ManifestFile]) -> list[str]:
    """Where a split's manifest disagrees with the fingerprints stamped into its own files or with the
    manifest of the node output that lists it. The writer makes all of them from one value at one
    time, so any disagreement means a manifest was edited or files from another output were copied in."""
    problems = []
    for key in ("teacher_fingerprint", "tokenizer_fingerprint"):
        said = manifest.get(key)
        stamped: dict[str, list[str]] = {}
        for f in files:
            if key in f.provenance and f.provenance[key] != said:
                stamped.setdefault(f.provenance[key], []).append(f.path.name)
        for value, names in stamped.items():
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            problems.append(f"{path / MANIFEST} says {key.replace('_', ' ')} {said}, but its files were written "
                            f"with {value} ({names[0]}{more})")
    parent = parent_manifest(path)
    if parent is not None:
        for key in ("teacher_fingerprint", "tokenizer_fingerprint", "k"):
            if key in parent and key in manifest and parent[key] != manifest[key]:
                problems.append(f"{path / MANIFEST} says {key.replace('_', ' ')} {manifest[key]}, but the "
                                f"{parent['kind']} output's {Path(path).resolve().parent / MANIFEST} says {parent[key]}")
    return problems


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
        entries.append(_entry(directory, best, spans))
        used.add(best["path"])
        nxt += int(best["rows"])
    if nxt != expected_rows:
        raise RuntimeError(f"{directory}: written files overrun the expected {expected_rows} rows")
    for s in spans:
        if s["path"] not in used:
            (directory / s["path"]).unlink(missing_ok=True)
    return entries


def _entry(directory: Path, chosen: dict, spans: list[dict]) -> dict:
    """The manifest entry of a chosen file as it is on disk. Two writes of the same run of rows (a
    retried task) share its name and the last rename wins; a GPU teacher need not give the same bits
    twice, so when their checksums differ the file itself decides."""
    entry = {"path": chosen["path"], "rows": int(chosen["rows"]), "bytes": int(chosen["bytes"]),
             "checksum": chosen.get("checksum")}
    if len({s.get("checksum") for s in spans if s["path"] == chosen["path"]}) > 1:
        data = (directory / chosen["path"]).read_bytes()
        entry.update(bytes=len(data), checksum=file_checksum(data))
    return entry


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
        self._files = verify_files(self.path, manifest, self.kind)
        rows = np.array([f.rows for f in self._files], dtype=np.int64)
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
        return [f.path for f in self._files]

    def _damaged(self, f: ManifestFile, what: str) -> LogitCacheError:
        return LogitCacheError(f"{self.path}: file {f.path.name} {what}. {rebuild_hint(self.kind)}")

    def _read_file(self, f: ManifestFile):
        """A file's bytes, checked against its manifest checksum (when the manifest has one)."""
        import pyarrow as pa

        try:
            with pa.OSFile(str(f.path)) as handle:
                data = handle.read_buffer()
        except OSError as err:
            raise self._damaged(f, f"cannot be read ({err})") from err
        if f.checksum is not None:
            try:
                got = checksum_mismatch(f.checksum, data)
            except LogitCacheError as err:
                raise self._damaged(f, f"cannot be checked: {err}") from err
            if got is not None:
                raise self._damaged(f, f"does not match its checksum (the manifest says {f.checksum}, the file has "
                                       f"{got}): it was damaged after it was written")
        return data

    def verify_checksums(self) -> None:
        """Read every file once and check it against its manifest checksum, without decoding it: for
        a caller that hands the files to another reader (Ray Data) and wants damage named up front."""
        for f in self._files:
            if f.checksum is not None:
                self._read_file(f)

    def _check_values(self, f: ManifestFile, arrays: dict[str, np.ndarray]) -> None:
        """Subclasses: refuse decoded values no writer produces."""

    def _file_arrays(self, i: int) -> dict[str, np.ndarray]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        f = self._files[i]
        data = self._read_file(f)
        try:
            # The file checksum covers every page, so the page checksums are checked only without one
            # (they cost as much again: a second CRC over the same bytes).
            table = pq.read_table(pa.BufferReader(data), columns=list(self.columns),
                                  page_checksum_verification=f.checksum is None)
        except (OSError, pa.ArrowException) as err:  # a failed page CRC, a corrupt zstd frame, a bad page header
            raise self._damaged(f, f"is damaged ({err})") from err
        if table.num_rows != f.rows:
            raise self._damaged(f, f"holds {table.num_rows} rows, the manifest says {f.rows}")
        try:
            arrays = self._decode(table)
        except LogitCacheError as err:
            raise self._damaged(f, f"does not decode: {err}") from err
        want = np.arange(self._starts[i], self._starts[i] + f.rows)
        if not np.array_equal(arrays["row_id"], want):
            raise self._damaged(f, f"does not hold rows {want[0]}..{want[-1]} in order as the manifest implies")
        self._check_values(f, arrays)
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


def page_verifying_scan_options():
    """Ray Data / pyarrow.dataset scan options that check Parquet page checksums, with the buffered
    reads Ray Data uses by default (giving `fragment_scan_options` replaces its defaults)."""
    import pyarrow.dataset as pds

    return pds.ParquetFragmentScanOptions(page_checksum_verification=True, use_buffered_stream=True, buffer_size=8 << 20)


# Log-prob columns: a writer stores finite values only, so NaN or inf means a broken teacher or damage.
FINITE_COLUMNS = ("topk_logprobs", "rest_logprob")


# IEEE exponent bits of each float width: a value is NaN or inf exactly when its magnitude bits reach them.
_NONFINITE_BITS = {2: (np.uint16, 0x7FFF, 0x7C00), 4: (np.uint32, 0x7FFFFFFF, 0x7F800000)}
_CHUNK = 1 << 20


def _any_nonfinite(a: np.ndarray) -> bool:
    """np.isfinite(a).all() negated, ~10x faster on float16 (which numpy has no fast isfinite for),
    in chunks so a decoded file costs no full-size temporary; this runs on every file read."""
    bits = _NONFINITE_BITS.get(a.dtype.itemsize) if a.dtype.kind == "f" else None
    flat = np.ravel(a)
    if bits is None:
        return not bool(np.isfinite(flat).all())
    utype, magnitude, exponent = bits
    u = flat.view(utype)
    scratch = np.empty(min(_CHUNK, u.size), utype)
    for lo in range(0, u.size, _CHUNK):
        part = scratch[: min(_CHUNK, u.size - lo)]
        np.bitwise_and(u[lo : lo + _CHUNK], magnitude, out=part)
        if part.max() >= exponent:
            return True
    return False


def nonfinite_values(arrays: dict[str, np.ndarray]) -> tuple[str, int, int] | None:
    """(column, how many, first row id) of the first log-prob column holding NaN or inf, else None."""
    for column in FINITE_COLUMNS:
        a = arrays.get(column)
        if a is None or a.size == 0 or not _any_nonfinite(a):
            continue
        bad = ~np.isfinite(a)
        if bad.any():
            first = int(np.nonzero(bad.reshape(len(a), -1).any(axis=1))[0][0])
            return column, int(bad.sum()), int(arrays["row_id"][first])
    return None


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
        self.problems = provenance_problems(self.path, manifest, self._files)

    def _check_values(self, f, arrays):
        bad = nonfinite_values(arrays)
        if bad is not None:
            column, count, row = bad
            raise self._damaged(f, f"holds {count} non-finite values (NaN or inf) in {column}, the first in row {row}: "
                                   "the teacher that made it produced them (diverged or broken weights), or the file "
                                   "was damaged; a cache holds finite log-probs only")

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
        return sum(f.bytes for f in self._files)


def _check_kind(path: Path, manifest: dict, kind: str) -> None:
    _refuse_multi_split(path, manifest, "a single split")
    if manifest.get("kind") != kind:
        raise LogitCacheError(f"{path} holds {manifest.get('kind')!r}, not a {kind} directory")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LogitCacheError(
            f"{path} has format_version {manifest.get('format_version')}, this reader reads {FORMAT_VERSION}; rebuild it"
        )


def open_logit_cache(path: str | Path, expect_teacher_fingerprint: str | None = None,
                     expect_tokenizer_fingerprint: str | None = None, strict: bool = True, **reader_kwargs) -> LogitCache:
    """Open one split of a teacher logit cache, refusing it if incomplete, damaged, from another
    teacher / tokenizer than the caller expects, or (with `strict`) when its manifest contradicts the
    fingerprints stamped into its files or its node output's manifest; without `strict` those
    contradictions are left in `cache.problems` for the caller to report (`slimmoe logits inspect`).
    `reader_kwargs`: cache_bytes, shuffle_window_bytes."""
    path = Path(path)
    manifest = read_manifest(path)
    _check_kind(path, manifest, "logit_cache")
    cache = LogitCache(path, manifest, **reader_kwargs)
    # Contradictions first: when a manifest was edited, "the teacher changed" would be the wrong story.
    if strict and cache.problems:
        raise LogitCacheError(
            f"logit cache {path} contradicts itself: " + "; ".join(cache.problems) + ". A manifest was edited by hand "
            f"or files of another cache were copied in, so which teacher made it is unknown. {rebuild_hint('logit_cache')}"
        )
    for what, expected in (("teacher", expect_teacher_fingerprint), ("tokenizer", expect_tokenizer_fingerprint)):
        if expected is None:
            continue
        key = f"{what}_fingerprint"
        got = manifest.get(key)
        if got != expected:
            raise LogitCacheError(
                f"logit cache {path} was made with {what} fingerprint {got}, but {expected} is expected: "
                f"the {what} changed since the cache was built. Rebuild the cache for this {what} "
                "(rerun the teacher_logits node) or point at the cache made for it"
            )
        stamped = sorted({f.provenance[key] for f in cache._files if key in f.provenance} - {expected})
        if stamped:
            raise LogitCacheError(
                f"logit cache {path}: its manifest says {what} fingerprint {expected} as expected, but its files were "
                f"written with {stamped[0]}: the manifest was edited. {rebuild_hint('logit_cache')}"
            )
    return cache


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
