"""Adaptive stage length: end a stage once its held-out KL has stopped improving, so the tokens it
would have spent go to the next stage.

The held-out rows are the last `early_stop_rows` rows of the validation logit cache (evaluation
reads that split from its first row, so a validation split longer than both keeps them apart; a
workflow refuses one that is not: `heldout_overlap`).
Every rank scores its share of the rows and the sums are all-reduced, so every rank sees the same
KL and stops at the same step, under every strategy (fsdp included: see `HeldOutKL`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from slimmoe.tasks.slimming.losses import per_token_kl


def heldout_rows(num_rows: int, rows: int) -> range:
    """The held-out rows of a validation split of `num_rows` rows: its last `rows` (every row, when fewer)."""
    return range(num_rows - min(rows, num_rows), num_rows)


def heldout_overlap(early_stop_rows: int, evaluated_rows, num_rows: int) -> str | None:
    """Why the held-out rows would overlap the rows evaluate reports on, or None. `evaluated_rows`: the
    split's first rows evaluate scores (evaluate.max_rows; "all" for every row; None: no evaluation).
    Refused rather than split: either split would change a number the user reads (the stop's noise, or
    the rows the report is on) without their knowing."""
    if evaluated_rows is None or num_rows <= 0:
        return None
    held = heldout_rows(num_rows, early_stop_rows)
    scored = num_rows if evaluated_rows == "all" else min(evaluated_rows, num_rows)
    if scored <= held.start:
        return None
    fixes = [f"lower early_stop_rows to at most {num_rows - scored}"] if scored < num_rows else []
    if evaluated_rows == "all":
        fixes.append(f"set evaluate.max_rows to at most {held.start}" if held.start else "set evaluate.max_rows")
    elif held.start:
        fixes.append(f"lower evaluate.max_rows to at most {held.start}")
    fixes.append("tokenize more validation rows (data.validation_fraction)")
    asked = "every row" if evaluated_rows == "all" else f"max_rows={evaluated_rows}"
    return (f"early_stop_rows={early_stop_rows} overlaps the rows evaluate reports on: the validation split holds "
            f"{num_rows} rows; the early stop measures its last {len(held)} (rows {held.start}-{num_rows - 1}) and "
            f"evaluate ({asked}) scores its first {scored} (rows 0-{scored - 1}), so the reported KL would be on rows "
            f"that chose when the stage stopped; {', '.join(fixes[:-1])} or {fixes[-1]}")


class HeldOutKL:
    """Mean per-token KL(teacher || student) on fixed held-out rows, identical on every rank.

    Every rank runs the same number of forwards on batches of the same shape, whether or not the rows
    divide by the world size: under FSDP each forward is a sequence of all-gathers, and a rank with a
    batch fewer would leave the others waiting in one. A rank short of rows fills its last batch with
    copies of a held-out row that count zero."""

    def __init__(self, cache, rows: int, rank: int, world: int, batch_size: int):
        held = heldout_rows(cache.num_rows, rows)
        take = len(held)
        if take == 0:
            raise ValueError(f"{cache.path} holds no rows to measure the held-out KL on")
        self.rows = take
        self.world = world
        first = held.start
        mine = list(held)[rank::world]
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
    first step, the baseline); from the first check at or past `min_steps` on, stop when the last
    window lowered the KL by less than `min_improvement` of the best KL seen before it.

    A freshly cut student's KL rises for a while before it falls (the optimizer warms up on weights
    that no longer fit together), so a decision taken in that bump ends a stage that was about to
    improve: hence no decision before `min_steps`. Comparing with the best earlier check rather than
    the previous one keeps a bump later on from reading as progress once it recedes."""

    def __init__(self, min_improvement: float, window_tokens: int, tokens_per_step: int, min_tokens: int = 0):
        self.min_improvement = min_improvement
        self.window_steps = max(1, math.ceil(window_tokens / tokens_per_step))
        self.min_steps = math.ceil(min_tokens / tokens_per_step)

    def due(self, step: int) -> bool:
        return step % self.window_steps == 0

    def decide(self, checks: list[dict]) -> bool:
        """Fill in the last check's improvement; True when it says stop."""
        if len(checks) < 2:
            return False
        best, now = min(c["heldout_kl"] for c in checks[:-1]), checks[-1]["heldout_kl"]
        improvement = (best - now) / best if best > 0 else 0.0
        checks[-1]["improvement"] = round(improvement, 6)
        if checks[-1]["step"] < self.min_steps:
            return False
        return improvement < self.min_improvement
