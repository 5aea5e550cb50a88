"""What every distillation engine of the train loop shares: AdamW over the model's parameters with
the warm-up + cosine schedule, clipping and the optimizer step. Engines differ in how the model is
wrapped (DDP, FSDP2), how backward syncs, and how they checkpoint."""

from __future__ import annotations

import torch

from slimmoe.tasks.core.runtime import lr_lambda


class AdamWEngine:
    def __init__(self, model, cfg, device, total_steps: int, start_step: int = 0, warmup: bool = True):
        """`model` is the wrapped model the loop calls; its parameters are what AdamW steps.

        `start_step` puts the schedule at that step (an engine rebuilt mid-stage, after a gradual
        cut); `warmup=False` skips the warm-up (moments carried from the stage before are warm)."""
        self.model, self.cfg, self.device = model, cfg, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        # LambdaLR steps once on creation, so last_epoch=start_step-1 lands the schedule on start_step.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, cfg.warmup_fraction if warmup else 0.0, cfg.min_lr_ratio),
            last_epoch=start_step - 1)

    def step(self):
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]
