"""Workflow config validation: every problem is named with its file, line and field, before any work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from standins import workflow_dict, write_config, write_weights

CONFIGS = Path(__file__).resolve().parents[1] / "workflows" / "configs"


def fails_before_work(ws: Path, cfg_path: Path, *patterns: str) -> str:
    """Run the workflow; it must raise WorkflowConfigError matching every pattern, having run nothing."""
    from slimmoe.workflows.config import WorkflowConfigError
    from slimmoe.workflows.driver import run_workflow

    with pytest.raises(WorkflowConfigError) as err:
        run_workflow(cfg_path, log=lambda s: None)
    msg = str(err.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in:\n{msg}"
    assert not (ws / "calls.txt").exists(), "a node ran"
    store = ws / "store" / "wf"
    assert not store.exists() or not [p for p in store.iterdir() if not p.name.startswith(".")]
    return msg


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_unknown_keys_are_named_with_their_line(ws):
    cfg = workflow_dict(ws)
    cfg["stagez"] = []
    path = write_config(ws, cfg)
    msg = fails_before_work(ws, path, r"stagez: unknown field 'stagez'", r"valid fields here: .*stages")
    assert f"wf.yaml:{line_of(path, 'stagez')}: " in msg

    cfg = workflow_dict(ws)
    cfg["resources"]["gpus"] = 2
    fails_before_work(ws, write_config(ws, cfg), r"resources\.gpus: unknown field 'gpus'.*gpus_per_worker")

    cfg = workflow_dict(ws)
    cfg["stages"][1]["learning_rate"] = 0.1  # StageConfig, the stage's own config class, rejects it
    cfg["data"]["colour"] = "blue"
    path = write_config(ws, cfg)
    msg = fails_before_work(ws, path, r"stages\[1\]\.learning_rate: unknown field 'learning_rate'.*lr",
                            r"data\.colour: unknown field 'colour'")
    assert f"wf.yaml:{line_of(path, 'learning_rate')}: stages[1].learning_rate" in msg
    assert f"wf.yaml:{line_of(path, 'colour')}: data.colour" in msg


def test_negative_budget(ws):
    cfg = workflow_dict(ws)
    cfg["stages"][2]["token_budget"] = -1000
    path = write_config(ws, cfg)
    msg = fails_before_work(ws, path, r"stages\[2\]\.token_budget: .*greater than 0.*-1000")
    assert f":{line_of(path, '-1000')}: " in msg


def test_stage_target_must_shrink(ws):
    cfg = workflow_dict(ws)
    cfg["stages"][1]["expert_intermediate_size"] = 40  # stage_1 targets 32
    path = write_config(ws, cfg)
    fails_before_work(ws, path, r"stages\[1\]\.expert_intermediate_size: expert_intermediate_size=40 is not smaller "
                                r"than stage_1's intermediate_size=32; choose a size in 1\.\.31")

    cfg = workflow_dict(ws)
    cfg["stages"][0]["expert_intermediate_size"] = 48  # the teacher's experts are 48 wide
    cfg["stages"][2]["num_key_value_heads"] = 2  # stage_2 went to 1
    msg = fails_before_work(ws, write_config(ws, cfg),
                            r"stages\[0\]\.expert_intermediate_size: .*not smaller than the teacher's intermediate_size=48",
                            r"stages\[2\]\.num_key_value_heads: .*larger than stage_2's num_key_value_heads=1")
    assert "2 problems" in msg


def test_storage_not_writable(ws):
    blocker = ws / "a_file"
    blocker.write_text("not a directory")
    path = write_config(ws, workflow_dict(ws, storage=str(blocker / "store")))
    fails_before_work(ws, path, r"storage: storage '.*a_file/store/wf' is not writable")


def test_teacher_missing_or_not_a_model_directory(ws):
    path = write_config(ws, workflow_dict(ws, teacher={"path": str(ws / "no_such_teacher")}))
    fails_before_work(ws, path, r"teacher\.path: teacher directory .*no_such_teacher does not exist")

    (ws / "empty_teacher").mkdir()
    path = write_config(ws, workflow_dict(ws, teacher={"path": "empty_teacher"}))  # relative to the config
    fails_before_work(ws, path, r"teacher\.path: teacher directory .*empty_teacher has no config\.json")


def test_structure_errors_are_all_reported_together(ws):
    cfg = workflow_dict(ws)
    cfg["pretrain_teacher"] = {"seed": 0}  # and `teacher` is set too
    cfg["stages"][1]["name"] = "stage_1"
    cfg["stages"][0]["name"] = "stage_1"
    cfg["evaluate"] = {"models": ["stage_9"]}
    cfg["baselines"].append({"name": "trimmed", "kind": "trim", "method": "block-drop", "n": 1, "from": "nowhere"})
    msg = fails_before_work(ws, write_config(ws, cfg),
                            r"set exactly one of `teacher`", r"stage name 'stage_1' is used twice",
                            r"evaluate\.models\[0\]: unknown model 'stage_9'", r"baselines\[1\]\.from: unknown model 'nowhere'")
    assert "problems" in msg


def test_yaml_syntax_error_and_missing_fields(ws):
    from slimmoe.workflows.config import WorkflowConfigError, load_workflow

    bad = ws / "bad.yaml"
    bad.write_text("name: wf\nstorage: x\nstages:\n  - {expert_intermediate_size: 3\n")
    with pytest.raises(WorkflowConfigError, match=r"bad\.yaml:\d+: .*not valid YAML"):
        load_workflow(bad)
    missing = ws / "missing.yaml"
    missing.write_text("name: wf\nstorage: store\nstages:\n  - expert_intermediate_size: 3\n")
    with pytest.raises(WorkflowConfigError) as err:
        load_workflow(missing)
    msg = str(err.value)
    assert "missing.yaml:1: data: required field is missing" in msg
    assert "missing.yaml:4: stages[0].token_budget: required field is missing" in msg
    with pytest.raises(WorkflowConfigError, match="does not exist"):
        load_workflow(ws / "nope.yaml")


def test_cli_reports_config_errors_with_exit_code_2(ws):
    from typer.testing import CliRunner

    from slimmoe.workflows.cli import app

    cfg = workflow_dict(ws)
    cfg["stages"][0]["token_budget"] = -5
    result = CliRunner().invoke(app, ["run", str(write_config(ws, cfg))])
    assert result.exit_code == 2
    assert "stages[0].token_budget" in result.output and "greater than 0" in result.output
    assert not (ws / "calls.txt").exists()


def test_yaml_line_lookup():
    from slimmoe.workflows.config import yaml_line

    root = yaml.compose("a: 1\nb:\n  c: [1, 2]\n  d:\n    - x: 1\n      y: 2\n")
    assert yaml_line(root, ("a",)) == 1
    assert yaml_line(root, ("b", "d", 0, "y")) == 6
    assert yaml_line(root, ("b", "d", 0, "zzz")) == 5  # a missing key: its parent's line
    assert yaml_line(root, ("b", "c", 1)) == 3


def test_keys_depend_on_config_and_inputs_not_on_storage(ws):
    from slimmoe.workflows.dag import build_dag

    a = build_dag(write_config(ws, workflow_dict(ws)))
    b = build_dag(write_config(ws, workflow_dict(ws, storage=str(ws / "elsewhere")), "b.yaml"))
    assert {n: x.key for n, x in a.nodes.items()} == {n: x.key for n, x in b.nodes.items()}
    cfg = workflow_dict(ws)
    cfg["logits"]["k"] = 8
    c = build_dag(write_config(ws, cfg, "c.yaml"))
    changed = {n for n in a.nodes if a.nodes[n].key != c.nodes[n].key}
    assert changed == {"teacher_logits", "stage_1", "stage_2", "stage_3", "one_stage", "evaluate_stage_3",
                       "evaluate_one_stage"}
    # Changing the teacher's weights changes everything that reads it, but not the tokenization.
    write_weights(ws / "teacher" / "model.safetensors", 1.0)
    d = build_dag(write_config(ws, workflow_dict(ws), "d.yaml"))
    assert d.nodes["tokenize"].key == a.nodes["tokenize"].key
    assert d.nodes["teacher_logits"].key != a.nodes["teacher_logits"].key
    # the one-stage baseline: the final targets, the summed budget, straight from the teacher
    one = a.nodes["one_stage"]
    assert one.inputs["model"] == "teacher" and one.config["token_budget"] == 9
    assert one.config["expert_intermediate_size"] == 8


@pytest.mark.parametrize("name", ["demo", "phi-mini-moe", "phi-tiny-moe", "qwen3-moe"])
def test_example_configs_validate_against_the_task_configs(name):
    """The shipped configs pass the workflow schema, whose sections are the task config classes."""
    from slimmoe.tasks.slimming.config import StageConfig
    from slimmoe.workflows.dag import build_dag

    dag = build_dag(CONFIGS / f"{name}.yaml", check_env=False)
    assert "tokenize" in dag.nodes and "teacher_logits" in dag.nodes
    stages = [n for n in dag.nodes.values() if n.role == "stage"]
    assert len(stages) >= 2 and all(n.key for n in dag.nodes.values())
    assert all(isinstance(n.task_config, StageConfig) for n in stages)


def test_a_stage_config_is_parsed_once_and_travels_as_it_is(ws):
    """The object a stage node runs with is the one in the parsed workflow, resources filled in."""
    from slimmoe.tasks.slimming.config import StageConfig
    from slimmoe.workflows.dag import build_dag

    cfg = workflow_dict(ws, resources={"num_workers": 2, "cpus_per_worker": 3})
    cfg["stages"][1]["num_workers"] = 1  # a stage's own value wins over resources
    dag = build_dag(write_config(ws, cfg))
    stage_1, stage_2 = dag.nodes["stage_1"].task_config, dag.nodes["stage_2"].task_config
    assert stage_1 is dag.workflow.config.stages[0] and isinstance(stage_1, StageConfig)
    assert (stage_1.name, stage_1.num_workers, stage_1.cpus_per_worker) == ("stage_1", 2, 3)
    assert stage_2.num_workers == 1
    assert dag.nodes["teacher_logits"].task_config.actor_pool_size == 1


def test_every_later_stage_is_checked_against_the_sizes_it_inherits(ws):
    cfg = workflow_dict(ws)
    cfg["stages"][2]["num_key_value_heads"] = 3  # the teacher has 2 KV heads, stage_2 keeps 1
    msg = fails_before_work(ws, write_config(ws, cfg), r"stages\[2\]\.num_key_value_heads: num_key_value_heads=3 "
                                                       r"is larger than stage_2's num_key_value_heads=1")
    assert "1 problem" not in msg
    cfg = workflow_dict(ws)
    cfg["stages"][1]["expert_intermediate_size"] = 18  # 72-byte rows in float32: the fused kernel refuses them
    fails_before_work(ws, write_config(ws, cfg), r"stages\[1\]\.expert_intermediate_size: expert_intermediate_size=18 "
                                                 r"gives 72-byte expert rows in float32.*choose 16 or 20")


def test_a_trim_baseline_can_be_followed_by_distillation_without_a_further_cut():
    from slimmoe.workflows.config import WorkflowConfigError
    from slimmoe.workflows.dag import build_dag

    dag = build_dag(CONFIGS / "qwen3-moe.yaml", check_env=False)
    node = dag.nodes["expert_drop_half_distilled"]
    assert node.role == "stage" and node.inputs == {"model": "expert_drop_half", "logits": "teacher_logits"}
    assert node.task_config.distill_only and node.task_config.expert_intermediate_size is None
    assert node.task_config.token_budget == 30_000_000_000
    assert "evaluate_expert_drop_half_distilled" in dag.nodes
    assert dag.descendants("expert_drop_half") == ["expert_drop_half_distilled", "evaluate_expert_drop_half",
                                                   "evaluate_expert_drop_half_distilled"]

    raw = yaml.safe_load((CONFIGS / "qwen3-moe.yaml").read_text())
    raw["baselines"][0]["distill"] = {"token_budget": 10}
    with pytest.raises(WorkflowConfigError, match="distill follows a trim baseline only"):
        build_dag(raw, check_env=False)
    raw = yaml.safe_load((CONFIGS / "qwen3-moe.yaml").read_text())
    raw["baselines"][1]["distill"] = {"token_budget": 10, "expert_intermediate_size": 8}
    with pytest.raises(WorkflowConfigError, match="distill_only: true keeps every size"):
        build_dag(raw, check_env=False)


def test_pure_kd_scores_for_the_teachers_own_cut_are_refused(ws, tiny_model_dir, tmp_path):
    """At a stage that cuts the teacher the student is the teacher: the pure KD loss is exactly zero."""
    import pytest

    from slimmoe.tasks.core.fingerprint import model_fingerprint
    from slimmoe.tasks.nodes.stage import run_stage
    from slimmoe.tasks.slimming.config import StageConfig

    cfg = workflow_dict(ws)
    cfg["stages"][0].update(score_loss="kd", next_token_weight=0.0)
    for later in cfg["stages"][1:]:  # cut a stage's output: KD is informative there
        later.update(score_loss="kd", next_token_weight=0.0)
    msg = fails_before_work(ws, write_config(ws, cfg), r"stages\[0\]\.score_loss: score_loss: kd with next_token_weight: 0")
    assert "stages[1]" not in msg and "stages[2]" not in msg
    assert "baselines[0].score_loss" in msg  # the one-stage baseline takes stage_3's settings and cuts the teacher

    stage = StageConfig(expert_intermediate_size=32, token_budget=64, score_loss="kd", next_token_weight=0.0)
    with pytest.raises(ValueError, match="every score would be 0"):
        run_stage(stage, tiny_model_dir, tmp_path / "no_cache", tmp_path / "out", tmp_path / "work",
                  teacher_fingerprint=model_fingerprint(tiny_model_dir))
    assert not (tmp_path / "work").exists()


def test_relative_paths_resolve_against_the_config_file(ws):
    from slimmoe.workflows.config import load_workflow

    cfg = workflow_dict(ws, evaluate={"models": ["stage_3"], "lm_eval_include_path": "my_tasks"})
    sub = ws / "configs"
    sub.mkdir()
    loaded = load_workflow(write_config(sub, cfg))
    assert loaded.config.evaluate.lm_eval_include_path == str(sub / "my_tasks")


def test_a_stage_that_must_keep_its_moments_is_checked_like_a_written_setting(ws):
    """carry_optimizer on a stage makes the stage before keep its AdamW moments; an fsdp stage cannot,
    so the workflow is refused at the carrying stage's line before anything trains."""
    from slimmoe.workflows.config import WorkflowConfigError
    from slimmoe.workflows.dag import build_dag

    cfg = workflow_dict(ws)
    cfg["stages"][0].update(strategy="fsdp", num_workers=2)
    cfg["stages"][1]["carry_optimizer"] = True
    path = write_config(ws, cfg)
    with pytest.raises(WorkflowConfigError) as err:
        build_dag(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "carry_optimizer" in text)
    assert f"wf.yaml:{line}: stages[1].carry_optimizer: carry_optimizer: true starts from the AdamW moments of " \
           "stage_1" in str(err.value)
    assert "keep_optimizer_state needs strategy: ddp (this stage uses fsdp)" in str(err.value)
    cfg["stages"][0]["strategy"] = "ddp"  # a ddp stage keeps them, and only the node before the carrier does
    dag = build_dag(write_config(ws, cfg))
    assert [dag.nodes[f"stage_{i}"].task_config.keep_optimizer_state for i in (1, 2, 3)] == [True, False, False]


def test_configs_are_frozen_and_a_change_is_validated_and_derived_again():
    from pydantic import ValidationError

    from slimmoe.tasks.slimming.config import StageConfig

    cfg = StageConfig(expert_intermediate_size=32, token_budget=800, early_stop_min_improvement=0.02)
    assert (cfg.strategy, cfg.early_stop_window_tokens) == ("ddp", 100)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.token_budget = 1600
    more = cfg.with_changes(token_budget=1600)
    assert (more.token_budget, more.early_stop_window_tokens) == (1600, 200)  # derived again, not kept
    assert cfg.with_changes(early_stop_window_tokens=50).with_changes(token_budget=1600).early_stop_window_tokens == 50
    gpu = cfg.with_changes(use_gpu=True, num_workers=2, early_stop_min_improvement=None)
    assert gpu.strategy == "fsdp" and gpu.train_dtype() == "bfloat16"
    with pytest.raises(ValidationError, match="carry_optimizer needs strategy: ddp"):
        gpu.with_changes(carry_optimizer=True)
