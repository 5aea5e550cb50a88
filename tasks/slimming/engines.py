"""How a stage's workers share the student (ddp, deepspeed, fsdp), behind one interface.

Everything the train loop does that depends on the strategy goes through an engine, so the loop
never asks which strategy it runs; `engine_class` is the one place that chooses. An engine class

- makes the student: cuts it from the stage's input (`cut_student`) or rebuilds it to resume from a
  checkpoint (`resume_student`);
- wraps it and owns AdamW with the warm-up + cosine schedule (every engine takes `start_step` and
  `warmup` alike);
- runs forward, backward and the optimizer step;
- saves and loads its part of a checkpoint (the weights where it keeps them, optimizer, schedule) and
  saves the final model;
- hands AdamW moments over by parameter name and cuts itself mid-stage where the strategy can (ddp:
  it holds the whole model and a plain optimizer on every rank; the config refuses these elsewhere).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch

from slimmoe.tasks.core.runtime import lr_lambda, rank_and_world
from slimmoe.tasks.slimming.config import Cut
from slimmoe.tasks.slimming import student as students
from slimmoe.tasks.slimming.stage_run import StageRun


def adamw(params, cfg, total_steps: int, start_step: int = 0, warmup: bool = True):
    """AdamW and its schedule. `start_step` puts the schedule at that step (an engine rebuilt mid-stage,
    after a gradual cut); `warmup=False` skips the warm-up (moments carried from the stage before are warm)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    # LambdaLR steps once on creation, so last_epoch=start_step-1 lands the schedule on start_step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, cfg.warmup_fraction if warmup else 0.0, cfg.min_lr_ratio),
        last_epoch=start_step - 1)
    return optimizer, scheduler


class Engine:
    """`module` is the student as built (what held-out checks, parameter counts and moments read);
    `model` is what the loop calls (the student wrapped by the strategy)."""

    def __init__(self, model, cfg, device, total_steps: int, start_step: int = 0, warmup: bool = True):
        self.module, self.cfg, self.device = model, cfg, device
        self.model = self._wrap(model, device)
        self.optimizer, self.scheduler = adamw(self.model.parameters(), cfg, total_steps, start_step, warmup)

    def _wrap(self, model, device):
        return model

    # -- the student ------------------------------------------------------------------------------

    @classmethod
    def cut_student(cls, run: StageRun, cache, device, rank: int, world: int):
        """The student cut from the stage's input, and the input's moments sliced alike (or None)."""
        raise NotImplementedError

    @classmethod
    def resume_student(cls, run: StageRun, ckpt_dir: Path, device):
        """The student as a checkpoint holds it (or, where `load` fills the weights, its empty shape)."""
        raise NotImplementedError

    # -- a step -----------------------------------------------------------------------------------

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def backward(self, loss, last_micro: bool):
        (loss / self.cfg.grad_accum).backward()

    def step(self):
        # The norm is logged every logging step; with clipping off an infinite bound computes it and
        # clips nothing. Kept as a tensor: reading it here would wait on the device every step.
        self._grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> float | None:
        """The gradient norm of the last step, before clipping (the same on every rank)."""
        norm = getattr(self, "_grad_norm", None)
        if norm is None:
            return None
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor whose value the norm's collectives already agreed on
            norm = norm.full_tensor()
        return float(norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -- checkpoints and the final model ----------------------------------------------------------

    def save(self, ckpt_dir: Path, rank: int):
        """This rank's part of a checkpoint. Every rank calls it."""
        raise NotImplementedError

    def load(self, ckpt_dir: Path):
        raise NotImplementedError

    def save_final(self, run: StageRun, rank: int):
        """The distilled student as a Hugging Face directory in `run.final_dir`. Every rank calls it."""
        raise NotImplementedError

    # -- what only some strategies can do ---------------------------------------------------------

    def install_moments(self, moments: dict) -> dict:
        raise NotImplementedError(f"{type(self).__name__} cannot take carried moments (carry_optimizer is ddp only)")

    def save_moments(self, path: Path) -> int:
        raise NotImplementedError(f"{type(self).__name__} cannot save moments (keep_optimizer_state is ddp only)")

    def recut(self, run: StageRun, cache, rank: int, world: int, cut: Cut, index: int, step: int):
        raise NotImplementedError(f"{type(self).__name__} cannot cut mid-stage (cut_steps > 1 is ddp only)")


class _WholeStudent(Engine):
    """Engines whose every rank holds the whole student: rank 0 writes its weights."""

    @classmethod
    def cut_student(cls, run, cache, device, rank, world):
        return students.cut_whole(run, cache, device, rank, world)

    @classmethod
    def resume_student(cls, run, ckpt_dir, device):
        from slimmoe.tasks.core.checkpoint import load_model

        return load_model(ckpt_dir / "model", device=device, experts_implementation=run.cfg.experts_kernel_on(device))

    def save(self, ckpt_dir, rank):
        if rank == 0:
            self.module.save_pretrained(ckpt_dir / "model", safe_serialization=True)
        self._save_state(ckpt_dir, rank)

    def _save_state(self, ckpt_dir: Path, rank: int):
        raise NotImplementedError

    def save_final(self, run, rank):
        from slimmoe.tasks.core.checkpoint import save_model_dir

        if rank == 0:
            save_model_dir(self.module, run.final_dir, tokenizer_from=run.model_dir, overwrite=True)


class DDPEngine(_WholeStudent):
    """Plain PyTorch DDP (gloo on CPU, NCCL on GPU); bf16 autocast on GPU."""

    def _wrap(self, model, device):
        # bf16 compute over the float32 masters; the experts run eager there (`StageConfig.experts_kernel`).
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
        if rank_and_world()[1] == 1:
            return model.to(device)
        import ray.train.torch as rt

        # Experts that receive no token in a batch get no gradient: DDP must be told.
        return rt.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    def forward(self, input_ids):
        if self.autocast is None:
            return super().forward(input_ids)
        with self.autocast:
            return super().forward(input_ids)

    def backward(self, loss, last_micro: bool):
        scaled = loss / self.cfg.grad_accum
        if last_micro or not hasattr(self.model, "no_sync"):
            scaled.backward()
        else:
            with self.model.no_sync():
                scaled.backward()

    def _save_state(self, ckpt_dir, rank):
        if rank == 0:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       ckpt_dir / "optimizer.pt")

    def load(self, ckpt_dir):
        state = torch.load(ckpt_dir / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def install_moments(self, moments):
        from slimmoe.tasks.slimming.moments import install_moments

        return install_moments(self.optimizer, self.module, moments)

    def save_moments(self, path):
        from slimmoe.tasks.slimming.moments import save_moments

        return save_moments(self.optimizer, self.module, path)

    def recut(self, run, cache, rank, world, cut, index, step):
        """Cut the student and its moments to `cut`'s targets and go on from an engine at the same point
        of the one schedule: the stage is one optimisation throughout."""
        from slimmoe.tasks.slimming.moments import optimizer_moments

        model = self.module
        student, moments = students.recut_whole(model, optimizer_moments(self.optimizer, model), run, cache, rank,
                                                world, cut, index)
        student = student.to(self.device)
        student.train()
        engine = type(self)(student, run.cfg, self.device, run.steps.total_steps, start_step=step,
                            warmup=not run.cfg.carry_optimizer)
        engine.install_moments(moments)
        return engine


def _float32_buffers(model) -> dict[str, torch.Tensor]:
    return {name: buf.detach().clone() for name, buf in model.named_buffers() if buf.dtype == torch.float32}


def restore_buffers(model, saved: dict[str, torch.Tensor]) -> list[str]:
    """Put back the float32 buffers a cast narrowed, with their exact values. Older DeepSpeed releases
    (the range we allow starts at 0.16) call `module.bfloat16()` in bf16 mode, which also casts RoPE's
    `inv_freq`: positions near 4k are then off by radians in training, while inference recomputes
    float32 frequencies. Newer ones (0.19.8 here) cast parameters only. Returns the names restored."""
    restored = []
    for name, buf in model.named_buffers():
        if name in saved and buf.dtype != torch.float32:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            owner._buffers[attr] = saved[name].to(buf.device)
            restored.append(name)
    return restored


class DeepSpeedEngine(_WholeStudent):
    """DeepSpeed ZeRO-1/2 (on CPU: DeepSpeed's CPU accelerator over gloo). ZeRO-3 is refused by the
    config: the student here is whole on every rank before DeepSpeed sees it, so use the fsdp
    strategy for models that do not fit one device."""

    def __init__(self, model, cfg, device, total_steps: int, start_step: int = 0, warmup: bool = True):
        import deepspeed

        self.module, self.cfg, self.device = model, cfg, device
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch,
            "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": cfg.train_dtype() == "bfloat16"},
            "steps_per_print": 10**9,
        }
        optimizer, scheduler = adamw(model.parameters(), cfg, total_steps, start_step, warmup)
        float_buffers = _float32_buffers(model)
        # DeepSpeed picks its GPU from LOCAL_RANK, which need not be the GPU Ray Train gave this worker
        # (fractional gpus_per_worker, or workers that do not share CUDA_VISIBLE_DEVICES); name it.
        args = SimpleNamespace(device_rank=device.index or 0) if device.type == "cuda" else None
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            args=args, model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
        if device.type == "cuda" and self.model.device != device:
            raise RuntimeError(f"DeepSpeed placed the model on {self.model.device}, but this worker's device is {device}")
        restore_buffers(model, float_buffers)

    def backward(self, loss, last_micro: bool):
        # DeepSpeed scales by gradient_accumulation_steps itself and steps only at the boundary.
        self.model.backward(loss)
        self.model.step()

    def step(self):
        pass

    def grad_norm(self) -> float | None:
        norm = self.model.get_global_grad_norm()  # computed by DeepSpeed when it clips
        return None if norm is None else float(norm)

    def _save_state(self, ckpt_dir, rank):
        # Every rank writes its own ZeRO shard; DeepSpeed's file names carry the rank.
        self.model.save_checkpoint(str(ckpt_dir / "deepspeed"), tag="state")

    def load(self, ckpt_dir):
        self.model.load_checkpoint(str(ckpt_dir / "deepspeed"), tag="state")


class FSDPEngine(Engine):
    """FSDP2: AdamW on the float32 shards; no rank ever holds the whole student (see `fsdp.py`).
    Checkpoints go through `torch.distributed.checkpoint`, so each rank writes only its shards and a
    restarted group resumes at the exact step."""

    @classmethod
    def cut_student(cls, run, cache, device, rank, world):
        return students.cut_sharded(run, cache, device, rank, world), None

    @classmethod
    def resume_student(cls, run, ckpt_dir, device):
        from slimmoe.tasks.core.checkpoint import load_config
        from slimmoe.tasks.slimming.fsdp import build_sharded

        # The weights come from the distributed checkpoint (`load`); the shape from the pruned model.
        return build_sharded(load_config(run.pruned_dir), device, run.cfg.experts_kernel_on(device),
                             run.cfg.activation_checkpointing, mesh=students.stage_mesh(run.cfg, device)[0])

    def backward(self, loss, last_micro: bool):
        # Under HSDP the gradients are reduce-scattered inside each group every micro-batch but
        # all-reduced between the groups (between nodes) only with the step's last one; FSDP2 keeps
        # the earlier micro-batches' partial sums and adds them in. Without a replicate group this
        # flag changes nothing.
        self.model.set_requires_all_reduce(last_micro)
        super().backward(loss, last_micro)

    def save(self, ckpt_dir, rank):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        # Each rank writes its own `__<rank>_0.distcp` into its directory and the coordinator the
        # metadata; Ray Train gathers the ranks' directories into one checkpoint.
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(ckpt_dir / "dcp"))
        if rank == 0:
            torch.save({"scheduler": self.scheduler.state_dict()}, ckpt_dir / "scheduler.pt")

    def load(self, ckpt_dir):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(ckpt_dir / "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=True)["scheduler"])

    def save_final(self, run, rank):
        from slimmoe.tasks.core.runtime import dtype_from_name
        from slimmoe.tasks.core.safetensors_files import checkpoint_dtype
        from slimmoe.tasks.slimming.fsdp import save_sharded_model

        # A collective gather. The student keeps the dtype its teacher was stored in (float32 masters
        # are for training only).
        save_sharded_model(self.model, run.final_dir, config_from=run.pruned_dir,
                           dtype=dtype_from_name(checkpoint_dtype(run.pruned_dir)),
                           tokenizer_from=run.model_dir, overwrite=True)


ENGINES: dict[str, type[Engine]] = {"ddp": DDPEngine, "deepspeed": DeepSpeedEngine, "fsdp": FSDPEngine}


def engine_class(strategy: str) -> type[Engine]:
    """The engine of a resolved strategy (`StageConfig.resolved_strategy()`)."""
    return ENGINES[strategy]
