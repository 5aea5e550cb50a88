"""A finished node output changed by hand: every `_SUCCESS` marker records the size and checksum of
each file of its output, `status` reports a changed file as `damaged` naming it and the fix, a node
that would read it refuses to start in one line (no traceback, no retries), and `rerun` fixes it.
Markers from before checksums count as done, unverified. Driven through the CLI on the stand-in
workflow, on a local directory and on S3 (moto)."""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib

from typer.testing import CliRunner

from slimmoe.workflows.cli import app
from standins import take_calls, workflow_dict, write_config

runner = CliRunner()


def _cli(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result


def _states(cfg, *flags: str) -> dict[str, dict]:
    return {r["node"]: r for r in json.loads(_cli("status", str(cfg), "--json", *flags).stdout)}


def _key_dir(store, node: str):
    """The one complete output of `node` in a local store."""
    (out,) = [d for d in (store / "wf" / node).iterdir() if (d / "_SUCCESS").exists()]
    return out


def _edited(text: str) -> str:
    """The hand edit of the issue on a stage's config.json: its cut 32 -> 48, the same number of bytes."""
    assert '"expert_intermediate_size": 32' in text
    return text.replace("32", "48")


def _assert_refused(result, file: str) -> None:
    """One error line naming the damaged file and the fix, no traceback."""
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "cannot run stage_2" in errors[0] and file in errors[0], errors[0]
    assert "slimmoe rerun CONFIG stage_1" in errors[0], errors[0]


def test_an_output_edited_by_hand_is_damaged_refused_as_input_and_rerun_fixes_it(ws):
    cfg = write_config(ws, workflow_dict(ws))
    calls = ws / "calls.txt"
    _cli("run", str(cfg))
    take_calls(calls)
    out = _key_dir(ws / "store", "stage_1")
    marker = json.loads((out / "_SUCCESS").read_text())
    assert set(marker["checksums"]) == {"config.json", "metrics.json", "model.txt"}
    data = (out / "config.json").read_bytes()
    assert marker["checksums"]["config.json"] == {"bytes": len(data), "checksum": f"crc32:{zlib.crc32(data):08x}"}

    edited = out / "config.json"
    edited.write_text(_edited(edited.read_text()))

    rows = _states(cfg)
    assert rows["stage_1"]["state"] == "damaged"
    assert {r["state"] for n, r in rows.items() if n != "stage_1"} == {"done"}
    assert str(edited) in rows["stage_1"]["error"] and "slimmoe rerun CONFIG stage_1" in rows["stage_1"]["error"]
    table = _cli("status", str(cfg)).output
    assert any(line.split()[:2] == ["stage_1", "damaged"] for line in table.splitlines()), table
    assert f"stage_1: {edited} changed after the node finished" in table, table

    # The stage after it refuses before it starts: one line, and the stand-in never ran (no retries).
    _assert_refused(_cli("rerun", str(cfg), "stage_2", code=2), str(edited))
    assert take_calls(calls) == []

    _cli("rerun", str(cfg), "stage_1")
    assert take_calls(calls) == ["stage_1"]
    assert json.loads(edited.read_text())["expert_intermediate_size"] == 32
    assert {r["state"] for r in _states(cfg).values()} == {"done"}
    _cli("rerun", str(cfg), "stage_2")
    assert take_calls(calls) == ["stage_2"]


def test_status_verify_reads_every_file_where_the_plain_status_trusts_unchanged_mtimes(ws):
    cfg = write_config(ws, workflow_dict(ws))
    _cli("run", str(cfg))
    model = _key_dir(ws / "store", "stage_2") / "model.txt"
    before = model.stat()
    model.write_text(model.read_text()[::-1])  # same size; then the mtime it had: damage no write reveals
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))

    # The plain status reads only files written after their marker (cost: a listing per node).
    assert _states(cfg)["stage_2"]["state"] == "done"
    row = _states(cfg, "--verify")["stage_2"]
    assert row["state"] == "damaged" and str(model) in row["error"], row
    assert "slimmoe rerun CONFIG stage_2" in row["error"]


def test_an_output_from_before_checksums_counts_as_done_unverified(ws):
    cfg = write_config(ws, workflow_dict(ws))
    calls = ws / "calls.txt"
    _cli("run", str(cfg))
    take_calls(calls)
    out = _key_dir(ws / "store", "stage_1")
    marker = json.loads((out / "_SUCCESS").read_text())
    del marker["checksums"]  # as an older slimmoe wrote it
    (out / "_SUCCESS").write_text(json.dumps(marker))
    (out / "config.json").write_text(_edited((out / "config.json").read_text()))  # nothing to compare it with

    rows = _states(cfg)
    assert {r["state"] for r in rows.values()} == {"done"} and rows["stage_1"]["error"] is None
    _cli("run", str(cfg))
    assert take_calls(calls) == []
    _cli("rerun", str(cfg), "stage_2")
    assert take_calls(calls) == ["stage_2"]


def test_on_s3_a_changed_object_is_damaged_refused_on_download_and_rerun_fixes_it(ws, s3_server):
    from slimmoe.workflows.storage import Store

    calls, cache, storage = ws / "calls.txt", ws / "cache", s3_server.uri(s3_server.new_bucket())
    cfg = write_config(ws, workflow_dict(ws, storage=storage, cache_dir=str(cache)))
    _cli("run", str(cfg))
    take_calls(calls)
    store = Store(storage)
    node_dir = store.join("wf", "stage_1")
    (key,) = [k for k in store.listdir(node_dir) if not k.startswith((".", "_"))]
    assert "config.json" in json.loads(store.read_text(store.sub(node_dir, key, "_SUCCESS")))["checksums"]
    edited = store.sub(node_dir, key, "config.json")
    time.sleep(1.1)  # S3 keeps mtimes in whole seconds: the edit must land in a second after the marker's
    store.write_text(edited, _edited(store.read_text(edited)))

    row = _states(cfg)["stage_1"]
    assert row["state"] == "damaged" and store.display(edited) in row["error"], row
    assert "slimmoe rerun CONFIG stage_1" in row["error"]

    # On another machine (no copy cached from before the edit) the download is checked in full.
    shutil.rmtree(cache / "inputs")
    _assert_refused(_cli("rerun", str(cfg), "stage_2", code=2), store.display(edited))
    assert take_calls(calls) == [] and not any((cache / "inputs" / "wf" / "stage_1").iterdir())  # no copy kept

    _cli("rerun", str(cfg), "stage_1")
    assert {r["state"] for r in _states(cfg).values()} == {"done"}
    _cli("rerun", str(cfg), "stage_2")
    assert take_calls(calls) == ["stage_1", "stage_2"]
    # A rerun keeps the key: a copy downloaded before it is not that output any more.
    _cli("rerun", str(cfg), "stage_1")
    assert "downloading stage_1" in _cli("rerun", str(cfg), "stage_2").output

