"""Workflow storage: a local directory or a URI that pyarrow understands (s3://, gs://, file://, ...).

Every operation goes through one `pyarrow.fs.FileSystem`: a `LocalFileSystem` rooted at an absolute
path for a local directory, or whatever `FileSystem.from_uri` returns for a URI. Store paths are the
filesystem's own paths (an absolute path locally, `bucket/prefix/...` on an object store), built
with `join`/`sub` and shown to users with `display`.

The filesystems differ in one way that matters here, kept in the one flag `atomic_rename`: a local
filesystem renames a directory in one step, an object store has no rename at all (a "move" is a
copy of every object, then a delete). Publishing a directory is written once, in `publish`, on top
of that flag, and its invariant holds on both kinds of store:

* A directory is complete exactly when its `_SUCCESS` marker is there. The marker is always
  written after the data it vouches for, and a copy writes it last too, so a reader that finds the
  marker finds the data (object stores make each single object appear whole, with one PUT).
* A directory is built under a staging name `.<name>.partial-<id>` beside its final place and only
  then, complete with its marker, moved to `<name>`. Replacing an existing `<name>` never leaves a
  moment without a complete copy: where rename is atomic the old one is first renamed aside to
  `.<name>.old-<id>` (instant), elsewhere it is deleted (copying it aside would cost a full copy)
  because the staged copy, already complete, stands in for it.
* Whatever an interrupted publish leaves (`leftover` recognises the names) is either incomplete
  (no valid marker: delete it) or a complete copy of the old or the new directory, which the owner
  of these directories (the workflow driver's `_cleanup`) moves into place if nothing complete is.

Tasks only ever see local paths. `local_path` says whether a store path is one; a URI store is
always reached through the filesystem (even file://, which is how tests stand in for a bucket), so
its writers stage in a local directory that `publish` uploads, and its readers download first.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from slimmoe.tasks.core.storage import file_checksum

MARKER = "_SUCCESS"
PARTIAL = ".partial-"
ASIDE = ".old-"

# Schemes whose pyarrow path is the URI's path alone (the host, if any, is part of the connection);
# for object stores (s3, gs, abfs, ...) the path starts with the bucket, i.e. the URI's netloc.
_PATH_ONLY_SCHEMES = {"file", "local", "hdfs", "viewfs"}


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def leftover(entry: str) -> Optional[tuple[str, str]]:
    """(name, id) for a publish's staging or set-aside entry `.<name>.partial-<id>` / `.<name>.old-<id>`.

    The staged copy and the set-aside copy of one publish share the id, so whoever owns the one owns
    the other."""
    if not entry.startswith("."):
        return None
    for tag in (PARTIAL, ASIDE):
        name, sep, ident = entry[1:].rpartition(tag)
        if sep and name and ident:
            return name, ident
    return None


class StorageError(ValueError):
    """Storage that cannot be opened, read or written."""


class Store:
    """A storage root; every path argument is a store path as returned by `join` or `sub`."""

    def __init__(self, location: str | os.PathLike):
        location = str(location)
        self.location = location
        self._fs: Optional[pafs.FileSystem] = None
        if not is_uri(location):
            self.root = str(Path(location).expanduser().resolve())
            self._prefix = None  # store paths are OS paths
            self._fs = pafs.LocalFileSystem()
            return
        # A URI is opened on first use (opening S3 already talks to the network, and a config is
        # validated or its keys computed on machines without credentials); its root is derived from
        # the text the way pyarrow does, and checked against pyarrow's answer when it is opened.
        # The query (`?endpoint_override=...&region=...`) is the connection's, not the path's: urlsplit
        # keeps it apart, and pyarrow reads it when the URI is opened.
        parts = urlsplit(location)
        if not parts.scheme:
            raise StorageError(f"storage {location!r} is not a URI pyarrow can open (no scheme)")
        if parts.scheme in _PATH_ONLY_SCHEMES:
            root = parts.path
        elif parts.scheme == "mock":  # pyarrow's in-memory test filesystem: relative paths
            root = parts.path.lstrip("/")
        else:
            root = parts.netloc + parts.path
        # pyarrow percent-decodes the path (`s3://bucket/my%20runs` is the prefix `my runs`, and a URI
        # cannot hold a bare space): the root must be the decoded one, or the check in `fs` refuses it.
        root = unquote(root)
        self.root = root.rstrip("/") or ("/" if root.startswith("/") else "")
        base = unquote(location.split("?", 1)[0].split("#", 1)[0])
        base = base.rstrip("/") if self.root != "/" else base
        # What a store path is prefixed with to be shown as a URI: `s3://` + `bucket/prefix`. The query
        # is left off: it says how this process connects (endpoint, region, scheme), not where the
        # data is, and a store path shown with it would read as one more path component.
        self._prefix = base[: len(base) - len(self.root)] if base.endswith(self.root) else f"{parts.scheme}://"

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            try:
                fs, path = pafs.FileSystem.from_uri(self.location)
            except Exception as err:  # pyarrow raises several types for unknown schemes or missing credentials
                raise StorageError(f"storage {self.location!r} cannot be opened: {err}") from err
            if (path.rstrip("/") or "/") != (self.root.rstrip("/") or "/"):
                raise StorageError(f"storage {self.location!r}: pyarrow resolves it to path {path!r}, "
                                   f"not {self.root!r}; write the URI in the form scheme://bucket/prefix")
            self._fs = fs
        return self._fs

    @property
    def atomic_rename(self) -> bool:
        """Whether a directory is renamed in one step. Only the local filesystem is known to; other
        stores (object stores above all) are treated as having no rename, which is correct everywhere,
        only slower where a rename would have done."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    # -- paths -------------------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        """A path under the storage root."""
        return self.sub(self.root, *parts)

    def sub(self, path: str, *parts: str) -> str:
        """A path under `path` (a path of this store)."""
        return posixpath.join(path, *parts)

    def display(self, path: str) -> str:
        """The path as a user would type it (a local path, or a URI with its scheme)."""
        return path if self._prefix is None else self._prefix + path

    def local_path(self, path: str) -> Optional[str]:
        """`path` as an OS path that tasks may read and write directly, or None where the store is a URI."""
        return path if self._prefix is None else None

    # -- reading -----------------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def listdir(self, path: str) -> list[str]:
        """Names directly under `path` ([] if it does not exist or is no directory)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
        except NotADirectoryError:
            return []
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)

    def files(self, path: str) -> dict[str, pafs.FileInfo]:
        """Every file under `path`, at any depth, by its path relative to `path`: sizes and mtimes from
        one listing, without reading a byte."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
        except NotADirectoryError:
            return {}
        return {posixpath.relpath(i.path, path): i for i in infos if i.type == pafs.FileType.File}

    def checksum(self, path: str) -> str:
        """The file's `file_checksum`, streamed (from a URI store: over the network, never held whole)."""
        with self.fs.open_input_stream(path) as f:
            return file_checksum(f)

    def read_text(self, path: str) -> Optional[str]:
        """The file's text, or None if it does not exist."""
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read().decode()
        except (FileNotFoundError, NotADirectoryError):
            return None

    # -- writing -----------------------------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        self.fs.create_dir(path, recursive=True)

    def write_text(self, path: str, text: str) -> None:
        """Write a whole file so that a reader sees the old content or the new, never a part.

        Where rename is atomic the text goes to a temporary name that then replaces the file; an
        object store makes an object visible only once its single PUT is complete."""
        data = text.encode()
        parent = posixpath.dirname(path)
        if parent:
            self.fs.create_dir(parent, recursive=True)  # a local filesystem needs it; harmless on others
        target = path
        if self.atomic_rename:
            target = self.sub(parent, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            if target != path:
                self.fs.move(target, path)
        except BaseException:
            if target != path:
                self.delete_file(target)
            raise

    def delete_file(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass

    def delete_dir(self, path: str) -> None:
        """Delete a directory and everything under it (nothing if it does not exist)."""
        try:
            self.fs.delete_dir(path)
        except FileNotFoundError:
            pass

    def move(self, src: str, dst: str) -> None:
        """Move a directory to `dst`, which must not exist: a rename where rename is atomic, else a copy
        (the `_SUCCESS` marker last, so `dst` is never complete before its data) and then a delete."""
        if self.atomic_rename:
            self.fs.move(src, dst)
            return
        self._copy_tree(src, dst)
        self.delete_dir(src)

    def _copy_tree(self, src: str, dst: str) -> None:
        infos = self.fs.get_file_info(pafs.FileSelector(src, recursive=True))
        self.fs.create_dir(dst, recursive=True)
        for info in infos:  # directories first (a hierarchical filesystem needs them before their files)
            if info.type == pafs.FileType.Directory:
                self.fs.create_dir(self.sub(dst, posixpath.relpath(info.path, src)), recursive=True)
        files = [i.path for i in infos if i.type == pafs.FileType.File]
        for path in sorted(files, key=lambda p: posixpath.basename(p) == MARKER):  # markers last
            self.fs.copy_file(path, self.sub(dst, posixpath.relpath(path, src)))

    # -- transfer between the store and local directories ---------------------------------------------
    def upload_dir(self, local_dir: str | Path, path: str) -> None:
        """Copy a local directory's content to `path` (nothing to do when `path` is that very directory)."""
        local_dir = str(Path(local_dir).resolve())
        if self.local_path(path) == local_dir:
            return
        self.makedirs(path)
        pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def download_dir(self, path: str, local_dir: str | Path) -> None:
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local_dir), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())

    # -- publishing --------------------------------------------------------------------------------------
    def staging_path(self, final: str) -> str:
        """A fresh staging path `.<name>.partial-<id>` beside `final`, for `publish`."""
        parent, name = posixpath.split(final)
        return self.sub(parent, f".{name}{PARTIAL}{uuid.uuid4().hex[:8]}")

    def publish(self, staged: str, final: str, marker_text: str, local_dir: str | Path | None = None) -> None:
        """Put a finished directory at `final`, replacing what is there; the one way outputs are published.

        1. `local_dir` (a writer's local copy, for a URI store) is uploaded to `staged`; a writer on a
           local store wrote into `staged` itself, and nothing is copied.
        2. The `_SUCCESS` marker (`marker_text`) is written into `staged`, last: from here on the staged
           copy is complete.
        3. An existing `final` goes: renamed aside to `.<name>.old-<id>` where rename is atomic, else
           deleted, its marker first (so a half-deleted directory never reads as complete).
        4. `staged` moves to `final` (a rename, or a copy with the marker last), then the set-aside
           copy is deleted.
        A crash at any point leaves a complete copy: `final` (old or new), or the staged new one, or
        the old one set aside; `leftover` names the last two for recovery."""
        if local_dir is not None:
            self.upload_dir(local_dir, staged)
        self.write_text(self.sub(staged, MARKER), marker_text)
        aside = None
        if self.exists(final):
            if self.atomic_rename:
                name, ident = leftover(posixpath.basename(staged)) or (posixpath.basename(final), uuid.uuid4().hex[:8])
                aside = self.sub(posixpath.dirname(final), f".{name}{ASIDE}{ident}")
                self.move(final, aside)
            else:
                self.delete_file(self.sub(final, MARKER))
                self.delete_dir(final)
        self.move(staged, final)
        if aside is not None:
            self.delete_dir(aside)

    # -- checks ----------------------------------------------------------------------------------------
    def check_writable(self, path: str) -> None:
        """Create and delete a probe file under `path`; raise StorageError naming the problem. The
        directories the probe created go again: validation runs the probe before it knows whether the
        run goes ahead, and a refused run must leave nothing behind (the run creates what it needs)."""
        probe = self.sub(path, f".slimmoe-probe-{uuid.uuid4().hex[:8]}")
        local = self.local_path(path)
        created = []
        if local is not None:
            missing = Path(local)
            while not missing.exists() and missing != missing.parent:
                created.append(missing)
                missing = missing.parent
        try:
            self.makedirs(path)
            self.write_text(probe, "probe\n")
            self.delete_file(probe)
        except StorageError:
            raise
        except Exception as err:  # PermissionError, NotADirectoryError, pyarrow OSError, credentials
            raise StorageError(
                f"storage {self.display(path)!r} is not writable ({type(err).__name__}: {err}); "
                "choose a directory or bucket prefix this user can write to"
            ) from err
        finally:
            # Deepest first, and only while empty: another run may have started writing there meanwhile.
            # (An object store's directories are markers that a listing does not need: they stay.)
            for directory in created:
                try:
                    directory.rmdir()
                except OSError:
                    break
