"""Live metrics: a stage's logging steps reach a TensorBoard event file (read back with TensorBoard's
own reader) and `history.jsonl` while it runs; the workflow's `tracking:` section picks the tracker
without changing any node's key."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from slimmoe.tasks.core.tracking import HISTORY_FILE, TRACKING_DIR, read_history
from slimmoe.tasks.nodes.stage import run_stage
from stage_helpers import SEQ, stage_cfg
from standins import workflow_dict, write_config


def tensorboard_points(work) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(work / TRACKING_DIR), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_stage_logs_one_point_per_logging_step_to_tensorboard_and_history(pipeline, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    cfg = stage_cfg(token_budget=12 * 8 * SEQ * 2, log_interval=3, checkpoint_interval=100)
    run_stage(cfg, pipeline["teacher"], pipeline["logits"], out, work, teacher_fingerprint=pipeline["fp"],
              name="tracked")
    history = read_history(work / HISTORY_FILE)
    assert [r["step"] for r in history] == [3, 6, 9, 12]
    # What the stage kept at its end is what it appended as it went.
    assert history == json.loads((out / "metrics.json").read_text())["history"]
    for row in history:
        assert row["grad_norm"] > 0 and row["memory_gb"] > 0 and row["lr"] > 0 and row["tokens_per_s"] > 0
    points = tensorboard_points(work)
    for metric in ("loss", "kl", "lr", "tokens_per_s", "grad_norm", "memory_gb"):
        series = points[f"tracked/{metric}"]
        assert [s for s, _ in series] == [3, 6, 9, 12], metric
        assert [v for _, v in series] == pytest.approx([r[metric] for r in history], rel=1e-5), metric


def test_deepspeed_reports_its_own_gradient_norm(pipeline, tmp_path):
    work = tmp_path / "work"
    cfg = stage_cfg(strategy="deepspeed", zero_stage=2, token_budget=4 * 8 * SEQ * 2, log_interval=2,
                    checkpoint_interval=100)
    run_stage(cfg, pipeline["teacher"], pipeline["logits"], tmp_path / "out", work, teacher_fingerprint=pipeline["fp"])
    assert [r["step"] for r in read_history(work / HISTORY_FILE)] == [2, 4]
    assert all(r["grad_norm"] > 0 for r in read_history(work / HISTORY_FILE))


def test_the_tracking_section_reaches_every_stage_and_leaves_the_keys_alone(ws):
    from slimmoe.workflows.dag import build_dag

    plain = build_dag(write_config(ws, workflow_dict(ws)))
    cfg = workflow_dict(ws)
    cfg["tracking"] = {"backend": "none"}
    quiet = build_dag(write_config(ws, cfg, "quiet.yaml"))
    assert {n: x.key for n, x in plain.nodes.items()} == {n: x.key for n, x in quiet.nodes.items()}
    stages = [n for n, x in quiet.nodes.items() if x.kind == "stage"]
    assert stages and all(quiet.nodes[n].task_config.tracking.backend == "none" for n in stages)
    assert all(plain.nodes[n].task_config.tracking.backend == "tensorboard" for n in stages)


def test_a_tracker_that_is_not_installed_is_refused_at_its_yaml_line(ws):
    import importlib.util

    from slimmoe.workflows.config import WorkflowConfigError, load_workflow

    if importlib.util.find_spec("wandb") is not None:
        pytest.fail("this test needs an environment without wandb (the dev install does not bring it)")
    cfg = workflow_dict(ws)
    cfg["tracking"] = {"backend": "wandb", "project": "p"}
    with pytest.raises(WorkflowConfigError) as err:
        load_workflow(write_config(ws, cfg))
    assert "tracking" in str(err.value) and "pip install wandb" in str(err.value), str(err.value)
