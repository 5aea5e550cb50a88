"""Text inputs: one place that recognises a data source and reads its documents.

Sources: plain text files (a file, a directory or a glob), JSONL files, Parquet files, a directory
saved by `datasets.Dataset.save_to_disk`, or a directory of token shards written by the tokenize
task (recognised by its `manifest.json`). The tokenize task reads the same sources with Ray Data;
this module is the single-process reader for calibration data and small jobs.
"""

from __future__ import annotations

import glob as globlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

TEXT_SUFFIXES = (".txt", ".text", ".md", ".py", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


class DataSourceError(ValueError):
    """A data source that is missing, empty, of an unknown kind, or lacks its text field."""


@dataclass(frozen=True)
class DataSource:
    kind: str  # "text" | "jsonl" | "parquet" | "hf_dataset" | "token_shards"
    files: tuple[str, ...]
    root: str

    @property
    def needs_tokenizer(self) -> bool:
        return self.kind != "token_shards"


def _expand(path: str) -> list[str]:
    if any(ch in path for ch in "*?["):
        return sorted(p for p in globlib.glob(path, recursive=True) if Path(p).is_file())
    p = Path(path)
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    return []


def detect_source(path: str | Path) -> DataSource:
    path = str(path)
    p = Path(path)
    if p.is_dir() and (p / "manifest.json").exists():
        manifest = json.loads((p / "manifest.json").read_text())
        if manifest.get("kind") == "tokenized_dataset":  # the tokenize task's output: use its train split
            return detect_source(p / "train")
        if manifest.get("kind") == "token_shards":
            return DataSource("token_shards", tuple(str(p / f["path"]) for f in manifest["files"]), path)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        return DataSource("hf_dataset", (), path)
    files = _expand(path)
    if not files:
        raise DataSourceError(f"data path {path!r} matches no files; give a file, a directory or a glob such as 'data/*.jsonl'")
    suffixes = {Path(f).suffix.lower() for f in files}
    for kind, allowed in (("parquet", PARQUET_SUFFIXES), ("jsonl", JSONL_SUFFIXES)):
        if suffixes <= set(allowed):
            return DataSource(kind, tuple(files), path)
    text_files = [f for f in files if Path(f).suffix.lower() in TEXT_SUFFIXES or not Path(f).suffix]
    if len(text_files) == len(files):
        return DataSource("text", tuple(files), path)
    raise DataSourceError(
        f"data path {path!r} mixes file kinds {sorted(suffixes)}; point it at one kind: text "
        f"({', '.join(TEXT_SUFFIXES)}), JSONL, Parquet, a saved `datasets` directory, or token shards"
    )


def check_text(value, text_field: str, where: str) -> str:
    if value is None:
        raise DataSourceError(f"text field {text_field!r} is missing in {where}; set text_field to the column holding the text")
    if not isinstance(value, str):
        raise DataSourceError(
            f"text field {text_field!r} in {where} holds {type(value).__name__}, not a string; "
            "set text_field to a column of strings"
        )
    return value


def iter_documents(source: DataSource, text_field: str = "text") -> Iterator[str]:
    """Every document of a text-bearing source, in a fixed order."""
    if source.kind == "text":
        for f in source.files:
            yield Path(f).read_text(encoding="utf-8", errors="replace")
    elif source.kind == "jsonl":
        for f in source.files:
            with open(f, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        yield check_text(json.loads(line).get(text_field), text_field, f"{f}:{lineno}")
    elif source.kind == "parquet":
        import pyarrow.parquet as pq

        for f in source.files:
            schema = pq.read_schema(f)
            if text_field not in schema.names:
                raise DataSourceError(
                    f"text field {text_field!r} is missing in {f} (columns: {', '.join(schema.names)}); set text_field"
                )
            for value in pq.read_table(f, columns=[text_field]).column(text_field).to_pylist():
                yield check_text(value, text_field, f)
    elif source.kind == "hf_dataset":
        for row_text in _hf_dataset_texts(source.root, text_field):
            yield row_text
    else:
        raise DataSourceError(f"{source.root} holds token shards, not text")


def _hf_dataset_texts(root: str, text_field: str) -> Iterator[str]:
    import datasets

    ds = datasets.load_from_disk(root)
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        ds = ds[split]
    if text_field not in ds.column_names:
        raise DataSourceError(
            f"text field {text_field!r} is missing in dataset {root} (columns: {', '.join(ds.column_names)}); set text_field"
        )
    for value in ds[text_field]:
        yield check_text(value, text_field, root)


def pack_sequences(token_lists: Iterable[list[int]], seq_len: int, eos_token_id: int | None) -> Iterator[list[int]]:
    """Concatenate documents with EOS after each and cut the stream into full `seq_len` rows
    (the incomplete tail is dropped)."""
    buf: list[int] = []
    for ids in token_lists:
        buf.extend(ids)
        if eos_token_id is not None:
            buf.append(eos_token_id)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]


def read_token_rows(source: DataSource, limit: int | None = None) -> list[list[int]]:
    """`input_ids` rows of token shards, in manifest order."""
    import pyarrow.parquet as pq

    rows: list[list[int]] = []
    for f in source.files:
        rows.extend(pq.read_table(f, columns=["input_ids"]).column("input_ids").to_pylist())
        if limit is not None and len(rows) >= limit:
            return rows[:limit]
    return rows
