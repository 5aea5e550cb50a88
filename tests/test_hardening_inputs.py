"""What a careful user hit (issue 24, items 1, 4, 5 and 9): inputs that ran to a misleading result or
failed late. Each is now refused before the expensive work, in one message that names the field (with
its YAML line, in a workflow), the file where one is at fault, and the fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from slimmoe.workflows.cli import app
from standins import take_calls, workflow_dict, write_config
from tiny import stdlib_texts

runner = CliRunner()


def _refused(result) -> str:
    """A refusal: exit 2, no traceback; its output."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    return result.output


def _error_line(result) -> str:
    """The `error:` line of a refusal that came back from a Ray Data worker (Ray Data logs the worker's
    exception itself, on stderr, before the command's own line)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _line_of(path: Path, text: str, after: str | None = None) -> int:
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line) if after else 0
    return next(i for i, line in enumerate(lines[start:], start + 1) if text in line)


def _workflow(ws: Path) -> dict:
    cfg = workflow_dict(ws)
    cfg["data"]["seq_len"] = 128  # within the stand-in teacher's context
    return cfg


def _run(ws: Path, cfg: dict):
    return runner.invoke(app, ["run", str(write_config(ws, cfg))])


def _runs(ws: Path, cfg: dict) -> None:
    result = _run(ws, cfg)
    assert result.exit_code == 0, result.output
    assert take_calls(ws / "calls.txt"), "no node ran"


# -- item 1: a requested lm-eval task that cannot run fails the evaluation ----------------------------

BROKEN_TASK = """\
task: slimmoe_broken
dataset_path: json
doc_to_text: "{{question}}"
doc_to_choice: [a, b
"""


@pytest.fixture(scope="module")
def tokens(tiny_model_dir, tmp_path_factory):
    from slimmoe.tasks.core.fingerprint import tokenizer_fingerprint
    from slimmoe.tasks.data.shards import write_tokenized_dataset

    ids = np.random.default_rng(0).integers(3, 90, size=(4, 16))
    out = tmp_path_factory.mktemp("lm_eval_inputs") / "tokens"
    write_tokenized_dataset(out, {"train": ids, "validation": ids}, tokenizer_fingerprint(tiny_model_dir), eos_token_id=2)
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    """Every check must come before the model is loaded: loading it fails the test."""
    import slimmoe.tasks.nodes.evaluate as evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the lm-eval tasks were checked")

    monkeypatch.setattr(evaluate, "load_model", refuse)


def _evaluate(model_dir, tokens, out, *extra):
    return runner.invoke(app, ["evaluate", str(model_dir), "--data", str(tokens), "--device", "cpu", "--max-rows", "2",
                               "--out", str(out), *extra])


def test_a_broken_task_yaml_fails_the_evaluation_with_the_files_own_error(tiny_model_dir, tokens, tmp_path,
                                                                           no_model_load):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "slimmoe_broken.yaml").write_text(BROKEN_TASK)
    out = _refused(_evaluate(tiny_model_dir, tokens, tmp_path / "eval", "--lm-eval-tasks", "slimmoe_broken",
                             "--lm-eval-include-path", str(tasks)))
    assert f"its task file {tasks / 'slimmoe_broken.yaml'} could not be loaded" in out
    assert "while parsing a flow sequence" in out  # the YAML parser's own words
    assert "not a registered task" not in out
    assert not (tmp_path / "eval" / "report.json").exists()


def test_a_missing_include_directory_is_refused_naming_the_field(tiny_model_dir, tokens, tmp_path, no_model_load):
    out = _refused(_evaluate(tiny_model_dir, tokens, tmp_path / "eval", "--lm-eval-tasks", "a",
                             "--lm-eval-include-path", str(tmp_path / "nowhere")))
    assert f"lm_eval_include_path '{tmp_path / 'nowhere'}' is not a directory" in out


def test_an_unknown_task_name_fails_naming_where_it_was_looked_for(tiny_model_dir, tokens, tmp_path, no_model_load,
                                                                  monkeypatch):
    from lm_eval.tasks import TaskManager

    import slimmoe.tasks.evaluation.lm_eval as le

    # lm-eval's bundled tasks take a minute to index: the include directory alone stands in for them.
    monkeypatch.setattr(le, "_task_manager", lambda path: TaskManager(include_path=path, include_defaults=False))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "other.yaml").write_text(BROKEN_TASK.replace("slimmoe_broken", "other"))
    out = _refused(_evaluate(tiny_model_dir, tokens, tmp_path / "eval", "--lm-eval-tasks", "no_such_task",
                             "--lm-eval-include-path", str(tasks)))
    assert f"'no_such_task' not found in lm-eval's bundled tasks and {tasks}" in out
    assert f"{tasks / 'other.yaml'} could not be loaded" in out  # what the directory held that did not load


def test_a_workflow_refuses_a_missing_include_directory_and_a_broken_task_at_validation(ws):
    cfg = _workflow(ws)
    cfg["evaluate"].update(lm_eval_tasks="slimmoe_broken", lm_eval_include_path=str(ws / "nowhere"))
    path = write_config(ws, cfg)
    out = _refused(runner.invoke(app, ["run", str(path)]))
    assert f"wf.yaml:{_line_of(path, 'lm_eval_include_path')}: evaluate.lm_eval_include_path: " in out
    assert not (ws / "calls.txt").exists()

    (ws / "tasks").mkdir()
    (ws / "tasks" / "slimmoe_broken.yaml").write_text(BROKEN_TASK)
    cfg["evaluate"]["lm_eval_include_path"] = str(ws / "tasks")
    path = write_config(ws, cfg)
    out = _refused(runner.invoke(app, ["run", str(path)]))
    assert f"wf.yaml:{_line_of(path, 'lm_eval_tasks')}: evaluate.lm_eval_tasks: lm-eval task 'slimmoe_broken': " in out
    assert "while parsing a flow sequence" in out
    assert not (ws / "calls.txt").exists()


# -- item 4: early-stop rows that overlap the evaluated rows ------------------------------------------


def test_early_stop_rows_overlapping_the_evaluated_rows_are_refused_once_the_rows_are_known(ws, monkeypatch):
    monkeypatch.setenv("STANDIN_ROWS", "5888:1133")  # what the stand-in tokenize and teacher_logits hold
    cfg = _workflow(ws)
    cfg["evaluate"]["max_rows"] = 200
    _runs(ws, cfg)  # the data nodes are done: their rows are known from here on

    cfg["stages"][0].update(early_stop_min_improvement=0.1, early_stop_rows=1100)
    path = write_config(ws, cfg)
    out = _refused(runner.invoke(app, ["run", str(path)]))
    assert (f"wf.yaml:{_line_of(path, 'early_stop_rows: 1100')}: stages[0].early_stop_rows: early_stop_rows=1100 overlaps "
            "the rows evaluate reports on: the validation split holds 1133 rows; the early stop measures its last 1100 "
            "(rows 33-1132) and evaluate (max_rows=200) scores its first 200 (rows 0-199)") in out
    assert "lower early_stop_rows to at most 933, lower evaluate.max_rows to at most 33" in out
    assert not take_calls(ws / "calls.txt")

    cfg["stages"][0]["early_stop_rows"] = 933  # the fix it names
    _runs(ws, cfg)


def test_the_stage_refuses_the_overlap_from_its_own_cache(tmp_path):
    """A fresh workflow's rows are known only once tokenize ran: the stage checks its validation cache
    before any worker starts, with the rows the workflow's evaluate scores filled into its config."""
    from slimmoe.tasks.nodes import stage
    from slimmoe.tasks.slimming.config import StageConfig

    class Cache:
        num_rows = 1133

    cfg = StageConfig(expert_intermediate_size=8, token_budget=3, early_stop_min_improvement=0.1, early_stop_rows=1100,
                      evaluated_rows=200)
    from slimmoe.tasks.slimming.adaptive import heldout_overlap

    assert stage.heldout_overlap is heldout_overlap  # the one rule, at validation and in the stage
    assert "overlaps the rows evaluate reports on" in heldout_overlap(cfg.early_stop_rows, cfg.evaluated_rows,
                                                                       Cache.num_rows)
    assert heldout_overlap(933, 200, 1133) is None and heldout_overlap(1100, None, 1133) is None
    assert "set evaluate.max_rows to at most 33" in heldout_overlap(1100, "all", 1133)


# -- item 5: files in a text glob that are not text -----------------------------------------------------


def _text_dir(root: Path) -> Path:
    data = root / "data"
    data.mkdir()
    for i, text in enumerate(stdlib_texts(max_files=4)):
        (data / f"doc{i}.txt").write_text(text)
    return data


def test_tokenize_refuses_a_binary_file_in_a_text_glob_naming_it(tiny_model_dir, tmp_path):
    data = _text_dir(tmp_path)
    (data / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    out = tmp_path / "tokens"
    message = _refused(runner.invoke(app, ["tokenize", str(data / "*.txt"), str(tiny_model_dir), str(out)]))
    assert f"{data / 'image.txt'} holds a NUL byte at offset 8: it is a binary file, not text" in message
    assert "skip_unreadable: true" in message and not out.exists()

    (data / "image.txt").unlink()
    (data / "latin1.txt").write_bytes("café crème\n".encode("latin-1"))
    message = _refused(runner.invoke(app, ["tokenize", str(data / "*.txt"), str(tiny_model_dir), str(out)]))
    assert f"{data / 'latin1.txt'} is not UTF-8 text (byte 0xe9 at offset 3)" in message


def test_skip_unreadable_skips_them_with_a_count_and_a_late_bad_byte_is_found_too(ray_cluster, tiny_model_dir,
                                                                                  tmp_path):
    data = _text_dir(tmp_path)
    # Valid for longer than the head the cheap check reads: found as the worker decodes the whole file.
    (data / "late.txt").write_bytes(b"x = 1\n" * 20000 + b"\xff\n")
    out = tmp_path / "tokens"
    message = _error_line(runner.invoke(app, ["tokenize", str(data / "*.txt"), str(tiny_model_dir), str(out),
                                              "--seq-len", "32"]))
    assert f"{data / 'late.txt'} is not UTF-8 text (byte 0xff at offset 120000)" in message
    assert not out.exists()

    (data / "image.txt").write_bytes(b"\x00\x01\x02" * 100)

    result = runner.invoke(app, ["tokenize", str(data / "*.txt"), str(tiny_model_dir), str(out), "--seq-len", "32",
                                 "--skip-unreadable"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["skipped_unreadable_files"] == 2
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == 4


def test_a_workflow_refuses_a_binary_file_in_its_source_at_the_data_source_line(ws):
    (ws / "docs").mkdir()
    (ws / "docs" / "a.txt").write_text("hello\n")
    (ws / "docs" / "b.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00" * 8)
    cfg = _workflow(ws)
    cfg["data"]["source"] = str(ws / "docs" / "*.txt")
    path = write_config(ws, cfg)
    out = _refused(runner.invoke(app, ["run", str(path)]))
    assert (f"wf.yaml:{_line_of(path, 'source:')}: data.source: {ws / 'docs' / 'b.txt'} holds a NUL byte at offset 7"
            in out)
    assert not (ws / "calls.txt").exists()

    cfg["data"]["skip_unreadable"] = True
    _runs(ws, cfg)


# -- item 9: the plan's fix for a stage that does not fit passes every check of the run ----------------


def test_the_plans_fix_is_one_the_run_accepts(ws, monkeypatch):
    monkeypatch.setenv("STANDIN_ROWS", "64:40")  # the train logit cache holds 64 rows
    cfg = _workflow(ws)
    _runs(ws, cfg)

    # Over a million rows a micro-batch: far more memory than this machine has, and than the cache holds.
    cfg["stages"][0]["micro_batch"] = 2**20
    path = write_config(ws, cfg)
    out = _refused(runner.invoke(app, ["run", str(path)]))
    assert (f"wf.yaml:{_line_of(path, 'micro_batch: 1048576')}: stages[0].micro_batch: the train logit cache holds 64 rows: "
            "the logit cache holds fewer than micro_batch=1048576 x num_workers=1 rows") in out
    fix = re.search(r"stage_1: the \w+ phase needs .* available: set micro_batch: (\d+) and grad_accum: (\d+)", out)
    assert fix, out
    micro_batch, grad_accum = map(int, fix.groups())
    assert micro_batch <= 64 and micro_batch * grad_accum == 2**20  # the same tokens per step, in rows the cache has
    assert not take_calls(ws / "calls.txt")

    cfg["stages"][0].update(micro_batch=micro_batch, grad_accum=grad_accum)
    _runs(ws, cfg)
