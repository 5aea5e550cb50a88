"""What a stage's driver hands its Ray Train workers, as one frozen value.

`run_stage` works out once what every rank must agree on (the steps, the cuts and when they are
made, whether the stage cuts the teacher itself, the fingerprints the cache must carry), so no
worker decides it again from what it happens to see. The value is pickled to every worker.
It also names the files of the stage's work directory, which the driver and the workers share."""

from __future__ import annotations

import errno
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from slimmoe.tasks.core.storage import write_json_atomic
from slimmoe.tasks.slimming.config import Cut, StageConfig, StageSteps

# Ray Train's storage for the stage's run, under the work dir: creating the trainer again with the same
# pair resumes it.
RAY_STORAGE, RAY_RUN_NAME = "ray_train", "distill"
CHECKPOINT_PREFIX = "checkpoint_step"


@dataclass(frozen=True)
class StageRun:
    cfg: StageConfig  # the validated config itself, not a copy of some of its fields
    name: str
    model_dir: Path
    cache_dir: Path
    work_dir: Path
    steps: StageSteps
    # The first is made before training (for distill_only: the sizes as they are, never applied);
    # with cut_steps > 1 the others follow during training, at their steps.
    cuts: tuple[Cut, ...]
    cuts_the_teacher: bool
    teacher_fingerprint: Optional[str]
    tokenizer_fingerprint: Optional[str]
    heldout_cache_dir: Optional[Path] = None

    @property
    def pruned_dir(self) -> Path:
        return self.work_dir / "pruned"

    @property
    def final_dir(self) -> Path:
        return self.work_dir / "final"

    @property
    def metrics_file(self) -> Path:
        return self.work_dir / "metrics.json"

    @property
    def prepare_file(self) -> Path:
        return self.work_dir / "prepare.json"

    @property
    def nonfinite_file(self) -> Path:
        return self.work_dir / "nonfinite.json"

    @property
    def progress_file(self) -> Path:
        return self.work_dir / "progress.json"

    @property
    def pruned_ready_file(self) -> Path:
        """Written by rank 0 once `pruned/` is complete, with the token of the attempt that wrote it."""
        return self.work_dir / "pruned.ready"

    @property
    def scores_file(self) -> Path:
        return self.work_dir / "scores.safetensors"

    @property
    def checkpoint_record(self) -> Path:
        """The latest checkpoint every rank has uploaded, written by rank 0 after they all have. Ray Train
        registers a checkpoint only when its controller next polls the workers (every few seconds), so a
        driver stopped in between leaves uploaded checkpoints its own record does not name."""
        return self.work_dir / "checkpoint.json"

    def checkpoint_dir(self, step: int) -> Path:
        return self.work_dir / RAY_STORAGE / RAY_RUN_NAME / f"{CHECKPOINT_PREFIX}{step:09d}"

    def recorded_checkpoint(self) -> Optional[tuple[int, Path]]:
        """(step, directory) of the checkpoint `checkpoint_record` names, if that directory is there."""
        try:
            step = int(json.loads(self.checkpoint_record.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        path = self.checkpoint_dir(step)
        return (step, path) if path.is_dir() else None

    def pid_file(self, rank: int) -> Path:
        return self.work_dir / "pids" / f"rank{rank}.pid"

    def record_memory(self, rank: int, **values) -> None:
        """Add `values` to this rank's memory record, which metrics.json collects as `memory_per_rank`."""
        path = self.work_dir / "memory" / f"rank{rank}.json"
        path.parent.mkdir(exist_ok=True)
        record = json.loads(path.read_text()) if path.exists() else {}
        write_json_atomic(path, {**record, "rank": rank, **values})

    def memory_records(self) -> list[dict]:
        return [json.loads(f.read_text()) for f in sorted((self.work_dir / "memory").glob("rank*.json"))]


def checkpoint_step(path) -> int:
    """The step in a checkpoint directory's name (-1 for a name this stage did not give)."""
    name = Path(str(path)).name
    digits = name[len(CHECKPOINT_PREFIX):]
    return int(digits) if name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else -1


class StageWorkerError(RuntimeError):
    """A stage's worker failed: the message names the stage, the rank, the step and what the rank was
    doing, then the original error. Pickled back to the driver inside Ray Train's report, so it keeps
    its facts in `args` (what pickling restores)."""

    def __init__(self, message: str, stage: str, rank: int, step: int, phase: str, recurs: str = ""):
        super().__init__(message, stage, rank, step, phase, recurs)
        self.stage, self.rank, self.step, self.phase = stage, rank, step, phase
        self.recurs = recurs  # why a retry would fail the same way ("" when it might not)

    def __str__(self) -> str:
        return self.args[0]

    @classmethod
    def of(cls, stage: str, rank: int, world: int, step: int, phase: str, err: BaseException) -> "StageWorkerError":
        return cls(f"{stage}: rank {rank} of {world} failed at step {step} ({phase}): {type(err).__name__}: {err}",
                   stage, rank, step, phase, recurring_reason(err))


# Errors that come back on every retry: what the stage reads or writes is wrong, not the worker that read it.
_SHAPE_WORDS = re.compile(r"size mismatch|shape mismatch|shapes cannot be multiplied|must match the size of tensor|"
                          r"is invalid for input of size|does not match the shape")
_DAMAGED_FILE_TYPES = {"SafetensorError", "ArrowInvalid", "LogitCacheError", "BrokenCheckpointError"}
_FULL_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EROFS: "the file system is read-only", errno.EACCES: "a file is not writable"}


def recurring_reason(err: BaseException) -> str:
    """Why `err` (or an error it was raised from) would recur on a retry; "" when a retry might succeed
    (a lost worker, a network fault, an error not known to be deterministic)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return _FULL_ERRNOS[err.errno]
        if isinstance(err, ImportError):
            return "a module is missing"
        if type(err).__name__ in _DAMAGED_FILE_TYPES:
            return "a file it reads is damaged"
        if isinstance(err, (ValueError, RuntimeError)) and _SHAPE_WORDS.search(str(err)):
            return "tensor shapes do not match"
        err = err.__cause__ or err.__context__
    return ""
