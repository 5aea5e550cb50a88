"""`slimmoe demo` end to end on a shortened demo config: the real tasks wired through the driver.

Every node of the SlimMoE workflow runs for real (pretrain_teacher, tokenize on Ray Data, the teacher
pass on an actor pool, three Ray Train stages, evaluate), only smaller than `demo.yaml`: a tiny
teacher, a few of the standard library's files, a few distillation steps."""

from __future__ import annotations

import json

import yaml

from slimmoe.workflows.demo import demo_config_path, run_demo
from slimmoe.workflows.report import verdict_line
from tiny import TINY_TEACHER

SEQ = 64
STEP_TOKENS = 8 * SEQ


def short_demo_config(tmp_path):
    cfg = yaml.safe_load(demo_config_path().read_text())
    cfg["storage"] = str(tmp_path / "runs")
    cfg["pretrain_teacher"] = dict(TINY_TEACHER, seed=0, max_steps=40, eval_every=0)
    cfg["data"] = {"source": "${PYTHON_STDLIB}/[a-c]*.py", "seq_len": SEQ, "validation_fraction": 0.2}
    cfg["logits"] = {"k": 16, "batch_size": 16}
    for stage, size, steps in zip(cfg["stages"], (32, 16), (4, 8)):  # 50% then 25% of the teacher's 64
        stage.update(expert_intermediate_size=size, token_budget=steps * STEP_TOKENS, micro_batch=8,
                     calibration_batches=2, checkpoint_interval=100, log_interval=2)
        if "early_stop_window_tokens" in stage:  # the demo's window, scaled with the shortened budget
            stage["early_stop_window_tokens"] = 2 * STEP_TOKENS
    cfg["evaluate"] = {"max_rows": 32, "batch_size": 8, "throughput_repeats": 1, "throughput_warmup": 0}
    path = tmp_path / "demo_short.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_demo_runs_the_real_workflow_then_reuses_every_node(ray_cluster, tmp_path):
    config = short_demo_config(tmp_path)
    lines: list[str] = []
    result = run_demo(config=config, log=lines.append)
    started = [line.split()[1] for line in lines if line.startswith("started ")]
    assert started[:3] == ["teacher", "tokenize", "teacher_logits"]
    assert {"stage_1", "stage_2", "one_stage", "evaluate_teacher", "evaluate_one_stage"} <= set(started)

    rows = {(r["model"], r["when"]): r for r in result["rows"]}
    assert list(rows) == [("teacher", "-"),
                          ("stage_1", "after slimming"), ("stage_1", "after distillation"),
                          ("stage_2", "after slimming"), ("stage_2", "after distillation"),
                          ("one_stage", "after slimming"), ("one_stage", "after distillation")]
    teacher, s1, s2, one = (rows[k] for k in [("teacher", "-"), ("stage_1", "after distillation"),
                                              ("stage_2", "after distillation"), ("one_stage", "after distillation")])
    assert teacher["total_params"] > s1["total_params"] > s2["total_params"] == one["total_params"]
    assert teacher["kl_to_teacher"] < 1e-4 < s2["kl_to_teacher"]
    assert all(r["perplexity"] > 1 and r["tokens_per_s"] > 0 for r in result["rows"])

    out = tmp_path / "runs" / "demo" / "_demo"
    assert (out / "report.md").read_text().startswith("| model |")
    assert json.loads((out / "report.json").read_text())["rows"] == result["rows"]
    assert (out / "curves.png").stat().st_size > 1000
    # The table ends with what this run shows, and it agrees with the rows.
    by_ppl = "multi-stage" if s2["perplexity"] < one["perplexity"] else "one-stage"
    by_kl = "multi-stage" if s2["kl_to_teacher"] < one["kl_to_teacher"] else "one-stage"
    opening = f"This run: {by_ppl} wins on both measures" if by_ppl == by_kl else "This run: mixed"
    assert result["verdict"].startswith(opening) and result["markdown"].endswith(result["verdict"])
    assert f"multi-stage {s2['perplexity']:.2f} (stage_2), one-stage {one['perplexity']:.2f}" in result["verdict"]
    assert f"multi-stage {s2['kl_to_teacher']:.4f} (stage_2), one-stage {one['kl_to_teacher']:.4f}" in result["verdict"]

    # Stage 1 scores with the next-token loss (the student is the teacher), stage 2 with the KD loss.
    stage_dir = tmp_path / "runs" / "demo"
    score_loss = {n: json.loads(next((stage_dir / n).glob("[0-9a-f]*/metrics.json")).read_text())["score_loss"]
                  for n in ("stage_1", "stage_2", "one_stage")}
    assert score_loss == {"stage_1": "next_token", "stage_2": "kd", "one_stage": "next_token"}

    again: list[str] = []
    second = run_demo(config=config, log=again.append)
    assert not [line for line in again if line.startswith("started ")], again
    assert second["rows"] == result["rows"]


def test_the_verdict_says_mixed_when_perplexity_and_kl_disagree():
    # The rows of a fresh demo that printed "multi-stage wins" on perplexity alone while the KL in the
    # same table favoured one-stage.
    def row(model, ppl, kl):
        return {"model": model, "when": "after distillation", "perplexity": ppl, "kl_to_teacher": kl}

    disagree = [row("stage_2", 46.37, 0.1286), row("one_stage", 46.88, 0.1257)]
    line = verdict_line(disagree, "stage_2", "one_stage")
    assert line.startswith("This run: mixed"), line
    assert "validation perplexity: multi-stage 46.37 (stage_2), one-stage 46.88" in line
    assert "KL to the teacher: multi-stage 0.1286 (stage_2), one-stage 0.1257" in line
    agree = [row("stage_2", 46.37, 0.1250), row("one_stage", 46.88, 0.1257)]
    assert verdict_line(agree, "stage_2", "one_stage").startswith("This run: multi-stage wins on both measures")
