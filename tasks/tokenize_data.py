"""The tokenize node: text documents -> packed, fixed-length token shards (train + validation).

Ray Data does the parallel work: read (per source kind) -> map_batches(decode, check, tokenize) on
an actor pool. The driver then consumes the tokenized documents *in input order* (files sorted by
path, records in file order; `preserve_order`) and packs them: EOS after each document, cut into
`seq_len` rows, the incomplete tail of each split dropped. It writes the rows as Parquet files with
fixed names (`part-00000.parquet`, ...), each written to a temporary name and renamed, then the
manifests, last.

Why packing runs on the driver rather than as another Ray stage: packing is a sequential scan
(where a row starts depends on every document before it), so doing it per Ray block would make
the rows depend on how Ray cut the data into blocks, which changes with the cluster size; a
shuffle by document key (groupby) would fix that but costs two all-to-all passes, ~a minute of
scheduling on a small machine for a few MB of text. The scan itself is cheap (numpy concatenation
and Parquet writes, I/O-bound at tens of millions of tokens per second), so tokenizing (the CPU-heavy
part) scales out while the output stays byte-for-byte reproducible. Writing the files ourselves
also gives deterministic names and atomic files, which `write_parquet` (uuid names, no atomicity)
does not.

The validation split is a fixed rule on content: a document goes to validation when the first 64
bits of the SHA-1 of its text fall under `validation_fraction`. The same input always gives the same
split, and duplicated documents never straddle train and validation.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .fingerprint import tokenizer_fingerprint
from .logit_cache import FORMAT_VERSION, MANIFEST
from .storage import ensure_free_output, write_json_atomic
from .text_sources import DataSource, DataSourceError, check_text, detect_source

SPLITS = ("train", "validation")


class TokenizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(..., description="text/JSONL/Parquet file, directory or glob, or a saved `datasets` directory")
    text_field: str = "text"
    seq_len: int = Field(512, ge=2)
    validation_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    rows_per_file: int = Field(8192, ge=1, description="rows per Parquet file")
    docs_per_batch: int = Field(256, ge=1)
    tokenize_workers: int = Field(1, ge=1, description="tokenizer actors (keep below the cluster's CPU count)")
    trust_remote_code: bool = False


# -- reading ---------------------------------------------------------------------------------------


def _first_json_line(path: str) -> tuple[int, str] | None:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                return lineno, line
    return None


def _parse_json_line(line: str, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataSourceError(f"{where} holds a line that is not JSON ({err}); JSONL needs one JSON object per line") from err
    if not isinstance(record, dict):
        raise DataSourceError(f"{where} holds a JSON {type(record).__name__}, not an object; JSONL needs one object per line")
    return check_text(record.get(text_field), text_field, where)


def _check_parquet_field(files: tuple[str, ...], text_field: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        schema = pq.read_schema(f)
        if text_field not in schema.names:
            raise DataSourceError(f"text field {text_field!r} is missing in {f} (columns: {', '.join(schema.names)}); set text_field")
        t = schema.field(text_field).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
            raise DataSourceError(f"text field {text_field!r} in {f} holds {t}, not a string; set text_field to a column of strings")


def _hf_dataset(root: str, text_field: str):
    import datasets

    ds = datasets.load_from_disk(root)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train" if "train" in ds else sorted(ds)[0]]
    if text_field not in ds.column_names:
        raise DataSourceError(f"text field {text_field!r} is missing in dataset {root} (columns: {', '.join(ds.column_names)}); set text_field")
    feature = ds.features[text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataSourceError(f"text field {text_field!r} in dataset {root} holds {feature}, not a string; set text_field to a column of strings")
    return ds.select_columns([text_field])


def check_source(source: DataSource, text_field: str):
    """Everything that can be checked before any work: returns the loaded `datasets` dataset if any."""
    if source.kind == "token_shards":
        raise DataSourceError(f"{source.root} already holds token shards; give the text the shards were made from")
    if source.kind == "parquet":
        _check_parquet_field(source.files, text_field)
    elif source.kind == "jsonl":
        first = next((hit for f in source.files if (hit := _first_json_line(f)) is not None), None)
        if first is None:
            raise DataSourceError(f"data {source.root} is empty: its JSONL files hold no lines")
        for f in source.files:  # the first record of each file: catches the usual wrong text_field early
            hit = _first_json_line(f)
            if hit is not None:
                _parse_json_line(hit[1], text_field, f"{f}:{hit[0]}")
    elif source.kind == "hf_dataset":
        ds = _hf_dataset(source.root, text_field)
        if len(ds) == 0:
            raise DataSourceError(f"dataset {source.root} is empty")
        return ds
    return None


def read_documents(source: DataSource, text_field: str, hf_dataset=None):
    """A Ray Dataset of raw records for `source`, plus the mode `_Tokenize` decodes them with.

    JSONL is read as text lines and parsed in Python rather than with `read_json`: Arrow's JSON
    reader infers one type per column across a block, so a stray non-string value anywhere in any
    field (not only the text field) fails the whole read with an Arrow type error."""
    import ray

    files = list(source.files)
    if source.kind == "text":
        return ray.data.read_binary_files(files, include_paths=True), "bytes"
    if source.kind == "jsonl":
        return ray.data.read_text(files, include_paths=True, drop_empty_lines=True), "jsonl"
    if source.kind == "parquet":
        ds = ray.data.read_parquet(files, include_paths=True, file_extensions=None)
        return ds.select_columns([text_field, "path"]), "column"
    if source.kind == "hf_dataset":
        return ray.data.from_huggingface(hf_dataset), "column"
    raise DataSourceError(f"cannot tokenize a {source.kind} source")


# -- tokenize and pack (run inside Ray workers) ----------------------------------------------------


class _Tokenize:
    """Decode and check records, assign each document its split by the SHA-1 of its text, tokenize."""

    def __init__(self, tokenizer, mode: str, text_field: str, root: str, validation_fraction: float):
        self.tok = tokenizer
        self.mode = mode
        self.text_field = text_field
        self.root = root
        self.threshold = int(validation_fraction * 2**64)

    def _texts(self, batch) -> list[str]:
        n = batch.num_rows
        paths = batch.column("path").to_pylist() if "path" in batch.column_names else [self.root] * n
        if self.mode == "bytes":
            return [b.decode("utf-8", errors="replace") for b in batch.column("bytes").to_pylist()]
        if self.mode == "jsonl":
            return [_parse_json_line(line, self.text_field, p) for line, p in zip(batch.column("text").to_pylist(), paths)]
        return [check_text(v, self.text_field, p) for v, p in zip(batch.column(self.text_field).to_pylist(), paths)]

    def __call__(self, batch):
        import pyarrow as pa

        texts = [t for t in self._texts(batch) if t]
        digests = [hashlib.sha1(t.encode("utf-8", errors="surrogatepass")).digest() for t in texts]
        ids = self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        return pa.table({
            "split": pa.array([int(int.from_bytes(d[:8], "big") < self.threshold) for d in digests], pa.int8()),
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
        })


# -- driver ----------------------------------------------------------------------------------------


def find_data_source_error(err: BaseException) -> DataSourceError | None:
    """The DataSourceError a Ray worker raised, however Ray wrapped it on the way back (the pipeline
    sets `raise_original_map_exception`, so Ray re-raises it as RayTaskError(DataSourceError), whose
    `.cause` is the original)."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is DataSourceError:
            return e
        stack.extend([e.__context__, e.__cause__, getattr(e, "cause", None)])
    return None


def ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)


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
        import pyarrow.parquet as pq

        block = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        out, rest = block[:n], block[n:]
        self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)
        offsets = pa.array(np.arange(0, n * self.seq_len + 1, self.seq_len, dtype=np.int32))
        table = pa.table({
            "row_id": pa.array(np.arange(self.rows, self.rows + n, dtype=np.int64)),
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(out.reshape(-1), pa.int32())),
        })
        name = f"part-{len(self.files):05d}.parquet"
        tmp = self.dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        pq.write_table(table, tmp)
        os.replace(tmp, self.dir / name)
        self.files.append({"path": name, "rows": n, "bytes": (self.dir / name).stat().st_size})
        self.rows += n

    def finish(self, tokenizer_fp: str, eos_token_id: int | None, extra: dict | None = None) -> dict:
        if self.pending_rows:
            self._flush(self.pending_rows)
        manifest = {"kind": "token_shards", "format_version": FORMAT_VERSION, "seq_len": self.seq_len,
                    "rows": self.rows, "tokens": self.rows * self.seq_len, "tokenizer_fingerprint": tokenizer_fp,
                    "eos_token_id": eos_token_id, "files": self.files, **(extra or {})}
        write_json_atomic(self.dir / MANIFEST, manifest)
        return manifest


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


def write_token_shards(split_dir: str | Path, rows, tokenizer_fp: str, eos_token_id: int | None = None,
                       rows_per_file: int = 8192, extra: dict | None = None) -> dict:
    """Token shards from ready rows ([N, T] ints): for tests, benchmarks and hand-made data."""
    rows = np.asarray(rows, dtype=np.int32)
    writer = ShardWriter(split_dir, rows.shape[1], rows_per_file)
    writer.add(rows)
    return writer.finish(tokenizer_fp, eos_token_id, extra)


def run_tokenize(cfg: TokenizeConfig, tokenizer_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Tokenize `cfg.data` with the tokenizer in `tokenizer_dir` into `out_dir`/{train,validation}."""
    from .calibration import load_tokenizer

    out_dir = Path(out_dir)
    ensure_free_output(out_dir)
    source = detect_source(cfg.data)
    hf = check_source(source, cfg.text_field)
    tok = load_tokenizer(tokenizer_dir, trust_remote_code=cfg.trust_remote_code)
    tok_fp = tokenizer_fingerprint(tokenizer_dir)
    eos = tok.eos_token_id

    import ray

    ensure_ray()
    packers = [Packer(cfg.seq_len, eos) for _ in SPLITS]
    writers = [ShardWriter(out_dir / name, cfg.seq_len, cfg.rows_per_file) for name in SPLITS]
    try:
        records, mode = read_documents(source, cfg.text_field, hf)
        docs = records.map_batches(
            _Tokenize, batch_format="pyarrow", batch_size=cfg.docs_per_batch,
            compute=ray.data.ActorPoolStrategy(size=cfg.tokenize_workers),
            fn_constructor_kwargs=dict(tokenizer=tok, mode=mode, text_field=cfg.text_field, root=source.root,
                                       validation_fraction=cfg.validation_fraction),
        )
        # Rows must not depend on which worker finished first: consume blocks in input order.
        docs.context.execution_options.preserve_order = True
        # A bad record raises DataSourceError in a worker: keep it, not a generic UserCodeException.
        docs.context.raise_original_map_exception = True
        for batch in docs.iter_batches(batch_format="pyarrow", batch_size=None):
            split = batch.column("split").to_numpy(zero_copy_only=False)
            ids = batch.column("input_ids")
            for s in range(len(SPLITS)):
                part = ids.filter(pa_mask(split == s)).combine_chunks()
                if len(part) == 0:
                    continue
                offs = part.offsets.to_numpy()
                flat = part.flatten().to_numpy(zero_copy_only=False)
                writers[s].add(packers[s].add(flat, (offs[1:] - offs[0]).astype(np.int64)))
    except Exception as err:
        found = find_data_source_error(err)
        if found is not None and found is not err:
            raise found from None
        raise
    if sum(p.documents for p in packers) == 0:
        raise DataSourceError(f"data {cfg.data} holds no documents (every file or record is empty)")
    for name, packer, writer in zip(SPLITS, packers, writers):
        if writer.rows + writer.pending_rows == 0:
            raise DataSourceError(
                f"the {name} split got {packer.documents} documents ({packer.tokens} tokens with EOS), not one full "
                f"sequence of seq_len={cfg.seq_len}; give more data or lower seq_len"
                + (", or raise validation_fraction" if name == "validation" else "")
            )
    split_info = {}
    for name, packer, writer in zip(SPLITS, packers, writers):
        m = writer.finish(tok_fp, eos, {"split": name, "documents": packer.documents, "dropped_tail_tokens": len(packer.tail)})
        split_info[name] = {"rows": m["rows"], "tokens": m["tokens"], "documents": packer.documents}
    manifest = {
        "kind": "tokenized_dataset", "format_version": FORMAT_VERSION, "seq_len": cfg.seq_len,
        "tokenizer_fingerprint": tok_fp, "tokenizer_path": str(Path(tokenizer_dir).resolve()), "eos_token_id": eos,
        "vocab_size": len(tok), "splits": split_info,
        "source": {"path": cfg.data, "kind": source.kind, "text_field": cfg.text_field}, "config": cfg.model_dump(),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return {
        "train_rows": split_info["train"]["rows"], "validation_rows": split_info["validation"]["rows"],
        "train_tokens": split_info["train"]["tokens"], "validation_tokens": split_info["validation"]["tokens"],
        "documents": sum(v["documents"] for v in split_info.values()), "seq_len": cfg.seq_len,
        "tokenizer_fingerprint": tok_fp,
    }


def pa_mask(values: np.ndarray):
    import pyarrow as pa

    return pa.array(values, pa.bool_())


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
    manifest = {"kind": "tokenized_dataset", "format_version": FORMAT_VERSION, "seq_len": seq_len,
                "tokenizer_fingerprint": tokenizer_fp, "tokenizer_path": tokenizer_path, "eos_token_id": eos_token_id,
                "vocab_size": vocab_size, "splits": info}
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest
