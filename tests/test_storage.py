"""The storage layer's contract, the same on every kind of store.

Each test runs on a local directory and on a `file://` URI (pyarrow's local filesystem reached the
way a bucket is: writers stage locally and upload), both of which rename atomically, and on two
object stores, where publishing takes the copy-and-delete route: pyarrow's in-memory `mock://`
filesystem and a real S3 API (moto's server on localhost, the `s3_server` fixture of conftest.py).
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from slimmoe.workflows.storage import MARKER, Store, StorageError, is_uri, leftover


@pytest.fixture(params=["local", "file", "object", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(tmp_path / "store")
    if request.param == "file":
        return Store(f"file://{tmp_path}/store")
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        return Store(server.uri(server.new_bucket()))
    return Store("mock:///bucket/store")


def _complete(store: Store, path: str):
    """The marker of a complete directory at `path` (the marker's files all present), else None."""
    text = store.read_text(store.sub(path, MARKER))
    if text is None:
        return None
    marker = json.loads(text)
    return marker if set(marker["files"]) <= set(store.listdir(path)) else None


def _leftovers(store: Store, parent: str) -> list[str]:
    return [e for e in store.listdir(parent) if leftover(e) is not None]


def _write_output(store: Store, final: str, version: str, tmp_path: Path):
    """Write an output the way the driver does: (staged path, local dir the writer used, marker text)."""
    staged = store.staging_path(final)
    local = store.local_path(staged)
    out = Path(local) if local else tmp_path / "staging" / posixpath.basename(staged)[1:]
    out.mkdir(parents=True)
    (out / "model.txt").write_text(f"weights {version}")
    (out / "sub").mkdir()
    (out / "sub" / "part.txt").write_text(f"part {version}")
    marker = json.dumps({"version": version, "files": ["model.txt", "sub"]})
    return staged, out, marker


def _publish(store: Store, final: str, version: str, tmp_path: Path) -> str:
    staged, out, marker = _write_output(store, final, version, tmp_path)
    store.publish(staged, final, marker, local_dir=out)
    return staged


def test_paths_display_and_flags(store, tmp_path):
    path = store.join("wf", "node", "abc")
    assert path == store.sub(store.join("wf"), "node", "abc") and path.startswith(store.root)
    if store.location.startswith("mock:"):
        assert store.display(path) == "mock:///bucket/store/wf/node/abc" and not store.atomic_rename
        assert store.local_path(path) is None
    elif store.location.startswith("s3:"):
        # Shown without the connection options (endpoint, region): the object as a user names it.
        bucket = store.location.split("://", 1)[1].split("/", 1)[0]
        assert store.display(path) == f"s3://{bucket}/store/wf/node/abc" and not store.atomic_rename
        assert store.local_path(path) is None and path == f"{bucket}/store/wf/node/abc"
        query = store.location.split("?", 1)[1]
        assert Store(f"{store.display(path)}?{query}").root == path
    elif is_uri(store.location):
        assert store.display(path) == f"file://{tmp_path}/store/wf/node/abc" and store.atomic_rename
        assert store.local_path(path) is None  # a URI store is always reached through its filesystem
        assert Store(store.display(path)).root == path
    else:
        assert store.display(path) == path == str(tmp_path / "store" / "wf" / "node" / "abc")
        assert store.local_path(path) == path and store.atomic_rename


def test_text_files_and_directories(store):
    d = store.join("wf", "n")
    f = store.sub(d, "_attempts", "k.json")
    assert store.read_text(f) is None and store.listdir(d) == [] and not store.exists(d)
    store.write_text(f, "one")
    store.write_text(f, "two")
    assert store.read_text(f) == "two" and store.exists(f)
    assert store.listdir(d) == ["_attempts"] and store.listdir(store.sub(d, "_attempts")) == ["k.json"]
    assert store.listdir(f) == []  # a file has no entries
    store.makedirs(store.sub(d, "x", "y"))
    assert store.listdir(d) == ["_attempts", "x"]
    store.delete_file(f)
    store.delete_file(f)  # gone already: nothing to do
    assert store.read_text(f) is None
    store.delete_dir(d)
    store.delete_dir(d)
    assert not store.exists(d)
    store.check_writable(store.join("wf"))
    assert store.listdir(store.join("wf")) == []  # the probe went


class _HalfWrittenStream:
    def __init__(self, stream):
        self.stream = stream

    def write(self, data):
        self.stream.write(data[: len(data) // 2])
        raise OSError("disk full")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()


class _FailingLocalFS(pafs.LocalFileSystem):
    def open_output_stream(self, path, *args, **kwargs):
        return _HalfWrittenStream(super().open_output_stream(path, *args, **kwargs))


@pytest.mark.parametrize("kind", ["local", "file"])
def test_a_failed_text_write_leaves_the_old_content(kind, tmp_path):
    store = Store(tmp_path / "store") if kind == "local" else Store(f"file://{tmp_path}/store")
    f = store.join("wf", "status.json")
    store.write_text(f, "old content")
    store._fs = _FailingLocalFS()
    with pytest.raises(OSError, match="disk full"):
        store.write_text(f, "new content, much longer than the old")
    assert store.read_text(f) == "old content"
    assert store.listdir(store.join("wf")) == ["status.json"]  # no temporary file is left


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_percent_encoded_uri_names_the_decoded_path(kind, tmp_path, request):
    """pyarrow decodes `%20` in a URI's path (a bare space is no URI); the store's root is that path."""
    if kind == "file":
        store = Store(f"file://{tmp_path}/my%20store")
        assert store.root == f"{tmp_path}/my store"
    else:
        server = request.getfixturevalue("s3_server")
        bucket = server.new_bucket()
        store = Store(server.uri(bucket, "my%20runs"))
        assert store.root == f"{bucket}/my runs"
    final = store.join("wf", "n", "k")
    _publish(store, final, "v1", tmp_path)
    assert _complete(store, final)["version"] == "v1"
    assert store.display(final) == ("file://" if kind == "file" else "s3://") + final
    if kind == "file":
        assert (tmp_path / "my store" / "wf" / "n" / "k" / MARKER).is_file()
    else:
        assert "my runs/wf/n/k/_SUCCESS" in server.keys(bucket)


def test_unopenable_and_unwritable_storage_is_a_storage_error(tmp_path):
    bad = Store("nope://somewhere/prefix")  # opened lazily: constructing it is fine
    with pytest.raises(StorageError, match="nope://somewhere/prefix"):
        bad.exists(bad.join("wf"))
    (tmp_path / "a_file").write_text("x")
    blocked = Store(tmp_path / "a_file" / "store")
    with pytest.raises(StorageError, match="a_file/store/wf' is not writable"):
        blocked.check_writable(blocked.join("wf"))


def test_leftover_names():
    assert leftover(".0123abcd.partial-1a2b3c4d") == ("0123abcd", "1a2b3c4d")
    assert leftover(".0123abcd.old-1a2b3c4d") == ("0123abcd", "1a2b3c4d")
    assert leftover("0123abcd") is None and leftover("_attempts") is None and leftover(".status.json.tmp-12") is None


def test_publish_puts_a_complete_output_in_place_and_leaves_nothing_beside_it(store, tmp_path):
    node = store.join("wf", "stage_1")
    final = store.sub(node, "k1")
    staged = _publish(store, final, "v1", tmp_path)
    assert leftover(posixpath.basename(staged)) == ("k1", posixpath.basename(staged).rsplit("-", 1)[1])
    assert _complete(store, final)["version"] == "v1"
    assert store.read_text(store.sub(final, "sub", "part.txt")) == "part v1"
    assert store.listdir(node) == ["k1"]  # no `.partial-` (or `.old-`) leftovers
    _publish(store, final, "v2", tmp_path)  # replacing it: the same
    assert _complete(store, final)["version"] == "v2" and store.listdir(node) == ["k1"]
    assert store.read_text(store.sub(final, "model.txt")) == "weights v2"


def _die_on_marker(monkeypatch):
    real = Store.write_text

    def write_text(self, path, text):
        if posixpath.basename(path) == MARKER:
            raise KeyboardInterrupt("killed between the data and the marker")
        return real(self, path, text)

    monkeypatch.setattr(Store, "write_text", write_text)


def test_a_crash_between_data_and_marker_leaves_the_node_incomplete(store, tmp_path, monkeypatch):
    node = store.join("wf", "stage_1")
    final = store.sub(node, "k1")
    staged, out, marker = _write_output(store, final, "v1", tmp_path)
    _die_on_marker(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        store.publish(staged, final, marker, local_dir=out)
    assert not store.exists(final) and _complete(store, final) is None
    assert _leftovers(store, node) == [posixpath.basename(staged)]  # the data, uploaded where needed, no marker
    assert store.listdir(staged) == ["model.txt", "sub"] and _complete(store, staged) is None


def test_a_crash_before_the_new_marker_keeps_the_old_output_untouched(store, tmp_path, monkeypatch):
    node = store.join("wf", "stage_1")
    final = store.sub(node, "k1")
    _publish(store, final, "old", tmp_path)
    staged, out, marker = _write_output(store, final, "new", tmp_path)
    _die_on_marker(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        store.publish(staged, final, marker, local_dir=out)
    assert _complete(store, final)["version"] == "old"
    assert store.read_text(store.sub(final, "model.txt")) == "weights old"


_MUTATIONS = ("write_text", "upload_dir", "move", "delete_dir", "delete_file")
_REAL = {name: getattr(Store, name) for name in _MUTATIONS}


def _instrument(monkeypatch, on_call):
    """Call `on_call(name)` before every mutating Store call (a KeyboardInterrupt from it is a crash)."""
    for name in _MUTATIONS:
        real = _REAL[name]

        def wrapped(self, *args, _real=real, _name=name, **kwargs):
            on_call(_name)
            result = _real(self, *args, **kwargs)
            on_call(_name + " done")
            return result

        monkeypatch.setattr(Store, name, wrapped)


def test_a_forced_republish_keeps_the_old_output_complete_until_the_new_one_is(store, tmp_path, monkeypatch):
    node = store.join("wf", "stage_2")
    final = store.sub(node, "k2")
    _publish(store, final, "old", tmp_path)
    staged, out, marker = _write_output(store, final, "new", tmp_path)
    seen = []
    state = {"new_complete": False}

    def check(step):
        in_place = _complete(store, final)
        new_staged = _complete(store, staged)
        state["new_complete"] |= new_staged is not None
        if not state["new_complete"]:  # until the new copy is complete, the old one stays in place, whole
            assert in_place is not None and in_place["version"] == "old", step
            assert store.read_text(store.sub(final, "model.txt")) == "weights old", step
        else:  # from then on a complete copy of the new one exists: staged, or in place
            assert "new" in {m["version"] for m in (in_place, new_staged) if m is not None}, step
        seen.append(step)

    _instrument(monkeypatch, check)
    store.publish(staged, final, marker, local_dir=out)
    assert "move" in seen
    assert _complete(store, final)["version"] == "new" and store.listdir(node) == ["k2"]


def test_a_crash_at_any_step_of_a_republish_leaves_a_complete_copy(store, tmp_path, monkeypatch):
    """Killed at each mutating step in turn: the output in place is complete, or a complete copy is beside
    it (what recovery moves into place); once the new marker was written, a complete new copy exists."""
    calls = []
    _instrument(monkeypatch, calls.append)
    node = store.join("wf", "stage_2")
    final = store.sub(node, "dry")
    _publish(store, final, "old", tmp_path / "dry-old")
    calls.clear()
    _publish(store, final, "new", tmp_path / "dry-new")
    steps = len(calls)
    assert steps >= 6  # upload, marker, old output out of the way, move, ...

    for k in range(steps):
        final = store.sub(node, f"k{k}")
        counter = {"n": 0}
        _instrument(monkeypatch, lambda step: None)
        _publish(store, final, "old", tmp_path / f"old{k}")
        staged, out, marker = _write_output(store, final, "new", tmp_path / f"new{k}")

        def crash(step, counter=counter, k=k):
            if counter["n"] == k:
                raise KeyboardInterrupt(f"killed at step {k}: {step}")
            counter["n"] += 1

        _instrument(monkeypatch, crash)
        with pytest.raises(KeyboardInterrupt):
            store.publish(staged, final, marker, local_dir=out)
        _instrument(monkeypatch, lambda step: None)
        copies = [_complete(store, final)] + [_complete(store, store.sub(node, e)) for e in _leftovers(store, node)
                                              if leftover(e)[0] == f"k{k}"]
        versions = {m["version"] for m in copies if m is not None}
        assert versions, f"no complete copy after a crash at step {k} ({calls[k]})"
        new_marker_written = any(c == "write_text done" for c in calls[:k])
        if new_marker_written:
            assert "new" in versions, f"step {k} ({calls[k]}): the new output, complete, was lost"
        else:
            assert _complete(store, final)["version"] == "old", f"step {k} ({calls[k]})"
        for e in _leftovers(store, node):  # leave the next round a clean node directory
            store.delete_dir(store.sub(node, e))


class _DyingMockFS(pafs._MockFileSystem):
    """pyarrow's in-memory filesystem, killed after `budget` object copies."""

    budget = None

    def copy_file(self, src, dest):
        if self.budget is not None:
            if self.budget == 0:
                raise KeyboardInterrupt("killed in the middle of a copy")
            self.budget -= 1
        return super().copy_file(src, dest)


def test_a_move_without_rename_copies_the_marker_after_the_data(tmp_path):
    """On an object store a move is a copy of every object: killed after any of them, the copy in place
    is either without its marker or has all its data."""
    for budget in range(4):  # model.txt, sub/part.txt, _SUCCESS: die before each, and never
        store = Store("mock:///bucket/store")
        store._fs = _DyingMockFS()
        assert not store.atomic_rename
        final = store.join("wf", "stage_1", "k1")
        staged, out, marker = _write_output(store, final, "v1", tmp_path / f"b{budget}")
        store._fs.budget = budget
        try:
            store.publish(staged, final, marker, local_dir=out)
        except KeyboardInterrupt:
            assert budget < 3
            assert _complete(store, staged) is not None  # the staged copy stays whole until the copy is done
        if store.exists(store.sub(final, MARKER)):
            assert store.read_text(store.sub(final, "model.txt")) == "weights v1", budget
            assert store.read_text(store.sub(final, "sub", "part.txt")) == "part v1", budget
    assert budget == 3 and _complete(store, final) is not None and store.listdir(store.join("wf", "stage_1")) == ["k1"]
