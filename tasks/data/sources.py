"""Text inputs: one place that recognises a data source and reads its documents.

Sources: plain text files (a file, a directory or a glob), JSONL files, Parquet files, a directory
saved by `datasets.Dataset.save_to_disk`, or a directory of token shards written by the tokenize
task (recognised by its `manifest.json`); `check_source` checks what
can be checked before any work (the text field, the first record of each file). The tokenize task reads the same sources with Ray Data;
this module is the single-process reader for calibration data and small jobs.

Text, JSONL and Parquet may also live at a URI: `s3://`, `gs://` (pyarrow's filesystems, with the
credentials and endpoint the environment or the URI's query gives, as the workflow's storage), or
`hf://datasets/org/name/...` (huggingface_hub's filesystem). Such a source is listed once; its files
are then read through the same pyarrow filesystem here and by Ray Data.
"""

from __future__ import annotations

import codecs
import glob as globlib
import hashlib
import io
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

TEXT_SUFFIXES = (".txt", ".text", ".md", ".py", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


class DataSourceError(ValueError):
    """A data source that is missing, empty, of an unknown kind, or lacks its text field."""


class DataAccessError(DataSourceError):
    """A URI whose filesystem cannot be opened or listed from here (credentials, network, scheme): a
    machine planning a cluster's workflow may simply lack the access the cluster has."""


# A remote source's first records are checked in this many files (the first by path); tokenize checks
# every record as it reads. A local file's first record costs microseconds, a remote one a request.
REMOTE_CHECKED_FILES = 32


@dataclass(frozen=True)
class DataSource:
    kind: str  # "text" | "jsonl" | "parquet" | "hf_dataset" | "token_shards"
    files: tuple[str, ...]  # OS paths; for a URI, the paths of its pyarrow filesystem (bucket/key)
    root: str
    filesystem: Any = field(default=None, compare=False)  # a URI's pyarrow filesystem; None: local files
    listing: tuple = ()  # a URI's files as (path, size, mtime in ns), from the one listing
    prefix: str = ""  # what makes a filesystem path a URI again (`s3://`), for messages

    @property
    def remote(self) -> bool:
        return self.filesystem is not None

    def display(self, path: str) -> str:
        return self.prefix + path

    def open(self, path: str):
        """A binary, line-iterable reader of one file."""
        if not self.remote:
            return open(path, "rb")
        return io.BufferedReader(self.filesystem.open_input_stream(path), HEAD_BYTES)

    def checked_files(self) -> tuple[str, ...]:
        return self.files[:REMOTE_CHECKED_FILES] if self.remote else self.files

    def checked_note(self) -> str | None:
        """Which files the checks before any work read, where not all of them."""
        n = len(self.checked_files())
        if n == len(self.files):
            return None
        return (f"{self.root}: first records checked in {n} of {len(self.files)} files (the first {n} by path); "
                "tokenize checks every record as it reads")

    def total_bytes(self) -> int | None:
        if self.remote:
            return sum(size for _, size, _ in self.listing)
        if self.kind in ("text", "jsonl", "parquet"):
            return sum(Path(f).stat().st_size for f in self.files)
        return None

    def text_bytes(self, text_field: str) -> int | None:
        """About how many bytes of text the source holds, from its listing: the files' bytes (JSONL's keys
        and escapes included), Parquet's scaled by the text column's uncompressed share of the checked
        files (their footers). None where unknown (a saved dataset, token shards)."""
        total = self.total_bytes()
        if total is None or self.kind != "parquet":
            return total
        import pyarrow.parquet as pq

        text, stored = 0, 0
        for path in self.checked_files():
            meta = pq.read_metadata(path, filesystem=self.filesystem)
            names = [meta.schema.column(c).name for c in range(meta.num_columns)]
            column = names.index(text_field) if text_field in names else None
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                stored += sum(group.column(c).total_compressed_size for c in range(group.num_columns))
                text += group.column(column).total_uncompressed_size if column is not None else 0
        return int(total * text / stored) if stored else total

    def fingerprint(self) -> str | None:
        """A URI source's identity for the tokenize key: every file's path, size and modification time,
        so a changed corpus is tokenized again. None for local data, whose key is its path (as before)."""
        if not self.remote:
            return None
        lines = "\n".join(f"{p}\t{size}\t{mtime}" for p, size, mtime in self.listing)
        return hashlib.sha256(lines.encode()).hexdigest()[:16]


_LOCAL_SCHEMES = ("file", "local")


def is_remote(path: str) -> bool:
    return "://" in path and urlsplit(path).scheme not in _LOCAL_SCHEMES


def _local(path: str) -> str:
    """A `file://` URI as the OS path it names; anything else unchanged."""
    if "://" in path and urlsplit(path).scheme in _LOCAL_SCHEMES:
        return unquote(urlsplit(path).path)
    return path


def _filesystem(uri: str):
    """(pyarrow filesystem, path on it, URI prefix) of a data URI. S3 and GCS come from
    `FileSystem.from_uri` on the bucket alone (with the URI's query: endpoint_override, region, scheme),
    so glob characters in the key never reach pyarrow's URI parser; hf:// is huggingface_hub's
    fsspec filesystem behind pyarrow's adapter."""
    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    try:
        if parts.scheme == "hf":
            from huggingface_hub import HfFileSystem

            return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem())), unquote(parts.netloc + parts.path), "hf://"
        bucket = f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
        fs, _ = pafs.FileSystem.from_uri(bucket)
    except Exception as err:  # pyarrow raises several types for unknown schemes and missing credentials
        raise DataAccessError(f"data {uri!r} cannot be opened ({type(err).__name__}: {err}); give a URI pyarrow "
                              "reads (s3://bucket/prefix, gs://..., hf://datasets/org/name/...) and its credentials "
                              "(AWS_* variables or AWS_ENDPOINT_URL / ?endpoint_override= for an S3-compatible "
                              "store)") from err
    return fs, unquote(parts.netloc + parts.path), f"{parts.scheme}://"


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob as `glob.glob(recursive=True)` reads it: `*` within one path component, `**/` any depth.
    (No `?`: in a URI it starts the query.)"""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 1)) > i:
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _list_remote(fs, path: str) -> list:
    """The FileInfos of a URI's files (a file, every file under a prefix, or a glob's matches), from
    one listing; names starting with a dot are left out, as locally."""
    import pyarrow.fs as pafs

    path = path.rstrip("/")  # a prefix written as a directory (`s3://bucket/corpus/`)
    parts = path.split("/")
    glob_at = next((i for i, part in enumerate(parts) if any(ch in part for ch in "*[")), None)
    if glob_at is None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [info]
        if info.type != pafs.FileType.Directory:
            return []
        base, match = path, None
    else:
        base, match = "/".join(parts[:glob_at]), _glob_regex(path)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(".")
                   and (match is None or match.match(i.path))), key=lambda i: i.path)


def _detect_remote(uri: str) -> DataSource:
    fs, path, prefix = _filesystem(uri)
    try:
        infos = _list_remote(fs, path)
    except Exception as err:  # OSError from pyarrow: access denied, no such bucket, network
        raise DataAccessError(f"data {uri!r} cannot be listed ({type(err).__name__}: {err}); check the URI and "
                              "that this machine has the credentials to read it") from err
    if not infos:
        raise DataSourceError(f"data path {uri!r} matches no files; give a file, a prefix or a glob such as "
                              "'s3://bucket/corpus/*.jsonl'")
    files = [i.path for i in infos]
    listing = tuple((i.path, i.size, i.mtime_ns or 0) for i in infos)
    return DataSource(_kind_of(uri, files), tuple(files), uri, filesystem=fs, listing=listing, prefix=prefix)


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
    path = _local(str(path))
    if is_remote(path):
        return _detect_remote(path)
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
    return DataSource(_kind_of(path, files), tuple(files), path)


def _kind_of(path: str, files: list[str]) -> str:
    """text, jsonl or parquet, by the files' suffixes (one kind per source)."""
    suffixes = {Path(f).suffix.lower() for f in files}
    for kind, allowed in (("parquet", PARQUET_SUFFIXES), ("jsonl", JSONL_SUFFIXES)):
        if suffixes <= set(allowed):
            return kind
    if all(Path(f).suffix.lower() in TEXT_SUFFIXES or not Path(f).suffix for f in files):
        return "text"
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
    for f in source.checked_files():  # a remote file past them is checked as tokenize decodes it
        with source.open(f) as fh:
            head = fh.read(HEAD_BYTES)
        problem = text_problem(head, complete=len(head) < HEAD_BYTES)
        if problem is not None:
            bad.append((source.display(f), problem))
    if bad and not skip:
        others = f" (and {len(bad) - 1} more file{'s' if len(bad) > 2 else ''} of the {len(source.files)})" \
            if len(bad) > 1 else ""
        raise DataSourceError(f"{bad[0][0]} {bad[0][1]}{others}; {UNREADABLE_FIX}")
    if len(bad) == len(source.files):
        raise DataSourceError(f"data {source.root}: none of its {len(bad)} files is text ({bad[0][0]} "
                              f"{bad[0][1]}); point data.source at text files")
    skipped = {f for f, _ in bad}
    return (replace(source, files=tuple(f for f in source.files if source.display(f) not in skipped)),
            sorted(skipped))


def check_text(value, text_field: str, where: str) -> str:
    if value is None:
        raise DataSourceError(f"text field {text_field!r} is missing in {where}; set text_field to the column holding the text")
    if not isinstance(value, str):
        raise DataSourceError(
            f"text field {text_field!r} in {where} holds {type(value).__name__}, not a string; "
            "set text_field to a column of strings"
        )
    return value


def _first_json_line(source: DataSource, path: str) -> tuple[int, str] | None:
    with source.open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    return lineno, line.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataSourceError(f"{source.display(path)}:{lineno} is not UTF-8 text (byte "
                                          f"0x{line[err.start]:02x}); JSONL is UTF-8: fix or remove that line") from None
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


def _check_parquet_field(source: DataSource, files: tuple[str, ...], text_field: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        schema = pq.read_schema(path, filesystem=source.filesystem)
        f = source.display(path)
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
        _check_parquet_field(source, source.checked_files(), text_field)
    elif source.kind == "jsonl":
        hits = [hit for f in source.checked_files() if (hit := _first_json_line(source, f)) is not None]
        if not hits and len(source.checked_files()) == len(source.files):
            raise DataSourceError(f"data {source.root} is empty: its JSONL files hold no lines")
        for f in source.checked_files():  # the first record of each file: catches the usual wrong text_field early
            hit = _first_json_line(source, f)
            if hit is not None:
                parse_json_line(hit[1], text_field, f"{source.display(f)}:{hit[0]}", first=True)
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
            with source.open(f) as fh:
                yield decode_text(fh.read(), source.display(f))
    elif source.kind == "jsonl":
        for f in source.files:
            with source.open(f) as fh:
                first = True
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        where = f"{source.display(f)}:{lineno}"
                        yield parse_json_line(line.decode("utf-8"), text_field, where, first=first)
                        first = False
    elif source.kind == "parquet":
        import pyarrow.parquet as pq

        _check_parquet_field(source, source.files, text_field)
        for f in source.files:
            table = pq.read_table(f, columns=[text_field], filesystem=source.filesystem)
            for value in table.column(text_field).to_pylist():
                yield check_text(value, text_field, source.display(f))
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
