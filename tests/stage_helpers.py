"""A small trained teacher with its logit cache, and stage settings, shared by the stage tests."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from slimmoe.tasks.core.fingerprint import model_fingerprint
from slimmoe.tasks.data.config import TeacherLogitsConfig, TokenizeConfig
from slimmoe.tasks.data.readers import open_logit_cache
from slimmoe.tasks.nodes.teacher_logits import run_teacher_logits
from slimmoe.tasks.nodes.tokenize import run_tokenize
from slimmoe.tasks.slimming.config import StageConfig
from slimmoe.tasks.slimming.losses import next_token_loss, per_token_kl
from tiny import stdlib_texts, tiny_model, train_tokenizer

SEQ = 32


def build_stage_pipeline(root: Path) -> dict:
    """A small trained teacher, its tokenized data and its logit cache, under `root`."""
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


def stage_cfg(**kw):
    base = dict(expert_intermediate_size=16, num_key_value_heads=1, token_budget=40 * 8 * SEQ * 2, micro_batch=8,
                num_workers=2, lr=3e-3, warmup_fraction=0.1, checkpoint_interval=10, log_interval=5,
                calibration_batches=2, next_token_weight=0.5, cpus_per_worker=1)
    base.update(kw)
    return StageConfig(**base)


def held_out_kl(model_dir, logits_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cache = open_logit_cache(logits_dir / "validation")
    b = cache.read_rows(list(range(min(64, cache.num_rows))))
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"]).logits
    return float(per_token_kl(logits, b["topk_ids"], b["topk_logprobs"], b["rest_logprob"]).mean())


def committed_checkpoint_step(work: Path):
    """The step of the latest checkpoint Ray Train's controller has registered (None before the first).

    A report returning on the worker is not enough: the controller collects reports when it polls
    the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: 2 s by default, 0.5 s in the tests), so a
    worker killed right after reporting can lose that checkpoint. The controller writes this snapshot
    after it registered one."""
    snapshot = work / "ray_train" / "distill" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not there yet, or caught mid-write
        return None
    return latest["metrics"]["step"] if latest else None


def run_stage_killing_rank1(cfg: StageConfig, pipeline: dict, out: Path, work: Path, timeout_s: float = 900,
                            after_step: int = 0) -> tuple:
    """Run the stage in a thread and SIGKILL rank 1 once a checkpoint of step `after_step` or later is
    committed and training has passed it; return (killed pid or None, the committed step it was killed after)."""
    from slimmoe.tasks.nodes.stage import run_stage

    runner = threading.Thread(target=lambda: run_stage(cfg, pipeline["teacher"], pipeline["logits"], out, work,
                                                       teacher_fingerprint=pipeline["fp"]))
    runner.start()
    killed, committed = None, None
    deadline = time.time() + timeout_s
    while time.time() < deadline and runner.is_alive():
        committed = committed_checkpoint_step(work)
        progress = work / "progress.json"
        if committed is not None and committed >= after_step and progress.exists() and \
                json.loads(progress.read_text())["step"] > committed:
            killed = int((work / "pids" / "rank1.pid").read_text())
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.2)
    runner.join()
    return killed, committed
