"""The prune-then-distill stage on Ray Train (tiny models, CPU workers on gloo)."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from slimmoe.tasks.core.tracking import HISTORY_FILE, TRACKING_DIR, read_history
from slimmoe.tasks.slimming.config import stage_steps
from slimmoe.tasks.nodes.stage import run_stage
from stage_helpers import SEQ, run_stage_killing_rank1, held_out_kl, stage_cfg


def test_distillation_halves_the_kl_of_the_slimmed_student(pipeline, ddp_stage):
    _, out, metrics = ddp_stage
    pruned_kl = held_out_kl(out / "pruned", pipeline["logits"])
    final_kl = held_out_kl(out, pipeline["logits"])
    assert final_kl <= 0.5 * pruned_kl, (pruned_kl, final_kl)
    assert metrics["steps"] == 40 and metrics["params_after"] < metrics["params_before"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["score_loss"] == "next_token"  # stage 1: the student is the teacher, KD scores would be noise
    assert [r["step"] for r in m["history"]] == list(range(5, 41, 5))
    assert all(k in m["history"][0] for k in ("loss", "kl", "tokens_per_s", "lr"))
    cfg = AutoModelForCausalLM.from_pretrained(out).config
    assert cfg.intermediate_size == 16 and cfg.num_key_value_heads == 1
    assert (out / "tokenizer.json").exists() and (out / "pruned" / "config.json").exists()


def test_killed_worker_resumes_from_its_last_checkpoint(pipeline, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    cfg = stage_cfg(token_budget=36 * 8 * SEQ * 2, checkpoint_interval=9, log_interval=6, max_failures=2)
    killed, committed = run_stage_killing_rank1(cfg, pipeline, out, work)
    assert killed is not None, "the stage finished before a checkpoint could be observed"
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps_done"] == 36
    assert m["resumed_from_step"] is not None and m["resumed_from_step"] >= committed, (committed, m["resumed_from_step"])
    assert m["resumed_from_step"] % 9 == 0
    steps = [r["step"] for r in m["history"]]
    assert steps == list(range(6, 37, 6)), "reported steps must continue from the checkpoint, not restart"
    # The live record drops what the killed attempt logged past its checkpoint: each step once.
    assert [r["step"] for r in read_history(work / HISTORY_FILE)] == steps
    events = EventAccumulator(str(work / TRACKING_DIR))
    events.Reload()
    assert [e.step for e in events.Scalars("stage/kl")] == steps
    assert int((work / "pids" / "rank1.pid").read_text()) != killed


def test_deepspeed_zero2_runs_on_cpu_and_its_output_loads(pipeline, tmp_path):
    out = tmp_path / "out"
    cfg = stage_cfg(strategy="deepspeed", zero_stage=2, token_budget=12 * 8 * SEQ * 2, checkpoint_interval=6)
    metrics = run_stage(cfg, pipeline["teacher"], pipeline["logits"], out, tmp_path / "work",
                        teacher_fingerprint=pipeline["fp"])
    assert metrics["steps"] == 12
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 16
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_same_seed_same_final_loss(pipeline, tmp_path):
    cfg = stage_cfg(num_workers=1, token_budget=10 * 8 * SEQ, log_interval=10, checkpoint_interval=100)
    losses = []
    for attempt in range(2):
        metrics = run_stage(cfg, pipeline["teacher"], pipeline["logits"], tmp_path / f"out{attempt}",
                            tmp_path / f"work{attempt}", teacher_fingerprint=pipeline["fp"])
        losses.append(metrics["final_loss"])
    assert abs(losses[0] - losses[1]) <= 1e-6, losses


def test_nonfinite_loss_stops_with_the_step_and_saves_nothing(pipeline, tmp_path):
    out = tmp_path / "out"
    cfg = stage_cfg(num_workers=1, lr=1e12, grad_clip=0, warmup_fraction=0, token_budget=30 * 8 * SEQ, max_failures=0)
    with pytest.raises(FloatingPointError, match=r"NaN or inf at step \d+"):
        run_stage(cfg, pipeline["teacher"], pipeline["logits"], out, tmp_path / "work", teacher_fingerprint=pipeline["fp"])
    assert not (out / "config.json").exists()
    assert not (tmp_path / "work" / "final").exists()


def test_budget_beyond_the_cache_wraps_with_a_warning_or_is_refused():
    cfg = stage_cfg(token_budget=1000 * 8 * SEQ * 2)
    with pytest.warns(UserWarning, match="wrapping around"):
        steps = stage_steps(cfg, SEQ, batches_per_epoch=100)
    assert steps.total_steps == 1000 and steps.epochs == 10
    with pytest.raises(ValueError, match="token_budget=.*budget_overflow"):
        stage_steps(stage_cfg(token_budget=1000 * 8 * SEQ * 2, budget_overflow="refuse"), SEQ, batches_per_epoch=100)


def test_bad_stage_configs_are_refused_before_any_work(pipeline, tmp_path):
    with pytest.raises(ValueError, match="ZeRO-3.*strategy: fsdp"):
        stage_cfg(strategy="deepspeed", zero_stage=3)
    with pytest.raises(ValueError, match="not smaller"):
        run_stage(stage_cfg(expert_intermediate_size=64), pipeline["teacher"], pipeline["logits"], tmp_path / "o",
                  tmp_path / "w")
    with pytest.raises(ValueError, match="fingerprint"):
        run_stage(stage_cfg(), pipeline["teacher"], pipeline["logits"], tmp_path / "o", tmp_path / "w",
                  teacher_fingerprint="0" * 16)
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_distill_only_keeps_every_size_and_moves_toward_the_teacher(pipeline, tmp_path):
    from slimmoe.tasks.nodes.slim import run_slim
    from slimmoe.tasks.slimming.config import SlimConfig

    cut = tmp_path / "cut"  # a model compressed elsewhere (here: a one-shot magnitude cut)
    run_slim(SlimConfig(expert_intermediate_size=16), pipeline["teacher"], cut)
    out = tmp_path / "out"
    cfg = stage_cfg(expert_intermediate_size=None, num_key_value_heads=None, distill_only=True, num_workers=1,
               token_budget=30 * 8 * SEQ, next_token_weight=0.0)
    metrics = run_stage(cfg, cut, pipeline["logits"], out, tmp_path / "work", teacher_fingerprint=pipeline["fp"])
    assert metrics["params_after"] == metrics["params_before"]
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 16
    assert json.loads((out / "metrics.json").read_text())["score_loss"] is None
    assert not (out / "scores.safetensors").exists()
    assert held_out_kl(out, pipeline["logits"]) < 0.8 * held_out_kl(cut, pipeline["logits"])
    with pytest.raises(ValueError, match="distill_only: true keeps every size; remove expert_intermediate_size"):
        stage_cfg(distill_only=True, num_key_value_heads=None)
    with pytest.raises(ValueError, match="expert_intermediate_size is required"):
        stage_cfg(expert_intermediate_size=None)
