"""The student a stage trains, cut from its input on every rank alike: whole on each rank (ddp,
deepspeed) or sharded (fsdp).

Scores are all-reduced, so every rank cuts the same neurons; rank 0 writes `pruned/` (the one-shot
result, and what a resumed sharded stage rebuilds its student's shape from) and `prepare.json`."""

from __future__ import annotations

import gc
import json
import time
import uuid
from dataclasses import asdict

import torch.distributed as dist

from slimmoe.tasks.core.checkpoint import copy_model_dir, load_model, save_model_dir
from slimmoe.tasks.core.params import count_parameters
from slimmoe.tasks.core.storage import write_json_atomic
from slimmoe.tasks.slimming.moments import MOMENTS_FILE, load_moments, slice_moments
from slimmoe.tasks.slimming.scores import all_reduce_scores, kd_score_loss, next_token_score_loss, score_model
from slimmoe.tasks.slimming.config import Cut
from slimmoe.tasks.slimming.stage_run import StageRun
from slimmoe.tasks.slimming.surgery import apply_plan, keep_plan

CALIBRATION_SEED_OFFSET = 7919  # calibration rows are drawn apart from the training order


def scoring_loss(cfg, cuts_the_teacher: bool):
    """(name, loss) the cut is scored with: next-token while the student is the teacher (a KD loss is
    exactly zero there), else as configured."""
    mode = cfg.score_loss
    if mode == "auto":
        mode = "next_token" if cuts_the_teacher else "kd"
    if mode == "next_token":
        return "next_token", next_token_score_loss
    return "kd", kd_score_loss(cfg.temperature, cfg.next_token_weight)


def _calibration_scores(model, cfg, cache, rank: int, world: int, loss_fn, seed_offset: int):
    batches = cache.iter_batches(cfg.micro_batch, rank=rank, world_size=world, shuffle=True, seed=cfg.seed + seed_offset)
    calib = [b for _, b in zip(range(cfg.calibration_batches), batches)]
    return all_reduce_scores(score_model(model, calib, loss_fn, with_heads=cfg.num_key_value_heads is not None,
                                         expert_score=cfg.scored_experts()))


def cut_whole(run: StageRun, cache, device, rank: int, world: int):
    """Score on calibration batches, cut to the first cut and (rank 0) save the pruned model. Returns
    the student on `device` and, with `carry_optimizer`, the input's AdamW moments sliced with the
    same cut (else None)."""
    cfg = run.cfg
    model = load_model(run.model_dir, device=device, trust_remote_code=cfg.trust_remote_code,
                       experts_implementation=cfg.experts_kernel_on(device))
    moments = load_moments(run.model_dir / MOMENTS_FILE) if cfg.carry_optimizer else None
    params_before = count_parameters(model)
    if cfg.distill_only:
        if rank == 0:
            save_model_dir(model, run.pruned_dir, tokenizer_from=run.model_dir, overwrite=True)
            write_json_atomic(run.prepare_file, {"score_loss": None, "calibration_batches": 0,
                                                 "params_before": params_before})
        return model.to(device), moments
    loss_name, loss_fn = scoring_loss(cfg, run.cuts_the_teacher)
    scores = _calibration_scores(model, cfg, cache, rank, world, loss_fn, CALIBRATION_SEED_OFFSET)
    kept = keep_plan(model.config, scores, run.cuts[0].targets, model=model)
    student = apply_plan(model, kept)
    if moments is not None:
        moments = slice_moments(model, kept, moments)
    del model
    if rank == 0:
        scores.save(run.scores_file)
        save_model_dir(student, run.pruned_dir, tokenizer_from=run.model_dir, overwrite=True)
        write_json_atomic(run.prepare_file, {"score_loss": loss_name, "calibration_batches": scores.batches,
                                             "params_before": params_before})
    return student.to(device), moments


def recut_whole(model, moments: dict, run: StageRun, cache, rank: int, world: int, cut: Cut, index: int):
    """One inner cut of a gradual stage: re-score the student as it is now (KD loss: it is no longer the
    teacher) and cut it and its moments alike. Returns (student, moments)."""
    cfg = run.cfg
    _, loss_fn = scoring_loss(cfg, cuts_the_teacher=False)
    scores = _calibration_scores(model, cfg, cache, rank, world, loss_fn, CALIBRATION_SEED_OFFSET + index)
    kept = keep_plan(model.config, scores, cut.targets, model=model)
    moments = slice_moments(model, kept, moments)
    student = apply_plan(model, kept)
    return student, moments


def cut_record(cut: Cut, step: int, student) -> dict:
    """What metrics.json lists for a cut made at `step`."""
    return {"step": step, **asdict(cut.targets), "params_after": count_parameters(student)["total"]}


def _agreed_token(rank: int, world: int) -> str:
    """A token rank 0 draws and every rank receives: it tells this attempt's files from an earlier one's."""
    token = [uuid.uuid4().hex if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


def _wait_for_ready(marker, attempt: str, poll_s: float = 0.5) -> None:
    """Wait, outside any collective, until rank 0 has marked its work done for this attempt.

    Rank 0's streaming surgery reads most of the teacher and writes the student (at Phi-3.5-MoE scale
    20 minutes or more on a network filesystem): a barrier there would outlast the process group's
    timeout. If rank 0 fails instead, Ray Train ends every worker of the group, this one included."""
    while True:
        try:
            if json.loads(marker.read_text()).get("attempt") == attempt:
                return
        except (OSError, ValueError):  # not written yet (it is renamed into place whole)
            pass
        time.sleep(poll_s)


def stage_mesh(cfg, device):
    """(training mesh, scoring mesh) of a sharded stage on this worker (`fsdp.stage_meshes`), for the
    shard group its config derives from the workers on this node."""
    from slimmoe.tasks.core.runtime import workers_per_node
    from slimmoe.tasks.slimming.fsdp import stage_meshes

    return stage_meshes(device, cfg.shard_group(workers_per_node()))


def cut_sharded(run: StageRun, cache, device, rank: int, world: int):
    """The fsdp path of `cut_whole`: score the sharded model, write the pruned checkpoint by streaming
    surgery (rank 0, one tensor at a time), and load the student from it, sharded. Records the
    parameter bytes each rank held (the point of sharding) in its memory record."""
    from slimmoe.tasks.slimming import fsdp
    from slimmoe.tasks.slimming.streaming import stream_slim

    cfg = run.cfg
    memory = {}
    attempt = _agreed_token(rank, world)
    train_mesh, score_mesh = stage_mesh(cfg, device)
    group = score_mesh.size() if score_mesh is not None else world
    # Under HSDP each shard group scores its own ranks' calibration batches on a model sharded over the
    # group alone (no gradient crosses groups); the groups' sums are added at the end.
    model = fsdp.sharded_model_from(run.model_dir, device, cfg.experts_kernel_on(device),
                                    trust_remote_code=cfg.trust_remote_code, mesh=score_mesh)
    memory["input_param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    memory["input_local_param_bytes"] = fsdp.local_param_bytes(model)
    memory["input_allocated_param_bytes"] = fsdp.allocated_param_bytes(model)
    params_before = count_parameters(model)
    if cfg.distill_only:
        prepare = {"score_loss": None, "calibration_batches": 0, "params_before": params_before}
        if rank == 0:
            copy_model_dir(run.model_dir, run.pruned_dir, overwrite=True)
            write_json_atomic(run.pruned_ready_file, {"attempt": attempt})
    else:
        loss_name, loss_fn = scoring_loss(cfg, run.cuts_the_teacher)
        first = rank // group * group
        batches = fsdp.every_rank_batches(cache, cfg.micro_batch, world, cfg.calibration_batches,
                                          cfg.seed + CALIBRATION_SEED_OFFSET, ranks=range(first, first + group))
        scores = fsdp.sharded_taylor_scores(model, batches, loss_fn, with_heads=cfg.num_key_value_heads is not None,
                                            replicas=world // group, expert_score=cfg.scored_experts())
        # The unsharded definition counts one batch per rank; so does this, for the same batches.
        prepare = {"score_loss": loss_name, "calibration_batches": scores.batches, "params_before": params_before}
        if rank == 0:
            scores.save(run.scores_file)
            stream_slim(run.model_dir, run.pruned_dir, keep_plan(model.config, scores, run.cuts[0].targets),
                        tokenizer_from=run.model_dir, overwrite=True, trust_remote_code=cfg.trust_remote_code)
            write_json_atomic(run.pruned_ready_file, {"attempt": attempt})
    del model
    gc.collect()
    if rank != 0:
        _wait_for_ready(run.pruned_ready_file, attempt)
    student = fsdp.sharded_model_from(run.pruned_dir, device, cfg.experts_kernel_on(device),
                                      cfg.activation_checkpointing, mesh=train_mesh)
    memory["student_param_bytes"] = sum(p.numel() * p.element_size() for p in student.parameters())
    memory["student_local_param_bytes"] = fsdp.local_param_bytes(student)
    memory["student_allocated_param_bytes"] = fsdp.allocated_param_bytes(student)
    memory["shard_group"] = group
    run.record_memory(rank, **memory)
    if rank == 0:
        write_json_atomic(run.prepare_file, prepare)
    return student
