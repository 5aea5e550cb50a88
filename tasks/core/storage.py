"""Writing outputs so that nothing half-written is ever taken for complete.

Every output directory is written under a temporary sibling name and renamed into place only
when whole; single files likewise. Markers and manifests are written last by the callers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Iterator

CHECKSUM_CHUNK = 16 << 20  # a file of tens of GB is checksummed without ever being held whole


def file_checksum(data) -> str:
    """The checksum "crc32:<8 hex digits>" of a file's bytes: a bytes-like object, or a binary file object
    (anything with `read(n)`: an open file, a pyarrow input stream) read in chunks. The one checksum of the
    project: logit-cache and token-shard manifests record it per file, node markers per output file
    (why CRC-32: the Integrity note of tasks/data/formats.py)."""
    if hasattr(data, "read"):
        crc = 0
        while chunk := data.read(CHECKSUM_CHUNK):
            crc = zlib.crc32(chunk, crc)
    else:
        crc = zlib.crc32(data)
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


def write_bytes_atomic(path: str | Path, data) -> None:
    """`data` (bytes or a buffer) as `path`: a reader sees the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(data))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())


def ensure_free_output(path: str | Path) -> None:
    """Refuse an output path that already holds something, before any work is done."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not empty; choose another output path or remove it")


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block finishes.

    With `overwrite`, an existing `path` is replaced only after the new one is complete; without
    it, an existing non-empty `path` is an error (nothing is touched)."""
    path = Path(path)
    if not overwrite:
        ensure_free_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
