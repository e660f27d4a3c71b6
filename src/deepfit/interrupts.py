"""SIGINT/SIGTERM during training: the handler only records the signal; training checks it at
the next step boundary, writes a resumable checkpoint and raises SignalStop. A second signal
never aborts that orderly stop (two quick Ctrl-C presses lost the checkpoint, issue 12); a third
one abandons it (Abandoned: a run that hangs can still be stopped), except while the checkpoint
is being written, which always finishes. Before training, a Ctrl-C interrupts at once and is also
remembered (early_interrupts), so that code which swallows the KeyboardInterrupt cannot lose it."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from deepfit.errors import StopRequested

HANDLED = (signal.SIGINT, signal.SIGTERM)
ABANDON_AT = 3  # the signal count that gives up on the orderly stop
Notify = Callable[[str], None]


class SignalStop(StopRequested):
    """Training stopped cleanly on a signal; exit code 128 + signal number (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, signum: int, run_dir: Path | None = None) -> None:
        super().__init__(f"{signal.Signals(signum).name} received; a resumable checkpoint was written")
        self.signum = signum
        self.exit_code = 128 + signum
        self.run_dir = run_dir


class NothingTrained(StopRequested):
    """Interrupted while the data and model were being built: no step ran, nothing to resume."""

    def __init__(self) -> None:
        super().__init__("interrupted before training started: nothing was trained; start the run again")


class AfterTraining(StopRequested):
    """Interrupted once training had ended, while the test split was measured and the figures
    drawn: the checkpoints are complete; evaluate measures what was cut short."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(
            f"interrupted after training ended; its checkpoints are complete: deepfit evaluate {run_dir} measures the test split"
        )


class Abandoned(KeyboardInterrupt):
    """The user signalled ABANDON_AT times: stopped at once, without a new checkpoint. A
    KeyboardInterrupt, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} received {ABANDON_AT} times: stopped without saving; training since the last checkpoint is lost")
        self.exit_code = 128 + signum


class StopFlag:
    """The first signal that arrived, or None; set from the handler, read by the loop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0  # signals received so far
        self.saving = False  # the stop's checkpoint is being written: no signal interrupts it

    def check(self, run_dir: Path | None = None) -> None:
        """Raise SignalStop if a signal arrived since training started."""
        if self.signum is not None:
            raise SignalStop(self.signum, run_dir)

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """While the stop's checkpoint is written, further signals only leave a note."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False


_early: list[int] = []  # SIGINTs met by early_interrupts' handler and not yet taken


@contextlib.contextmanager
def early_interrupts() -> Iterator[None]:
    """While deepfit starts (imports, data, model: seconds), Ctrl-C raises KeyboardInterrupt at
    once, as Python's own handler does, and is remembered as well: an exception raised inside an
    import's finalizer or a C call that clears errors is dropped ("Exception ignored"), and the
    press would be lost. fit() takes it before training (take_early_interrupt); Python's report
    of the dropped exception ("Exception ignored in ...", a traceback) is held back. Installed only
    where Python's handler is (a SIGINT the parent made ignored stays ignored)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> Any:
        _early.append(signum)
        signal.default_int_handler(signum, frame)

    previous = sys.unraisablehook

    def unraisable(info: Any) -> None:  # the press is remembered: no "Exception ignored ... Traceback" for it
        if not isinstance(info.exc_value, KeyboardInterrupt):
            previous(info)

    _early.clear()
    signal.signal(signal.SIGINT, handle)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous
        _early.clear()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[list[int]]:
    """SIGTERM raises KeyboardInterrupt inside (main thread only; the handler before is put
    back after); yields the list it notes the signal in."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handle(signum: int, frame: FrameType | None) -> Any:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def take_early_interrupt() -> int | None:
    """The first signal early_interrupts met since it was last asked, or None."""
    signum = _early[0] if _early else None
    _early.clear()
    return signum


def write_stderr(message: str) -> None:
    """The handler's words to the person pressing Ctrl-C: only a signal handler knows when they
    pressed again, and the main thread is busy, so it writes the line itself."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"deepfit: {message}\n")
        sys.stderr.flush()


@contextlib.contextmanager
def stop_on_signals(notify: Notify = write_stderr) -> Iterator[StopFlag]:
    """Install the handlers for the duration of training (main thread only; elsewhere signals
    keep their usual behaviour) and put back the previous ones afterwards."""
    flag = StopFlag()
    flag.signum = take_early_interrupt()  # met after fit() last asked: training stops at its first check
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous: dict[int, Any] = {int(signum): signal.getsignal(signum) for signum in HANDLED}

    def handle(signum: int, frame: FrameType | None) -> Any:
        flag.count += 1
        if flag.signum is None:
            flag.signum = signum
        elif flag.saving:
            notify("still writing the checkpoint; it finishes first")
        elif flag.count >= ABANDON_AT:
            raise Abandoned(signum)
        else:
            notify(
                "stopping at the next step and saving a checkpoint; signal again to abandon it (training since the last checkpoint is lost)"
            )

    for signum in HANDLED:
        signal.signal(signum, handle)
    try:
        yield flag
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
