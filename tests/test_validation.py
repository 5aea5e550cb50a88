"""What `slimmoe run` checks before anything starts: the data source, the teacher's weight files, and
typos in field names; each problem with the YAML line of its field."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from typer.testing import CliRunner

from slimmoe.workflows.cli import app
from standins import workflow_dict, write_config, write_weights

runner = CliRunner()




def refused(ws: Path, cfg: dict, *patterns: str, fresh: bool = True) -> tuple[str, Path]:
    """`slimmoe run` on `cfg` exits 2 with every pattern in its message, having run no node (and, where
    the store was `fresh`, having written nothing there)."""
    path = write_config(ws, cfg)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    for p in patterns:
        assert re.search(p, result.output), f"{p!r} not in:\n{result.output}"
    assert "Traceback" not in result.output
    assert not (ws / "calls.txt").exists(), "a node ran"
    assert not fresh or not (ws / "store" / "wf").exists() or not [p for p in (ws / "store" / "wf").iterdir()
                                                                  if not p.name.startswith(".")]
    return result.output, path


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# -- item: the data source ---------------------------------------------------------------------------


def test_a_data_source_that_matches_nothing_is_refused_before_any_node_runs(ws):
    cfg = workflow_dict(ws)
    cfg["data"]["source"] = str(ws / "corpus" / "*.jsonl")  # a glob over a directory that is not there
    out, path = refused(ws, cfg, r"data\.source: data path '.*corpus/\*\.jsonl' matches no files")
    assert f"wf.yaml:{line_of(path, 'source:')}: data.source" in out

    cfg["data"]["source"] = "nowhere.txt"  # relative to the config's directory, and missing
    refused(ws, cfg, r"data\.source: data path 'nowhere\.txt' matches no files")

    # The source is also read as the tokenize node would: here its records lack the text field.
    (ws / "corpus").mkdir()
    (ws / "corpus" / "a.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    cfg["data"]["source"] = str(ws / "corpus" / "*.jsonl")
    refused(ws, cfg, r"data\.source: text field 'text' is missing in .*a\.jsonl:1")


def test_a_uri_source_that_cannot_be_listed_is_refused_and_a_tokenized_source_may_go(ws):
    from slimmoe.workflows.driver import run_workflow

    cfg = workflow_dict(ws)
    # Listed at validation like a local glob: an endpoint that does not answer is refused at data.source.
    cfg["data"]["source"] = "s3://no-such-bucket/corpus/*.jsonl?endpoint_override=127.0.0.1:9&scheme=http"
    refused(ws, cfg, r"data\.source: data .*s3://no-such-bucket/corpus/\*\.jsonl.* cannot be", fresh=True)

    cfg = workflow_dict(ws)
    run_workflow(write_config(ws, cfg), log=lambda s: None)
    (ws / "calls.txt").unlink()
    (ws / "data.txt").unlink()
    lines: list[str] = []
    run_workflow(write_config(ws, cfg), log=lines.append)  # the tokens are there: the text is not needed again
    assert any(line.startswith("skipped tokenize") for line in lines)
    cfg["data"]["seq_len"] = 64  # a new tokenization would need it
    refused(ws, cfg, r"data\.source: data path '.*data\.txt' matches no files", fresh=False)


# -- item: the teacher's safetensors files -----------------------------------------------------------


def truncate(path: Path, keep: int) -> int:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return len(data)


def test_a_truncated_teacher_is_refused_with_the_file_named(ws):
    weights = ws / "teacher" / "model.safetensors"
    size = truncate(weights, -8)
    cfg = workflow_dict(ws)
    out, path = refused(ws, cfg, rf"teacher\.path: {re.escape(str(weights))} is truncated: {size - 8} bytes, but its "
                                 rf"header describes {size} bytes \(8 missing\); copy or download it again")
    assert f"wf.yaml:{line_of(path, 'path:')}: teacher.path" in out

    truncate(weights, 5)  # not even the header length
    refused(ws, cfg, rf"{re.escape(str(weights))} is truncated: 5 bytes")

    # A sharded checkpoint whose index names a shard that is not there.
    write_weights(weights)
    weights.rename(ws / "teacher" / "model-00001-of-00002.safetensors")
    (ws / "teacher" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors",
                                        "v": "model-00002-of-00002.safetensors"}}))
    refused(ws, cfg, r"teacher\.path: .*model\.safetensors\.index\.json names 1 file\(s\) that .*teacher lacks: "
                     r"model-00002-of-00002\.safetensors")
    write_weights(ws / "teacher" / "model-00002-of-00002.safetensors")
    assert runner.invoke(app, ["run", str(path)]).exit_code == 0


def test_slim_on_a_truncated_checkpoint_is_one_message_naming_the_file(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    size = truncate(model / "model.safetensors", (model / "model.safetensors").stat().st_size // 2)
    result = runner.invoke(app, ["slim", str(model), str(tmp_path / "out"), "--expert-size", "12"])
    assert result.exit_code == 2, result.output
    assert f"{model / 'model.safetensors'} is truncated: {size // 2} bytes, but its header describes {size} bytes" \
        in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


# -- item: a misspelt field --------------------------------------------------------------------------


def test_a_misspelt_required_field_is_named_with_a_suggestion(ws):
    cfg = workflow_dict(ws)
    cfg["stages"][1]["token_budgt"] = cfg["stages"][1].pop("token_budget")
    out, path = refused(ws, cfg)
    typo = line_of(path, "token_budgt")
    assert f"wf.yaml:{typo}: stages[1].token_budgt: unknown field 'token_budgt'; did you mean token_budget?" in out
    assert (f"stages[1].token_budget: required field is missing; the unknown field 'token_budgt' (line {typo}) "
            "looks like a typo of it") in out

    # The same in a trim baseline's distill section, which the DAG builder validates.
    cfg = workflow_dict(ws)
    cfg["baselines"].append({"name": "trimmed", "kind": "trim", "method": "block-drop", "n": 1,
                             "distill": {"tokn_budget": 10}})
    out, path = refused(ws, cfg)
    assert (f"wf.yaml:{line_of(path, 'tokn_budget')}: baselines[1].distill.tokn_budget: unknown field "
            "'tokn_budget'; did you mean token_budget?") in out

    # An unknown key that resembles no missing field still lists the valid ones.
    cfg = workflow_dict(ws)
    cfg["stages"][0]["colour"] = "blue"
    out, _ = refused(ws, cfg, r"stages\[0\]\.colour: unknown field 'colour'; valid fields here: .*token_budget")
    assert "did you mean" not in out
