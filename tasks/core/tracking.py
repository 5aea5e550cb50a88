"""Live metrics of a stage: one point per logging step in an experiment tracker, and the step rows
appended to the stage's work directory as they happen.

A multi-day stage is watched while it runs and examined after it crashed, so nothing here waits for
the stage to end: the tracker is flushed at every point, and `history.jsonl` gets a line per logging
step (a crash keeps every line written before it). TensorBoard event files are the default because
they need no server and no account, work offline, and `tensorboard --logdir` reads them where they
lie; W&B is an option where it is installed.

Only rank 0 writes; the metrics are rank 0's, except the ones the stage has already agreed on.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

HISTORY_FILE = "history.jsonl"
TRACKING_DIR = "tracking"


class TrackingConfig(BaseModel):
    """Where a stage's per-step metrics go besides its log and `history.jsonl`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["tensorboard", "wandb", "none"] = Field(
        "tensorboard", description="tensorboard: event files in the stage's work directory; wandb: a W&B run "
                                   "(needs the wandb package); none: only the log and history.jsonl")
    project: Optional[str] = Field(None, description="the W&B project (backend: wandb)")
    wandb_mode: Literal["online", "offline"] = Field(
        "offline", description="W&B's mode: offline writes the run locally for `wandb sync`; online needs a login")

    @model_validator(mode="after")
    def _backend_installed(self):
        # Refused when the workflow is read, not when a stage reaches its first logging step.
        if self.backend == "wandb" and importlib.util.find_spec("wandb") is None:
            raise ValueError("backend: wandb needs the wandb package, which is not installed; pip install wandb "
                             "(the extra slimmoe[wandb]), or use backend: tensorboard")
        if self.project is not None and self.backend != "wandb":
            raise ValueError(f"project is W&B's; backend is {self.backend}: remove project or use backend: wandb")
        return self


class MetricLogger:
    """The interface every tracker has: scalars at a step, then close."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NullLogger(MetricLogger):
    def log(self, step, scalars):
        pass


class TensorBoardLogger(MetricLogger):
    """Event files under `log_dir`, one scalar series per metric (tag `<stage>/<metric>`)."""

    def __init__(self, log_dir: Path, run_name: str, start_step: int):
        from tensorboardX import SummaryWriter

        # A resumed stage repeats the steps after its checkpoint: purge_step makes TensorBoard drop the
        # points the interrupted attempt wrote from that step on, so each step shows once. The
        # checkpoint's own step was logged before the checkpoint was taken and is not repeated.
        self.writer = SummaryWriter(logdir=str(log_dir), purge_step=start_step + 1 if start_step else None,
                                    flush_secs=10**6)
        self.prefix = run_name

    def log(self, step, scalars):
        for name, value in scalars.items():
            self.writer.add_scalar(f"{self.prefix}/{name}", value, global_step=step)
        self.writer.flush()  # live: a reader sees the point now, not at the next flush period

    def close(self):
        self.writer.close()


class WandbLogger(MetricLogger):
    def __init__(self, cfg: TrackingConfig, log_dir: Path, run_name: str, run_id: str):
        import wandb

        # The same id on every attempt of the stage, so a resumed stage continues its W&B run.
        self.run = wandb.init(project=cfg.project or "slimmoe", name=run_name, id=run_id, resume="allow",
                              dir=str(log_dir), mode=cfg.wandb_mode)

    def log(self, step, scalars):
        self.run.log(dict(scalars), step=step)

    def close(self):
        self.run.finish()


def open_metric_logger(cfg: TrackingConfig, log_dir: Path, run_name: str, run_id: str,
                       start_step: int) -> MetricLogger:
    if cfg.backend == "none":
        return NullLogger()
    log_dir.mkdir(parents=True, exist_ok=True)
    if cfg.backend == "wandb":
        return WandbLogger(cfg, log_dir, run_name, run_id)
    return TensorBoardLogger(log_dir, run_name, start_step)


class StepHistory:
    """`history.jsonl`: one JSON line per logging step, appended and flushed as the stage goes."""

    def __init__(self, path: Path, resumed_from_step: Optional[int]):
        self.path = path
        # The lines past the checkpoint a resumed stage starts from are steps it will take again.
        if resumed_from_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and _step_of(line) is not None and _step_of(line) <= resumed_from_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        elif resumed_from_step is None and path.exists():
            path.unlink()  # a fresh start of the stage in a reused work directory

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _step_of(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by the crash that ended the attempt


def read_history(path: Path) -> list[dict]:
    """The rows of a `history.jsonl`, without a last line a crash cut short."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
