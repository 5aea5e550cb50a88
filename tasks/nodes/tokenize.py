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

A blend (`data.sources`) runs one such pipeline per source and interleaves their documents on the
driver by the rule in `tasks/data/blend.py` (each source's tokens follow its weight; nothing is
repeated); the manifest records each source's realised share.

The validation split is a fixed rule on content: a document goes to validation when the first 64
bits of the SHA-1 of its text fall under `validation_fraction`. The same input always gives the same
split, and duplicated documents never straddle train and validation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from slimmoe.tasks.core.fingerprint import tokenizer_fingerprint
from slimmoe.tasks.core.runtime import Progress, ensure_ray, quiet_ray_data_progress
from slimmoe.tasks.core.storage import ensure_free_output
from slimmoe.tasks.data.blend import Blend
from slimmoe.tasks.data.calibration import load_tokenizer
from slimmoe.tasks.data.config import TokenizeConfig
from slimmoe.tasks.data.formats import TokenizedDatasetManifest
from slimmoe.tasks.data.packing import Packer
from slimmoe.tasks.data.shards import ShardWriter
from slimmoe.tasks.data.sources import (DataSource, DataSourceError, check_source, check_text, decode_text, detect_source,
                                        parse_json_line, readable_text_files)

SPLITS = ("train", "validation")
SKIPPED = len(SPLITS)  # the split code of a file a worker skipped as unreadable: counted, never packed


def read_documents(source: DataSource, text_field: str, hf_dataset=None):
    """A Ray Dataset of raw records for `source`, plus the mode `_Tokenize` decodes them with.

    JSONL is read as text lines and parsed in Python rather than with `read_json`: Arrow's JSON
    reader infers one type per column across a block, so a stray non-string value anywhere in any
    field (not only the text field) fails the whole read with an Arrow type error."""
    import ray

    files, fs = list(source.files), source.filesystem  # fs: a URI's filesystem, None for local files
    if source.kind == "text":
        return ray.data.read_binary_files(files, include_paths=True, filesystem=fs), "bytes"
    if source.kind == "jsonl":
        return ray.data.read_text(files, include_paths=True, drop_empty_lines=True, filesystem=fs), "jsonl"
    if source.kind == "parquet":
        ds = ray.data.read_parquet(files, include_paths=True, file_extensions=None, filesystem=fs)
        return ds.select_columns([text_field, "path"]), "column"
    if source.kind == "hf_dataset":
        return ray.data.from_huggingface(hf_dataset), "column"
    raise DataSourceError(f"cannot tokenize a {source.kind} source")


# -- tokenize and pack (run inside Ray workers) ----------------------------------------------------


class _Tokenize:
    """Decode and check records, assign each document its split by the SHA-1 of its text, tokenize."""

    def __init__(self, tokenizer, mode: str, text_field: str, root: str, validation_fraction: float,
                 skip_unreadable: bool = False, prefix: str = ""):
        self.tok = tokenizer
        self.prefix = prefix  # a URI source's scheme, so messages name `s3://bucket/key`
        self.mode = mode
        self.skip_unreadable = skip_unreadable
        self.text_field = text_field
        self.root = root
        self.threshold = int(validation_fraction * 2**64)

    def _texts(self, batch) -> list[str]:
        n = batch.num_rows
        paths = ([self.prefix + p for p in batch.column("path").to_pylist()] if "path" in batch.column_names
                 else [self.root] * n)
        if self.mode == "bytes":
            return [decode_text(b, p, self.skip_unreadable) for b, p in zip(batch.column("bytes").to_pylist(), paths)]
        if self.mode == "jsonl":
            return [parse_json_line(line, self.text_field, p) for line, p in zip(batch.column("text").to_pylist(), paths)]
        return [check_text(v, self.text_field, p) for v, p in zip(batch.column(self.text_field).to_pylist(), paths)]

    def __call__(self, batch):
        import pyarrow as pa

        raw = self._texts(batch)
        skipped = sum(t is None for t in raw)  # files past the driver's head check that are not text either
        texts = [t for t in raw if t]
        digests = [hashlib.sha1(t.encode("utf-8", errors="surrogatepass")).digest() for t in texts]
        ids = self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        splits = [int(int.from_bytes(d[:8], "big") < self.threshold) for d in digests] + [SKIPPED] * skipped
        return pa.table({
            "split": pa.array(splits, pa.int8()),
            "input_ids": pa.array(ids + [[]] * skipped, pa.list_(pa.int32())),
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


def checked_sources(cfg: TokenizeConfig) -> list[tuple[DataSource, list[str], Any]]:
    """Every source of the blend, listed and checked before Ray starts: (source, the unreadable text
    files left out, the loaded `datasets` dataset if any)."""
    out = []
    for part in cfg.blend():
        source, unreadable = readable_text_files(detect_source(part.path), cfg.skip_unreadable)
        out.append((source, unreadable, check_source(source, cfg.text_field)))
    return out


def _tokenized(source: DataSource, hf, cfg: TokenizeConfig, tok):
    """One source's tokenized documents, in input order, as a Ray Dataset."""
    import ray

    records, mode = read_documents(source, cfg.text_field, hf)
    docs = records.map_batches(
        _Tokenize, batch_format="pyarrow", batch_size=cfg.docs_per_batch,
        compute=ray.data.ActorPoolStrategy(size=cfg.tokenize_workers),
        fn_constructor_kwargs=dict(tokenizer=tok, mode=mode, text_field=cfg.text_field, root=source.root,
                                   validation_fraction=cfg.validation_fraction,
                                   skip_unreadable=cfg.skip_unreadable, prefix=source.prefix),
    )
    # Rows must not depend on which worker finished first: consume blocks in input order.
    docs.context.execution_options.preserve_order = True
    # A bad record raises DataSourceError in a worker: keep it, not a generic UserCodeException.
    docs.context.raise_original_map_exception = True
    quiet_ray_data_progress(docs.context)
    return docs


def run_tokenize(cfg: TokenizeConfig, tokenizer_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Tokenize `cfg.source` (or the blend `cfg.sources`) with the tokenizer in `tokenizer_dir` into
    `out_dir`/{train,validation}."""
    out_dir = Path(out_dir)
    ensure_free_output(out_dir)
    sources = checked_sources(cfg)
    for source, _, _ in sources:
        if (note := source.checked_note()) is not None:
            print(f"tokenize: {note}")
    tok = load_tokenizer(tokenizer_dir, trust_remote_code=cfg.trust_remote_code)
    tok_fp = tokenizer_fingerprint(tokenizer_dir)
    eos = tok.eos_token_id

    import pyarrow as pa

    ensure_ray()
    packers = [Packer(cfg.seq_len, eos) for _ in SPLITS]
    writers = [ShardWriter(out_dir / name, cfg.seq_len, cfg.rows_per_file) for name in SPLITS]
    blend = None
    try:
        streams = [_tokenized(source, hf, cfg, tok).iter_batches(batch_format="pyarrow", batch_size=None)
                   for source, _, hf in sources]
        if len(streams) > 1:
            blend = Blend(streams, [part.weight for part in cfg.blend()], skipped=SKIPPED)
        progress = Progress("tokenize", None, "documents")
        skipped_late = 0
        for batch in blend if blend is not None else streams[0]:
            split = batch.column("split").to_numpy(zero_copy_only=False)
            skipped_late += int((split == SKIPPED).sum())
            ids = batch.column("input_ids")
            for s in range(len(SPLITS)):
                part = ids.filter(pa.array(split == s, pa.bool_())).combine_chunks()
                if len(part) == 0:
                    continue
                offs = part.offsets.to_numpy()
                flat = part.flatten().to_numpy(zero_copy_only=False)
                writers[s].add(packers[s].add(flat, (offs[1:] - offs[0]).astype(np.int64)))
            progress.advance(len(split))
        progress.finish()
    except Exception as err:
        found = find_data_source_error(err)
        if found is not None and found is not err:
            raise found from None
        raise
    if sum(p.documents for p in packers) == 0:
        raise DataSourceError(f"data {_named(cfg)} holds no documents (every file or record is empty)")
    for name, packer, writer in zip(SPLITS, packers, writers):
        if writer.rows + writer.pending_rows == 0:
            raise DataSourceError(
                f"the {name} split got {packer.documents} documents ({packer.tokens} tokens with EOS), not one full "
                f"sequence of seq_len={cfg.seq_len}; give more data or lower seq_len"
                + (", or raise validation_fraction" if name == "validation" else "")
            )
    skipped = sum(len(unreadable) for _, unreadable, _ in sources) + skipped_late
    split_info = {}
    for name, packer, writer in zip(SPLITS, packers, writers):
        m = writer.finish(tok_fp, eos, {"split": name, "documents": packer.documents, "dropped_tail_tokens": len(packer.tail)})
        split_info[name] = {"rows": m["rows"], "tokens": m["tokens"], "documents": packer.documents}
    TokenizedDatasetManifest(
        seq_len=cfg.seq_len, tokenizer_fingerprint=tok_fp, tokenizer_path=str(Path(tokenizer_dir).resolve()),
        eos_token_id=eos, vocab_size=len(tok), splits=split_info,
        source={**_source_record(cfg, sources, blend), "text_field": cfg.text_field,
                **({"skipped_unreadable_files": skipped} if cfg.skip_unreadable else {})}, config=cfg.model_dump(),
    ).write(out_dir)
    return {
        "train_rows": split_info["train"]["rows"], "validation_rows": split_info["validation"]["rows"],
        "train_tokens": split_info["train"]["tokens"], "validation_tokens": split_info["validation"]["tokens"],
        "documents": sum(v["documents"] for v in split_info.values()), "seq_len": cfg.seq_len,
        "tokenizer_fingerprint": tok_fp, **({"skipped_unreadable_files": skipped} if cfg.skip_unreadable else {}),
        **({"blend": {r["path"]: r["share"] for r in _source_record(cfg, sources, blend)["blend"]}} if blend else {}),
    }


def _named(cfg: TokenizeConfig) -> str:
    return cfg.source or ", ".join(part.path for part in cfg.blend())


def _source_record(cfg: TokenizeConfig, sources: list, blend: Blend | None) -> dict:
    """What the manifest says about the input: the source, or each source of the blend with its share."""
    if blend is None:
        return {"path": cfg.source, "kind": sources[0][0].kind}
    parts = cfg.blend()
    report = blend.report([part.path for part in parts], [part.weight for part in parts])
    for row, (source, _, _) in zip(report, sources):
        row["kind"] = source.kind
    return {"blend": report, "rule": "documents interleaved so each source's tokens follow its weight; ends "
                                     "when the source needed next runs out (tasks/data/blend.py)"}


