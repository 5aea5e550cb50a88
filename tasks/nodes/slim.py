"""One-shot slimming (`slimmoe slim`): score a checkpoint on calibration data, slim it, save it.

The same `score_model` and `slim_model` are what every SlimMoE stage runs before distilling.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

from slimmoe.tasks.core.checkpoint import load_config, load_model, save_model_dir
from slimmoe.tasks.core.params import count_parameters
from slimmoe.tasks.core.storage import ensure_free_output
from slimmoe.tasks.data.calibration import calibration_batches
from slimmoe.tasks.slimming.config import SlimConfig, validate_targets
from slimmoe.tasks.slimming.scores import score_model
from slimmoe.tasks.slimming.surgery import slim_model


def run_slim(cfg: SlimConfig, model_dir: str | Path, out_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = load_config(model_dir, cfg.trust_remote_code)
    validate_targets(config, cfg.targets, dtype="float32")  # before any weights are read or anything written
    ensure_free_output(out_dir)
    model = load_model(model_dir, trust_remote_code=cfg.trust_remote_code)
    before = count_parameters(model)
    if cfg.data is None:
        log("no --data given: scoring by weight magnitude |w| (data-free fallback; Taylor scores need calibration data)")
        batches = None
    else:
        batches = calibration_batches(cfg.data, cfg.calibration_batches, cfg.batch_size, cfg.seq_len,
                                      tokenizer_dir=model_dir, text_field=cfg.text_field)
        log(f"scoring on {len(batches)} calibration batches of {tuple(batches[0].shape)} tokens (first-order Taylor |w*g|)")
    scores = score_model(model, batches, with_heads=cfg.num_key_value_heads is not None)
    slim = slim_model(model, scores, cfg.targets)
    after = count_parameters(slim)
    save_model_dir(slim, out_dir, tokenizer_from=model_dir)
    return {"before": before, "after": after, "scores": scores.method, "targets": asdict(cfg.targets),
            "calibration_batches": scores.batches}
