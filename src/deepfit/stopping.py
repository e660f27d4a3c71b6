"""The stop handling every task's loop shares: signals read at step boundaries, a
file-system failure that names the way back, and on a stop a checkpoint written and the run
folder attached to a signal's SignalStop; a time limit ends training without an error. Once
training has ended, a Ctrl-C or SIGTERM names the command that measures what it cut short."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

from deepfit.checkpoint import resumable_on_failure
from deepfit.errors import StopRequested
from deepfit.interrupts import AfterTraining, SignalStop, StopFlag, stop_on_signals, terminate_as_interrupt


@contextlib.contextmanager
def stoppable(run_dir: Path, save: Callable[[], None], *, finished: Callable[[], bool]) -> Iterator[StopFlag]:
    """Train inside: yields the signal flag the loop checks. A StopRequested from the body saves
    (`save`, which a second Ctrl-C does not interrupt) and propagates, unless `finished()` says the
    stop ends training as planned (the time limit), in which case the block simply ends."""
    with stop_on_signals() as flag:
        try:
            with resumable_on_failure(run_dir):
                yield flag
        except StopRequested as stop:
            with flag.protect():  # a second Ctrl-C must not cost the checkpoint
                save()
            if isinstance(stop, SignalStop):
                stop.run_dir = run_dir
            if not finished():
                raise


@contextlib.contextmanager
def after_training(run_dir: Path) -> Iterator[None]:
    """Measure and draw inside: a Ctrl-C there (Python's own handler is back), or a SIGTERM (a
    scheduler's, or torchrun's agent passing one on), stops with one line saying the checkpoints
    are complete and `deepfit evaluate` measures the test split; exit code 130 or 143. Without
    it a SIGTERM there ended the process without a word."""
    with terminate_as_interrupt() as received:
        try:
            yield
        except KeyboardInterrupt:
            stop = AfterTraining(run_dir)
            stop.exit_code = 128 + (received[0] if received else signal.SIGINT)
            raise stop from None
