"""SIGINT/SIGTERM during training: the handler only records the signal; training checks it at
the next step boundary, writes a resumable checkpoint and raises SignalStop. A second signal of
the same kind stops at once (KeyboardInterrupt / SystemExit), for a run that hangs."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from deepfit.errors import StopRequested

HANDLED = (signal.SIGINT, signal.SIGTERM)


class SignalStop(StopRequested):
    """Training stopped cleanly on a signal; exit code 128 + signal number (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, signum: int, run_dir: Path | None = None) -> None:
        super().__init__(f"{signal.Signals(signum).name} received; a resumable checkpoint was written")
        self.signum = signum
        self.exit_code = 128 + signum
        self.run_dir = run_dir


class StopFlag:
    """The first signal that arrived, or None; set from the handler, read by the loop."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self, run_dir: Path | None = None) -> None:
        """Raise SignalStop if a signal arrived since training started."""
        if self.signum is not None:
            raise SignalStop(self.signum, run_dir)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Install the handlers for the duration of training (main thread only; elsewhere signals
    keep their usual behaviour) and put back the previous ones afterwards."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous: dict[int, Any] = {int(signum): signal.getsignal(signum) for signum in HANDLED}

    def handle(signum: int, frame: FrameType | None) -> Any:
        if flag.signum == signum:  # asked twice: stop now, as without deepfit
            signal.signal(signum, previous[signum])
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        flag.signum = signum

    for signum in HANDLED:
        signal.signal(signum, handle)
    try:
        yield flag
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
