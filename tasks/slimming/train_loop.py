"""The Ray Train worker loop of a stage: score and slim (or resume), then distill.

Every worker reads its own shard of the logit cache. Scores are all-reduced so every rank cuts
the same neurons; rank 0 saves the pruned checkpoint. Checkpoints (model, optimizer, scheduler,
step, per-rank RNG) are reported every `checkpoint_interval` steps, and a restarted worker group
resumes from the latest one at the exact data position.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from slimmoe.tasks.core.runtime import lr_lambda, progress_line
from slimmoe.tasks.slimming.adaptive import EarlyStop, HeldOutKL
from slimmoe.tasks.slimming.engine import AdamWEngine
from slimmoe.tasks.slimming.config import SlimTargets, StageConfig
from slimmoe.tasks.core.checkpoint import load_model, save_model_dir
from slimmoe.tasks.slimming.losses import distillation_loss, document_mask, per_token_kl
from slimmoe.tasks.core.params import count_parameters
from slimmoe.tasks.slimming.scores import all_reduce_scores
from slimmoe.tasks.slimming.scores import kd_score_loss, next_token_score_loss, score_model
from slimmoe.tasks.slimming.moments import (MOMENTS_FILE, install_moments, load_moments, optimizer_moments,
                                            save_moments, slice_moments)
from slimmoe.tasks.slimming.surgery import apply_plan, keep_plan
from slimmoe.tasks.core.storage import write_json_atomic

CALIBRATION_SEED_OFFSET = 7919  # calibration rows are drawn apart from the training order


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_true(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if _world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


class MicroBatches:
    """This rank's micro-batches in a fixed order, wrapping into a new shuffled epoch when one ends."""

    def __init__(self, cache, micro_batch: int, rank: int, world: int, seed: int, start_micro: int):
        self.cache, self.micro_batch, self.rank, self.world, self.seed = cache, micro_batch, rank, world, seed
        self.per_epoch = cache.num_batches(micro_batch, world)
        self.epoch, start = divmod(start_micro, self.per_epoch)
        self._it = self._epoch_iter(start)

    def _epoch_iter(self, start: int):
        return iter(self.cache.iter_batches(self.micro_batch, rank=self.rank, world_size=self.world, shuffle=True,
                                            seed=self.seed, epoch=self.epoch, start_batch=start))

    def __next__(self) -> dict:
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = self._epoch_iter(0)
            return next(self._it)


class DDPEngine(AdamWEngine):
    """Plain PyTorch DDP (gloo on CPU, NCCL on GPU) with AdamW and a warm-up + cosine schedule."""

    def __init__(self, model, cfg, device, total_steps: int, **schedule):
        import ray.train.torch as rt

        self.module = model
        # Experts that receive no token in a batch get no gradient: DDP must be told.
        wrapped = rt.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) \
            if _world()[1] > 1 else model.to(device)
        super().__init__(wrapped, cfg, device, total_steps, **schedule)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def forward(self, input_ids):
        if self.autocast is None:
            return self.model(input_ids=input_ids).logits
        with self.autocast:
            return self.model(input_ids=input_ids).logits

    def backward(self, loss, last_micro: bool):
        scaled = loss / self.cfg.grad_accum
        if last_micro or not hasattr(self.model, "no_sync"):
            scaled.backward()
        else:
            with self.model.no_sync():
                scaled.backward()

    def save(self, ckpt_dir: Path, rank: int):
        if rank == 0:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       ckpt_dir / "optimizer.pt")

    def load(self, ckpt_dir: Path):
        state = torch.load(ckpt_dir / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_model(self):
        return self.module


class DeepSpeedEngine:
    """DeepSpeed ZeRO-1/2 inside the same loop (on CPU: DeepSpeed's CPU accelerator over gloo). ZeRO-3
    is refused by the config: the model here is whole on every rank before DeepSpeed sees it, so use
    the fsdp strategy for models that do not fit one device."""

    def __init__(self, model, cfg, device, total_steps: int):
        import deepspeed

        self.module = model
        self.cfg, self.device = cfg, device
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch,
            "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": device.type == "cuda"},
            "steps_per_print": 10**9,
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, cfg.warmup_fraction, cfg.min_lr_ratio))
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def backward(self, loss, last_micro: bool):
        # DeepSpeed scales by gradient_accumulation_steps itself and steps only at the boundary.
        self.model.backward(loss)
        self.model.step()

    def step(self):
        pass

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, ckpt_dir: Path, rank: int):
        # Every rank writes its own ZeRO shard; DeepSpeed's file names carry the rank.
        self.model.save_checkpoint(str(ckpt_dir / "deepspeed"), tag="state")

    def load(self, ckpt_dir: Path):
        self.model.load_checkpoint(str(ckpt_dir / "deepspeed"), tag="state")

    def full_state_model(self):
        return self.module


def _engine_class(strategy: str):
    if strategy == "fsdp":
        from slimmoe.tasks.slimming.fsdp import FSDPEngine

        return FSDPEngine
    return DeepSpeedEngine if strategy == "deepspeed" else DDPEngine


def _select_scoring_loss(cfg, cuts_the_teacher: bool):
    mode = cfg.score_loss
    if mode == "auto":
        mode = "next_token" if cuts_the_teacher else "kd"
    if mode == "next_token":
        return "next_token", next_token_score_loss
    return "kd", kd_score_loss(cfg.temperature, cfg.next_token_weight)


def _prepare_student(cfg, loop_cfg: dict, cache, device, rank: int, world: int, targets):
    """Score on calibration batches (all ranks, all-reduced), cut to `targets`, and (rank 0) save the
    pruned model. Returns the student and, with `carry_optimizer`, the input's AdamW moments sliced
    with the same cut."""
    work_dir, model_dir = Path(loop_cfg["work_dir"]), Path(loop_cfg["model_dir"])
    model = load_model(model_dir, device=device, trust_remote_code=cfg.trust_remote_code,
                       experts_implementation=cfg.experts_implementation)
    moments = load_moments(model_dir / MOMENTS_FILE) if cfg.carry_optimizer else None
    params_before = count_parameters(model)
    if cfg.distill_only:
        if rank == 0:
            save_model_dir(model, work_dir / "pruned", tokenizer_from=model_dir, overwrite=True)
            write_json_atomic(work_dir / "prepare.json", {"score_loss": None, "calibration_batches": 0,
                                                           "params_before": params_before})
        return model, moments
    loss_name, loss_fn = _select_scoring_loss(cfg, loop_cfg["cuts_the_teacher"])
    scores = _calibration_scores(model, cfg, cache, rank, world, loss_fn, CALIBRATION_SEED_OFFSET)
    plan = keep_plan(model.config, scores, targets, model=model)
    student = apply_plan(model, plan)
    if moments is not None:
        moments = slice_moments(model, plan, moments)
    del model
    if rank == 0:
        scores.save(work_dir / "scores.safetensors")
        save_model_dir(student, work_dir / "pruned", tokenizer_from=model_dir, overwrite=True)
        write_json_atomic(work_dir / "prepare.json", {"score_loss": loss_name, "calibration_batches": scores.batches,
                                                       "params_before": params_before})
    return student, moments


def _calibration_scores(model, cfg, cache, rank: int, world: int, loss_fn, seed_offset: int):
    batches = cache.iter_batches(cfg.micro_batch, rank=rank, world_size=world, shuffle=True, seed=cfg.seed + seed_offset)
    calib = [b for _, b in zip(range(cfg.calibration_batches), batches)]
    return all_reduce_scores(score_model(model, calib, loss_fn, with_heads=cfg.num_key_value_heads is not None))


def _recut(engine, cfg, loop_cfg: dict, cache, device, rank: int, world: int, cut: dict, index: int, step: int):
    """One inner cut of a gradual stage: re-score the student as it is now (KD loss: it is no longer
    the teacher), cut it to the cut's targets, and rebuild the engine at the same point of the
    schedule with the moments sliced like the weights (the stage is one optimisation throughout)."""
    model = engine.full_state_model()
    targets = SlimTargets(**cut["targets"])
    _, loss_fn = _select_scoring_loss(cfg, cuts_the_teacher=False)
    scores = _calibration_scores(model, cfg, cache, rank, world, loss_fn, CALIBRATION_SEED_OFFSET + index)
    plan = keep_plan(model.config, scores, targets, model=model)
    moments = slice_moments(model, plan, optimizer_moments(engine.optimizer, model))
    student = apply_plan(model, plan).to(device)
    student.train()
    del model, engine
    engine = DDPEngine(student, cfg, device, loop_cfg["plan"]["total_steps"], start_step=step,
                       warmup=not cfg.carry_optimizer)
    install_moments(engine.optimizer, engine.module, moments)
    return engine, {"step": step, **cut["targets"], "params_after": count_parameters(student)["total"]}


def _prepare_sharded_student(cfg, loop_cfg: dict, cache, device, rank: int, world: int):
    """The fsdp path of `_prepare_student`: score the sharded model, write the pruned checkpoint by
    streaming surgery (rank 0, one tensor at a time), and load the student from it, sharded."""
    import gc

    from slimmoe.tasks.slimming import fsdp
    from slimmoe.tasks.core.checkpoint import copy_model_dir
    from slimmoe.tasks.slimming.streaming import stream_slim
    from slimmoe.tasks.slimming.surgery import keep_plan

    work_dir, model_dir = Path(loop_cfg["work_dir"]), Path(loop_cfg["model_dir"])
    pruned = work_dir / "pruned"
    memory = {}
    model = fsdp.sharded_model_from(model_dir, device, cfg.experts_implementation, trust_remote_code=cfg.trust_remote_code)
    memory["input_param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    memory["input_local_param_bytes"] = fsdp.local_param_bytes(model)
    params_before = count_parameters(model)
    if cfg.distill_only:
        prepare = {"score_loss": None, "calibration_batches": 0, "params_before": params_before}
        if rank == 0:
            copy_model_dir(model_dir, pruned, overwrite=True)
    else:
        loss_name, loss_fn = _select_scoring_loss(cfg, loop_cfg["cuts_the_teacher"])
        batches = fsdp.every_rank_batches(cache, cfg.micro_batch, world, cfg.calibration_batches,
                                          cfg.seed + CALIBRATION_SEED_OFFSET)
        scores = fsdp.sharded_taylor_scores(model, batches, loss_fn, with_heads=cfg.num_key_value_heads is not None)
        # The unsharded definition counts one batch per rank; so does this, for the same batches.
        prepare = {"score_loss": loss_name, "calibration_batches": scores.batches, "params_before": params_before}
        config = model.config
        if rank == 0:
            scores.save(work_dir / "scores.safetensors")
            stream_slim(model_dir, pruned, keep_plan(config, scores, cfg.targets), tokenizer_from=model_dir,
                        overwrite=True, trust_remote_code=cfg.trust_remote_code)
    del model
    gc.collect()
    dist.barrier()  # the pruned checkpoint is complete before any rank reads it
    student = fsdp.sharded_model_from(pruned, device, cfg.experts_implementation, cfg.activation_checkpointing)
    memory["student_param_bytes"] = sum(p.numel() * p.element_size() for p in student.parameters())
    memory["student_local_param_bytes"] = fsdp.local_param_bytes(student)
    _record_memory(work_dir, rank, **memory)
    if rank == 0:
        write_json_atomic(work_dir / "prepare.json", prepare)
    return student


def _peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux: VmHWM)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _record_memory(work_dir: Path, rank: int, **values) -> None:
    """Add `values` to this rank's memory record (work_dir/memory/rank<r>.json)."""
    path = work_dir / "memory" / f"rank{rank}.json"
    path.parent.mkdir(exist_ok=True)
    record = json.loads(path.read_text()) if path.exists() else {}
    write_json_atomic(path, {**record, "rank": rank, **values})


def _save_checkpoint(engine, state: dict, rank: int, name: str):
    import ray.train

    tmp = Path(tempfile.mkdtemp(prefix=f"slimmoe-ckpt-r{rank}-"))
    if rank == 0:
        if not getattr(engine, "sharded", False):
            engine.full_state_model().save_pretrained(tmp / "model", safe_serialization=True)
        torch.save({k: v for k, v in state.items() if k != "history"}, tmp / "trainer_state.pt")
        (tmp / "history.json").write_text(json.dumps(state["history"]))
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8)},
               tmp / f"rng_rank{rank}.pt")
    engine.save(tmp, rank)
    ray.train.report({"step": state["step"], "tokens": state["tokens"], "stage": name},
                     checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    shutil.rmtree(tmp, ignore_errors=True)  # uploaded synchronously by now


def _schedule_record(cfg, state: dict, plan: dict, early_stop) -> dict:
    """What the schedule options did, for metrics.json: the cuts made, the carried moments, and the
    early-stop checks with the tokens left unspent (which the next stage inherits)."""
    out = {"cuts": state["cuts"], "carried_optimizer": state["carried_optimizer"],
           "unspent_tokens": plan["planned_tokens"] - state["tokens"] if state["stopped_early_at"] is not None else 0}
    if early_stop is not None:
        out["early_stop"] = {"min_improvement": cfg.early_stop_min_improvement, "window_steps": early_stop.window_steps,
                             "rows": cfg.early_stop_rows, "checks": state["heldout"],
                             "stopped_at_step": state["stopped_early_at"]}
    return out


def train_loop(loop_cfg: dict) -> None:
    import ray.train
    import ray.train.torch as rt

    from slimmoe.tasks.data.readers import open_logit_cache
    cfg: StageConfig = loop_cfg["stage"]
    plan, name = loop_cfg["plan"], loop_cfg["name"]
    rank, world = _world()
    device = rt.get_device()
    work_dir = Path(loop_cfg["work_dir"])
    (work_dir / "pids").mkdir(parents=True, exist_ok=True)
    (work_dir / "pids" / f"rank{rank}.pid").write_text(str(os.getpid()))
    torch.manual_seed(cfg.seed + rank)
    cache = open_logit_cache(loop_cfg["cache_dir"], expect_teacher_fingerprint=loop_cfg.get("teacher_fingerprint"),
                             expect_tokenizer_fingerprint=loop_cfg.get("tokenizer_fingerprint"))

    cuts = loop_cfg.get("cuts") or [{"step": 0, "targets": asdict(cfg.targets)}]
    state = {"step": 0, "tokens": 0, "history": [], "resumed_from_step": None, "cuts_done": 1, "cuts": [],
             "heldout": [], "stopped_early_at": None, "carried_optimizer": None}
    checkpoint = ray.train.get_checkpoint()
    engine_cls = _engine_class(cfg.strategy)
    # Carried moments are warm: a second warm-up would throw away what they know (same on resume).
    schedule = {"warmup": False} if cfg.carry_optimizer else {}
    if checkpoint is None:
        if cfg.strategy == "fsdp":
            student, moments = _prepare_sharded_student(cfg, loop_cfg, cache, device, rank, world), None
        else:
            student, moments = _prepare_student(cfg, loop_cfg, cache, device, rank, world,
                                                SlimTargets(**cuts[0]["targets"]))
            student = student.to(device)
        engine = engine_cls(student, cfg, device, plan["total_steps"], **schedule)
        if moments is not None:
            state["carried_optimizer"] = install_moments(engine.optimizer, engine.module, moments)
        if not cfg.distill_only:
            state["cuts"].append({"step": 0, **cuts[0]["targets"], "params_after": count_parameters(student)["total"]})
    else:
        with checkpoint.as_directory() as ckpt:
            ckpt = Path(ckpt)
            if cfg.strategy == "fsdp":  # the weights come from the distributed checkpoint
                from slimmoe.tasks.slimming.fsdp import build_sharded
                from slimmoe.tasks.core.checkpoint import load_config

                student = build_sharded(load_config(work_dir / "pruned"), device, cfg.experts_implementation,
                                        cfg.activation_checkpointing)
            else:
                student = load_model(ckpt / "model", device=device, experts_implementation=cfg.experts_implementation)
            engine = engine_cls(student, cfg, device, plan["total_steps"], **schedule)
            engine.load(ckpt)
            saved = torch.load(ckpt / "trainer_state.pt", weights_only=True)
            state.update(saved, history=json.loads((ckpt / "history.json").read_text()))
            rng = torch.load(ckpt / f"rng_rank{rank}.pt", weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if torch.cuda.is_available() and rng["cuda"].numel():
                torch.cuda.set_rng_state(rng["cuda"])
        state["resumed_from_step"] = state["step"]
        if rank == 0:
            progress_line(f"[{name}] resumed from checkpoint at step {state['step']}/{plan['total_steps']}")

    eos = cache.manifest.get("eos_token_id", getattr(student.config, "eos_token_id", None))
    eos = eos if isinstance(eos, int) else None
    batches = MicroBatches(cache, cfg.micro_batch, rank, world, cfg.seed, state["step"] * cfg.grad_accum)
    engine.model.train()
    total = plan["total_steps"]
    early_stop, heldout = None, None
    if cfg.early_stop_min_improvement is not None:
        early_stop = EarlyStop(cfg.early_stop_min_improvement, cfg.early_stop_window_tokens, plan["tokens_per_step"])
        heldout = HeldOutKL(open_logit_cache(loop_cfg["heldout_cache_dir"]), cfg.early_stop_rows, rank, world,
                            cfg.micro_batch)
    t_log, tokens_at_log = time.time(), state["tokens"]
    while state["step"] < total:
        while state["cuts_done"] < len(cuts) and state["step"] >= cuts[state["cuts_done"]]["step"]:
            engine, record = _recut(engine, cfg, loop_cfg, cache, device, rank, world, cuts[state["cuts_done"]],
                                    state["cuts_done"], state["step"])
            state["cuts"].append(record)
            state["cuts_done"] += 1
            if rank == 0:
                progress_line(f"[{name}] cut {state['cuts_done']}/{len(cuts)} at step {state['step']}: "
                              f"{record['params_after']:,} parameters")
        if early_stop is not None and early_stop.due(state["step"]) and \
                not (state["heldout"] and state["heldout"][-1]["step"] == state["step"]):
            state["heldout"].append({"step": state["step"], "tokens": state["tokens"],
                                     "heldout_kl": round(heldout(engine.full_state_model(), device), 6)})
            if early_stop.decide(state["heldout"]):
                state["stopped_early_at"] = state["step"]
                if rank == 0:
                    c = state["heldout"][-1]
                    progress_line(f"[{name}] held-out KL improved {c['improvement']:.2%} over the last "
                                  f"{early_stop.window_steps} steps (< {cfg.early_stop_min_improvement:.2%}): "
                                  f"stopping at step {state['step']}/{total}")
                break
        parts_acc: dict[str, float] = {}
        finite = True
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            mask = document_mask(batch["input_ids"], eos) if cfg.mask_document_boundaries else None
            logits = engine.forward(batch["input_ids"])
            loss, parts = distillation_loss(logits, batch["input_ids"], batch["topk_ids"], batch["topk_logprobs"],
                                            batch["rest_logprob"], cfg.temperature, cfg.next_token_weight, mask)
            finite = finite and bool(torch.isfinite(loss))
            if not finite:
                break
            engine.backward(loss, last_micro=micro == cfg.grad_accum - 1)
            parts["loss"] = float(loss.detach())
            if cfg.temperature != 1.0:
                with torch.no_grad():
                    parts["kl"] = float(per_token_kl(logits.detach(), batch["topk_ids"], batch["topk_logprobs"],
                                                     batch["rest_logprob"]).mean())
            else:
                parts["kl"] = parts["kd"]
            for k, v in parts.items():
                parts_acc[k] = parts_acc.get(k, 0.0) + v / cfg.grad_accum
        if not _all_true(finite, device):
            # Stop every rank together and save nothing as final; the driver raises with the step.
            if rank == 0:
                write_json_atomic(work_dir / "nonfinite.json", {"step": state["step"] + 1})
            ray.train.report({"nonfinite_step": state["step"] + 1, "stage": name})
            return
        engine.step()
        state["step"] += 1
        state["tokens"] += plan["tokens_per_step"]
        if state["step"] % cfg.log_interval == 0 or state["step"] == total:
            now = time.time()
            tps = (state["tokens"] - tokens_at_log) / max(now - t_log, 1e-9)
            t_log, tokens_at_log = now, state["tokens"]
            row = {"step": state["step"], "tokens": state["tokens"], "lr": engine.lr(), "tokens_per_s": round(tps, 1),
                   **{k: round(v, 6) for k, v in parts_acc.items()}}
            state["history"].append(row)
            if rank == 0:
                write_json_atomic(work_dir / "progress.json", row)
                eta = (total - state["step"]) * plan["tokens_per_step"] / max(tps, 1e-9)
                progress_line(f"[{name}] step {state['step']}/{total} tokens {state['tokens']}/{plan['planned_tokens']} "
                      f"loss {row['loss']:.4f} kl {row['kl']:.4f} tok/s {tps:.0f} eta {eta:.0f}s")
        if state["step"] % cfg.checkpoint_interval == 0 and state["step"] < total:
            _save_checkpoint(engine, state, rank, name)

    final_model = engine.full_state_model()
    _record_memory(work_dir, rank, peak_rss_bytes=_peak_rss_bytes())
    if world > 1:
        dist.barrier()  # every rank's record is on disk before rank 0 collects them
    if getattr(engine, "sharded", False):  # a collective gather: every rank takes part
        from slimmoe.tasks.core.runtime import dtype_from_name
        from slimmoe.tasks.core.safetensors_files import checkpoint_dtype
        from slimmoe.tasks.slimming.fsdp import save_sharded_model

        # The student keeps the dtype its teacher was stored in (float32 masters are for training only).
        save_sharded_model(final_model, work_dir / "final", config_from=work_dir / "pruned",
                           dtype=dtype_from_name(checkpoint_dtype(work_dir / "pruned")),
                           tokenizer_from=loop_cfg["model_dir"], overwrite=True)
    if rank == 0:
        prepare = json.loads((work_dir / "prepare.json").read_text())
        metrics = {"stage": name, "plan": plan, "steps_done": state["step"], "tokens_seen": state["tokens"],
                   "resumed_from_step": state["resumed_from_step"], "history": state["history"],
                   "params_after": count_parameters(final_model), "config": cfg.model_dump(), **prepare}
        metrics["memory_per_rank"] = [json.loads(f.read_text()) for f in sorted((work_dir / "memory").glob("rank*.json"))]
        metrics.update(_schedule_record(cfg, state, plan, early_stop))
        if not getattr(engine, "sharded", False):
            save_model_dir(final_model, work_dir / "final", tokenizer_from=loop_cfg["model_dir"], overwrite=True)
        if cfg.keep_optimizer_state:
            save_moments(engine.optimizer, engine.module, work_dir / "final" / MOMENTS_FILE)
        write_json_atomic(work_dir / "metrics.json", metrics)
    ray.train.report({"step": state["step"], "tokens": state["tokens"], "stage": name, "done": True})
