"""Free space, asked of the file system in one place, and the refusal when a task's writes would not fit."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class NotEnoughSpaceError(OSError):
    """A task's outputs would not fit where they go; the message names the path, the bytes needed and free."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path) -> int:
    """Bytes this user may still write on the file system that holds `path` (or would hold it)."""
    st = os.statvfs(_existing(path))
    return st.f_bavail * st.f_frsize


def dir_bytes(path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:  # removed while we walk
                pass
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_free_space(needs: dict, what: str, fix: str) -> None:
    """Refuse when the bytes `needs` maps paths to do not fit the free space of their file systems (paths
    on one file system add up). `what` names the task, `fix` says what to change."""
    by_device: dict[int, list] = {}
    for path, need in needs.items():
        if need > 0:
            by_device.setdefault(os.stat(_existing(path)).st_dev, []).append((Path(path), need))
    for items in by_device.values():
        need = sum(n for _, n in items)
        free = free_bytes(items[0][0])
        if need > free:
            where = " and ".join(f"{p} ({human_bytes(n)})" for p, n in items)
            raise NotEnoughSpaceError(f"{what} needs {human_bytes(need)} of disk space ({need:,} bytes) for {where}, "
                                      f"but that file system has {human_bytes(free)} free ({free:,} bytes); {fix}")


__all__ = ["NotEnoughSpaceError", "check_free_space", "dir_bytes", "free_bytes", "human_bytes"]
