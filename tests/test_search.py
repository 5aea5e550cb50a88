"""`slimmoe search`: shapes counted exactly, only shapes within the targets, a workflow that validates,
a refusal with the nearest feasible targets, and --serve-tp's rules; on a tiny teacher whose tokenize and
teacher_logits nodes the search runs itself."""

import json
import re
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from slimmoe.tasks.core.params import count_parameters
from slimmoe.tasks.slimming.config import ModelSizes, SlimTargets
from slimmoe.tasks.slimming.search import Budget, SearchConfig, count_function, enumerate_shapes
from slimmoe.tasks.slimming.surgery import slimmed_config
from slimmoe.workflows.cli import app
from slimmoe.workflows.dag import build_dag
from slimmoe.workflows.search import plan_search
from tiny import save_tiny_model_dir, tiny_config

runner = CliRunner()
SEQ, MICRO = 32, 4


@pytest.mark.parametrize("family", ["phimoe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_the_enumerators_counts_equal_count_parameters_on_the_built_models(family):
    config = tiny_config(family)
    sizes = ModelSizes.of(config)
    counts = count_function(config, sizes)
    shapes = enumerate_shapes(sizes, counts, "float32", Budget(total=10**9))
    assert len(shapes) == len({(s.num_experts, s.num_key_value_heads) for s in shapes}) > 1
    for shape in shapes:
        built = AutoModelForCausalLM.from_config(slimmed_config(config, SlimTargets(
            shape.expert_intermediate_size, shape.num_key_value_heads, None, shape.num_experts)))
        got = count_parameters(built)
        assert (shape.total, shape.active) == (got["total"], got["active"]), shape
        assert got["num_experts"] == shape.num_experts


def _workflow(root: Path, teacher: Path) -> Path:
    stage = {"micro_batch": MICRO, "calibration_batches": 1, "token_budget": 8 * SEQ * MICRO,
             "checkpoint_interval": 50, "log_interval": 5, "early_stop_rows": 16}
    cfg = {"name": "wf", "storage": str(root / "store"), "teacher": {"path": str(teacher)},
           "data": {"source": "${PYTHON_STDLIB}/[a-c]*.py", "seq_len": SEQ, "validation_fraction": 0.2},
           "logits": {"k": 8, "batch_size": 32},
           "stages": [{"name": "stage_1", "expert_intermediate_size": 32, **stage},
                      {"name": "stage_2", "expert_intermediate_size": 16, "num_key_value_heads": 1, **stage}],
           "baselines": [{"name": "one_stage", "kind": "one_stage"}]}
    path = root / "wf.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _teacher_counts(teacher: Path) -> dict:
    return count_parameters(AutoModelForCausalLM.from_pretrained(teacher))


@pytest.fixture(scope="module")
def searched(ray_cluster, tmp_path_factory):
    """One search from an empty store (it runs tokenize and teacher_logits itself), with a short distillation
    of the best cut: (config, its output workflow, the JSON result, the targets, the CLI's stdout)."""
    root = tmp_path_factory.mktemp("search")
    # Weights far from uniform outputs, so every cut moves the KL (the shared tiny teacher's barely do).
    teacher_dir = save_tiny_model_dir(root / "teacher", "phimoe", initializer_range=0.5)
    config = _workflow(root, teacher_dir)
    teacher = _teacher_counts(teacher_dir)
    target_total, target_active = int(0.8 * teacher["total"]), int(0.85 * teacher["active"])
    out = root / "out" / "searched.yaml"
    result = runner.invoke(app, ["search", str(config), "--target-params", f"{target_total:.6e}",
                                 "--target-active-params", str(target_active), "--candidates", "6", "--top", "1",
                                 "--distill-steps", "2", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return config, out, json.loads(result.stdout), (target_total, target_active), teacher_dir


def test_the_search_runs_the_cache_it_needs_and_keeps_only_shapes_within_the_targets(searched):
    config, _, report, (target_total, target_active), _ = searched
    store = config.parent / "store" / "wf"
    assert all(any((store / node).glob("*/_SUCCESS")) for node in ("tokenize", "teacher_logits"))
    assert not (store / "stage_1").exists()  # the stage it cuts for is not run, only what it reads
    candidates = report["candidates"]
    assert 1 < len(candidates) <= 6
    assert all(c["total"] <= target_total and c["active"] <= target_active for c in candidates)
    assert all(c["kl_cut"] > 0 for c in candidates)
    # Ranked by the held-out KL; the distilled one (the best cut) ranks by its KL after distillation.
    distilled = [c for c in candidates if c["kl_distilled"] is not None]
    assert len(distilled) == 1 and distilled[0] == report["best"] == candidates[0]
    rest = [c["kl_cut"] for c in candidates[1:]]
    assert rest == sorted(rest)
    assert distilled[0]["kl_distilled"] != distilled[0]["kl_cut"]  # measured again, on the distilled model
    # Every shape is the widest within the targets for its expert and KV counts: no shape is dominated.
    assert len({(c["num_experts"], c["num_key_value_heads"]) for c in candidates}) == len(candidates)


def test_the_written_workflow_validates_with_the_chosen_shape_and_spaced_stages(searched):
    config, out, report, _, teacher_dir = searched
    best = report["best"]
    dag = build_dag(str(out))  # what `slimmoe plan` and `slimmoe run` do with it first
    s1, s2 = dag.nodes["stage_1"].task_config, dag.nodes["stage_2"].task_config
    teacher = ModelSizes.of(AutoModelForCausalLM.from_pretrained(teacher_dir).config)
    assert s2.expert_intermediate_size == best["expert_intermediate_size"]
    assert (s2.num_experts or teacher.num_experts) == best["num_experts"]
    assert (s2.num_key_value_heads or teacher.num_key_value_heads) == best["num_key_value_heads"]
    # stage_1 halfway, on the 16-byte float32 alignment, rounded up.
    half = (teacher.expert_intermediate_size + best["expert_intermediate_size"]) / 2
    assert s1.expert_intermediate_size == -(-half // 4) * 4
    assert dag.nodes["one_stage"].task_config.expert_intermediate_size == best["expert_intermediate_size"]
    # The same store and data: the written workflow reuses the cache the search made.
    original = build_dag(str(config))
    assert dag.nodes["teacher_logits"].key == original.nodes["teacher_logits"].key
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left beside it
    plan = runner.invoke(app, ["plan", str(out), "--json", "--cpu-memory-gb", "64"])
    assert plan.exit_code == 0, plan.output


def test_infeasible_targets_are_refused_with_the_nearest_feasible_ones(searched):
    config = searched[0]
    result = runner.invoke(app, ["search", str(config), "--target-params", "1e3", "--target-active-params", "2e3"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --target-params 1.00K --target-active-params 2.00K:")
    near = re.search(r"nearest feasible targets are --target-params (\S+) --target-active-params (\S+) ", lines[0])
    assert near, lines[0]
    # Those targets are met, and nothing below them is.
    dag = build_dag(str(config))
    total, active = float(near.group(1)), float(near.group(2))
    shapes = plan_search(dag, SearchConfig(target_params=total, target_active_params=active)).candidates
    assert shapes and all(s.total <= total and s.active <= active for s in shapes)
    # With one target the nearest is the smallest shape: one parameter less is refused.
    alone = runner.invoke(app, ["search", str(config), "--target-params", "1e3"])
    smallest = int(re.search(r"nearest feasible targets are --target-params (\d+) ", alone.output).group(1))
    assert plan_search(dag, SearchConfig(target_params=smallest)).candidates
    assert runner.invoke(app, ["search", str(config), "--target-params", str(smallest - 1)]).exit_code == 2
    no_target = runner.invoke(app, ["search", str(config)])
    assert no_target.exit_code == 2 and "--target-params" in no_target.output


def test_serve_tp_drops_the_shapes_a_tensor_parallel_server_cannot_split(searched):
    config, _, _, (target_total, target_active), _ = searched
    dag = build_dag(str(config))
    loose = SearchConfig(target_params=target_total, candidates=100)
    every = plan_search(dag, loose).candidates
    assert {s.num_key_value_heads for s in every} == {1, 2}
    # 4 GPUs: a KV head's 2 query heads cannot be split four ways, so only the 2-KV shapes (4 query heads) remain.
    at_tp4 = plan_search(dag, loose.with_changes(serve_tp=[1, 4])).candidates
    assert at_tp4 and {s.num_key_value_heads for s in at_tp4} == {2}
    assert set(at_tp4) == {s for s in every if s.num_key_value_heads == 2}
    # The CLI says it in one line: at 8 GPUs the teacher's 4 query heads cannot split at all.
    result = runner.invoke(app, ["search", str(config), "--target-params", str(target_total), "--serve-tp", "8"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: ") and "--serve-tp 8" in result.output


def test_stage_names_the_input_that_is_cut(searched):
    config = searched[0]
    dag = build_dag(str(config))
    first = plan_search(dag, SearchConfig(target_params=searched[3][0]))
    second = plan_search(dag, SearchConfig(target_params=searched[3][0], stage="stage_2"))
    assert (first.input_node, first.sizes.expert_intermediate_size) == ("teacher", 48)
    # stage_2 cuts stage_1's output: 32 wide, as stage_1 asks, so every shape is narrower than that.
    assert (second.input_node, second.sizes.expert_intermediate_size) == ("stage_1", 32)
    assert all(s.expert_intermediate_size < 32 for s in second.candidates)
    result = runner.invoke(app, ["search", str(config), "--target-params", "1e9", "--stage", "stage_9"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --stage stage_9: the workflow has no such stage; choose one of stage_1, stage_2"
