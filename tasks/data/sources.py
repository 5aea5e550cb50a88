"""Text inputs: one place that recognises a data source and reads its documents.

Sources: plain text files (a file, a directory or a glob), JSONL files, Parquet files, a directory
saved by `datasets.Dataset.save_to_disk`, or a directory of token shards written by the tokenize
task (recognised by its `manifest.json`); `check_source` checks what
can be checked before any work (the text field, the first record of each file). The tokenize task reads the same sources with Ray Data;
this module is the single-process reader for calibration data and small jobs.
"""

from __future__ import annotations

import codecs
import glob as globlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

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


# What the cheap check reads of each text file (validation, and the tokenize driver before Ray starts):
# a binary file shows itself in its first bytes; the rest is checked as the file is decoded.
HEAD_BYTES = 1 << 16
UNREADABLE_FIX = "remove it from the data, or set skip_unreadable: true (data.skip_unreadable) to skip such files"


def text_problem(data: bytes, complete: bool = True) -> str | None:
    """Why `data` is not text to train on (a NUL byte, bytes that are not UTF-8), or None. `complete`:
    `data` is the whole file, so a multi-byte character cut at its end is an error too."""
    nul = data.find(b"\0")
    if nul >= 0:
        return f"holds a NUL byte at offset {nul}: it is a binary file, not text"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=complete)
    except UnicodeDecodeError as err:
        return f"is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
    return None


def decode_text(data: bytes, path: str, skip: bool = False) -> str | None:
    """A text file's contents; a file that is not text raises naming it (None with `skip`), where a
    lenient decode would train on U+FFFD characters."""
    problem = text_problem(data)
    if problem is None:
        return data.decode("utf-8")
    if skip:
        return None
    raise DataSourceError(f"{path} {problem}; {UNREADABLE_FIX}")


def readable_text_files(source: DataSource, skip: bool = False) -> tuple[DataSource, list[str]]:
    """`source` without the text files whose first HEAD_BYTES are not text, and those files. Without
    `skip` the first such file is refused by name (with a count of the others)."""
    if source.kind != "text":
        return source, []
    bad = []
    for f in source.files:
        with open(f, "rb") as fh:
            head = fh.read(HEAD_BYTES)
        problem = text_problem(head, complete=len(head) < HEAD_BYTES)
        if problem is not None:
            bad.append((f, problem))
    if bad and not skip:
        others = f" (and {len(bad) - 1} more file{'s' if len(bad) > 2 else ''} of the {len(source.files)})" \
            if len(bad) > 1 else ""
        raise DataSourceError(f"{bad[0][0]} {bad[0][1]}{others}; {UNREADABLE_FIX}")
    if len(bad) == len(source.files):
        raise DataSourceError(f"data {source.root}: none of its {len(bad)} files is text ({bad[0][0]} "
                              f"{bad[0][1]}); point data.source at text files")
    skipped = {f for f, _ in bad}
    return replace(source, files=tuple(f for f in source.files if f not in skipped)), sorted(skipped)


def check_text(value, text_field: str, where: str) -> str:
    if value is None:
        raise DataSourceError(f"text field {text_field!r} is missing in {where}; set text_field to the column holding the text")
    if not isinstance(value, str):
        raise DataSourceError(
            f"text field {text_field!r} in {where} holds {type(value).__name__}, not a string; "
            "set text_field to a column of strings"
        )
    return value


def _first_json_line(path: str) -> tuple[int, str] | None:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                return lineno, line
    return None


def _locate(path: str, line: str) -> tuple[int, bool, bool] | None:
    """(line number, whether it is the file's first record, whether it is the whole line) of `line` in
    `path`, or None.

    Ray Data's `read_text` hands a worker a file's lines without their numbers; a bad line is looked up
    here, on the error path only, so a clean corpus is never read twice. The first line equal to it is
    where reading fails first. Ray splits lines with `str.splitlines`, which also breaks at U+2028,
    U+2029 and U+0085, characters a JSON string may hold raw: such a fragment is found inside its line."""
    target = line.strip()
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            first, containing = None, None
            for lineno, text in enumerate(fh, 1):
                text = text.strip()
                if not text:
                    continue
                first = first or lineno
                if text == target:
                    return lineno, lineno == first, True
                if containing is None and target and target in text:
                    containing = (lineno, lineno == first, False)
            return containing
    except OSError:  # a path this process cannot open: the bare file name is all there is to say
        return None


def parse_json_line(line: str, text_field: str, where: str, first: bool = False) -> str:
    """The text of one JSONL record. `where` is `file:line`, or a bare file for a line Ray Data read
    (the line is then found in the file, see `_locate`). `first`: the file's first record, where a
    missing text field means text_field names no field of the data; past it (the first record of each
    file is checked before any work), the field is missing on that line, not in the data."""
    try:
        record = json.loads(line.rstrip("\r\n"))  # the newline would be read as part of an unterminated string
        problem = None if isinstance(record, dict) else f"holds a JSON {type(record).__name__}, not an object"
    except json.JSONDecodeError as err:
        record, problem = None, f"is not JSON ({err.msg}: column {err.colno})"
    value = record.get(text_field) if isinstance(record, dict) else None
    if problem is None and isinstance(value, str):
        return value
    if Path(where).is_file() and (found := _locate(where, line)) is not None:
        where, first = f"{where}:{found[0]}", found[1]
        if not found[2]:
            raise DataSourceError(
                f"{where} holds a raw line separator (U+2028, U+2029 or U+0085) in a string, where the tokenize "
                "reader splits lines; write it escaped (\\u2028), as json.dumps does unless ensure_ascii=False")
    if problem is not None:
        raise DataSourceError(f"{where} {problem}; JSONL needs one JSON object per line: fix or remove that line")
    held = type(value).__name__ if value is not None else "null"
    if text_field in record:
        fix = ("set text_field to a key of strings" if first else
               "the file's first record holds a string there: fix or remove that line")
        raise DataSourceError(f"text field {text_field!r} in {where} holds {held}, not a string; {fix}")
    keys = (", ".join(list(record)[:8]) + (" ..." if len(record) > 8 else "")) or "none"
    fix = ("set text_field to the key holding the text" if first else
           "the file's first record has it, so this line lacks it: fix or remove that line")
    raise DataSourceError(f"text field {text_field!r} is missing in {where} (its keys: {keys}); {fix}")


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


def load_hf_dataset(root: str, text_field: str):
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
                parse_json_line(hit[1], text_field, f"{f}:{hit[0]}", first=True)
    elif source.kind == "hf_dataset":
        ds = load_hf_dataset(source.root, text_field)
        if len(ds) == 0:
            raise DataSourceError(f"dataset {source.root} is empty")
        return ds
    return None


def iter_documents(source: DataSource, text_field: str = "text") -> Iterator[str]:
    """Every document of a text-bearing source, in a fixed order."""
    if source.kind == "text":
        for f in source.files:
            yield decode_text(Path(f).read_bytes(), f)
    elif source.kind == "jsonl":
        for f in source.files:
            with open(f, encoding="utf-8") as fh:
                first = True
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        yield parse_json_line(line, text_field, f"{f}:{lineno}", first=first)
                        first = False
    elif source.kind == "parquet":
        import pyarrow.parquet as pq

        _check_parquet_field(source.files, text_field)
        for f in source.files:
            for value in pq.read_table(f, columns=[text_field]).column(text_field).to_pylist():
                yield check_text(value, text_field, f)
    elif source.kind == "hf_dataset":
        for value in load_hf_dataset(source.root, text_field)[text_field]:
            yield check_text(value, text_field, source.root)
    else:
        raise DataSourceError(f"{source.root} holds token shards, not text")


def read_token_rows(source: DataSource, limit: int | None = None) -> list[list[int]]:
    """`input_ids` rows of token shards, in manifest order."""
    import pyarrow.parquet as pq

    rows: list[list[int]] = []
    for f in source.files:
        rows.extend(pq.read_table(f, columns=["input_ids"]).column("input_ids").to_pylist())
        if limit is not None and len(rows) >= limit:
            return rows[:limit]
    return rows
