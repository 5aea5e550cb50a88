"""What a careful user hit (issue 24, items 2, 3, 6 and 8): settings that validated, then ran to a
wrong result or failed after expensive work. Each is now refused before anything runs, in one line
that names the field (with its YAML line, in a workflow) and the fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimmoe.workflows.cli import app
from standins import take_calls, workflow_dict, write_config
from tiny import stdlib_texts, tiny_config, train_tokenizer

runner = CliRunner()


def _refused(result) -> str:
    """The one `error:` line of a refusal (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert any("error" in line for line in lines), result.output
    return result.output


def _line_of(path: Path, text: str, after: str | None = None) -> int:
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line) if after else 0
    return next(i for i, line in enumerate(lines[start:], start + 1) if text in line)


def _workflow(ws: Path, **changes) -> dict:
    cfg = workflow_dict(ws)
    cfg["data"]["seq_len"] = 128  # within every teacher context these tests write
    cfg.update(changes)
    return cfg


def _run_refused(ws: Path, cfg: dict, *patterns: str, command: str = "run") -> tuple[str, Path]:
    """`slimmoe run` (or `plan`, which validates alike) refuses `cfg` with every pattern in its message,
    having run no node."""
    path = write_config(ws, cfg)
    out = _refused(runner.invoke(app, [command, str(path)]))
    for p in patterns:
        assert re.search(p, out), f"{p!r} not in:\n{out}"
    assert not (ws / "calls.txt").exists(), "a node ran"
    return out, path


def _runs(ws: Path, cfg: dict) -> None:
    """`slimmoe run` accepts `cfg` and runs its (stand-in) nodes."""
    result = runner.invoke(app, ["run", str(write_config(ws, cfg))])
    assert result.exit_code == 0, result.output
    assert take_calls(ws / "calls.txt"), "no node ran"


def _teacher_config(ws: Path, family: str | None = None, **changes) -> None:
    """Change the stand-in teacher's config.json (rewritten as `family`'s first, where given)."""
    path = ws / "teacher" / "config.json"
    if family is not None:
        tiny_config(family).to_json_file(path)
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


# -- item 2: an average-bits target the candidate widths cannot reach ---------------------------------


def test_quantize_refuses_an_average_above_the_widest_candidate_width(tiny_model_dir, tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text("\n\n".join(stdlib_texts(8)))
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), str(out), "--avg-bits", "9", "--data", str(data),
                                 "--calibration-batches", "1", "--seq-len", "32", "--group-size", "16"])
    msg = _refused(result)
    assert ("avg_bits=9 is above the widest candidate width 4: candidate_bits [1, 2, 3, 4] reach averages from 1 to 4 "
            "bits; lower avg_bits to at most 4 or add a wider width (up to 8) to candidate_bits") in msg
    assert not out.exists()

    # The same rule for a workflow's quantize baseline, at its YAML entry.
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), str(tmp_path / "q2"), "--avg-bits", "0.5",
                                 "--data", str(data)])
    assert "reach averages from 1 to 4 bits; raise avg_bits" in _refused(result)


def test_a_quantize_baseline_with_an_unreachable_average_is_refused_at_its_line(ws):
    cfg = _workflow(ws)
    cfg["baselines"].append({"name": "pmq", "kind": "quantize", "avg_bits": 5, "candidate_bits": [2, 3]})
    out, path = _run_refused(ws, cfg, r"avg_bits=5 is above the widest candidate width 3: candidate_bits \[2, 3\] "
                                      r"reach averages from 2 to 3 bits")
    assert f"wf.yaml:{_line_of(path, 'name: pmq')}: baselines[1]" in out


# -- item 3: an early-stop window the stage's budget never completes -----------------------------------


def test_an_early_stop_window_not_smaller_than_the_budget_is_refused(ws):
    cfg = _workflow(ws)
    cfg["stages"][0].update(token_budget=20480, early_stop_min_improvement=0.1, early_stop_window_tokens=100000)
    out, path = _run_refused(ws, cfg, r"stages\[0\]: .*early_stop_window_tokens=100000 is not smaller than "
                                      r"token_budget=20480, so the early stop can never fire; lower "
                                      r"early_stop_window_tokens to a fraction of the budget \(e\.g\. 2560\) or remove "
                                      r"it for the default of token_budget / 8")
    assert f"wf.yaml:{_line_of(path, 'expert_intermediate_size: 32')}: stages[0]" in out

    cfg["stages"][0]["early_stop_window_tokens"] = 20480  # the whole budget: still no second check
    _run_refused(ws, cfg, r"early_stop_window_tokens=20480 is not smaller than token_budget=20480")


def test_the_derived_early_stop_window_is_never_refused(ws):
    cfg = _workflow(ws)
    # Budgets of 1 and 3 tokens derive a window of 1: the user wrote no window to fix.
    cfg["stages"][0].update(token_budget=1, early_stop_min_improvement=0.1)
    cfg["stages"][1].update(early_stop_min_improvement=0.1)
    cfg["stages"][2].update(early_stop_min_improvement=0.1, early_stop_window_tokens=2)
    _runs(ws, cfg)


# -- item 6: sequences longer than the teacher's context ---------------------------------------------


def test_a_seq_len_past_the_teachers_positions_is_refused_at_its_line(ws):
    _teacher_config(ws, max_position_embeddings=256)
    cfg = _workflow(ws)
    cfg["data"]["seq_len"] = 512
    out, path = _run_refused(ws, cfg, r"data\.seq_len: 512 tokens is longer than the teacher's context: its "
                                      r"config\.json has max_position_embeddings=256; lower data\.seq_len to at most 256")
    assert f"wf.yaml:{_line_of(path, 'seq_len: 512')}: data.seq_len" in out

    # Unwritten, the default (512) is held to the same limit, at the data section.
    del cfg["data"]["seq_len"]
    out, path = _run_refused(ws, cfg, r"data\.seq_len: 512 tokens is longer")
    assert f"wf.yaml:{_line_of(path, 'data:')}: data.seq_len" in out


def test_rope_scaling_extends_the_context_the_seq_len_may_use(ws):
    # Mixtral: a family that takes yarn scaling (PhiMoE's is longrope, its scaled length written out).
    _teacher_config(ws, "mixtral", head_dim=8, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6})
    cfg = _workflow(ws)
    cfg["data"]["seq_len"] = 2048
    _run_refused(ws, cfg, r"data\.seq_len: 2048 tokens is longer than the teacher's context: its config\.json has "
                          r"max_position_embeddings=256, and its yarn RoPE scaling with factor 4 reaches 1024; lower "
                          r"data\.seq_len to at most 1024")
    cfg["data"]["seq_len"] = 1024
    _runs(ws, cfg)


def test_a_family_that_writes_its_scaled_length_is_held_to_it(ws):
    # DeepSeek-V3 style: max_position_embeddings is already the scaled length (factor x the original).
    _teacher_config(ws, "mixtral", head_dim=8, max_position_embeddings=1024,
                    rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 256})
    cfg = _workflow(ws)
    cfg["data"]["seq_len"] = 1024
    _runs(ws, cfg)
    cfg["data"]["seq_len"] = 1025
    _run_refused(ws, cfg, r"max_position_embeddings=1024; lower data\.seq_len to at most 1024")


def test_the_demo_teachers_context_bounds_the_seq_len(ws):
    # `plan`: were the check missing, `run` would train the demo teacher before the data failed.
    cfg = _workflow(ws)
    del cfg["teacher"]
    cfg["pretrain_teacher"] = {"max_position_embeddings": 128, "seq_len": 64}
    cfg["data"]["seq_len"] = 256
    out, path = _run_refused(ws, cfg, r"data\.seq_len: 256 tokens is longer than the teacher's context "
                                      r"\(pretrain_teacher\.max_position_embeddings=128\); lower data\.seq_len to at "
                                      r"most 128 or raise pretrain_teacher\.max_position_embeddings", command="plan")
    assert f"wf.yaml:{_line_of(path, 'seq_len: 256')}: data.seq_len" in out


# -- item 8: a tokenizer or a top-k larger than the teacher's vocabulary -------------------------------


def test_a_tokenizer_larger_than_the_teachers_embedding_is_refused_at_teacher_path(ws):
    train_tokenizer(ws / "teacher", stdlib_texts(), vocab_size=320)  # the stand-in teacher has 96 rows
    cfg = _workflow(ws)
    out, path = _run_refused(ws, cfg, rf"teacher\.path: the tokenizer in {re.escape(str(ws / 'teacher'))} has 320 "
                                      r"tokens, more than the 96 embedding rows of the teacher's config\.json "
                                      r"\(vocab_size=96\); point teacher\.path at a directory whose tokenizer\.json "
                                      r"belongs to its model")
    assert f"wf.yaml:{_line_of(path, 'path:', after='teacher:')}: teacher.path" in out

    _teacher_config(ws, vocab_size=320)  # a tokenizer that fits its model
    _runs(ws, cfg)


def test_a_top_k_not_below_the_vocabulary_is_refused_at_logits_k(ws):
    cfg = _workflow(ws, logits={"k": 1000})
    out, path = _run_refused(ws, cfg, r"logits\.k: k=1000 must be smaller than the teacher's vocabulary of 96 tokens "
                                      r"\(the teacher's config\.json\); lower logits\.k below 96")
    assert f"wf.yaml:{_line_of(path, 'k: 1000')}: logits.k" in out

    cfg["logits"]["k"] = 96  # the runtime refuses k == vocabulary too
    _run_refused(ws, cfg, r"logits\.k: k=96 must be smaller")

    del cfg["teacher"]  # the demo teacher: its section sets the vocabulary its tokenizer is trained to
    cfg["pretrain_teacher"] = {"vocab_size": 512, "seq_len": 64}
    cfg["logits"]["k"] = 1000
    _run_refused(ws, cfg, r"logits\.k: k=1000 must be smaller than the teacher's vocabulary of 512 tokens "
                          r"\(pretrain_teacher\.vocab_size\); lower logits\.k below 512", command="plan")


@pytest.mark.parametrize("content", ['{"stand-in": true}', "not json", '{"model": {"type": "BPE"}}'])
def test_a_tokenizer_json_without_a_readable_vocabulary_is_left_to_the_tokenize_node(ws, content):
    (ws / "teacher" / "tokenizer.json").write_text(content)
    _runs(ws, _workflow(ws))
