"""The workflow driver with stand-in node kinds: caching, keys, resume after SIGKILL, rerun, status.

The stand-ins are small but real tasks: they read their inputs, write outputs, and the stage
stand-in checkpoints its progress to the stable work dir, so a killed run can resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from standins import ALL_NODES, STANDIN_SITE, kill_mid_stage, make_teacher, take_calls, workflow_dict, write_config

@pytest.fixture
def wf(tmp_path, monkeypatch):
    """A workspace: stand-in node kinds, teacher, config; stand-in calls are logged to calls.txt."""
    import standins

    standins.install()
    make_teacher(tmp_path / "teacher")
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("STANDIN_CALLS", str(calls))
    monkeypatch.delenv("STANDIN_FAIL", raising=False)

    class W:
        root = tmp_path

        @staticmethod
        def calls() -> list[str]:
            return take_calls(calls)

        @staticmethod
        def config(**changes) -> Path:
            return write_config(tmp_path, workflow_dict(tmp_path, **changes))

    yield W
    standins.uninstall()


def outputs(store: Path, workflow: str = "wf") -> dict[str, dict[str, str]]:
    """node -> {file: content} of each complete output (the _SUCCESS marker's run-specific fields dropped)."""
    out = {}
    for node_dir in sorted((store / workflow).iterdir()):
        if node_dir.name.startswith("_"):
            continue
        for key_dir in node_dir.iterdir():
            if key_dir.name.startswith((".", "_")) or not (key_dir / "_SUCCESS").exists():
                continue
            files = {f.name: f.read_text() for f in key_dir.iterdir() if f.name != "_SUCCESS"}
            files["_key"] = json.loads((key_dir / "_SUCCESS").read_text())["key"]
            out[node_dir.name] = files
    return out


def test_second_run_runs_no_node_and_markers_are_complete(wf):
    from slimmoe.workflows.driver import run_workflow

    cfg = wf.config()
    lines: list[str] = []
    res = run_workflow(cfg, log=lines.append)
    assert wf.calls() == ALL_NODES
    assert [r.state for r in res.values()] == ["skipped"] + ["finished"] * len(ALL_NODES)  # the external teacher
    assert any(line.startswith("finished stage_2 in ") and "val_loss=" in line for line in lines)

    store = wf.root / "store" / "wf"
    for name in ALL_NODES:
        key = res[name].key
        marker = json.loads((store / name / key / "_SUCCESS").read_text())
        assert marker["key"] == key and marker["node"] == name
        assert set(marker) >= {"kind", "config", "inputs", "started", "finished", "duration_s", "metrics", "files"}
        assert marker["files"] and all((store / name / key / f).exists() for f in marker["files"])
        assert not (store / name / "_work" / key).exists()  # a stage's work dir goes once it succeeded
    assert json.loads((store / "stage_2" / res["stage_2"].key / "_SUCCESS").read_text())["inputs"]["model"] == \
        {"node": "stage_1", "key": res["stage_1"].key}
    logs = list((store / "_logs").iterdir())
    assert logs and "started stage_1" in logs[0].read_text()

    lines.clear()
    res2 = run_workflow(cfg, log=lines.append)
    assert wf.calls() == []
    assert all(r.state == "skipped" for r in res2.values())
    assert f"skipped stage_2 (key {res['stage_2'].key})" in lines
    assert {n: r.key for n, r in res2.items()} == {n: r.key for n, r in res.items()}


def test_changing_one_stage_reruns_it_and_what_follows_only(wf):
    from slimmoe.workflows.driver import run_workflow, workflow_status

    run_workflow(wf.config(), log=lambda s: None)
    wf.calls()
    stages = workflow_dict(wf.root)["stages"]
    stages[1]["lr"] = 5e-4
    cfg = wf.config(stages=stages)
    states = {r["node"]: r["state"] for r in workflow_status(cfg)}
    assert states["stage_1"] == "done" and states["stage_2"] == "stale" and states["stage_3"] == "stale"
    assert states["one_stage"] == "done"

    run_workflow(cfg, log=lambda s: None)
    assert wf.calls() == ["stage_2", "stage_3", "evaluate_stage_3"]
    assert {r["state"] for r in workflow_status(cfg)} == {"done"}

    # Placement settings are not part of a key: more teacher actors recompute nothing.
    run_workflow(wf.config(stages=stages, resources={"actor_pool_size": 3}), log=lambda s: None)
    assert wf.calls() == []
    # The first stage's target changes every stage after it (their input changed), not the data nodes.
    stages[0]["expert_intermediate_size"] = 40
    run_workflow(wf.config(stages=stages), log=lambda s: None)
    assert wf.calls() == ["stage_1", "stage_2", "stage_3", "evaluate_stage_3"]


def _run_cli(args: list[str], out_path: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "slimmoe.workflows.cli", *args], stdout=open(out_path, "w"),
                            stderr=subprocess.STDOUT, env=env)


def test_sigkill_mid_stage_then_restart_resumes_and_matches_uninterrupted_run(wf, tmp_path):
    from slimmoe.workflows.driver import run_workflow, workflow_status

    stages = workflow_dict(wf.root)["stages"]
    stages[1].update(token_budget=8)
    cfg = wf.config(stages=stages)
    env = dict(os.environ, STANDIN_CALLS=str(tmp_path / "calls.txt"), STANDIN_SLOW="stage_2:0.4",
               PYTHONPATH=STANDIN_SITE)

    first = _run_cli(["run", str(cfg)], tmp_path / "first.log", env)
    work = wf.root / "store" / "wf" / "stage_2" / "_work"
    killed_at = kill_mid_stage(first, work, tmp_path / "first.log")
    assert 3 <= killed_at < 8
    state = {r["node"]: r for r in workflow_status(cfg)}
    assert state["stage_1"]["state"] == "done"
    assert state["stage_2"]["state"] == "failed" and "interrupted" in state["stage_2"]["error"]
    assert state["stage_3"]["state"] == "missing"
    assert list((wf.root / "store" / "wf" / "stage_2").glob(".*.partial-*"))  # the killed attempt's leftovers
    assert wf.calls() == ["tokenize", "teacher_logits", "stage_1", "stage_2"]

    second = _run_cli(["run", str(cfg)], tmp_path / "second.log", env)
    assert second.wait(timeout=180) == 0, (tmp_path / "second.log").read_text()
    log = (tmp_path / "second.log").read_text()
    assert "skipped stage_1" in log and "skipped tokenize" in log
    assert "started stage_2" in log and "resuming" in log
    assert f"resumed from step {killed_at}" in log
    assert wf.calls() == ["stage_2", "stage_3", "one_stage", "evaluate_stage_3", "evaluate_one_stage"]
    assert not list((wf.root / "store" / "wf" / "stage_2").glob(".*.partial-*"))  # cleaned up
    assert not any(work.iterdir())
    driver_logs = "".join(p.read_text() for p in (wf.root / "store" / "wf" / "_logs").iterdir())
    assert "resuming" in driver_logs

    # The same workflow, never interrupted.
    reference = wf.root / "reference"
    run_workflow(wf.config(stages=stages), overrides={"storage": str(reference)}, log=lambda s: None)
    assert outputs(wf.root / "store") == outputs(reference)
    assert set(outputs(reference)) == set(ALL_NODES)


def _kill_mid_rerun(cfg: Path, wf, tmp_path: Path, log_name: str) -> Path:
    """`slimmoe rerun CONFIG stage_2` in a subprocess, SIGKILLed in the middle of its training; returns
    the rerun's work dir, checked before the kill to survive `status --clean` while the rerun lives."""
    from typer.testing import CliRunner

    from slimmoe.workflows.cli import app

    env = dict(os.environ, STANDIN_CALLS=str(tmp_path / "calls.txt"), STANDIN_SLOW="stage_2:0.4",
               PYTHONPATH=STANDIN_SITE)
    proc = _run_cli(["rerun", str(cfg), "stage_2"], tmp_path / log_name, env)
    work = wf.root / "store" / "wf" / "stage_2" / "_work"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        progress = list(work.glob("*-rerun-*/progress.json"))
        if progress and json.loads(progress[0].read_text())["step"] >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, (tmp_path / log_name).read_text()
    try:
        rerun_dir = progress[0].parent
        cleaned = CliRunner().invoke(app, ["status", str(cfg), "--clean"])
        assert cleaned.exit_code == 0, cleaned.output
        assert rerun_dir.is_dir() and str(rerun_dir) not in cleaned.output  # a live rerun's state stays
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (rerun_dir / "progress.json").exists()
    return rerun_dir


def test_sigkill_mid_rerun_shows_in_status_and_its_work_dir_is_removed(wf, tmp_path):
    from typer.testing import CliRunner

    from slimmoe.workflows.cli import app
    from slimmoe.workflows.driver import run_workflow, workflow_status

    stages = workflow_dict(wf.root)["stages"]
    stages[1].update(token_budget=8)
    cfg = wf.config(stages=stages)
    res = run_workflow(cfg, log=lambda s: None)
    wf.calls()
    node_dir = wf.root / "store" / "wf" / "stage_2"
    before = {p.name: p.read_bytes() for p in (node_dir / res["stage_2"].key).iterdir()}
    runner = CliRunner()

    rerun_dir = _kill_mid_rerun(cfg, wf, tmp_path, "rerun1.log")
    size = sum(f.stat().st_size for f in rerun_dir.rglob("*") if f.is_file())
    row = {r["node"]: r for r in workflow_status(cfg)}["stage_2"]
    assert row["state"] == "done"  # the output before the rerun is still in place
    assert "last rerun was interrupted" in row["error"] and str(rerun_dir) in row["error"]
    assert row["leftovers"] == [{"path": str(rerun_dir), "bytes": size}]
    table = runner.invoke(app, ["status", str(cfg)]).output
    assert "stage_2: last rerun was interrupted" in table and f"{rerun_dir} ({size} B)" in table

    # The node's next run removes what the killed rerun left (the node itself is complete: skipped).
    lines: list[str] = []
    run_workflow(cfg, log=lines.append)
    assert wf.calls() == ["stage_2"]  # the killed rerun's only
    assert not rerun_dir.exists() and not list(node_dir.glob(".*.partial-*"))
    assert any(line.startswith(f"removed {rerun_dir} ({size} B)") for line in lines)
    assert {p.name: p.read_bytes() for p in (node_dir / res["stage_2"].key).iterdir()} == before
    row = {r["node"]: r for r in workflow_status(cfg)}["stage_2"]
    assert row["leftovers"] == [] and "interrupted" in row["error"] and str(rerun_dir) not in row["error"]

    # `slimmoe status --clean` removes them without running anything.
    rerun_dir = _kill_mid_rerun(cfg, wf, tmp_path, "rerun2.log")
    assert list(node_dir.glob(".*.partial-*"))
    result = runner.invoke(app, ["status", str(cfg), "--clean", "--json"])
    assert result.exit_code == 0, result.output
    assert f"removed {rerun_dir}" in result.stderr
    rows = json.loads(result.stdout)
    assert all(r["leftovers"] == [] for r in rows) and {r["state"] for r in rows} == {"done"}
    assert not rerun_dir.exists() and not list(node_dir.glob(".*.partial-*"))
    assert {p.name: p.read_bytes() for p in (node_dir / res["stage_2"].key).iterdir()} == before
    assert "nothing to clean" in runner.invoke(app, ["status", str(cfg), "--clean"]).output
    assert wf.calls() == ["stage_2"]  # the killed rerun's only: cleaning ran no node


def test_rerun_keeps_old_output_when_new_run_fails(wf, monkeypatch):
    from slimmoe.workflows.driver import NodeFailed, rerun_node, run_workflow, workflow_status

    cfg = wf.config()
    res = run_workflow(cfg, log=lambda s: None)
    wf.calls()
    out = wf.root / "store" / "wf" / "stage_2" / res["stage_2"].key
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    monkeypatch.setenv("STANDIN_FAIL", "stage_2")
    with pytest.raises(NodeFailed, match="stage_2"):
        rerun_node(cfg, "stage_2", log=lambda s: None)
    assert wf.calls() == ["stage_2"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []
    row = {r["node"]: r for r in workflow_status(cfg)}["stage_2"]
    assert row["state"] == "done" and "last rerun failed" in row["error"]

    # A rerun must not resume from stale state in the stable work dir (Ray Train would, silently).
    monkeypatch.delenv("STANDIN_FAIL")
    stale = out.parent / "_work" / res["stage_2"].key
    stale.mkdir(parents=True)
    (stale / "progress.json").write_text(json.dumps({"step": 3, "acc": "bogus"}))
    lines: list[str] = []
    rerun_node(cfg, "stage_2", log=lines.append)
    assert wf.calls() == ["stage_2"]
    assert not any("resum" in line for line in lines)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after["model.txt"] == before["model.txt"]
    assert json.loads(after["_SUCCESS"])["started"] > json.loads(before["_SUCCESS"])["finished"]

    rerun_node(cfg, "stage_2", downstream=True, log=lambda s: None)
    assert wf.calls() == ["stage_2", "stage_3", "evaluate_stage_3"]


def test_rerun_unknown_node_lists_valid_names(wf):
    from typer.testing import CliRunner

    from slimmoe.workflows.cli import app
    from slimmoe.workflows.driver import UnknownNodeError, rerun_node

    cfg = wf.config()
    with pytest.raises(UnknownNodeError) as err:
        rerun_node(cfg, "stage_9", log=lambda s: None)
    assert "stage_9" in str(err.value) and all(n in str(err.value) for n in ALL_NODES)
    result = CliRunner().invoke(app, ["rerun", str(cfg), "stage_9"])
    assert result.exit_code == 2 and "evaluate_one_stage" in result.output
    assert wf.calls() == []


def test_status_cli_table_and_json(wf):
    from typer.testing import CliRunner

    from slimmoe.workflows.cli import app

    cfg = wf.config()
    runner = CliRunner()
    rows = json.loads(runner.invoke(app, ["status", str(cfg), "--json"]).output)
    assert {r["node"]: r["state"] for r in rows} == {"teacher": "done", **{n: "missing" for n in ALL_NODES}}
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "finished evaluate_one_stage" in result.output
    rows = json.loads(runner.invoke(app, ["status", str(cfg), "--json"]).output)
    assert all(r["state"] == "done" for r in rows)
    stage_2 = next(r for r in rows if r["node"] == "stage_2")
    assert stage_2["metric"].startswith("val_loss=") and stage_2["path"].endswith(stage_2["key"])
    table = runner.invoke(app, ["status", str(cfg)]).output
    assert table.splitlines()[0].split() == ["node", "state", "key", "time", "metric", "path"]
    assert sum(" done " in line for line in table.splitlines()) == len(ALL_NODES) + 1


def test_incomplete_outputs_are_never_taken_for_complete(wf):
    from slimmoe.workflows.dag import build_dag
    from slimmoe.workflows.driver import Driver, run_workflow

    cfg = wf.config()
    res = run_workflow(cfg, log=lambda s: None)
    wf.calls()
    driver = Driver(build_dag(cfg), log=lambda s: None)
    out = wf.root / "store" / "wf" / "stage_3" / res["stage_3"].key
    assert driver.marker("stage_3") is not None
    marker = json.loads((out / "_SUCCESS").read_text())

    (out / "_SUCCESS").write_text(json.dumps(dict(marker, key="0" * 16)))  # another key's marker
    assert driver.marker("stage_3") is None
    (out / "_SUCCESS").write_text(json.dumps(marker))
    (out / "model.txt").unlink()  # a marker pointing at deleted data
    assert driver.marker("stage_3") is None
    (out / "_SUCCESS").unlink()
    assert driver.marker("stage_3") is None

    run_workflow(cfg, log=lambda s: None)
    assert wf.calls() == ["stage_3"]  # same key again: the evaluation of it stays valid
    assert (out / "model.txt").exists() and driver.marker("stage_3") is not None


def test_uri_storage_uploads_outputs_and_downloads_inputs(wf, tmp_path):
    from slimmoe.workflows.driver import rerun_node, run_workflow, workflow_status

    remote = tmp_path / "bucket"
    cfg = wf.config(storage=f"file://{remote}", cache_dir=str(tmp_path / "cache"))
    res = run_workflow(cfg, log=lambda s: None)
    assert wf.calls() == ALL_NODES
    assert res["stage_2"].path == f"file://{remote}/wf/stage_2/{res['stage_2'].key}"
    assert outputs(remote).keys() == set(ALL_NODES)
    # inputs were downloaded to the local cache, outputs staged locally then uploaded
    assert (tmp_path / "cache" / "inputs" / "wf" / "stage_1" / res["stage_1"].key / "model.txt").exists()
    assert not any((tmp_path / "cache" / "staging" / "wf" / "stage_2").iterdir())
    assert list((remote / "wf" / "_logs").iterdir())

    run_workflow(cfg, log=lambda s: None)
    assert wf.calls() == []
    before = outputs(remote)
    rerun_node(cfg, "stage_2", log=lambda s: None)
    assert wf.calls() == ["stage_2"]
    assert outputs(remote) == before
    assert {r["state"] for r in workflow_status(cfg)} == {"done"}

    # Locally computed and URI-stored outputs are the same (storage is not part of any key).
    run_workflow(wf.config(), log=lambda s: None)
    assert outputs(wf.root / "store") == before


def test_a_workflow_config_cannot_load_code(wf):
    """No config field imports a module or runs a file: `plugins` and `kinds` are unknown fields."""
    from slimmoe.workflows.config import WorkflowConfigError
    from slimmoe.workflows.driver import run_workflow

    planted = wf.root / "planted.py"
    planted.write_text(f"open({str(wf.root / 'ran')!r}, 'w').write('imported')\n")
    cfg = write_config(wf.root, workflow_dict(wf.root, plugins=[str(planted)], kinds={"stage": "planted"}))
    with pytest.raises(WorkflowConfigError) as err:
        run_workflow(cfg, log=lambda s: None)
    assert "plugins: unknown field 'plugins'" in str(err.value) and "kinds: unknown field 'kinds'" in str(err.value)
    assert not (wf.root / "ran").exists() and wf.calls() == []


def test_a_second_live_run_of_a_node_on_this_host_is_refused(wf):
    import subprocess
    import socket

    from slimmoe.workflows.dag import build_dag
    from slimmoe.workflows.driver import Driver, NodeBusyError, run_workflow

    cfg = wf.config()
    dag = build_dag(cfg)
    other = subprocess.Popen(["sleep", "60"])  # stands in for another driver that is running stage_1
    try:
        key = dag.nodes["stage_1"].key
        Driver(dag, log=lambda s: None)._write_attempt("stage_1", key, {
            "node": "stage_1", "key": key, "state": "running", "pid": other.pid, "host": socket.gethostname(),
            "started": "2026-01-01T00:00:00+00:00", "partial": None})
        with pytest.raises(NodeBusyError, match=rf"pid {other.pid}"):
            run_workflow(cfg, log=lambda s: None)
        assert "stage_1" not in wf.calls()
    finally:
        other.kill()
        other.wait()
    run_workflow(cfg, log=lambda s: None)  # that run is gone: the node runs
    assert "stage_1" in wf.calls()


def test_uri_rerun_killed_after_deleting_the_old_output_keeps_the_new_one(wf, tmp_path, monkeypatch):
    from slimmoe.workflows.dag import build_dag
    from slimmoe.workflows.driver import rerun_node, run_workflow
    from slimmoe.workflows.storage import Store

    remote = tmp_path / "bucket"
    cfg = wf.config(storage=f"file://{remote}", cache_dir=str(tmp_path / "cache"))
    run_workflow(cfg, log=lambda s: None)
    final = remote / "wf" / "stage_2" / build_dag(cfg).nodes["stage_2"].key
    wf.calls()
    real_move = Store.move

    def dies_on_promote(self, src, dst):
        if ".partial-" in src:
            raise KeyboardInterrupt("killed between deleting the old output and moving the new one")
        return real_move(self, src, dst)

    monkeypatch.setattr(Store, "move", dies_on_promote)
    with pytest.raises(KeyboardInterrupt):
        rerun_node(cfg, "stage_2", log=lambda s: None)
    assert not final.exists()  # the old output is gone, the new one is staged beside it
    monkeypatch.setattr(Store, "move", real_move)
    wf.calls()
    run_workflow(cfg, log=lambda s: None)
    assert wf.calls() == []  # the staged, complete copy was promoted: nothing is recomputed
    assert (final / "_SUCCESS").exists() and not list(final.parent.glob(".*.partial-*"))
