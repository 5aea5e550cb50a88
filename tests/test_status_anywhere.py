"""`slimmoe status` from a machine without the teacher's files (a laptop beside a cluster run), and
`slimmoe submit --command status|rerun` building the job that runs them on the cluster."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from typer.testing import CliRunner

from slimmoe.workflows.cli import app
from standins import ALL_NODES, take_calls, workflow_dict, write_config

runner = CliRunner()


def _rows(cfg) -> dict[str, dict]:
    result = runner.invoke(app, ["status", str(cfg), "--json"])
    assert result.exit_code == 0, result.output
    return {r["node"]: r for r in json.loads(result.output)}


def test_status_without_the_teachers_files_reads_the_teacher_the_run_recorded(ws):
    cfg = write_config(ws, workflow_dict(ws))
    assert runner.invoke(app, ["run", str(cfg)]).exit_code == 0
    before = _rows(cfg)
    assert {n: r["state"] for n, r in before.items()} == {"teacher": "done", **{n: "done" for n in ALL_NODES}}
    assert before["teacher"]["error"] is not None  # the teacher was there: still taken from the record, not read

    shutil.move(ws / "teacher", ws / "teacher.elsewhere")  # the laptop: the config and storage, no teacher
    away = _rows(cfg)
    assert {n: (r["state"], r["key"]) for n, r in away.items()} == {n: (r["state"], r["key"]) for n, r in before.items()}
    assert "not read here" in away["teacher"]["error"] and "recorded" in away["teacher"]["error"]
    table = runner.invoke(app, ["status", str(cfg)])
    assert table.exit_code == 0 and "teacher: not read here" in table.output

    # Without the record, status reads the teacher as run does, and says where it is missing.
    (ws / "store" / "wf" / "_teacher.json").unlink()
    missing = runner.invoke(app, ["status", str(cfg)])
    assert missing.exit_code == 2 and "teacher.path" in missing.output and "does not exist" in missing.output
    # `run` never takes the record: it needs the teacher's files.
    shutil.move(ws / "teacher.elsewhere", ws / "teacher")
    assert runner.invoke(app, ["run", str(cfg)]).exit_code == 0
    shutil.move(ws / "teacher", ws / "teacher.elsewhere")
    refused = runner.invoke(app, ["run", str(cfg)])
    assert refused.exit_code == 2 and "teacher.path" in refused.output


def test_a_config_naming_another_teacher_does_not_take_the_record(ws):
    cfg = write_config(ws, workflow_dict(ws))
    assert runner.invoke(app, ["run", str(cfg)]).exit_code == 0
    other = workflow_dict(ws)
    other["teacher"]["path"] = str(ws / "another-teacher")
    result = runner.invoke(app, ["status", str(write_config(ws, other, "other.yaml"))])
    assert result.exit_code == 2 and "another-teacher" in result.output and "does not exist" in result.output


@pytest.mark.parametrize("args, entry_tail", [
    (["--command", "status"], ["status"]),
    (["stage_2", "--command", "rerun"], ["rerun"]),
])
def test_submit_builds_a_status_or_rerun_job_that_the_cli_runs(ws, monkeypatch, args, entry_tail):
    from slimmoe.workflows.submit import CONFIG_NAME, job_command, prepare_submission

    cfg = write_config(ws, workflow_dict(ws))
    assert runner.invoke(app, ["run", str(cfg)]).exit_code == 0
    take_calls(ws / "calls.txt")
    command = "status" if "status" in args else "rerun"
    node = "stage_2" if command == "rerun" else None
    sub = prepare_submission(cfg, "http://10.1.2.3:8265", command=job_command(command, node))
    try:
        pkg = sub.runtime_env["py_modules"][-1]
        tail = ["stage_2"] if node else []
        assert sub.entrypoint == ["slimmoe", *entry_tail, "--config-package", sub.package_dir.name, CONFIG_NAME, *tail]
        # What the job runs, run here: the shipped config package importable as on the cluster.
        monkeypatch.syspath_prepend(str(sub.package_dir.parent))
        result = runner.invoke(app, sub.entrypoint[1:])
        assert result.exit_code == 0, result.output
        if command == "status":
            assert "stage_2" in result.output and "done" in result.output
            assert take_calls(ws / "calls.txt") == []
        else:
            assert [c.split(":")[0] for c in take_calls(ws / "calls.txt")] == ["stage_2"]
    finally:
        sys.modules.pop(sub.package_dir.name, None)
        sub.cleanup()
    assert pkg


@pytest.mark.parametrize("args, message", [
    (["--command", "rerun"], "--command rerun needs the NODE"),
    (["stage_2"], "NODE (stage_2) goes with --command rerun"),
    (["--command", "stop"], "is not one of run, status, rerun"),
])
def test_submit_refuses_a_command_without_its_node_or_a_node_without_rerun(ws, args, message):
    cfg = write_config(ws, workflow_dict(ws))
    result = runner.invoke(app, ["submit", str(cfg), *args, "--address", "http://10.1.2.3:8265"])
    assert result.exit_code == 2 and message in result.output, result.output
