"""What a careful user hit (issue 24, items 10, 15 and 16): each case driven from the command line,
answered in one line that names the file, line or field and the fix."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimmoe.workflows.cli import app
from standins import workflow_dict, write_config
from tiny import stdlib_texts

runner = CliRunner()


def _one_line_error(result) -> str:
    """The refusal's message: exit 2, no traceback, one `error:` line."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _error_line(result) -> str:
    """The `error:` line of a refusal that came back from a Ray Data worker: Ray Data logs the worker's
    exception itself (on stderr, before the command's own line), so only the line is checked."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _refusal(result) -> str:
    """A workflow refused at validation: exit 2, no traceback; the problems under one `error:` line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    return result.output


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _good_lines(n: int) -> list[str]:
    texts = [t for t in stdlib_texts(max_files=n, max_chars=60) if t]
    return [json.dumps({"text": texts[i % len(texts)], "id": i}) for i in range(n)]


# -- item 10: JSONL errors name file:line -----------------------------------------------------------


def test_tokenize_names_the_file_and_line_of_an_unterminated_jsonl_record(ray_cluster, tiny_model_dir, tmp_path):
    lines = _good_lines(60)
    lines[49] = '{"text": "an unterminated string'
    data = _jsonl(tmp_path / "docs.jsonl", lines)
    out = tmp_path / "tokens"
    message = _error_line(runner.invoke(app, ["tokenize", str(data), str(tiny_model_dir), str(out), "--seq-len", "16"]))
    assert f"{data}:50" in message and "line 1 column" not in message
    assert "column 10" in message  # where on line 50 the JSON breaks
    assert not out.exists()


def test_tokenize_says_a_field_missing_on_one_line_is_that_line_s_problem(ray_cluster, tiny_model_dir, tmp_path):
    lines = _good_lines(60)
    lines[49] = json.dumps({"title": "no text on this line", "id": 49})
    data = _jsonl(tmp_path / "docs.jsonl", lines)
    message = _error_line(runner.invoke(app, ["tokenize", str(data), str(tiny_model_dir), str(tmp_path / "t"),
                                              "--seq-len", "16"]))
    assert f"{data}:50" in message and "set text_field" not in message
    assert "first record" in message and "title" in message  # the keys the line has instead


def test_a_raw_line_separator_the_reader_splits_at_is_named_not_called_bad_json(ray_cluster, tiny_model_dir, tmp_path):
    """Valid JSON with a raw U+2028 in a string (json.dumps(ensure_ascii=False) writes it so): Ray's line
    reader splits there, so the worker sees two broken halves; the message says what happened."""
    lines = _good_lines(60)
    lines[49] = json.dumps({"text": "before\u2028after"}, ensure_ascii=False)
    data = _jsonl(tmp_path / "docs.jsonl", lines)
    message = _error_line(runner.invoke(app, ["tokenize", str(data), str(tiny_model_dir), str(tmp_path / "t"),
                                              "--seq-len", "16"]))
    assert f"{data}:50" in message and "U+2028" in message and "not JSON" not in message


def test_calibration_data_names_the_file_and_line_too(tiny_model_dir, tmp_path):
    """`slim --data` reads JSONL in one process (no Ray): the same file:line and advice."""
    lines = _good_lines(60)
    lines[49] = '{"text": "an unterminated string'
    data = _jsonl(tmp_path / "docs.jsonl", lines)
    message = _one_line_error(runner.invoke(app, ["slim", str(tiny_model_dir), str(tmp_path / "s"), "--expert-size", "24",
                                                  "--data", str(data), "--calibration-batches", "40", "--seq-len", "32"]))
    assert f"{data}:50" in message and "line 1 column" not in message
    lines[49] = json.dumps({"title": "no text"})
    _jsonl(data, lines)
    message = _one_line_error(runner.invoke(app, ["slim", str(tiny_model_dir), str(tmp_path / "s"), "--expert-size", "24",
                                                  "--data", str(data), "--calibration-batches", "40", "--seq-len", "32"]))
    assert f"{data}:50" in message and "set text_field" not in message


def test_a_wrong_text_field_still_gets_the_text_field_advice(tiny_model_dir, tmp_path):
    data = _jsonl(tmp_path / "docs.jsonl", [json.dumps({"body": "x"})] * 3)
    message = _one_line_error(runner.invoke(app, ["tokenize", str(data), str(tiny_model_dir), str(tmp_path / "t")]))
    assert f"{data}:1" in message and "set text_field" in message


# -- item 15: truncated safetensors inputs, and the packed file's mode --------------------------------


def _truncate(path: Path, drop: int = 10) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-drop])


def test_slim_with_truncated_scores_is_one_line(tiny_model_dir, tmp_path):
    from slimmoe.tasks.slimming.streaming import streaming_magnitude_scores

    scores = tmp_path / "scores.safetensors"
    streaming_magnitude_scores(tiny_model_dir).save(scores)
    _truncate(scores)
    out = tmp_path / "slim"
    message = _one_line_error(runner.invoke(app, ["slim", str(tiny_model_dir), str(out), "--expert-size", "24",
                                                  "--scores", str(scores)]))
    assert str(scores) in message and "truncated" in message
    assert not out.exists()


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, tmp_path_factory):
    """`slimmoe quantize` output of the tiny model, and a tokenize-node output to evaluate it on."""
    from slimmoe.tasks.core.fingerprint import tokenizer_fingerprint
    from slimmoe.tasks.data.shards import write_tokenized_dataset

    root = tmp_path_factory.mktemp("quantized")
    data = root / "data"
    data.mkdir()
    for i, text in enumerate(stdlib_texts(max_files=6)):
        (data / f"doc{i}.txt").write_text(text)
    out = root / "q"
    res = runner.invoke(app, ["quantize", str(tiny_model_dir), str(out), "--avg-bits", "3", "--data", str(data / "*.txt"),
                              "--calibration-batches", "1", "--seq-len", "32", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    import numpy as np

    ids = np.random.default_rng(0).integers(3, 90, size=(4, 16))
    write_tokenized_dataset(root / "tokens", {"train": ids, "validation": ids}, tokenizer_fingerprint(tiny_model_dir),
                            eos_token_id=2)
    return {"out": out, "tokens": root / "tokens", "root": root}


def test_the_packed_file_gets_the_mode_of_the_rest_of_the_output(quantized):
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in quantized["out"].iterdir() if p.is_file()}
    assert modes["model.quantized.safetensors"] == 0o666 & ~umask, modes
    assert len(set(modes.values())) == 1, modes


def test_evaluate_on_a_truncated_packed_file_is_one_line(quantized, tmp_path):
    import shutil

    from slimmoe.tasks.mcmoe.packed import WEIGHTS_FILE

    broken = tmp_path / "q"
    shutil.copytree(quantized["out"], broken)
    _truncate(broken / WEIGHTS_FILE)
    message = _one_line_error(runner.invoke(app, ["evaluate", str(broken), "--data", str(quantized["tokens"]),
                                                  "--device", "cpu", "--out", str(tmp_path / "eval")]))
    assert str(broken / WEIGHTS_FILE) in message and "truncated" in message


# -- item 16 -------------------------------------------------------------------------------------------


S3_DUMMY_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _workflow(ws: Path, **changes) -> dict:
    """The stand-in workflow with a sequence length the tiny teacher's context holds."""
    cfg = workflow_dict(ws, **changes)
    cfg["data"] = dict(cfg["data"], seq_len=64)
    return cfg


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_against_an_s3_endpoint_that_does_not_answer_is_one_line(ws, monkeypatch):
    for k, v in S3_DUMMY_ENV.items():
        monkeypatch.setenv(k, v)
    port = _closed_port()
    uri = f"s3://bucket/store?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    config = write_config(ws, _workflow(ws, storage=uri))
    message = _one_line_error(runner.invoke(app, ["status", str(config)]))
    assert "s3://bucket/store" in message and "cannot be read" in message
    # what `run` says of the same storage (its writability probe)
    assert "s3://bucket/store" in _refusal(runner.invoke(app, ["run", str(config)]))


def test_plan_refuses_a_negative_gpu_memory_naming_the_option(ws):
    config = write_config(ws, _workflow(ws))
    message = _one_line_error(runner.invoke(app, ["plan", str(config), "--gpu-memory-gb", "-3"]))
    assert "--gpu-memory-gb" in message and "resources.gpu_memory_gb" in message
    assert "capacity" not in message
    message = _one_line_error(runner.invoke(app, ["plan", str(config), "--mfu", "1.5"]))
    assert "--mfu" in message


def test_logits_inspect_on_a_model_directory_says_it_is_no_cache(tiny_model_dir):
    message = _one_line_error(runner.invoke(app, ["logits", "inspect", str(tiny_model_dir)]))
    assert "model directory, not a logit cache" in message and "incomplete" not in message


def test_a_run_refused_for_a_truncated_teacher_leaves_no_storage_behind(ws):
    _truncate(ws / "teacher" / "model.safetensors", 4)
    config = write_config(ws, _workflow(ws))
    message = _refusal(runner.invoke(app, ["run", str(config)]))
    assert "truncated" in message
    assert not (ws / "store").exists()


def test_the_probe_that_leaves_nothing_behind_still_refuses_storage_it_cannot_write(ws):
    (ws / "a_file").write_text("x")
    config = write_config(ws, _workflow(ws, storage=str(ws / "a_file" / "store")))
    assert "is not writable" in _refusal(runner.invoke(app, ["run", str(config)]))
    assert (ws / "a_file").read_text() == "x"
