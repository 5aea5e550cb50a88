"""lm-eval-harness tasks on a model directory (an optional dependency).

A requested task that cannot run is a failure of the evaluation, never a note in its report: every
task is looked up before the model loads (`check_lm_eval_tasks`), and a task that fails while it runs
raises `LmEvalTaskError`.

Tasks are looked up by lm-eval's `TaskManager`: its bundled tasks and, with `lm_eval_include_path`,
the task YAMLs of a local directory (how offline clusters run their own tasks, with data files
beside them). A plain checkpoint is loaded by lm-eval's `hf` model from its path; a packed
quantized checkpoint (`slimmoe quantize`), which `from_pretrained` refuses by design, is loaded
here with its packed experts and handed to the same `hf` model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from pathlib import Path
from typing import Optional

import torch

from slimmoe.tasks.evaluation.config import LM_EVAL_INSTALL_HINT, EvaluateConfig


class LmEvalTaskError(ValueError):
    """A requested lm-eval task that cannot be found, set up or run; `field` is the setting to change."""

    def __init__(self, message: str, field: str = "lm_eval_tasks"):
        super().__init__(message)
        self.field = field


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
        raise LmEvalTaskError(f"lm_eval_include_path {cfg.lm_eval_include_path!r} is not a directory on this machine; "
                              "give a directory holding lm-eval task YAML files", field="lm_eval_include_path")
    return str(path)


class _SkippedFiles(logging.Handler):
    """The task files lm-eval's indexer skipped, with the error each raised: it logs them at DEBUG level
    (`lm_eval.tasks._index`, "Skip <path> (<error>)") and leaves their tasks out, so a broken YAML
    otherwise surfaces only as "not a registered task"."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.files: dict[str, str] = {}

    def emit(self, record):
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) == 2 and isinstance(args[1], BaseException):
            self.files[str(args[0])] = f"{type(args[1]).__name__}: {args[1]}"


@contextlib.contextmanager
def _skipped_task_files():
    logger = logging.getLogger("lm_eval.tasks._index")
    handler, level, propagate = _SkippedFiles(), logger.level, logger.propagate
    logger.addHandler(handler)
    # DEBUG for our handler only: the indexer's other debug lines must not reach the root's handlers.
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield handler.files
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _include_index(include_path: str) -> tuple[set[str], dict[str, str]]:
    """The task names the include directory defines and its task files lm-eval could not load. Indexing
    this directory alone takes milliseconds, where lm-eval's bundled tasks take up to a minute; not
    cached, so a fixed file is seen at once."""
    from lm_eval.tasks import TaskManager

    with _skipped_task_files() as skipped:
        try:
            names = set(TaskManager(include_path=include_path, include_defaults=False).all_tasks)
        except TypeError:  # an lm-eval without include_defaults: the full index below says what it can
            return set(), {}
    return names, dict(skipped)


def _task_file_of(task: str, skipped: dict[str, str]) -> Optional[tuple[str, str]]:
    """The skipped task file that defines `task` (named after it, or `task: <name>` inside), with its error."""
    line = re.compile(rf"^\s*(task|group)\s*:\s*['\"]?{re.escape(task)}['\"]?\s*$", re.MULTILINE)
    for path, err in skipped.items():
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        if Path(path).stem == task or line.search(text):
            return path, err
    return None


def _require_lm_eval() -> None:
    try:
        from lm_eval.tasks import TaskManager  # noqa: F401  (lm-eval before 0.4.2 has none)
    except ImportError as err:
        raise LmEvalTaskError(f"lm_eval_tasks need lm_eval, which is not installed ({err}); install it with "
                              f"{LM_EVAL_INSTALL_HINT}, or remove lm_eval_tasks") from None
    try:
        # lm-eval does not require what its hf model imports (accelerate): without it every task would
        # fail on its own, after the model was scored.
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError as err:
        raise LmEvalTaskError(f"lm_eval_tasks need lm-eval's hf model, which cannot be imported "
                              f"({type(err).__name__}: {err}); install what it needs with {LM_EVAL_INSTALL_HINT}") from None


def _searched(include_path: Optional[str]) -> str:
    return (f"lm-eval's bundled tasks and {include_path}" if include_path else
            "lm-eval's bundled tasks (set lm_eval_include_path for a directory of task YAMLs)")


def check_include_tasks(cfg: EvaluateConfig) -> dict[str, str]:
    """The cheap part of `check_lm_eval_tasks` (workflow validation runs it too): the include directory
    exists, and no requested task's file in it failed to load. Returns the files lm-eval skipped there."""
    include_path = _include_path(cfg)
    if include_path is None or not cfg.lm_eval_tasks:
        return {}
    names, skipped = _include_index(include_path)
    for task in cfg.lm_eval_tasks:
        hit = None if task in names else _task_file_of(task, skipped)
        if hit is not None:
            raise LmEvalTaskError(f"lm-eval task {task!r}: its task file {hit[0]} could not be loaded: {hit[1]}; "
                                  "fix that file")
    return skipped


def check_lm_eval_tasks(cfg: EvaluateConfig) -> None:
    """Every requested task is found, before any model loads: a LmEvalTaskError naming the task, and for
    a task file of the include directory that lm-eval could not load, that file and its own error."""
    if not cfg.lm_eval_tasks:
        return
    _require_lm_eval()
    skipped = check_include_tasks(cfg)
    include_path = _include_path(cfg)
    known = set(_task_manager(include_path).all_tasks)
    missing = [t for t in cfg.lm_eval_tasks if t not in known and not Path(t).is_file()]
    if missing:
        broken = "".join(f"; {p} could not be loaded: {e}" for p, e in list(skipped.items())[:3])
        raise LmEvalTaskError(f"lm-eval task{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} not "
                              f"found in {_searched(include_path)}{broken}; check lm_eval_tasks")


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
    """Each task's metrics: {task: {"status": "ok", "metrics": ...}}. A task that cannot be found, set up
    or run raises LmEvalTaskError: the evaluation fails rather than report the task as an error."""
    if not cfg.lm_eval_tasks:
        return {}
    check_lm_eval_tasks(cfg)
    import lm_eval

    dtype = cfg.weights_dtype(device.type)
    include_path = _include_path(cfg)
    task_manager = _task_manager(include_path)
    try:
        model, model_args = _model(Path(model_dir), cfg, device, dtype)
    except Exception as err:  # an unloadable checkpoint: lm-eval's error, in one line
        raise LmEvalTaskError(f"lm-eval could not load {model_dir}: {type(err).__name__}: {err}") from err
    results = {}
    for task in cfg.lm_eval_tasks:
        try:
            out = lm_eval.simple_evaluate(
                model=model, model_args=model_args, tasks=[task], batch_size=cfg.lm_eval_batch_size,
                limit=cfg.lm_eval_limit, num_fewshot=cfg.lm_eval_num_fewshot, device=str(device),
                task_manager=task_manager, log_samples=False,
            )
        except Exception as err:  # missing data, a bad field of the task: one line naming the task
            raise LmEvalTaskError(f"lm-eval task {task!r} failed: {type(err).__name__}: {err} (tasks searched: "
                                  f"{_searched(include_path)})") from err
        res = (out or {}).get("results", {})
        results[task] = {"status": "ok", "metrics": res.get(task, res)}
    return results
