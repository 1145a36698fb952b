"""SIGTERM, what a batch scheduler (Slurm, Kubernetes) sends before it kills, handled as a
Ctrl-C: whatever stops and saves the work on Ctrl-C does on SIGTERM too, and the exit code
says which signal it was (143 = 128 + SIGTERM, as a shell reports it; 130 for Ctrl-C)."""

from __future__ import annotations

import logging
import signal
import threading

_received: int | None = None  # the signal that interrupted this process, if one did


def handle_sigterm_as_ctrl_c() -> None:
    """Route SIGTERM to the SIGINT handler in place when it arrives: Python's (raises
    KeyboardInterrupt) or Tune's graceful stop during a sweep. Call it again after
    ray.init, which puts in its own handlers (a Python one that exits at once, and in its
    C++ core one that prints a stack dump and aborts)."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals reach the main thread only (and only it may set their handlers)
    signal.signal(signal.SIGTERM, _as_ctrl_c)
    tune_log = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _TuneStopLines) for f in tune_log.filters):
        tune_log.addFilter(_TuneStopLines())


class _TuneStopLines(logging.Filter):
    """Tune's lines on a stop signal go: one says to resume with `Tuner.restore(...)`, and
    the driver's own line says to run the same command, which does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Stop signal received",
                                                   "Experiment has been interrupted"))


def _as_ctrl_c(signum: int, frame) -> None:
    global _received
    _received = signum
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job) or the OS default: nothing to hand it to
        raise KeyboardInterrupt


def interrupted_exit_code() -> int:
    """130 after a Ctrl-C, 143 after a SIGTERM."""
    return 128 + (_received or signal.SIGINT)
