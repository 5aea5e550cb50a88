"""One SlimMoE stage as one Ray Train job: score, slim, then distill on the cached teacher logits.

`run_stage` runs on the driver: it checks the config against the model and the cache before any
worker starts, works out once what every worker must agree on (a `StageRun`: the steps, the cuts,
the fingerprints), launches a `TorchTrainer` whose workers run
`slimmoe.tasks.slimming.train_loop.train_loop(run)`, and assembles the output directory:

    <out_dir>/             the distilled student: a standard Hugging Face model directory
    <out_dir>/pruned/      the slimmed, not yet distilled checkpoint (the one-shot result; with
                           distill_only, the input model as it came)
    <out_dir>/metrics.json per-logging-step loss, KL, tokens/s, learning rate; steps and timings
                           (`data.formats.StageMetrics`: the part a next stage reads)
    <out_dir>/scores.safetensors  the all-reduced sensitivity scores the cut was made with
    <out_dir>/optimizer/moments.safetensors  with keep_optimizer_state: the final AdamW moments by
                           parameter name, for a next stage that carries them
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from pathlib import Path

from slimmoe.tasks.core.checkpoint import copy_tokenizer_files, has_tokenizer, load_config
from slimmoe.tasks.core.disk import check_free_space, dir_bytes
from slimmoe.tasks.core.runtime import ensure_ray, progress_line
from slimmoe.tasks.data.formats import STAGE_METRICS, LogitCacheError, read_stage_metrics
from slimmoe.tasks.data.readers import open_logit_cache, parent_manifest, split_dir
from slimmoe.tasks.core.fingerprint import model_fingerprint, tokenizer_fingerprint
from slimmoe.tasks.planning.disk import CHECKPOINTS_KEPT, stage_disk
from slimmoe.tasks.slimming.adaptive import heldout_overlap
from slimmoe.tasks.slimming.config import (Cut, ModelSizes, StageConfig, check_score_loss, gradual_cuts, stage_steps,
                                           validate_targets)
from slimmoe.tasks.slimming.moments import MOMENTS_FILE
from slimmoe.tasks.slimming.stage_run import RAY_RUN_NAME, RAY_STORAGE, StageRun, StageWorkerError
from slimmoe.tasks.slimming.train_loop import train_loop

SPLIT = "train"
HELDOUT_SPLIT = "validation"  # what an adaptive-length stage measures its held-out KL on


def unspent_tokens_of(model_dir: Path) -> int:
    """The tokens the stage that wrote `model_dir` left unspent by ending early (0 for any other model)."""
    metrics = read_stage_metrics(model_dir)
    return metrics.unspent_tokens if metrics is not None else 0


def run_stage(cfg: StageConfig, model_dir, logits_dir, out_dir, work_dir, teacher_fingerprint: str | None = None,
              name: str = "stage") -> dict:
    """Score, slim and distill `model_dir` into `out_dir`. `work_dir` holds the Ray Train run (its
    checkpoints): a second call with the same `work_dir` resumes it; a fresh one starts over."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    model_dir, logits_dir, out_dir, work_dir = map(lambda p: Path(p).resolve(), (model_dir, logits_dir, out_dir, work_dir))
    config = load_config(model_dir, cfg.trust_remote_code)
    if cfg.carry_optimizer and not (model_dir / MOMENTS_FILE).is_file():
        raise ValueError(f"{name}: carry_optimizer: true needs the AdamW moments of the stage before it, but "
                         f"{model_dir} has no {MOMENTS_FILE}; set keep_optimizer_state: true on that stage (a workflow "
                         "does this itself) or remove carry_optimizer")
    inherited = unspent_tokens_of(model_dir)
    if inherited:  # the stage before ended early: its unspent tokens are this stage's (and its windows follow)
        cfg = cfg.with_changes(token_budget=cfg.token_budget + inherited)
    if not cfg.distill_only:
        validate_targets(config, cfg.targets, dtype=cfg.train_dtype())
    model_fp = model_fingerprint(model_dir)
    check_score_loss(cfg, model_fp == teacher_fingerprint)  # before anything else is read, when the driver knows
    expect_tok = tokenizer_fingerprint(model_dir) if has_tokenizer(model_dir) else None
    cache_dir = split_dir(logits_dir, SPLIT, "logit_cache")
    # Without the driver's teacher, the split must at least agree with its own node output's manifest.
    parent = parent_manifest(cache_dir)
    expect_teacher = teacher_fingerprint or (parent or {}).get("teacher_fingerprint")
    cache = open_logit_cache(cache_dir, expect_teacher_fingerprint=expect_teacher, expect_tokenizer_fingerprint=expect_tok)
    # Whether this stage cuts the teacher itself decides the scoring loss; worked out here once, for all workers.
    cuts_the_teacher = model_fp == cache.manifest.get("teacher_fingerprint")
    if teacher_fingerprint is None:
        check_score_loss(cfg, cuts_the_teacher)
    if cache.vocab_size != config.vocab_size:
        raise ValueError(f"the logit cache's vocab_size={cache.vocab_size} differs from the model's {config.vocab_size}")
    steps = stage_steps(cfg, cache.seq_len, cfg.batches_per_epoch(cache.num_rows), inherited_tokens=inherited)
    cuts = (Cut(0, cfg.targets),) if cfg.distill_only else tuple(
        gradual_cuts(cfg, ModelSizes.of(config), steps.total_steps, cfg.train_dtype()))
    heldout_dir = None
    if cfg.early_stop_min_improvement is not None:
        heldout_dir = split_dir(logits_dir, HELDOUT_SPLIT, "logit_cache", missing_ok=True)
        if heldout_dir is None or heldout_dir == cache_dir:
            raise ValueError(f"{name}: early_stop_min_improvement measures the held-out KL on the teacher logits' "
                             f"{HELDOUT_SPLIT} split, which {logits_dir} does not have; tokenize with a "
                             "validation_fraction above 0 or remove early_stop_min_improvement")
        heldout = open_logit_cache(heldout_dir, expect_teacher_fingerprint=expect_teacher,
                                   expect_tokenizer_fingerprint=expect_tok)
        overlap = heldout_overlap(cfg.early_stop_rows, cfg.evaluated_rows, heldout.num_rows)
        if overlap is not None:
            raise ValueError(f"{name}: {overlap}")
    # The config travels as the object itself, validated with any inherited tokens already in its budget.
    run = StageRun(cfg=cfg, name=name, model_dir=model_dir, cache_dir=cache_dir, work_dir=work_dir, steps=steps,
                   cuts=cuts, cuts_the_teacher=cuts_the_teacher,
                   teacher_fingerprint=cache.manifest.get("teacher_fingerprint"), tokenizer_fingerprint=expect_tok,
                   heldout_cache_dir=heldout_dir)
    _check_disk(run, config, out_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    run.nonfinite_file.unlink(missing_ok=True)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    ensure_ray()

    started, failures = time.time(), 0
    while True:
        # Retries are the driver's, not Ray Train's (max_failures=0): Ray Train would retry every error, and
        # one that recurs (a full disk, a damaged file, a shape mismatch, a missing module) would be run and
        # reported max_failures + 1 times. A new trainer on the same storage resumes from the last checkpoint.
        trainer = TorchTrainer(
            functools.partial(train_loop, run),  # Ray Train's own config must be a dict; this is typed
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=RAY_RUN_NAME, storage_path=str(work_dir / RAY_STORAGE),
                checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                failure_config=FailureConfig(max_failures=0),
            ),
        )
        try:
            trainer.fit()
            break
        except Exception as err:
            failure, recurs = _stage_failure(err, name)
            if recurs or failures >= cfg.max_failures:
                raise failure from err
            failures += 1
            progress_line(f"[{name}] {failure}; retrying from the last checkpoint (retry {failures} of "
                          f"max_failures={cfg.max_failures})")
    if run.nonfinite_file.exists():
        nonfinite = json.loads(run.nonfinite_file.read_text())
        ranks = ", ".join(map(str, nonfinite.get("ranks", [])))
        raise FloatingPointError(
            f"{name}: the distillation loss became NaN or inf at step {nonfinite['step']} on rank {ranks} of "
            f"{nonfinite.get('world', 1)}; every rank stopped together and nothing was saved as final. "
            "Lower lr, raise warmup_fraction, or check the logit cache with `slimmoe logits inspect`."
        )
    if not (run.final_dir / "config.json").exists():
        raise RuntimeError(f"{name}: training ended without writing the final model to {run.final_dir}")
    metrics = json.loads(run.metrics_file.read_text())
    metrics["wall_seconds_last_attempt"] = round(time.time() - started, 2)
    _assemble_output(run, out_dir, metrics)
    return _headline(metrics)


class StageFailedError(RuntimeError):
    """A stage's worker failed; the message names the stage, the rank, the step and the error."""


def _stage_failure(err: Exception, name: str) -> tuple[Exception, bool]:
    """The error to report for a failed `fit` (the workers' own, not Ray Train's wrapping) and whether it
    would recur on a retry. Anything that is not known to recur (a lost worker, an unknown error) may be
    retried."""
    damaged = _worker_errors(err, LogitCacheError)
    if damaged:
        return LogitCacheError(f"{name}: a distillation worker could not read the teacher logit cache: "
                               f"{damaged[0]}"), True
    failed = sorted(_worker_errors(err, StageWorkerError), key=lambda e: e.rank)
    if not failed:
        return err, False
    others = "".join(f"; rank {e.rank} also failed ({e.phase})" for e in failed[1:])
    reason = next((e.recurs for e in failed if e.recurs), "")
    if reason:
        return StageFailedError(f"{failed[0]}{others}. Not retried: {reason}, so a retry would fail the same way; "
                                "fix the cause and run again (the stage resumes from its last checkpoint)"), True
    return StageFailedError(f"{failed[0]}{others}. Every rank of the stage was stopped; running the stage again "
                            f"resumes from its last checkpoint"), False


def _check_disk(run: StageRun, config, out_dir: Path) -> None:
    """Refuse before any worker starts when the checkpoints and outputs the plan counts would not fit
    (a resumed stage's checkpoints already on disk count as written)."""
    from slimmoe.tasks.planning.memory import model_shape
    from slimmoe.tasks.slimming.surgery import slimmed_config

    cfg = run.cfg
    out_config = config if cfg.distill_only else slimmed_config(config, cfg.targets)
    trained = config if cfg.distill_only else slimmed_config(config, run.cuts[0].targets)
    shape_out = model_shape(out_config)
    need = stage_disk(model_shape(trained).total, shape_out.checkpoint_bytes, shape_out.total, run.steps.total_steps,
                      cfg.checkpoint_interval, cfg.keep_optimizer_state)
    written = dir_bytes(run.work_dir) if run.work_dir.is_dir() else 0
    check_free_space({run.work_dir: need.work_bytes - written, out_dir: need.output_bytes}, run.name,
                     "free space there, or set the workflow's storage (and cache_dir) to a larger disk")


def _worker_errors(err: BaseException, kind: type) -> list:
    """The errors of type `kind` workers raised, found inside Ray Train's failure (its worker_failures
    by rank, the causes of Ray's task errors)."""
    todo, seen, found = [err], set(), []
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # a RayTaskError's original exception, before Ray's copy of it
        if isinstance(cause, kind) or isinstance(e, kind):
            found.append(cause if isinstance(cause, kind) else e)
            continue
        todo += [cause, e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
    return found


def _assemble_output(run: StageRun, out_dir: Path, metrics: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in run.final_dir.iterdir():
        if item.is_dir():  # optimizer/ (kept moments)
            shutil.copytree(item, out_dir / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, out_dir / item.name)
    shutil.copytree(run.pruned_dir, out_dir / "pruned", dirs_exist_ok=True)
    if run.scores_file.exists():  # a distill-only stage scores nothing
        shutil.copy2(run.scores_file, out_dir / "scores.safetensors")
    copy_tokenizer_files(run.model_dir, out_dir)
    (out_dir / STAGE_METRICS).write_text(json.dumps(metrics, indent=2) + "\n")


def _headline(metrics: dict) -> dict:
    last = metrics["history"][-1] if metrics["history"] else {}
    return {
        "steps": metrics["steps_done"], "tokens": metrics["tokens_seen"], "final_loss": last.get("loss"),
        "final_kl": last.get("kl"), "params_before": metrics["params_before"]["total"],
        "params_after": metrics["params_after"]["total"], "active_after": metrics["params_after"]["active"],
        "resumed_from_step": metrics.get("resumed_from_step"),
    }
