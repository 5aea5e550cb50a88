"""Runtime helpers every node shares: device and dtype names, the Ray connection, this process's rank,
the learning-rate schedule, and one-line progress output."""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Optional

import torch

# Config-facing dtype names. "auto" (where a config offers it) is resolved by the caller, since what it
# means depends on the device (bfloat16 on GPU, float32 on CPU).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str, field: str = "dtype") -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"{field}={name!r} is not a dtype name; use one of {', '.join(DTYPES)}") from None


def resolve_device(name: str, field: str = "device") -> torch.device:
    """`auto` is the GPU when there is one; a named CUDA device without CUDA is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"{field}={name!r} is not a device name; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{field}={name!r} but no CUDA device is available; set {field} to 'cpu' or 'auto'")
    return device


def ensure_ray(address: Optional[str] = None) -> None:
    """Connect to the cluster at `address` / RAY_ADDRESS, else start a local one (once per process).

    "local" rather than Ray's default "auto": a node run by hand must never attach itself to some
    stray cluster that happens to be running on the machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, ignore_reinit_error=True)


def workers_per_node() -> int:
    """The ranks on this process's node: Ray Train's (and torchrun's) LOCAL_WORLD_SIZE, else the world."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return int(local) if local and local.isdigit() else rank_and_world()[1]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks; (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def warmup_cosine(step: int, warmup_steps: int, progress: float, min_ratio: float, base: float = 1.0) -> float:
    """The learning rate at `step` (0-based): linear warm-up to `base` over `warmup_steps`, then a cosine
    decay to `base * min_ratio` as `progress` goes from 0 to 1 (progress past 1 stays at the floor).
    Callers pass `progress` so that a time-budgeted run can decay by elapsed time instead of steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return base * (min_ratio + (1.0 - min_ratio) * cos)


def lr_lambda(total_steps: int, warmup_fraction: float, min_lr_ratio: float):
    """A LambdaLR multiplier: linear warm-up over `warmup_fraction` of the steps, then cosine to `min_lr_ratio`."""
    warmup = int(total_steps * warmup_fraction)
    return lambda step: warmup_cosine(step, warmup, step_progress(step, warmup, total_steps), min_lr_ratio)


def step_progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """How far past the warm-up `step` is, as a fraction of the steps after it."""
    return (step - warmup_steps) / max(1, total_steps - warmup_steps)


def progress_line(message: str) -> None:
    """One progress line, on stderr. Ray Train workers tee their stdout into the job's log and the
    driver's echo alike, so a line printed there shows up twice; stderr is echoed once."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class Progress:
    """At most one progress line per `interval_s` for a pass over data: done/total, rate, ETA."""

    def __init__(self, name: str, total: int | None, unit: str, interval_s: float = 10.0,
                 log=progress_line, clock=time.monotonic):
        self.name, self.total, self.unit, self.interval_s, self.log, self.clock = name, total, unit, interval_s, log, clock
        self.start = self.last = clock()
        self.done = 0
        self._shown = -1  # `done` when the last line was printed

    def advance(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.interval_s:
            self.last = now
            self._show(now)

    def finish(self) -> None:
        """The closing line, unless the last one already said the same."""
        if self.done != self._shown:
            self._show(self.clock())

    def _show(self, now: float) -> None:
        self._shown = self.done
        self.log(self._line(now))

    def _line(self, now: float) -> str:
        rate = self.done / max(now - self.start, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        eta = f", eta {max(self.total - self.done, 0) / max(rate, 1e-9):.0f}s" if self.total else ""
        return f"[{self.name}] {self.done:,}{of} {self.unit}, {rate:,.0f} {self.unit}/s{eta}"


def quiet_ray_data_progress(context) -> None:
    """Without a terminal, Ray Data logs a several-line status block of every operator every 10 s; the
    nodes print their own one-line `Progress` instead. With a terminal its progress bars stay.
    `context`: the dataset's own DataContext (a dataset keeps the one it was created with)."""
    if not sys.stdout.isatty():
        context.enable_progress_bars = False
