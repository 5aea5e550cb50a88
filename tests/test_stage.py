"""The prune-then-distill stage on Ray Train (tiny models, CPU workers on gloo)."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimmoe.tasks.core.fingerprint import model_fingerprint
from slimmoe.tasks.slimming.losses import next_token_loss, per_token_kl
from slimmoe.tasks.data.readers import open_logit_cache
from slimmoe.tasks.slimming.config import StageConfig, plan_steps
from slimmoe.tasks.nodes.stage import run_stage
from slimmoe.tasks.data.config import TeacherLogitsConfig
from slimmoe.tasks.nodes.teacher_logits import run_teacher_logits
from slimmoe.tasks.data.config import TokenizeConfig
from slimmoe.tasks.nodes.tokenize import run_tokenize
from tiny import stdlib_texts, tiny_model, train_tokenizer

SEQ = 32


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, ray_cluster):
    """A small trained teacher, its tokenized data and its logit cache."""
    root = tmp_path_factory.mktemp("stage")
    teacher_dir = root / "teacher"
    texts = stdlib_texts(max_files=50, max_chars=5000)
    tok = train_tokenizer(teacher_dir, texts, vocab_size=320)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    torch.manual_seed(0)
    model = tiny_model("phimoe", vocab_size=len(tok), hidden_size=48, intermediate_size=64)
    ids = torch.tensor([i for t in texts for i in tok(t)["input_ids"] + [tok.eos_token_id]])
    rows = ids[: len(ids) // SEQ * SEQ].view(-1, SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = rows[torch.randint(0, len(rows), (16,), generator=g)]
        loss = next_token_loss(model(input_ids=batch).logits, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(teacher_dir)
    tokens = root / "tokens"
    run_tokenize(TokenizeConfig(source=str(data), seq_len=SEQ, validation_fraction=0.1), teacher_dir, tokens)
    logits = root / "logits"
    run_teacher_logits(TeacherLogitsConfig(k=16, batch_size=32), teacher_dir, tokens, logits)
    return {"root": root, "teacher": teacher_dir, "logits": logits, "fp": model_fingerprint(teacher_dir)}


def _cfg(**kw):
    base = dict(expert_intermediate_size=16, num_key_value_heads=1, token_budget=40 * 8 * SEQ * 2, micro_batch=8,
                num_workers=2, lr=3e-3, warmup_fraction=0.1, checkpoint_interval=10, log_interval=5,
                calibration_batches=2, next_token_weight=0.5, cpus_per_worker=1)
    base.update(kw)
    return StageConfig(**base)


def _held_out_kl(model_dir, logits_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cache = open_logit_cache(logits_dir / "validation")
    b = cache.read_rows(list(range(min(64, cache.num_rows))))
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"]).logits
    return float(per_token_kl(logits, b["topk_ids"], b["topk_logprobs"], b["rest_logprob"]).mean())


def test_distillation_halves_the_kl_of_the_slimmed_student(pipeline, tmp_path):
    out = tmp_path / "out"
    metrics = run_stage(_cfg(next_token_weight=0.0), pipeline["teacher"], pipeline["logits"], out, tmp_path / "work",
                        teacher_fingerprint=pipeline["fp"], name="stage_1")
    pruned_kl = _held_out_kl(out / "pruned", pipeline["logits"])
    final_kl = _held_out_kl(out, pipeline["logits"])
    assert final_kl <= 0.5 * pruned_kl, (pruned_kl, final_kl)
    assert metrics["steps"] == 40 and metrics["params_after"] < metrics["params_before"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["score_loss"] == "next_token"  # stage 1: the student is the teacher, KD scores would be noise
    assert [r["step"] for r in m["history"]] == list(range(5, 41, 5))
    assert all(k in m["history"][0] for k in ("loss", "kl", "tokens_per_s", "lr"))
    cfg = AutoModelForCausalLM.from_pretrained(out).config
    assert cfg.intermediate_size == 16 and cfg.num_key_value_heads == 1
    assert (out / "tokenizer.json").exists() and (out / "pruned" / "config.json").exists()


def _committed_checkpoint_step(work: Path):
    """The step of the latest checkpoint Ray Train's controller has registered (None before the first).

    A report returning on the worker is not enough: the controller collects reports when it polls
    the workers (every 2 s by default), so a worker killed right after reporting can lose that
    checkpoint. The controller writes this snapshot after it registered one."""
    snapshot = work / "ray_train" / "distill" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not there yet, or caught mid-write
        return None
    return latest["metrics"]["step"] if latest else None


def test_killed_worker_resumes_from_its_last_checkpoint(pipeline, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    cfg = _cfg(token_budget=150 * 8 * SEQ * 2, checkpoint_interval=20, log_interval=10, max_failures=2)
    result = {}
    runner = threading.Thread(target=lambda: result.update(
        m=run_stage(cfg, pipeline["teacher"], pipeline["logits"], out, work, teacher_fingerprint=pipeline["fp"])))
    runner.start()
    killed = None
    deadline = time.time() + 900
    committed = None
    while time.time() < deadline and runner.is_alive():
        committed = _committed_checkpoint_step(work)
        progress = work / "progress.json"
        # Kill mid-training, after a checkpoint is committed and some steps past it are done.
        if committed is not None and progress.exists() and json.loads(progress.read_text())["step"] > committed:
            pid = int((work / "pids" / "rank1.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed = pid
            break
        time.sleep(0.2)
    runner.join()
    assert killed is not None, "the stage finished before a checkpoint could be observed"
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps_done"] == 150
    assert m["resumed_from_step"] is not None and m["resumed_from_step"] >= committed, (committed, m["resumed_from_step"])
    assert m["resumed_from_step"] % 20 == 0
    steps = [r["step"] for r in m["history"]]
    assert steps == list(range(10, 151, 10)), "reported steps must continue from the checkpoint, not restart"
    assert int((work / "pids" / "rank1.pid").read_text()) != killed


def test_deepspeed_zero2_runs_on_cpu_and_its_output_loads(pipeline, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(strategy="deepspeed", zero_stage=2, token_budget=12 * 8 * SEQ * 2, checkpoint_interval=6)
    metrics = run_stage(cfg, pipeline["teacher"], pipeline["logits"], out, tmp_path / "work",
                        teacher_fingerprint=pipeline["fp"])
    assert metrics["steps"] == 12
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 16
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_same_seed_same_final_loss(pipeline, tmp_path):
    cfg = _cfg(num_workers=1, token_budget=10 * 8 * SEQ, log_interval=10, checkpoint_interval=100)
    losses = []
    for attempt in range(2):
        metrics = run_stage(cfg, pipeline["teacher"], pipeline["logits"], tmp_path / f"out{attempt}",
                            tmp_path / f"work{attempt}", teacher_fingerprint=pipeline["fp"])
        losses.append(metrics["final_loss"])
    assert abs(losses[0] - losses[1]) <= 1e-6, losses


def test_nonfinite_loss_stops_with_the_step_and_saves_nothing(pipeline, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(num_workers=1, lr=1e12, grad_clip=0, warmup_fraction=0, token_budget=30 * 8 * SEQ, max_failures=0)
    with pytest.raises(FloatingPointError, match=r"NaN or inf at step \d+"):
        run_stage(cfg, pipeline["teacher"], pipeline["logits"], out, tmp_path / "work", teacher_fingerprint=pipeline["fp"])
    assert not (out / "config.json").exists()
    assert not (tmp_path / "work" / "final").exists()


def test_budget_beyond_the_cache_wraps_with_a_warning_or_is_refused():
    cfg = _cfg(token_budget=1000 * 8 * SEQ * 2)
    with pytest.warns(UserWarning, match="wrapping around"):
        plan = plan_steps(cfg, SEQ, batches_per_epoch=100)
    assert plan["total_steps"] == 1000 and plan["epochs"] == 10
    with pytest.raises(ValueError, match="token_budget=.*budget_overflow"):
        plan_steps(_cfg(token_budget=1000 * 8 * SEQ * 2, budget_overflow="refuse"), SEQ, batches_per_epoch=100)


def test_bad_stage_configs_are_refused_before_any_work(pipeline, tmp_path):
    with pytest.raises(ValueError, match="ZeRO-3.*strategy: fsdp"):
        _cfg(strategy="deepspeed", zero_stage=3)
    with pytest.raises(ValueError, match="not smaller"):
        run_stage(_cfg(expert_intermediate_size=64), pipeline["teacher"], pipeline["logits"], tmp_path / "o",
                  tmp_path / "w")
    with pytest.raises(ValueError, match="fingerprint"):
        run_stage(_cfg(), pipeline["teacher"], pipeline["logits"], tmp_path / "o", tmp_path / "w",
                  teacher_fingerprint="0" * 16)
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_distill_only_keeps_every_size_and_moves_toward_the_teacher(pipeline, tmp_path):
    from slimmoe.tasks.nodes.slim import run_slim
    from slimmoe.tasks.slimming.config import SlimConfig

    cut = tmp_path / "cut"  # a model compressed elsewhere (here: a one-shot magnitude cut)
    run_slim(SlimConfig(expert_intermediate_size=16), pipeline["teacher"], cut)
    out = tmp_path / "out"
    cfg = _cfg(expert_intermediate_size=None, num_key_value_heads=None, distill_only=True, num_workers=1,
               token_budget=30 * 8 * SEQ, next_token_weight=0.0)
    metrics = run_stage(cfg, cut, pipeline["logits"], out, tmp_path / "work", teacher_fingerprint=pipeline["fp"])
    assert metrics["params_after"] == metrics["params_before"]
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 16
    assert json.loads((out / "metrics.json").read_text())["score_loss"] is None
    assert not (out / "scores.safetensors").exists()
    assert _held_out_kl(out, pipeline["logits"]) < 0.8 * _held_out_kl(cut, pipeline["logits"])
    with pytest.raises(ValueError, match="distill_only: true keeps every size; remove expert_intermediate_size"):
        _cfg(distill_only=True, num_key_value_heads=None)
    with pytest.raises(ValueError, match="expert_intermediate_size is required"):
        _cfg(expert_intermediate_size=None)
