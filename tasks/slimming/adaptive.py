"""Adaptive stage length: end a stage once its held-out KL has stopped improving, so the tokens it
would have spent go to the next stage.

The held-out rows are the last `early_stop_rows` rows of the validation logit cache (evaluation
reads that split from its first row, so a validation split longer than both keeps them apart).
Every rank scores its share of the rows and the sums are all-reduced, so every rank sees the same
KL and stops at the same step, under every strategy (fsdp included: see `HeldOutKL`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from slimmoe.tasks.slimming.losses import per_token_kl


class HeldOutKL:
    """Mean per-token KL(teacher || student) on fixed held-out rows, identical on every rank.

    Every rank runs the same number of forwards on batches of the same shape, whether or not the rows
    divide by the world size: under FSDP each forward is a sequence of all-gathers, and a rank with a
    batch fewer would leave the others waiting in one. A rank short of rows fills its last batch with
    copies of a held-out row that count zero."""

    def __init__(self, cache, rows: int, rank: int, world: int, batch_size: int):
        take = min(rows, cache.num_rows)
        if take == 0:
            raise ValueError(f"{cache.path} holds no rows to measure the held-out KL on")
        self.rows = take
        self.world = world
        first = cache.num_rows - take
        mine = list(range(first, cache.num_rows))[rank::world]
        per_rank = math.ceil(take / world)
        weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
        mine += [first] * (per_rank - len(mine))
        # A few dozen rows, read once: every check scores the same ones.
        self.batches = [(cache.read_rows(mine[s:s + batch_size]), torch.tensor(weights[s:s + batch_size],
                                                                               dtype=torch.float64))
                        for s in range(0, per_rank, batch_size)]

    @torch.no_grad()
    def __call__(self, model, device) -> float:
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)  # KL sum, token count
        for rows, weight in self.batches:
            b = {k: v.to(device) for k, v in rows.items()}
            logits = model(input_ids=b["input_ids"]).logits
            kl = per_token_kl(logits.float(), b["topk_ids"], b["topk_logprobs"], b["rest_logprob"]).double()
            weight = weight.to(device)
            total += torch.stack([(kl.sum(dim=-1) * weight).sum(), weight.sum() * kl.shape[-1]])
        if self.world > 1:
            dist.all_reduce(total)
        model.train(was_training)
        return float(total[0] / total[1])


class EarlyStop:
    """When to measure and whether to stop: a check every `window_steps` steps (and one before the
    first step, the baseline); stop when the last window improved the KL by less than
    `min_improvement` of its value at the window's start."""

    def __init__(self, min_improvement: float, window_tokens: int, tokens_per_step: int):
        self.min_improvement = min_improvement
        self.window_steps = max(1, math.ceil(window_tokens / tokens_per_step))

    def due(self, step: int) -> bool:
        return step % self.window_steps == 0

    def decide(self, checks: list[dict]) -> bool:
        """Fill in the last check's improvement; True when it says stop."""
        if len(checks) < 2:
            return False
        before, now = checks[-2]["heldout_kl"], checks[-1]["heldout_kl"]
        improvement = (before - now) / before if before > 0 else 0.0
        checks[-1]["improvement"] = round(improvement, 6)
        return improvement < self.min_improvement
