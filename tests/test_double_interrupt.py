"""Issue 12, item 2: two quick Ctrl-C presses (real SIGINTs to a child process, 0.3 s apart) keep
the checkpoint: before the first checkpoint and while the stop's checkpoint is being written.
The stop line says why, the run resumes, and a third press still abandons a run that hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepfit.checkpoint import load_checkpoint
from tests.conftest import write_tiny_idx

# A child that trains on many tiny batches (a long first epoch) and, when asked, makes each step
# take 1 s (a big model) or holds the stop's protected save open for 1.5 s (a slow disk), telling
# the parent through a marker file when that moment has come.
CHILD = """
import sys, time
from pathlib import Path
import deepfit.interrupts as interrupts
if sys.argv[1] == "slow-save":
    real = interrupts.StopFlag.protect
    def slow(self):
        with real(self):
            Path("saving").touch()
            time.sleep(1.5)
            yield
    import contextlib
    interrupts.StopFlag.protect = contextlib.contextmanager(slow)
if sys.argv[1] == "slow-step":  # a first step as slow as a big model's: both presses land inside it
    import importlib
    fit = importlib.import_module("deepfit.fit")
    real_after_step = fit.after_step
    def slow_step(run, deadline):
        Path("training").touch()
        time.sleep(1.0)
        real_after_step(run, deadline)
    fit.after_step = slow_step
sys.argv = ["deepfit", *sys.argv[2:]]
from deepfit.cli import main
raise SystemExit(main())
"""


def start(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    data = write_tiny_idx(tmp_path / "idx", train=600, test=20, side=8)
    args = ["train", "--data", "mnist", "--data-dir", str(data), "--model", "mlp", "--model.hidden", "8", "--epochs", "50"]
    args += ["--no-progress", "--data.batch-size", "1", "--out", "run"]
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(path: Path, child: subprocess.Popen[str], limit: float = 600) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def finish(child: subprocess.Popen[str]) -> str:
    try:
        _out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
    return err


def resumes(tmp_path: Path) -> bool:
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    done = subprocess.run(
        [sys.executable, "-m", "deepfit.cli", "train", "--resume", "run", "--epochs", str(state["epoch"] + 1), "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return done.returncode == 0 and f"resuming run at epoch {state['epoch'] + 1}, step {state['step']}" in done.stdout


def test_two_quick_presses_before_the_first_checkpoint_keep_a_resumable_one(tmp_path: Path) -> None:
    child = start(tmp_path, "slow-step")
    wait_for(tmp_path / "training", child)  # the first step is under way
    child.send_signal(signal.SIGINT)
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)
    err = finish(child)
    assert child.returncode == 130, err
    assert "deepfit: stopped: SIGINT received; a resumable checkpoint was written" in err and "Traceback" not in err
    assert "signal again to abandon it" in err  # the second press was heard, and said what a third would cost
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"]) == (0, 1)  # the step in hand was finished and kept
    assert resumes(tmp_path)


@pytest.mark.slow  # a real process and a slowed save: ~23 s; make test-slow runs it
def test_presses_during_the_save_do_not_abort_it(tmp_path: Path) -> None:
    child = start(tmp_path, "slow-save")
    wait_for(tmp_path / "run" / "config.yaml", child)
    time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    wait_for(tmp_path / "saving", child)  # the stop's checkpoint is being written
    child.send_signal(signal.SIGINT)
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)  # the third press: it would abandon, but not a save in progress
    err = finish(child)
    assert child.returncode == 130, err
    assert err.count("still writing the checkpoint; it finishes first") == 2 and "Traceback" not in err
    assert "a resumable checkpoint was written" in err
    assert resumes(tmp_path)


def test_a_third_press_abandons_a_stop_that_does_not_come() -> None:
    from deepfit.interrupts import Abandoned, stop_on_signals

    notes: list[str] = []
    with pytest.raises(Abandoned) as abandoned, stop_on_signals(notify=notes.append) as flag:
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGINT)  # training never reaches a step boundary in between
    assert flag.count == 3 and len(notes) == 1 and "abandon" in notes[0]
    assert "training since the last checkpoint is lost" in str(abandoned.value)
