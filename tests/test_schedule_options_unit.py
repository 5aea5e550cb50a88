"""The schedule options' pieces without Ray: moments sliced with the weights, the early-stop rule,
the gradual cut's sizes and the config rules (the stage runs are in test_schedule_options.py)."""

import pytest
import torch
from pydantic import ValidationError

from slimmoe.tasks.core.adapters import get_adapter
from slimmoe.tasks.slimming.adaptive import EarlyStop
from slimmoe.tasks.slimming.config import Cut, ModelSizes, StageConfig, gradual_cuts
from slimmoe.tasks.slimming.moments import (MomentsError, install_moments, load_moments, optimizer_moments,
                                            save_moments, slice_moments)
from slimmoe.tasks.slimming.scores import Scores, magnitude_scores
from slimmoe.tasks.slimming.config import SlimTargets
from slimmoe.tasks.slimming.surgery import apply_plan, keep_plan
from tiny import tiny_model


def _random_plan(model, seed=0):
    shapes = magnitude_scores(model, with_heads=True)
    g = torch.Generator().manual_seed(seed)
    scores = Scores(**{kind: {i: torch.rand(t.shape, generator=g) for i, t in getattr(shapes, kind).items()}
                       for kind in ("experts", "shared", "kv_groups")})
    adapter = get_adapter(model)
    targets = SlimTargets(adapter.expert_size(model.config) // 2,
                          num_key_value_heads=1 if adapter.head_pruning else None,
                          shared_expert_intermediate_size=24 if adapter.shared_expert_size_key else None)
    return keep_plan(model.config, scores, targets, model=model)


def _stepped_optimizer(model, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


@pytest.mark.parametrize("family", ["phimoe", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_sliced_moments_follow_the_weights_they_belong_to(family):
    # Moments that are a known function of the weights must still be that function of the cut
    # model's weights, entry by entry: then every moment sits beside the weight it was kept with.
    model = tiny_model(family)
    plan = _random_plan(model)
    params = dict(model.named_parameters())
    moments = {"exp_avg": {n: p.detach() * 2 + 1 for n, p in params.items()},
               "exp_avg_sq": {n: p.detach() ** 2 + 3 for n, p in params.items()},
               "step": {n: torch.tensor(7.0, dtype=torch.float64) for n in params}}
    sliced = slice_moments(model, plan, moments)
    student = apply_plan(model, plan)
    cut = 0
    for name, w in student.named_parameters():
        assert sliced["exp_avg"][name].shape == w.shape, name
        torch.testing.assert_close(sliced["exp_avg"][name], w.detach() * 2 + 1, rtol=0, atol=0)
        torch.testing.assert_close(sliced["exp_avg_sq"][name], w.detach() ** 2 + 3, rtol=0, atol=0)
        cut += w.shape != params[name].shape
    assert cut > 0  # the plan did cut something, so the check above saw slicing at work


def test_installed_moments_continue_the_step_count(tmp_path):
    model = tiny_model("phimoe")
    opt = _stepped_optimizer(model, steps=3)
    assert save_moments(opt, model, tmp_path / "m.safetensors") > 0
    plan = _random_plan(model)
    student = apply_plan(model, plan)
    fresh = torch.optim.AdamW(student.parameters(), lr=1e-3)
    installed = install_moments(fresh, student, slice_moments(model, plan, load_moments(tmp_path / "m.safetensors")))
    assert installed["max_step"] == 3.0 and installed["params"] > 0
    embed = student.get_input_embeddings().weight
    old_embed = optimizer_moments(opt, model)["exp_avg"]["model.embed_tokens.weight"]
    torch.testing.assert_close(fresh.state[embed]["exp_avg"], old_embed)
    _stepped_optimizer_continue(fresh, student)
    assert float(fresh.state[embed]["step"]) == 4.0  # continued, not restarted at 1


def _stepped_optimizer_continue(opt, model):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_moments_of_another_cut_are_refused():
    model = tiny_model("phimoe")
    opt = _stepped_optimizer(model, steps=1)
    unsliced = optimizer_moments(opt, model)
    student = apply_plan(model, _random_plan(model))
    with pytest.raises(MomentsError, match="not sliced with this model's cut"):
        install_moments(torch.optim.AdamW(student.parameters()), student, unsliced)


def test_early_stop_stops_when_a_window_improves_too_little():
    rule = EarlyStop(min_improvement=0.05, window_tokens=1000, tokens_per_step=300)
    assert rule.window_steps == 4 and rule.due(0) and rule.due(8) and not rule.due(6)
    checks = [{"step": 0, "heldout_kl": 1.0}]
    assert not rule.decide(checks)  # a baseline alone decides nothing
    checks.append({"step": 4, "heldout_kl": 0.8})
    assert not rule.decide(checks) and checks[-1]["improvement"] == pytest.approx(0.2)
    checks.append({"step": 8, "heldout_kl": 0.79})
    assert rule.decide(checks) and checks[-1]["improvement"] == pytest.approx(0.0125)


def test_early_stop_waits_out_the_warm_up_bump_and_compares_with_the_best_check():
    # The freshly cut student's KL rises before it falls: the old rule (previous check, first decision
    # after one window) stopped at step 4; this one decides from step 8 on, against the best check.
    rule = EarlyStop(min_improvement=0.05, window_tokens=1200, tokens_per_step=300, min_tokens=2400)
    assert rule.min_steps == 8
    checks = [{"step": 0, "heldout_kl": 1.0}, {"step": 4, "heldout_kl": 1.3}]
    assert not rule.decide(checks) and checks[-1]["improvement"] == pytest.approx(-0.3)
    checks.append({"step": 8, "heldout_kl": 0.9})
    assert not rule.decide(checks) and checks[-1]["improvement"] == pytest.approx(0.1)
    checks.append({"step": 12, "heldout_kl": 1.2})
    assert rule.decide(checks)
    checks[-1] = {"step": 12, "heldout_kl": 0.84}
    assert not rule.decide(checks) and checks[-1]["improvement"] == pytest.approx(0.0667, abs=1e-4)
    checks.append({"step": 16, "heldout_kl": 0.83})
    assert rule.decide(checks)
    # Receding from a bump is no progress: 1.1 is 15% below the previous check but 10% above the best.
    bump = [{"step": 0, "heldout_kl": 1.0}, {"step": 4, "heldout_kl": 1.3}, {"step": 8, "heldout_kl": 1.1}]
    assert rule.decide(bump) and bump[-1]["improvement"] == pytest.approx(-0.1)


def test_gradual_cut_reaches_the_targets_at_planned_steps():
    sizes = ModelSizes.of(tiny_model("phimoe", intermediate_size=256).config)
    cfg = StageConfig(expert_intermediate_size=64, num_key_value_heads=1, token_budget=1000, cut_steps=3)
    cuts = gradual_cuts(cfg, sizes, total_steps=30)
    assert [c.step for c in cuts] == [0, 10, 20]
    assert [c.targets.expert_intermediate_size for c in cuts] == [192, 128, 64]
    assert [c.targets.num_key_value_heads for c in cuts] == [2, 2, 1]  # rounded up: heads go at the last cut
    one = gradual_cuts(cfg.with_changes(cut_steps=1), sizes, total_steps=30)
    assert one == [Cut(0, cfg.targets)]
    with pytest.raises(ValueError, match="cut_steps=3 needs at least 3 optimizer steps"):
        gradual_cuts(cfg, sizes, total_steps=2)
    tight = StageConfig(expert_intermediate_size=248, token_budget=1000, cut_steps=3)
    with pytest.raises(ValueError, match="choose cut_steps of at most 2"):
        gradual_cuts(tight, sizes, total_steps=30)


@pytest.mark.parametrize("fields, message", [
    ({"carry_optimizer": True, "strategy": "fsdp"}, "carry_optimizer needs strategy: ddp"),
    ({"cut_steps": 2, "strategy": "deepspeed"}, "cut_steps needs strategy: ddp"),
    ({"cut_steps": 2, "early_stop_min_improvement": 0.01}, "use one of them per stage"),
    ({"early_stop_window_tokens": 100}, "set early_stop_min_improvement"),
    ({"early_stop_min_tokens": 100}, "early_stop_min_tokens is set but early_stop_min_improvement is not"),
    ({"early_stop_min_improvement": 0.1, "early_stop_min_tokens": 800}, "early_stop_min_tokens=800 is not smaller"),
    ({"early_stop_min_improvement": 1.5}, "less than 1"),
])
def test_schedule_option_rules(fields, message):
    with pytest.raises(ValidationError, match=message):
        StageConfig(expert_intermediate_size=16, token_budget=800, **fields)


def test_early_stop_window_defaults_to_an_eighth_of_the_budget_and_the_first_decision_to_a_quarter():
    cfg = StageConfig(expert_intermediate_size=16, token_budget=800, early_stop_min_improvement=0.01)
    assert (cfg.early_stop_window_tokens, cfg.early_stop_min_tokens) == (100, 200)
    wide = StageConfig(expert_intermediate_size=16, token_budget=800, early_stop_min_improvement=0.01,
                       early_stop_window_tokens=300)
    assert wide.early_stop_min_tokens == 300  # never before the first window's check
    assert StageConfig(expert_intermediate_size=16, token_budget=800).early_stop_min_tokens is None


# -- in a workflow ------------------------------------------------------------------------------------

def _dag(ws, stages, baselines=None):
    from slimmoe.workflows.dag import build_dag
    from standins import workflow_dict, write_config

    cfg = workflow_dict(ws, stages=stages, evaluate={"models": ["teacher"]})
    if baselines is not None:
        cfg["baselines"] = baselines
    return build_dag(write_config(ws, cfg))


def test_a_carrying_stage_makes_the_stage_before_keep_its_moments_and_the_baseline_stays_plain(ws):
    dag = _dag(ws, [{"expert_intermediate_size": 32, "token_budget": 3, "early_stop_min_improvement": 0.1},
                    {"expert_intermediate_size": 16, "token_budget": 3, "carry_optimizer": True, "cut_steps": 2}])
    first, second, one = (dag.nodes[n].task_config for n in ("stage_1", "stage_2", "one_stage"))
    assert first.keep_optimizer_state and not second.keep_optimizer_state
    assert (one.carry_optimizer, one.keep_optimizer_state, one.early_stop_min_improvement, one.cut_steps) == \
        (False, False, None, 1)
    plain = _dag(ws, [{"expert_intermediate_size": 32, "token_budget": 3, "early_stop_min_improvement": 0.1},
                      {"expert_intermediate_size": 16, "token_budget": 3, "cut_steps": 2}])
    assert plain.nodes["stage_1"].key != dag.nodes["stage_1"].key  # keeping the moments is another output


def test_carrying_into_the_first_stage_or_the_baseline_is_refused_at_its_line(ws):
    from slimmoe.workflows.config import WorkflowConfigError

    with pytest.raises(WorkflowConfigError, match=r"wf\.yaml:\d+: stages\[0\]\.carry_optimizer: the first stage cuts "
                                                  r"the teacher"):
        _dag(ws, [{"expert_intermediate_size": 32, "token_budget": 3, "carry_optimizer": True}])
    with pytest.raises(WorkflowConfigError, match=r"baselines\[0\]\.carry_optimizer: a one_stage baseline cuts"):
        _dag(ws, [{"expert_intermediate_size": 32, "token_budget": 3}],
             baselines=[{"name": "one_stage", "kind": "one_stage", "carry_optimizer": True}])


def test_a_gradual_cut_with_too_many_steps_for_its_width_is_refused_at_its_line(ws):
    from slimmoe.workflows.config import WorkflowConfigError

    # The stand-in teacher's experts are 48 wide: 48 -> 40 has room for two float32 cuts (44, 40), not three.
    with pytest.raises(WorkflowConfigError, match=r"stages\[0\]\.cut_steps: cut_steps=3 cannot take "
                                                  r"expert_intermediate_size from 48 to 40.*at most 2"):
        _dag(ws, [{"expert_intermediate_size": 40, "token_budget": 3, "cut_steps": 3}])
    _dag(ws, [{"expert_intermediate_size": 40, "token_budget": 3, "cut_steps": 2}])


def test_the_plan_trains_a_gradual_cut_at_its_first_and_largest_size(ws):
    from slimmoe.workflows.driver import plan_workflow
    from standins import workflow_dict, write_config

    def stage_plan(**extra):
        cfg = workflow_dict(ws, stages=[{"expert_intermediate_size": 16, "token_budget": 4096, **extra}],
                            evaluate={"models": ["teacher"]})
        plan = plan_workflow(write_config(ws, cfg))
        return next(n for n in plan.nodes if n.name == "stage_1")

    plain, gradual = stage_plan(), stage_plan(cut_steps=2)
    assert gradual.params_after == plain.params_after  # the same final model
    assert gradual.phases["train"].weights > plain.phases["train"].weights  # 32 wide first, then 16
    assert gradual.flops > plain.flops


def test_the_one_stage_baseline_reaches_targets_an_earlier_stage_cut(ws):
    # Three stages, the KV groups halved at the second: the baseline must end at the same architecture.
    dag = _dag(ws, [{"expert_intermediate_size": 32, "token_budget": 3},
                    {"expert_intermediate_size": 16, "num_key_value_heads": 1, "token_budget": 3},
                    {"expert_intermediate_size": 8, "token_budget": 3}])
    one = dag.nodes["one_stage"].task_config
    assert (one.expert_intermediate_size, one.num_key_value_heads, one.token_budget) == (8, 1, 9)
