"""`slimmoe report CONFIG` on workflows whose nodes already ran (the stand-in node kinds, which write an
evaluate `report.json` and a stage `metrics.json` in the real nodes' schema): the table against the
evaluate reports, the JSON, the curves, a half-finished run, nothing to report, and S3 storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimmoe.workflows.cli import app
from slimmoe.workflows.driver import NodeFailed, run_workflow
from standins import STANDIN_STEP_TOKENS, workflow_dict, write_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def report_cli(*args: str):
    result = CliRunner().invoke(app, ["report", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def node_file(store: Path, node: str, name: str) -> dict:
    """A file of the one complete output of `node` under the stand-in workflow's storage, read directly."""
    (path,) = [p for p in (store / "wf" / node).glob(f"[0-9a-f]*/{name}") if (p.parent / "_SUCCESS").exists()]
    return json.loads(path.read_text())


def table_rows(markdown: str) -> dict[str, list[str]]:
    """model -> its cells, from the Markdown table (the header under "model")."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_the_report_holds_every_evaluated_model_as_its_evaluate_node_reported_it(ws):
    evaluate = {"models": ["teacher", "stage_3", "one_stage"], "lm_eval_tasks": ["arc_easy", "piqa"]}
    config = write_config(ws, workflow_dict(ws, evaluate=evaluate))
    run_workflow(config, log=lambda _line: None)

    result = report_cli(str(config))
    assert result.exit_code == 0, result.output
    store = ws / "store"
    reports = {m: node_file(store, f"evaluate_{m}", "report.json") for m in evaluate["models"]}
    rows = table_rows(result.stdout)
    assert list(rows) == ["model", *evaluate["models"]]
    assert rows["model"][-2:] == ["arc_easy acc", "piqa acc"]
    for model, rep in reports.items():
        acc = [f"{rep['lm_eval'][t]['metrics']['acc,none']:.4f}" for t in ("arc_easy", "piqa")]
        assert rows[model] == [model, "-" if model == "teacher" else "after distillation",
                               f"{rep['parameters']['total']:,}", f"{rep['parameters']['active']:,}",
                               f"{rep['perplexity']:.2f}", f"{rep['kl_to_teacher']:.4f}",
                               f"{rep['throughput']['tokens_per_s']:.0f}", *acc]
    # The workflow has a one_stage baseline: the verdict compares it with the last stage.
    s3, one = reports["stage_3"], reports["one_stage"]
    assert f"validation perplexity: multi-stage {s3['perplexity']:.2f} (stage_3), one-stage {one['perplexity']:.2f} " \
           "(one_stage)" in result.stdout
    assert "Not complete" not in result.stdout

    out = store / "wf" / "_report"
    assert (out / "report.md").read_text() == result.stdout
    saved = json.loads((out / "report.json").read_text())  # `--json` prints the same: the tests below
    for row in saved["rows"]:
        rep = reports[row["model"]]
        assert (row["total_params"], row["active_params"], row["perplexity"], row["kl_to_teacher"], row["tokens_per_s"]) \
            == (rep["parameters"]["total"], rep["parameters"]["active"], rep["perplexity"], rep["kl_to_teacher"],
                rep["throughput"]["tokens_per_s"])
        assert row["lm_eval"] == {t: {k: v for k, v in rep["lm_eval"][t]["metrics"].items() if k != "alias"}
                                  for t in ("arc_easy", "piqa")}
    assert saved["missing"] == [] and saved["verdict"] in result.stdout

    # The curves: the three stages back to back on one token axis, and the one-stage baseline on its own.
    histories = {n: node_file(store, n, "metrics.json")["history"] for n in ("stage_1", "stage_2", "stage_3", "one_stage")}
    offsets = {"stage_1": 0, "stage_2": 3 * STANDIN_STEP_TOKENS, "stage_3": 6 * STANDIN_STEP_TOKENS}
    assert saved["curves"] == {
        "multi-stage": [[offsets[n] + h["tokens"], h["kl"]] for n in offsets for h in histories[n]],
        "one_stage": [[h["tokens"], h["kl"]] for h in histories["one_stage"]]}
    png = (out / "curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_a_half_finished_run_is_reported_with_what_is_missing(ws, monkeypatch, tmp_path):
    config = write_config(ws, workflow_dict(ws, evaluate={"models": ["stage_3", "one_stage", "teacher"]}))
    monkeypatch.setenv("STANDIN_FAIL", "evaluate_one_stage")
    with pytest.raises(NodeFailed):
        run_workflow(config, log=lambda _line: None)  # evaluate_teacher, after it, never starts

    out = tmp_path / "elsewhere"
    result = report_cli(str(config), "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["model"] for r in report["rows"]] == ["stage_3"]
    assert report["rows"][0]["perplexity"] == node_file(ws / "store", "evaluate_stage_3", "report.json")["perplexity"]
    assert report["missing"] == [{"node": "evaluate_one_stage", "state": "failed"},
                                 {"node": "evaluate_teacher", "state": "missing"}]
    assert report["verdict"] is None  # the one-stage baseline is not evaluated yet
    assert set(report["curves"]) == {"multi-stage", "one_stage"}  # its stage did finish
    markdown = (out / "report.md").read_text()
    assert "Not complete yet (left out above): evaluate_one_stage (failed), evaluate_teacher (missing)." \
        in markdown
    assert json.loads((out / "report.json").read_text()) == report and (out / "curves.png").stat().st_size > 10_000
    assert not (ws / "store" / "wf" / "_report").exists()


def test_a_workflow_with_no_complete_evaluate_node_gets_one_line_saying_what_to_run(ws):
    config = write_config(ws, workflow_dict(ws))
    result = report_cli(str(config))
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.output.strip().splitlines()
    assert "no evaluate node of workflow 'wf' is complete yet (evaluate_stage_3 (missing), evaluate_one_stage " \
           "(missing)): run `slimmoe run CONFIG` first" in line


def test_the_report_of_a_workflow_on_s3_is_written_to_the_bucket(ws, s3_server):
    from slimmoe.workflows.storage import Store

    bucket = s3_server.new_bucket()
    storage = s3_server.uri(bucket)
    # One stage and one evaluation: on S3 every node costs round trips.
    config = write_config(ws, workflow_dict(ws, storage=storage, cache_dir=str(ws / "cache"), baselines=[],
                                            stages=[{"expert_intermediate_size": 32, "token_budget": 3}],
                                            evaluate={"models": ["stage_1"]}))
    run_workflow(config, log=lambda _line: None)

    result = report_cli(str(config), "--json")
    assert result.exit_code == 0, result.output
    assert f"report written to s3://{bucket}/store/wf/_report" in result.output
    assert {"store/wf/_report/report.md", "store/wf/_report/report.json", "store/wf/_report/curves.png"} \
        <= set(s3_server.keys(bucket))
    store = Store(storage)
    saved = json.loads(store.read_text(store.join("wf", "_report", "report.json")))
    assert saved == json.loads(result.stdout) and [r["model"] for r in saved["rows"]] == ["stage_1"]
    evaluated = json.loads(store.read_text(store.join("wf", "evaluate_stage_1", next(
        k for k in store.listdir(store.join("wf", "evaluate_stage_1")) if not k.startswith(("_", "."))), "report.json")))
    assert saved["rows"][0]["perplexity"] == evaluated["perplexity"] and saved["verdict"] is None
    assert len(saved["curves"]["multi-stage"]) == 3
