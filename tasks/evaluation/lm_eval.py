"""lm-eval-harness tasks on a model directory (an optional dependency: each task's failure is recorded)."""

from __future__ import annotations

from pathlib import Path

import torch

from slimmoe.tasks.evaluation.config import EvaluateConfig

LM_EVAL_INSTALL_HINT = "pip install 'lm-eval>=0.4' (or the project's extra: pip install 'slimmoe[eval]')"


def run_lm_eval_tasks(model_dir: str | Path, cfg: EvaluateConfig, device: torch.device) -> dict:
    """Each task's metrics, or {"status": "unavailable"|"error", "message": ...}: never raises."""
    if not cfg.lm_eval_tasks:
        return {}
    try:
        import lm_eval
    except ImportError as err:
        msg = f"lm_eval is not installed ({err}); install it with {LM_EVAL_INSTALL_HINT} to run lm-eval-harness tasks"
        return {t: {"status": "unavailable", "message": msg} for t in cfg.lm_eval_tasks}
    results = {}
    dtype = cfg.load_dtype if cfg.load_dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    model_args = {"pretrained": str(model_dir), "trust_remote_code": cfg.trust_remote_code, "dtype": dtype}
    for task in cfg.lm_eval_tasks:
        try:
            out = lm_eval.simple_evaluate(
                model="hf", model_args=model_args, tasks=[task], batch_size=cfg.lm_eval_batch_size,
                limit=cfg.lm_eval_limit, num_fewshot=cfg.lm_eval_num_fewshot, device=str(device),
            )
            res = (out or {}).get("results", {})
            results[task] = {"status": "ok", "metrics": res.get(task, res)}
        except Exception as err:  # noqa: BLE001 — one task's failure (missing data, unknown name) is reported, not fatal
            results[task] = {"status": "error",
                             "message": f"lm-eval task {task!r} could not be run: {type(err).__name__}: {err}"}
    return results
