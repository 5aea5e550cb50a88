"""What a stage's driver hands its Ray Train workers, as one frozen value.

`run_stage` works out once what every rank must agree on (the steps, the cuts and when they are
made, whether the stage cuts the teacher itself, the fingerprints the cache must carry), so no
worker decides it again from what it happens to see. The value is pickled to every worker.
It also names the files of the stage's work directory, which the driver and the workers share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from slimmoe.tasks.core.storage import write_json_atomic
from slimmoe.tasks.slimming.config import Cut, StageConfig, StageSteps


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


class StageWorkerError(RuntimeError):
    """A stage's worker failed: the message names the stage, the rank, the step and what the rank was
    doing, then the original error. Pickled back to the driver inside Ray Train's report, so it keeps
    its facts in `args` (what pickling restores)."""

    def __init__(self, message: str, stage: str, rank: int, step: int, phase: str):
        super().__init__(message, stage, rank, step, phase)
        self.stage, self.rank, self.step, self.phase = stage, rank, step, phase

    def __str__(self) -> str:
        return self.args[0]

    @classmethod
    def of(cls, stage: str, rank: int, world: int, step: int, phase: str, err: BaseException) -> "StageWorkerError":
        return cls(f"{stage}: rank {rank} of {world} failed at step {step} ({phase}): {type(err).__name__}: {err}",
                   stage, rank, step, phase)
