"""SIGTERM and SIGINT of the driver: stop the node, record it, leave the work dir resumable, exit 143 / 130.

`ray.init` installs its own SIGTERM handlers (the core worker's C++ one prints a stack dump; the local
node's kills the cluster's processes and exits 1, and the interpreter then aborts with 134) while the
stage's workers go on training for a moment. So the driver installs these after Ray starts: the first
signal raises KeyboardInterrupt in the main thread (what `ray.get` passes on when it is interrupted),
the driver records the attempt as stopped and raises `RunStopped`, and `stop_ray` ends the stage's
workers before the process exits. A second signal during that is not caught: it ends the process.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: Optional[int] = None


class RunStopped(BaseException):
    """The driver was stopped by a signal; its exit status is 128 + the signal's number (143, 130).
    A BaseException like KeyboardInterrupt: no `except Exception` on the way out may take it for a failure."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum, _frame):
    global _received
    _received = signum
    for sig in STOP_SIGNALS:  # a second signal ends the process whatever it is doing
        signal.signal(sig, signal.SIG_DFL)
    raise KeyboardInterrupt(signal.Signals(signum).name)


_active = False


@contextlib.contextmanager
def stop_signals():
    """Catch the stop signals while the block runs (only the main thread can), then put back the handlers
    that were there before."""
    global _active, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _active, _received = True, None
    catch_stop_signals()
    try:
        yield
    finally:
        _active = False
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(sig, handler)


def catch_stop_signals() -> None:
    """(Re)install the handlers inside `stop_signals`: after `ray.init`, which replaces SIGTERM's."""
    if _active and _received is None and threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _handler)


def received() -> Optional[int]:
    """The stop signal caught so far, if any."""
    return _received


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def stop_ray() -> None:
    """End what this driver runs on Ray (a stage's controller and workers are its actors) before exiting."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


__all__ = ["RunStopped", "catch_stop_signals", "received", "signal_name", "stop_ray", "stop_signals"]
