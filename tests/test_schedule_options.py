"""The schedule options run as stages (Ray Train, gloo): an early stop hands its unspent tokens to
the next stage, which carries the moments on; a gradual cut reaches its targets at the planned steps."""

import json

import pytest
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from slimmoe.tasks.nodes.stage import run_stage
from slimmoe.tasks.slimming.moments import MOMENTS_FILE
from stage_helpers import SEQ, run_stage_killing_rank1, stage_cfg


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def _embed_step(out) -> float:
    with safe_open(str(out / MOMENTS_FILE), "pt") as f:
        return float(f.get_tensor("step/model.embed_tokens.weight"))


@pytest.fixture(scope="module")
def early_then_carried(pipeline, tmp_path_factory):
    """stage_1 (1 worker, 40 steps planned) stops early; stage_2 carries its moments and inherits its tokens."""
    root = tmp_path_factory.mktemp("schedule_chain")
    step_tokens = 8 * SEQ
    first = stage_cfg(expert_intermediate_size=32, num_workers=1, token_budget=40 * step_tokens,
                      keep_optimizer_state=True, early_stop_min_improvement=0.5,
                      early_stop_window_tokens=5 * step_tokens, early_stop_rows=32)
    run_stage(first, pipeline["teacher"], pipeline["logits"], root / "s1", root / "w1",
              teacher_fingerprint=pipeline["fp"], name="stage_1")
    # A long warm-up, so that a second warm-up would show in the logged learning rate.
    second = stage_cfg(expert_intermediate_size=16, num_workers=1, token_budget=20 * step_tokens,
                       carry_optimizer=True, keep_optimizer_state=True, warmup_fraction=0.5)
    run_stage(second, root / "s1", pipeline["logits"], root / "s2", root / "w2",
              teacher_fingerprint=pipeline["fp"], name="stage_2")
    return first, second, root / "s1", root / "s2"


def test_an_early_stop_passes_its_unspent_tokens_to_the_next_stage(early_then_carried):
    first, second, s1, s2 = early_then_carried
    m1, m2 = _metrics(s1), _metrics(s2)
    stop = m1["early_stop"]
    assert stop["stopped_at_step"] is not None and stop["stopped_at_step"] < m1["steps"]["total_steps"]
    assert m1["steps_done"] == stop["stopped_at_step"]
    assert stop["checks"][-1]["improvement"] < 0.5 and stop["checks"][0]["step"] == 0
    assert all(c["step"] % stop["window_steps"] == 0 for c in stop["checks"])
    assert m1["unspent_tokens"] == m1["steps"]["planned_tokens"] - m1["tokens_seen"] > 0
    assert m2["steps"]["inherited_tokens"] == m1["unspent_tokens"]
    assert m2["steps"]["configured_token_budget"] == second.token_budget
    # The schedule spends exactly what was configured, whichever stage spends it.
    assert m1["tokens_seen"] + m2["tokens_seen"] == first.token_budget + second.token_budget


def test_carried_moments_continue_the_step_count_without_a_second_warmup(early_then_carried):
    _, second, s1, s2 = early_then_carried
    m1, m2 = _metrics(s1), _metrics(s2)
    assert m2["carried_optimizer"]["max_step"] == m1["steps_done"] == _embed_step(s1)
    assert _embed_step(s2) == m1["steps_done"] + m2["steps_done"]
    first_row = m2["history"][0]
    assert first_row["step"] < m2["steps"]["total_steps"] * second.warmup_fraction
    # Without the warm-up the first logged lr is on the cosine near the peak; inside a warm-up of half
    # the steps it would be below half of it.
    assert first_row["lr"] > 0.9 * second.lr


def test_gradual_cut_reaches_the_targets_at_the_planned_steps_through_a_worker_kill(pipeline, tmp_path):
    # Rank 1 is killed after a checkpoint taken past the second cut: the stage resumes with the student
    # at the size it had then, makes the cuts still due on schedule, and the record of the earlier ones survives.
    cfg = stage_cfg(expert_intermediate_size=16, num_key_value_heads=1, token_budget=30 * 2 * 8 * SEQ, cut_steps=3,
                    checkpoint_interval=10)
    killed, committed = run_stage_killing_rank1(cfg, pipeline, tmp_path / "out", tmp_path / "work", after_step=10)
    assert killed is not None, "the stage finished before a checkpoint past the second cut could be observed"
    m = _metrics(tmp_path / "out")
    assert m["resumed_from_step"] is not None and m["resumed_from_step"] >= committed >= 10
    assert m["steps"]["total_steps"] == 30
    assert [(c["step"], c["expert_intermediate_size"], c["num_key_value_heads"]) for c in m["cuts"]] == \
        [(0, 48, 2), (10, 32, 2), (20, 16, 1)]
    sizes = [c["params_after"] for c in m["cuts"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == m["params_after"]["total"]
    assert [h["step"] for h in m["history"]] == list(range(5, 31, 5))
    lrs = [h["lr"] for h in m["history"]]
    assert lrs == sorted(lrs, reverse=True)  # one schedule across the cuts, never restarted
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert (config.intermediate_size, config.num_key_value_heads) == (16, 1)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert AutoConfig.from_pretrained(tmp_path / "out" / "pruned").intermediate_size == 48  # the first cut
