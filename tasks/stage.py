"""One SlimMoE stage as one Ray Train job: score, slim, then distill on the cached teacher logits.

`run_stage` runs on the driver: it checks the config against the model and the cache before any
worker starts, plans the steps, launches a `TorchTrainer` whose workers run
`slimmoe.tasks.distill.train_loop`, and assembles the output directory:

    <out_dir>/             the distilled student: a standard Hugging Face model directory
    <out_dir>/pruned/      the slimmed, not yet distilled checkpoint (the one-shot result; with
                           distill_only, the input model as it came)
    <out_dir>/metrics.json per-logging-step loss, KL, tokens/s, learning rate; plan and timings
    <out_dir>/scores.safetensors  the all-reduced sensitivity scores the cut was made with
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .checkpoint import copy_tokenizer_files, load_config
from .slimming import SlimTargets, validate_targets

SPLIT = "train"


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Targets of the cut. `distill_only` skips scoring and slimming: the model keeps every size and is
    # only distilled (a trimmed, quantized or otherwise compressed model, given the same budget).
    expert_intermediate_size: Optional[int] = Field(default=None, gt=0)
    distill_only: bool = False
    num_key_value_heads: Optional[int] = Field(default=None, gt=0)
    shared_expert_intermediate_size: Optional[int] = Field(default=None, gt=0)
    # Scoring. "auto" scores with the next-token loss while the student still is the teacher (the KD
    # loss and its gradient are exactly zero there: FIELD-NOTES trap 1) and with the KD loss after.
    calibration_batches: int = Field(default=8, gt=0)
    score_loss: Literal["auto", "next_token", "kd"] = "auto"
    # Distillation budget and optimisation.
    token_budget: int = Field(gt=0)
    micro_batch: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, ge=0, description="0 turns clipping off")
    temperature: float = Field(default=1.0, gt=0)
    next_token_weight: float = Field(default=0.5, ge=0)
    mask_document_boundaries: bool = True
    budget_overflow: Literal["wrap", "refuse"] = "wrap"
    # Bookkeeping.
    checkpoint_interval: int = Field(default=50, gt=0)
    log_interval: int = Field(default=10, gt=0)
    seed: int = 0
    # Execution.
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[1, 2, 3] = 2
    num_workers: int = Field(default=1, gt=0)
    use_gpu: bool = False
    gpus_per_worker: float = Field(default=1, gt=0, description="with use_gpu; a fraction packs workers on one GPU")
    cpus_per_worker: float = Field(default=1, gt=0)
    max_failures: int = Field(default=2, ge=0)
    experts_implementation: Optional[Literal["eager", "grouped_mm", "batched_mm"]] = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _targets_or_distill_only(self):
        cut = [f for f in ("expert_intermediate_size", "num_key_value_heads", "shared_expert_intermediate_size")
               if getattr(self, f) is not None]
        if self.distill_only and cut:
            raise ValueError(f"distill_only: true keeps every size; remove {', '.join(cut)} or set distill_only: false")
        if not self.distill_only and self.expert_intermediate_size is None:
            raise ValueError("expert_intermediate_size is required (the stage's target); "
                             "or set distill_only: true to distill without slimming")
        return self

    @model_validator(mode="after")
    def _zero3_needs_gpu(self):
        if self.strategy == "deepspeed" and self.zero_stage == 3 and not self.use_gpu:
            raise ValueError("zero_stage: 3 needs GPUs (DeepSpeed ZeRO-3 does not run on CPU); use zero_stage: 2 or use_gpu: true")
        return self

    @property
    def targets(self) -> SlimTargets:
        return SlimTargets(self.expert_intermediate_size, self.num_key_value_heads, self.shared_expert_intermediate_size)


def plan_steps(cfg: StageConfig, seq_len: int, batches_per_epoch: int) -> dict:
    """Optimizer steps for the token budget, and whether the cache must wrap around to supply them."""
    tokens_per_step = cfg.micro_batch * cfg.grad_accum * cfg.num_workers * seq_len
    total_steps = max(1, math.ceil(cfg.token_budget / tokens_per_step))
    micro_batches = total_steps * cfg.grad_accum
    if batches_per_epoch <= 0:
        raise ValueError(
            f"the logit cache holds fewer than micro_batch={cfg.micro_batch} x num_workers={cfg.num_workers} rows; "
            "lower micro_batch or cache more data"
        )
    epochs = micro_batches / batches_per_epoch
    if epochs > 1:
        cache_tokens = batches_per_epoch * cfg.micro_batch * cfg.num_workers * seq_len
        msg = (f"token_budget={cfg.token_budget} is {epochs:.2f}x what the logit cache holds ({cache_tokens} usable tokens)")
        if cfg.budget_overflow == "refuse":
            raise ValueError(msg + "; lower token_budget, cache more data, or set budget_overflow: wrap")
        warnings.warn(msg + "; wrapping around the cache (budget_overflow: wrap)", stacklevel=2)
    return {"total_steps": total_steps, "tokens_per_step": tokens_per_step, "planned_tokens": total_steps * tokens_per_step,
            "batches_per_epoch": batches_per_epoch, "epochs": round(epochs, 4), "seq_len": seq_len}


def _logits_split(logits_dir: Path) -> Path:
    """A teacher_logits node output holds one cache per split; a bare cache is used as it is."""
    return logits_dir / SPLIT if (logits_dir / SPLIT / "manifest.json").exists() else logits_dir


def run_stage(cfg: StageConfig, model_dir, logits_dir, out_dir, work_dir, teacher_fingerprint: str | None = None,
              name: str = "stage") -> dict:
    """Score, slim and distill `model_dir` into `out_dir`. `work_dir` holds the Ray Train run (its
    checkpoints): a second call with the same `work_dir` resumes it; a fresh one starts over."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .fingerprint import tokenizer_fingerprint
    from .logit_cache import open_logit_cache

    model_dir, logits_dir, out_dir, work_dir = map(lambda p: Path(p).resolve(), (model_dir, logits_dir, out_dir, work_dir))
    config = load_config(model_dir, cfg.trust_remote_code)
    if not cfg.distill_only:
        validate_targets(config, cfg.targets)
    expect_tok = tokenizer_fingerprint(model_dir) if any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")) else None
    cache_dir = _logits_split(logits_dir)
    cache = open_logit_cache(cache_dir, expect_teacher_fingerprint=teacher_fingerprint, expect_tokenizer_fingerprint=expect_tok)
    if cache.vocab_size != config.vocab_size:
        raise ValueError(f"the logit cache's vocab_size={cache.vocab_size} differs from the model's {config.vocab_size}")
    plan = plan_steps(cfg, cache.seq_len, cache.num_batches(cfg.micro_batch, cfg.num_workers))
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "nonfinite.json").unlink(missing_ok=True)
    loop_config = {
        "stage": cfg.model_dump(), "model_dir": str(model_dir), "cache_dir": str(cache_dir), "work_dir": str(work_dir),
        "teacher_fingerprint": cache.manifest.get("teacher_fingerprint"), "tokenizer_fingerprint": expect_tok,
        "plan": plan, "name": name,
    }
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)
    from .distill import train_loop

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name="distill", storage_path=str(work_dir / "ray_train"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    started = time.time()
    trainer.fit()
    final_dir = work_dir / "final"
    nonfinite_file = work_dir / "nonfinite.json"
    if nonfinite_file.exists():
        nonfinite = json.loads(nonfinite_file.read_text())["step"]
        raise FloatingPointError(
            f"{name}: the distillation loss became NaN or inf at step {nonfinite}; nothing was saved as final. "
            "Lower lr, raise warmup_fraction, or check the logit cache with `slimmoe logits inspect`."
        )
    if not (final_dir / "config.json").exists():
        raise RuntimeError(f"{name}: training ended without writing the final model to {final_dir}")
    metrics = json.loads((work_dir / "metrics.json").read_text())
    metrics["wall_seconds_last_attempt"] = round(time.time() - started, 2)
    _assemble_output(final_dir, work_dir, model_dir, out_dir, metrics)
    return _headline(metrics)


def _assemble_output(final_dir: Path, work_dir: Path, model_dir: Path, out_dir: Path, metrics: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in final_dir.iterdir():
        shutil.copy2(item, out_dir / item.name)
    shutil.copytree(work_dir / "pruned", out_dir / "pruned", dirs_exist_ok=True)
    if (work_dir / "scores.safetensors").exists():  # a distill-only stage scores nothing
        shutil.copy2(work_dir / "scores.safetensors", out_dir / "scores.safetensors")
    copy_tokenizer_files(model_dir, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _headline(metrics: dict) -> dict:
    last = metrics["history"][-1] if metrics["history"] else {}
    return {
        "steps": metrics["steps_done"], "tokens": metrics["tokens_seen"], "final_loss": last.get("loss"),
        "final_kl": last.get("kl"), "params_before": metrics["params_before"]["total"],
        "params_after": metrics["params_after"]["total"], "active_after": metrics["params_after"]["active"],
        "resumed_from_step": metrics.get("resumed_from_step"),
    }
