"""One-shot slimming (`slimmoe slim`): score a checkpoint, cut it, save it.

The same scores and `keep_plan` are what every SlimMoE stage uses before distilling. The cut always
streams (`streaming.stream_slim`: one tensor at a time), so a teacher far larger than memory can be
slimmed. Scores come from one of: calibration data (`data`: the model is loaded to take gradients,
then freed before the cut), a scores file (`scores`: the model is never loaded), or the weights'
magnitudes (neither: read tensor by tensor, the model is never loaded).
"""

from __future__ import annotations

import gc
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from slimmoe.tasks.core.checkpoint import load_config, load_model
from slimmoe.tasks.core.params import count_parameters_from_config
from slimmoe.tasks.core.safetensors_files import checkpoint_dtype
from slimmoe.tasks.core.storage import ensure_free_output
from slimmoe.tasks.data.calibration import calibration_batches
from slimmoe.tasks.slimming.config import SlimConfig, check_scores_source, validate_targets
from slimmoe.tasks.slimming.scores import Scores, score_model
from slimmoe.tasks.slimming.streaming import stream_slim, streaming_magnitude_scores
from slimmoe.tasks.slimming.surgery import keep_plan, slimmed_config


def _scores(cfg: SlimConfig, model_dir: Path, log: Callable[[str], None]) -> Scores:
    with_heads = cfg.num_key_value_heads is not None
    if cfg.scores is not None:
        log(f"cutting with the scores in {cfg.scores} (the model is not loaded)")
        return Scores.load(cfg.scores)
    if cfg.data is None:
        log("no --data given: scoring by weight magnitude |w| (data-free fallback; Taylor scores need calibration "
            "data), read tensor by tensor")
        return streaming_magnitude_scores(model_dir, with_heads=with_heads, trust_remote_code=cfg.trust_remote_code)
    batches = calibration_batches(cfg.data, cfg.calibration_batches, cfg.batch_size, cfg.seq_len,
                                  tokenizer_dir=model_dir, text_field=cfg.text_field)
    log(f"scoring on {len(batches)} calibration batches of {tuple(batches[0].shape)} tokens (first-order Taylor |w*g|)")
    model = load_model(model_dir, trust_remote_code=cfg.trust_remote_code)
    scores = score_model(model, batches, with_heads=with_heads)
    del model  # freed before the cut, which streams from the files
    gc.collect()
    return scores


def run_slim(cfg: SlimConfig, model_dir: str | Path, out_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_scores_source(cfg)
    config = load_config(model_dir, cfg.trust_remote_code)
    # The cut keeps the checkpoint's dtype, so expert rows must align in that dtype (float32 at least:
    # scoring loads the model in float32). Before any weights are read or anything is written.
    validate_targets(config, cfg.targets, dtype=checkpoint_dtype(model_dir), tensor_parallel=cfg.tensor_parallel,
                     llama_cpp=cfg.llama_cpp)
    ensure_free_output(out_dir)
    if cfg.scores is not None and not Path(cfg.scores).is_file():
        raise FileNotFoundError(f"scores: {cfg.scores} is not a file; give a scores.safetensors a stage wrote")
    scores = _scores(cfg, model_dir, log)
    plan = keep_plan(config, scores, cfg.targets)
    written = stream_slim(model_dir, out_dir, plan, tokenizer_from=model_dir, trust_remote_code=cfg.trust_remote_code)
    return {"before": count_parameters_from_config(config),
            "after": count_parameters_from_config(slimmed_config(config, cfg.targets)),
            "scores": scores.method, "targets": asdict(cfg.targets), "calibration_batches": scores.batches,
            "written": written}
