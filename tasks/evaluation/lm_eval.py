"""lm-eval-harness tasks on a model directory (an optional dependency: each task's failure is recorded).

Tasks are looked up by lm-eval's `TaskManager`: its bundled tasks and, with `lm_eval_include_path`,
the task YAMLs of a local directory (how offline clusters run their own tasks, with data files
beside them). A plain checkpoint is loaded by lm-eval's `hf` model from its path; a packed
quantized checkpoint (`slimmoe quantize`), which `from_pretrained` refuses by design, is loaded
here with its packed experts and handed to the same `hf` model.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import torch

from slimmoe.tasks.evaluation.config import LM_EVAL_INSTALL_HINT, EvaluateConfig



@functools.lru_cache(maxsize=4)
def _task_manager(include_path: Optional[str]):
    # Indexing lm-eval's bundled tasks reads thousands of YAML files (seconds to tens of seconds); a
    # process that evaluates several models (the driver running every evaluate node) does it once.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _include_path(cfg: EvaluateConfig) -> Optional[str]:
    """The include path as an absolute directory; a ValueError naming the field where it is no directory."""
    if cfg.lm_eval_include_path is None:
        return None
    path = Path(cfg.lm_eval_include_path).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"lm_eval_include_path {cfg.lm_eval_include_path!r} is not a directory on this machine; "
                         "give a directory holding lm-eval task YAML files")
    return str(path)


def _model(model_dir: Path, cfg: EvaluateConfig, device: torch.device, dtype: str):
    """What `simple_evaluate` is given: the `hf` model's name and arguments, or an `hf` model built on a
    quantized checkpoint loaded here."""
    from slimmoe.tasks.mcmoe.packed import is_quantized_checkpoint

    if not is_quantized_checkpoint(model_dir):
        args = {"pretrained": str(model_dir), "trust_remote_code": cfg.trust_remote_code, "dtype": dtype}
        return "hf", args
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from slimmoe.tasks.core.runtime import DTYPES
    from slimmoe.tasks.mcmoe.packed import load_quantized

    model = load_quantized(model_dir, dtype=DTYPES[dtype], device=device, trust_remote_code=cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=cfg.trust_remote_code)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.lm_eval_batch_size), None


def run_lm_eval_tasks(model_dir: str | Path, cfg: EvaluateConfig, device: torch.device) -> dict:
    """Each task's metrics, or {"status": "unavailable"|"error", "message": ...}: never raises."""
    if not cfg.lm_eval_tasks:
        return {}
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401  (lm-eval before 0.4.2 has none)
    except ImportError as err:
        msg = f"lm_eval is not installed ({err}); install it with {LM_EVAL_INSTALL_HINT} to run lm-eval-harness tasks"
        return {t: {"status": "unavailable", "message": msg} for t in cfg.lm_eval_tasks}
    try:
        # lm-eval does not require what its hf model imports (accelerate): without it every task would
        # fail on its own, far into the run.
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError as err:
        msg = (f"lm-eval's hf model cannot be imported ({type(err).__name__}: {err}); install what it needs with "
               f"{LM_EVAL_INSTALL_HINT}")
        return {t: {"status": "unavailable", "message": msg} for t in cfg.lm_eval_tasks}
    dtype = cfg.weights_dtype(device.type)
    try:
        include_path = _include_path(cfg)
        task_manager = _task_manager(include_path)
        model, model_args = _model(Path(model_dir), cfg, device, dtype)
    except Exception as err:  # noqa: BLE001 — a bad include path, an unloadable checkpoint: every task says so
        msg = f"lm-eval tasks could not be set up: {type(err).__name__}: {err}"
        return {t: {"status": "error", "message": msg} for t in cfg.lm_eval_tasks}
    searched = f"lm-eval's bundled tasks and {include_path}" if include_path else \
        "lm-eval's bundled tasks (set lm_eval_include_path for a directory of task YAMLs)"
    results = {}
    for task in cfg.lm_eval_tasks:
        try:
            out = lm_eval.simple_evaluate(
                model=model, model_args=model_args, tasks=[task], batch_size=cfg.lm_eval_batch_size,
                limit=cfg.lm_eval_limit, num_fewshot=cfg.lm_eval_num_fewshot, device=str(device),
                task_manager=task_manager, log_samples=False,
            )
            res = (out or {}).get("results", {})
            results[task] = {"status": "ok", "metrics": res.get(task, res)}
        except Exception as err:  # noqa: BLE001 — one task's failure (missing data, unknown name) is reported, not fatal
            results[task] = {"status": "error", "message": f"lm-eval task {task!r} could not be run: "
                             f"{type(err).__name__}: {err} (tasks searched: {searched})"}
    return results
