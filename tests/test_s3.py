"""Workflow storage on a real S3 API: moto's S3 server on localhost, reached through pyarrow's S3
filesystem exactly as a bucket would be (no rename; listings from key prefixes; directory markers).

The server (the `s3_server` fixture of conftest.py) runs in this process; subprocesses reach it through the endpoint in the storage URI and
the dummy credentials in the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from standins import ALL_NODES, STANDIN_SITE, kill_mid_stage, make_teacher, take_calls, workflow_dict, write_config


@pytest.fixture
def s3_bucket(s3_server) -> str:
    return s3_server.new_bucket()


def test_the_endpoint_can_come_from_the_uri_or_the_environment(s3_server, s3_bucket, monkeypatch):
    from slimmoe.workflows.storage import Store

    in_uri = Store(s3_server.uri(s3_bucket))
    assert in_uri.root == f"{s3_bucket}/store" and not in_uri.atomic_rename
    in_uri.write_text(in_uri.join("wf", "x.json"), "{}")
    assert s3_server.keys(s3_bucket)[-1] == "store/wf/x.json"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)  # what the AWS SDK inside pyarrow reads
    plain = Store(f"s3://{s3_bucket}/store")
    assert plain.read_text(plain.join("wf", "x.json")) == "{}" and plain.listdir(plain.join("wf")) == ["x.json"]


# -- a workflow on S3 ------------------------------------------------------------------------------


def store_outputs(store, workflow: str = "wf") -> dict[str, dict[str, str]]:
    """node -> {file: content} of each output with a marker, read through `store` (any kind)."""
    from slimmoe.workflows.storage import MARKER

    out = {}
    root = store.join(workflow)
    for node in store.listdir(root):
        if node.startswith("_"):
            continue
        for key in store.listdir(store.sub(root, node)):
            path = store.sub(root, node, key)
            marker = store.read_text(store.sub(path, MARKER))
            if key.startswith((".", "_")) or marker is None:
                continue
            files = {f: store.read_text(store.sub(path, f)) for f in store.listdir(path) if f != MARKER}
            files["_key"] = json.loads(marker)["key"]
            out[node] = files
    return out


@pytest.fixture
def s3_wf(tmp_path, s3_server, s3_bucket, monkeypatch):
    """Stand-in node kinds, a teacher, and a workflow config whose storage is a fresh S3 bucket."""
    import standins

    standins.install()
    make_teacher(tmp_path / "teacher")
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("STANDIN_CALLS", str(calls))
    monkeypatch.delenv("STANDIN_FAIL", raising=False)
    monkeypatch.delenv("STANDIN_SLOW", raising=False)

    class W:
        root = tmp_path
        bucket = s3_bucket
        server = s3_server
        storage = s3_server.uri(s3_bucket)

        @staticmethod
        def calls() -> list[str]:
            return take_calls(calls)

        @staticmethod
        def config(**changes) -> Path:
            changes.setdefault("storage", W.storage)
            changes.setdefault("cache_dir", str(tmp_path / "cache"))
            return write_config(tmp_path, workflow_dict(tmp_path, **changes))

        @staticmethod
        def store():
            from slimmoe.workflows.storage import Store

            return Store(W.storage)

    yield W
    standins.uninstall()


def _cli(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "slimmoe.workflows.cli", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=env)


def _status(cfg: Path, env: dict) -> dict[str, dict]:
    out = subprocess.run([sys.executable, "-m", "slimmoe.workflows.cli", "status", str(cfg), "--json"],
                         capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    return {r["node"]: r for r in json.loads(out.stdout)}


def test_sigkill_mid_stage_on_s3_resumes_to_the_uninterrupted_outputs(s3_wf, tmp_path):
    from slimmoe.workflows.driver import run_workflow

    stages = workflow_dict(s3_wf.root)["stages"]
    stages[1].update(token_budget=8)
    cfg = s3_wf.config(stages=stages)
    env = dict(os.environ, STANDIN_SLOW="stage_2:0.4", PYTHONPATH=STANDIN_SITE)

    first = _cli(["run", str(cfg)], tmp_path / "first.log", env)
    work = tmp_path / "cache" / "work" / "wf" / "stage_2"  # a URI store's work dirs are in the local cache
    killed_at = kill_mid_stage(first, work, tmp_path / "first.log", timeout_s=180)
    assert 3 <= killed_at < 8
    assert s3_wf.calls() == ["tokenize", "teacher_logits", "stage_1", "stage_2"]

    state = _status(cfg, env)
    assert state["stage_1"]["state"] == "done" and state["stage_1"]["path"].startswith(f"s3://{s3_wf.bucket}/store/wf/")
    assert state["stage_2"]["state"] == "failed" and "interrupted" in state["stage_2"]["error"]
    assert state["stage_3"]["state"] == "missing"
    keys = s3_wf.server.keys(s3_wf.bucket)
    assert f"store/wf/stage_1/{state['stage_1']['key']}/_SUCCESS" in keys
    assert f"store/wf/stage_2/_attempts/{state['stage_2']['key']}.json" in keys
    assert not any(k.startswith(f"store/wf/stage_2/{state['stage_2']['key']}") for k in keys)

    second = _cli(["run", str(cfg)], tmp_path / "second.log", env)
    assert second.wait(timeout=240) == 0, (tmp_path / "second.log").read_text()
    log = (tmp_path / "second.log").read_text()
    assert "skipped stage_1" in log and "started stage_2" in log and f"resumed from step {killed_at}" in log
    assert s3_wf.calls() == ["stage_2", "stage_3", "one_stage", "evaluate_stage_3", "evaluate_one_stage"]

    state = _status(cfg, env)
    assert {r["state"] for r in state.values()} == {"done"} and set(state) == {"teacher", *ALL_NODES}
    keys = s3_wf.server.keys(s3_wf.bucket)
    assert not [k for k in keys if ".partial-" in k or ".old-" in k]  # nothing staged is left in the bucket
    assert any(k.startswith("store/wf/_logs/") for k in keys)
    assert not any(work.iterdir()) and not any((tmp_path / "cache" / "staging" / "wf" / "stage_2").iterdir())

    # The same workflow, never interrupted, on a local directory: the same outputs under the same keys.
    from slimmoe.workflows.storage import Store

    reference = tmp_path / "reference"
    run_workflow(cfg, overrides={"storage": str(reference)}, log=lambda s: None)
    on_s3 = store_outputs(s3_wf.store())
    assert set(on_s3) == set(ALL_NODES) and on_s3 == store_outputs(Store(reference))


class _DiesAtMarkerCopy:
    """The store's real S3 filesystem, killed when a copy reaches the `_SUCCESS` marker (the data
    objects before it are copied: the most complete-looking state a killed move can leave)."""

    def __init__(self, fs):
        self._fs = fs

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def copy_file(self, src, dst):
        from slimmoe.workflows.storage import MARKER

        if os.path.basename(src) == MARKER:
            raise KeyboardInterrupt("killed before the marker was copied")
        return self._fs.copy_file(src, dst)


def _interrupt_publish(mp, crash: str, final: str):
    """Make the publish of `final` die at `crash`: before the staged marker is written; in the move,
    after the data reached `final` and before its marker did; or (a rerun) after the old output's
    marker was deleted but none of its data."""
    from slimmoe.workflows.storage import MARKER, Store

    if crash == "marker":
        real = Store.write_text

        def write_text(self, path, text):
            if path.startswith(os.path.dirname(final) + "/.") and os.path.basename(path) == MARKER:
                raise KeyboardInterrupt("killed before the staged marker was written")
            return real(self, path, text)

        mp.setattr(Store, "write_text", write_text)
    elif crash == "copy":
        real = Store._copy_tree

        def copy_tree(self, src, dst):
            if dst != final:
                return real(self, src, dst)
            fs = self.fs
            self._fs = _DiesAtMarkerCopy(fs)
            try:
                real(self, src, dst)
            finally:
                self._fs = fs

        mp.setattr(Store, "_copy_tree", copy_tree)
    else:
        real = Store.delete_dir

        def delete_dir(self, path):
            if path == final:
                assert self.read_text(self.sub(final, MARKER)) is None  # the marker goes first
                raise KeyboardInterrupt("killed before the old output's data was deleted")
            return real(self, path)

        mp.setattr(Store, "delete_dir", delete_dir)


@pytest.mark.parametrize("crash", ["marker", "copy", "rerun"])
def test_an_interrupted_publish_on_s3_is_never_taken_for_complete(s3_wf, monkeypatch, crash):
    from slimmoe.workflows.dag import build_dag
    from slimmoe.workflows.driver import Driver, rerun_node, run_workflow, workflow_status
    from slimmoe.workflows.storage import Store

    cfg = s3_wf.config()
    store = s3_wf.store()
    key = build_dag(cfg).nodes["stage_2"].key
    final = store.join("wf", "stage_2", key)
    if crash == "rerun":
        run_workflow(cfg, log=lambda s: None)
        s3_wf.calls()
    with monkeypatch.context() as mp:
        _interrupt_publish(mp, crash, final)
        with pytest.raises(KeyboardInterrupt):
            if crash == "rerun":
                rerun_node(cfg, "stage_2", log=lambda s: None)
            else:
                run_workflow(cfg, log=lambda s: None)
    assert s3_wf.calls()[-1] == "stage_2"

    keys = s3_wf.server.keys(s3_wf.bucket)
    in_place = [k for k in keys if k.startswith(f"store/wf/stage_2/{key}/")]
    if crash == "marker":
        assert not in_place  # the data went to the staging name only
    else:  # every data file in place, no marker: complete in all but the one thing that says so
        assert f"store/wf/stage_2/{key}/model.txt" in in_place and not any(k.endswith("/_SUCCESS") for k in in_place)
    driver = Driver(build_dag(cfg), log=lambda s: None)
    assert driver.marker("stage_2") is None and not driver.complete("stage_2")
    assert {r["node"]: r for r in workflow_status(cfg)}["stage_2"]["state"] != "done"

    lines: list[str] = []
    run_workflow(cfg, log=lines.append)
    calls = s3_wf.calls()
    if crash == "marker":  # the staged copy was incomplete: recomputed
        assert calls == ["stage_2", "stage_3", "one_stage", "evaluate_stage_3", "evaluate_one_stage"]
    elif crash == "copy":  # the staged copy was complete: moved into place, not recomputed
        assert calls == ["stage_3", "one_stage", "evaluate_stage_3", "evaluate_one_stage"]
    else:
        assert calls == []
    assert (f"skipped stage_2 (key {key})" in lines) == (crash != "marker")
    assert {r["state"] for r in workflow_status(cfg)} == {"done"}
    assert not [k for k in s3_wf.server.keys(s3_wf.bucket) if ".partial-" in k or ".old-" in k]

    reference = s3_wf.root / "reference"
    run_workflow(cfg, overrides={"storage": str(reference)}, log=lambda s: None)
    assert store_outputs(store) == store_outputs(Store(reference))
