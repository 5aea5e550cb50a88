"""Workflow storage: a local directory or a URI that pyarrow understands (s3://, gs://, file://).

Tasks only ever see local paths. On a local store they write straight into the store; on a URI
store they write into a local staging directory whose finished content is uploaded, and their
inputs are downloaded to a local cache first. A URI store has no atomic directory rename, so
completeness rests on the `_SUCCESS` object alone (a single PUT, atomic on object stores), which is
always written after the data it vouches for.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from pathlib import Path


def is_uri(location: str) -> bool:
    return "://" in str(location)


class StorageError(ValueError):
    """Storage that cannot be opened, read or written."""


class Store:
    """A storage root; every path argument is a store path as returned by `join`."""

    def __init__(self, location: str | os.PathLike):
        location = str(location)
        self.location = location
        self.is_local = not is_uri(location)
        self._fs = None
        if self.is_local:
            self.root = str(Path(location).expanduser().resolve())
            self._scheme = ""
        else:
            # The filesystem is opened on first use: opening S3 already talks to the network.
            self._scheme, rest = location.split("://", 1)
            # The same path pyarrow's from_uri gives (bucket/prefix; /abs/path for file://), without query options.
            self.root = rest.split("?", 1)[0].rstrip("/") or "/"

    @property
    def fs(self):
        if self.is_local:
            return None
        if self._fs is None:
            import pyarrow.fs as pafs

            try:
                self._fs, _ = pafs.FileSystem.from_uri(self.location)
            except Exception as err:  # pyarrow raises several types for unknown schemes or missing credentials
                raise StorageError(f"storage {self.location!r} cannot be opened: {err}") from err
        return self._fs

    # -- paths -------------------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        """A path under the storage root."""
        return self.sub(self.root, *parts)

    def sub(self, path: str, *parts: str) -> str:
        """A path under `path` (a path of this store)."""
        return os.path.join(path, *parts) if self.is_local else posixpath.join(path, *parts)

    def display(self, path: str) -> str:
        """The path as a user would type it (a local path, or a URI with its scheme)."""
        if self.is_local:
            return path
        return f"{self._scheme}://{path}" if self._scheme != "file" else f"file://{path}"

    # -- reading -----------------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        if self.is_local:
            return os.path.exists(path)
        import pyarrow.fs as pafs

        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def listdir(self, path: str) -> list[str]:
        """Names directly under `path` ([] if it does not exist)."""
        if self.is_local:
            try:
                return sorted(os.listdir(path))
            except (FileNotFoundError, NotADirectoryError):
                return []
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(path, allow_not_found=True, recursive=False)
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in self.fs.get_file_info(sel))

    def read_text(self, path: str) -> str | None:
        """The file's text, or None if it does not exist."""
        if self.is_local:
            try:
                return Path(path).read_text()
            except (FileNotFoundError, NotADirectoryError):
                return None
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read().decode()
        except FileNotFoundError:
            return None

    # -- writing -----------------------------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        if self.is_local:
            os.makedirs(path, exist_ok=True)
        else:
            self.fs.create_dir(path, recursive=True)

    def write_text(self, path: str, text: str) -> None:
        """Write a whole file so that a reader sees the old content or the new, never a part."""
        if self.is_local:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_text(text)
            os.replace(tmp, p)
        else:
            self.fs.create_dir(posixpath.dirname(path), recursive=True)  # local/HDFS need it; a no-op prefix on S3
            with self.fs.open_output_stream(path) as f:
                f.write(text.encode())

    def delete_file(self, path: str) -> None:
        try:
            if self.is_local:
                os.remove(path)
            else:
                self.fs.delete_file(path)
        except FileNotFoundError:
            pass

    def delete_dir(self, path: str) -> None:
        if self.is_local:
            shutil.rmtree(path, ignore_errors=True)
            return
        try:
            self.fs.delete_dir(path)
        except FileNotFoundError:
            pass

    def move(self, src: str, dst: str) -> None:
        """Rename a directory (atomic on a local store; a copy then delete where the store has no rename)."""
        if self.is_local:
            os.replace(src, dst)
            return
        try:
            self.fs.move(src, dst)
        except (OSError, NotImplementedError):  # object stores: directory moves are not supported
            self.upload_or_copy(src, dst, src_is_store=True)
            self.delete_dir(src)

    # -- transfer ----------------------------------------------------------------------------------
    def upload_or_copy(self, src: str, dst: str, src_is_store: bool = False) -> None:
        import pyarrow.fs as pafs

        self.makedirs(dst)
        src_fs = self.fs if src_is_store else pafs.LocalFileSystem()
        pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=self.fs)

    def upload_dir(self, local_dir: str | Path, path: str) -> None:
        self.upload_or_copy(str(local_dir), path)

    def download_dir(self, path: str, local_dir: str | Path) -> None:
        import pyarrow.fs as pafs

        Path(local_dir).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local_dir), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())

    def check_writable(self, path: str) -> None:
        """Create and delete a probe file under `path`; raise StorageError naming the problem."""
        probe = self.sub(path, f".slimmoe-probe-{uuid.uuid4().hex[:8]}")
        try:
            self.makedirs(path)
            self.write_text(probe, "probe\n")
            self.delete_file(probe)
        except Exception as err:  # PermissionError, NotADirectoryError, pyarrow OSError, credentials
            raise StorageError(
                f"storage {self.display(path)!r} is not writable ({type(err).__name__}: {err}); "
                "choose a directory or bucket prefix this user can write to"
            ) from err
