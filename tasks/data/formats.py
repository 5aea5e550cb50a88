"""The file formats of slimmoe's data outputs, and of the part of a stage's output a later stage
reads (`StageMetrics`), in one place, with their format version.

Token shards (the tokenize node) and logit caches (the teacher_logits node) are directories of
Parquet files plus a `manifest.json` written last; a node output with several splits has one such
directory per split and a manifest of its own that names them. Every writer builds its manifest
through the models below, and every reader checks a manifest's kind and version through them.

On-disk encoding of a logit cache row (one row per sequence of T tokens, top-k of K):
  row_id        int64            joins the row to the token shards' row of the same id
  input_ids     list<int32>      [T]
  topk_ids      binary           T*K little-endian uint16 (int32 when the vocabulary exceeds 65536)
  topk_logprobs binary           T*K little-endian float16, log-probs over the FULL vocabulary
  rest_logprob  binary           T little-endian float32, exact log-mass outside the top-k
The three per-token arrays are raw bytes rather than Parquet lists: a list column pays Parquet
definition/repetition levels for every element, which made decoding ~10x slower (0.3 s vs 0.03 s
for 1024 rows of 128x64 here), and the distillation loop reads this every step.

Integrity. Every Parquet file is written with page checksums (CRC-32 per data page) and its
manifest entry records `checksum`, "crc32:<8 hex digits>" of the whole file's bytes. Byte sizes
alone miss damage that keeps the size (a zeroed block), which decoded into NaN statistics or an
opaque zstd error far from the file. The file checksum is computed from the serialised bytes
before they reach the disk and checked wherever a reader loads a file whole; the page checksums
serve the readers that stream pages (Ray Data) and files whose manifest has no checksum. CRC-32
rather than a cryptographic hash: it is there to catch accidental damage, it is ~2.5x faster than
sha256 here, and nobody who can edit a manifest is kept out by a hash they can recompute.
Manifests written before checksums existed have no `checksum` and stay readable (the field is
optional, so FORMAT_VERSION stays 1). A logit cache's log-probs are finite: readers refuse NaN/inf.

A logit-cache file also carries its teacher and tokenizer fingerprints in its Parquet footer
(`slimmoe.teacher_fingerprint`, `slimmoe.tokenizer_fingerprint`), where the file checksum covers
them: a fingerprint edited in a manifest then disagrees with the files it lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from slimmoe.tasks.core.storage import file_checksum, write_bytes_atomic, write_json_atomic

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
LOGIT_CACHE_ENCODING = ("row_id int64; input_ids list<int32>[T]; topk_ids, topk_logprobs, rest_logprob: one binary "
                        "value per row holding little-endian [T, K] ids, [T, K] float16 log-probs over the full "
                        "vocabulary, [T] float32 log-mass outside the top-k")


class LogitCacheError(ValueError):
    """A token-shard or logit-cache directory that is incomplete, damaged, or from another model."""


# Parquet footer keys (file key-value metadata) a writer stamps its provenance under.
FOOTER_PREFIX = "slimmoe."

# How to rebuild a damaged directory of each kind, for the messages that refuse one.
REBUILD = {
    "logit_cache": "rerun the teacher_logits node (`slimmoe rerun CONFIG teacher_logits`), or run "
                   "`slimmoe teacher-logits` again for a cache made by hand",
    "token_shards": "rerun the tokenize node (`slimmoe rerun CONFIG tokenize`), or run `slimmoe tokenize` "
                    "again for shards made by hand",
}


def rebuild_hint(kind: str | None) -> str:
    return "Rebuild it: " + REBUILD.get(kind or "", "rerun the node that made it (`slimmoe rerun CONFIG NODE`)")


class FileEntry(BaseModel):
    path: str  # relative to the manifest's directory
    rows: int
    bytes: int
    checksum: Optional[str] = None  # "crc32:<hex>" of the file's bytes; absent in older manifests


class _Manifest(BaseModel):
    # Writers may record more than the readers need (provenance, timings): kept as written.
    model_config = ConfigDict(extra="allow")
    format_version: int = FORMAT_VERSION

    def write(self, directory: str | Path) -> dict:
        """Write it as `directory/manifest.json`, atomically; a directory is complete once this is there."""
        data = self.model_dump(mode="json")
        write_json_atomic(Path(directory) / MANIFEST, data)
        return data


class TokenShardsManifest(_Manifest):
    kind: Literal["token_shards"] = "token_shards"
    seq_len: int
    rows: int
    tokens: int
    tokenizer_fingerprint: Optional[str]
    eos_token_id: Optional[int] = None
    files: list[FileEntry]
    split: Optional[str] = None


class LogitCacheManifest(_Manifest):
    kind: Literal["logit_cache"] = "logit_cache"
    teacher_fingerprint: Optional[str]
    tokenizer_fingerprint: Optional[str]
    k: int
    seq_len: int
    vocab_size: int
    rows: int
    tokens: int
    dtypes: dict[str, str] = Field(default_factory=dict)
    files: list[FileEntry]
    split: Optional[str] = None
    eos_token_id: Optional[int] = None
    encoding: str = LOGIT_CACHE_ENCODING


class TokenizedDatasetManifest(_Manifest):
    """A tokenize node's output: one token-shards directory per split."""

    kind: Literal["tokenized_dataset"] = "tokenized_dataset"
    seq_len: int
    tokenizer_fingerprint: Optional[str]
    splits: dict[str, dict]
    tokenizer_path: Optional[str] = None
    eos_token_id: Optional[int] = None
    vocab_size: Optional[int] = None


class TeacherLogitsManifest(_Manifest):
    """A teacher_logits node's output: one logit cache per split."""

    kind: Literal["teacher_logits"] = "teacher_logits"
    splits: list[str]
    teacher_fingerprint: Optional[str]
    tokenizer_fingerprint: Optional[str]
    k: int
    vocab_size: int
    seq_len: int


STAGE_METRICS = "metrics.json"


class StageMetrics(BaseModel):
    """A stage output's metrics.json, as far as a later stage reads it: the tokens this stage left
    unspent by ending early, which the next stage adds to its budget. The rest (history, steps,
    memory per rank, the config) is a report and is kept as written. Files from before this model
    carry no kind or version and read as version 1."""

    model_config = ConfigDict(extra="allow")
    kind: Literal["stage_metrics"] = "stage_metrics"
    format_version: int = FORMAT_VERSION
    unspent_tokens: int = Field(0, ge=0)


def read_stage_metrics(model_dir: str | Path) -> StageMetrics | None:
    """The metrics of the stage that wrote `model_dir`; None when no stage did (a teacher, a model cut elsewhere)."""
    path = Path(model_dir) / STAGE_METRICS
    if not path.is_file():
        return None
    try:
        metrics = StageMetrics.model_validate_json(path.read_text())
    except ValueError as err:  # pydantic's ValidationError (bad JSON included) is a ValueError
        raise ValueError(f"{path} is not a stage's metrics file ({err}); the next stage's token budget depends on "
                         "it: rerun the stage that wrote it") from None
    if metrics.format_version != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {metrics.format_version}, this slimmoe reads {FORMAT_VERSION}; "
                         "rerun the stage that wrote it")
    return metrics


# Node outputs that hold one directory per split, and the single-split kind each holds.
MULTI_SPLIT_KINDS = {"tokenized_dataset": "token_shards", "teacher_logits": "logit_cache"}


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise LogitCacheError(f"{path} does not exist or is not a directory")
    mf = path / MANIFEST
    if not mf.exists():
        leftovers = sorted(p.name for p in path.glob("*.parquet"))
        what = f" ({len(leftovers)} Parquet files are there, but no manifest)" if leftovers else ""
        raise LogitCacheError(
            f"{path} has no {MANIFEST}: it is incomplete{what}, because the run that wrote it did not "
            "finish (the manifest is written last). Rebuild it: rerun the node that makes it "
            "(`slimmoe rerun CONFIG NODE`) or delete the directory and run again"
        )
    try:
        return json.loads(mf.read_text())
    except json.JSONDecodeError as err:
        raise LogitCacheError(f"{mf} is not valid JSON ({err}); rebuild {path}") from err


# -- checksummed Parquet files -------------------------------------------------------------------


def checksum_mismatch(expected: str, data) -> str | None:
    """None when `data` has the checksum `expected`, else the checksum it has."""
    algorithm = expected.split(":", 1)[0]
    if algorithm != "crc32":
        raise LogitCacheError(f"checksum {expected!r} uses {algorithm!r}, which this reader does not know; "
                              "upgrade slimmoe or rebuild the directory")
    got = file_checksum(data)
    return None if got == expected else got


def write_parquet_file(table, path: str | Path, provenance: dict[str, Optional[str]] | None = None,
                       **write_kwargs) -> dict:
    """Write `table` to `path` atomically (a temporary name, then a rename) with Parquet page checksums
    and `provenance` under FOOTER_PREFIX in the footer; return its manifest fields {"bytes", "checksum"}.
    The file is serialised in memory first so that the checksum is of exactly the bytes written, at
    no cost of reading them back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    stamp = {f"{FOOTER_PREFIX}{k}".encode(): str(v).encode() for k, v in (provenance or {}).items() if v is not None}
    if stamp:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **stamp})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, write_page_checksum=True, **write_kwargs)
    data = sink.getvalue()
    write_bytes_atomic(path, data)
    return {"bytes": data.size, "checksum": file_checksum(data)}


def footer_provenance(key_value_metadata: dict | None) -> dict[str, str]:
    """What `write_parquet_file` stamped into a footer, keys without the prefix (empty for older files)."""
    prefix = FOOTER_PREFIX.encode()
    return {k[len(prefix):].decode(): v.decode() for k, v in (key_value_metadata or {}).items() if k.startswith(prefix)}


# -- column encodings ------------------------------------------------------------------------------


def binary_column_to_numpy(column, dtype, per_row: int) -> np.ndarray:
    """A binary column whose every value is `per_row` items of `dtype`: [rows, per_row], zero-copy when possible."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    dtype = np.dtype(dtype)
    if n == 0:
        return np.zeros((0, per_row), dtype)
    if arr.null_count:
        raise LogitCacheError("a per-token column holds nulls; the cache is damaged, rebuild it")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64 if pa.types.is_large_binary(arr.type) else np.int32)
    offsets = offsets[arr.offset : arr.offset + n + 1]
    width = per_row * dtype.itemsize
    if offsets[-1] - offsets[0] != n * width or np.any(np.diff(offsets) != width):
        raise LogitCacheError(f"a per-token column holds values of the wrong length (expected {width} bytes per row); the cache is damaged")
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.view(dtype.newbyteorder("<")).reshape(n, per_row)


def numpy_to_binary_column(values: np.ndarray):
    """[rows, ...] array -> binary column with one value per row (little-endian raw bytes)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    if values.dtype.byteorder == ">":
        values = values.astype(values.dtype.newbyteorder("<"))
    n = values.shape[0]
    width = values[0].nbytes if n else 0
    offsets = np.arange(0, n * width + 1, width, dtype=np.int64)
    return pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(values.tobytes())])


def list_column_to_numpy(column, width: int, dtype=np.int32) -> np.ndarray:
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros((0, width), dtype)
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    if flat.size != n * width:
        raise LogitCacheError(f"a list column holds rows of the wrong length (expected {width} items per row)")
    return flat.astype(dtype, copy=False).reshape(n, width)


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)
