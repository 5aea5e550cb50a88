"""One-shot slimming: score a checkpoint on calibration data, slim it, save it.

The same `score_model` and `slim_model` are what every SlimMoE stage runs before distilling.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .calibration import calibration_batches
from .checkpoint import load_config, load_model, save_model_dir
from .kd_loss import kd_loss, next_token_loss
from .params import count_parameters
from .scoring import Scores, magnitude_scores, taylor_scores
from .storage import ensure_free_output
from .slimming import SlimTargets, slim_model, validate_targets


def next_token_score_loss(model: nn.Module, batch) -> torch.Tensor:
    input_ids = batch["input_ids"] if isinstance(batch, dict) else batch
    input_ids = input_ids.to(next(model.parameters()).device)
    return next_token_loss(model(input_ids=input_ids).logits, input_ids)


def kd_score_loss(temperature: float = 1.0, next_token_weight: float = 0.0) -> Callable[[nn.Module, dict], torch.Tensor]:
    """Scoring loss against cached teacher log-probs. At stage 1 the student *is* the teacher and
    this loss and its gradient are exactly zero (FIELD-NOTES, trap 1): use next-token scores there."""

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        device = next(model.parameters()).device
        b = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=b["input_ids"]).logits
        loss = kd_loss(logits, b["topk_ids"], b["topk_logprobs"], b["rest_logprob"], temperature)
        if next_token_weight:
            loss = loss + next_token_weight * next_token_loss(logits, b["input_ids"])
        return loss

    return loss_fn


def score_model(model: nn.Module, batches: Iterable | None, loss_fn=next_token_score_loss,
                with_heads: bool = True) -> Scores:
    """Taylor scores over `batches`, or weight magnitudes when there is no calibration data."""
    if batches is None:
        return magnitude_scores(model, with_heads=with_heads)
    return taylor_scores(model, batches, loss_fn, with_heads=with_heads)


def slim_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    targets: SlimTargets,
    data: str | Path | None = None,
    calibration_batches_n: int = 8,
    batch_size: int = 4,
    seq_len: int = 256,
    text_field: str = "text",
    trust_remote_code: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = load_config(model_dir, trust_remote_code)
    validate_targets(config, targets)  # before any weights are read or anything written
    ensure_free_output(out_dir)
    model = load_model(model_dir, trust_remote_code=trust_remote_code)
    before = count_parameters(model)
    if data is None:
        log("no --data given: scoring by weight magnitude |w| (data-free fallback; Taylor scores need calibration data)")
        batches = None
    else:
        batches = calibration_batches(data, calibration_batches_n, batch_size, seq_len, tokenizer_dir=model_dir,
                                      text_field=text_field)
        log(f"scoring on {len(batches)} calibration batches of {tuple(batches[0].shape)} tokens (first-order Taylor |w*g|)")
    scores = score_model(model, batches, with_heads=targets.num_key_value_heads is not None)
    slim = slim_model(model, scores, targets)
    after = count_parameters(slim)
    save_model_dir(slim, out_dir, tokenizer_from=model_dir)
    return {"before": before, "after": after, "scores": scores.method, "targets": asdict(targets),
            "calibration_batches": scores.batches}
