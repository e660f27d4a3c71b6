"""Kill at any moment: SIGKILL lands at random times, many of them in the middle of a save.
deepfit's writer always leaves a checkpoint that loads and a run that `--resume` finishes; the same
harness pointed at a naive `torch.save(state, path)` finds corrupt files, so the harness can fail."""

from __future__ import annotations

import multiprocessing
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from deepfit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.conftest import write_tiny_idx


@dataclass
class Counts:
    kills: int = 0
    corrupt: int = 0  # checkpoint files that did not load after a kill
    mid_save: int = 0  # kills that left a half-written temporary file (the kill hit a save)
    failed_resumes: int = 0


def big_state(version: int) -> dict[str, Any]:
    """A deepfit-shaped checkpoint of about 16 MB, so a write takes a while."""
    return {
        "kind": "deepfit-checkpoint", "format_version": 1, "config": {}, "classes": ["a"], "input_shape": [1, 2, 2],
        "mean": [0.0], "std": [1.0], "model": {f"w{i}": torch.full((1024, 512), float(version)) for i in range(8)},
        "version": version,
    }  # fmt: skip


def naive_save(state: dict[str, Any], path: Path) -> None:
    torch.save(state, path)


def write_forever(save: Callable[[dict[str, Any], Path], None], path: Path, ready: Any) -> None:
    """Child process body: save new versions to `path` until killed; set `ready` after the first."""
    version = 0
    while True:
        save(big_state(version), path)
        if version == 0:
            ready.set()
        version += 1


def saved_size(probe: Path) -> int:
    """Bytes of one complete save of big_state (every version has the same tensors)."""
    torch.save(big_state(0), probe)
    size = probe.stat().st_size
    probe.unlink()
    return size


def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    """Poll `condition` for up to `seconds`."""
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.0005)


def loads(path: Path) -> bool:
    try:
        load_checkpoint(path)
        return True
    except CheckpointError:
        return False


def writer_context() -> Any:
    """Children forked from a single-threaded server that has imported torch already: they start
    in milliseconds, and unlike a fork of the multi-threaded test process they cannot inherit a
    lock some other thread held (which deadlocked a child in an earlier version of this test)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "deepfit.checkpoint", "tests.test_kill"])
    return context


def kill_writer(save: Callable[[dict[str, Any], Path], None], folder: Path, kills: int, rng: random.Random) -> Counts:
    """Start a writer, let it finish one save, SIGKILL it after a random delay (or as soon as a
    write is under way), check the file; `kills` times."""
    counts, path, context = Counts(), folder / "last.pt", writer_context()
    folder.mkdir(parents=True, exist_ok=True)
    half = saved_size(folder / "size.probe") // 2

    def writing() -> bool:  # deepfit's temporary file exists, or a save in place has truncated the file
        return bool(list(folder.glob(".*.tmp"))) or (path.exists() and path.stat().st_size < half)

    for _ in range(kills):
        ready = context.Event()
        child = context.Process(target=write_forever, args=(save, path, ready), daemon=True)
        child.start()
        try:
            assert ready.wait(timeout=60), "the writer never finished its first save"
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0.0, 0.25))
            else:  # aim: kill as soon as a write is under way (for both writers: on a loaded machine random kills hit few saves)
                wait_for(writing, seconds=2.0)
        finally:
            child.kill()  # SIGKILL
            child.join()
        counts.kills += 1
        counts.mid_save += len(list(folder.glob(".*.tmp")))
        counts.corrupt += not loads(path)
        for stale in folder.glob(".*.tmp"):
            stale.unlink()
    return counts


@pytest.mark.parametrize("kills", [pytest.param(8, id="short"), pytest.param(60, id="long", marks=pytest.mark.slow)])
def test_atomic_writer_survives_kills_and_naive_writer_does_not(tmp_path: Path, kills: int) -> None:
    rng = random.Random(6)
    ours = kill_writer(save_checkpoint, tmp_path / "deepfit", kills, rng)
    naive = kill_writer(naive_save, tmp_path / "naive", kills, rng)
    print(f"\ndeepfit save_checkpoint: {ours}\nnaive torch.save:        {naive}")
    assert ours.kills == kills and ours.corrupt == 0
    assert ours.mid_save > 0  # the kills did land inside saves, so the check means something
    assert naive.corrupt > 0  # the same harness catches a writer that is not atomic


TRAIN = ["--data", "mnist", "--model", "mlp", "--model.hidden", "1024,1024", "--data.batch-size", "16"]
TRAIN += ["--sched.name", "none", "--no-progress", "--checkpoint-every", "1", "--keep-last", "2"]


def deepfit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepfit.cli", "train", *args]


def check_run_folder(folder: Path, counts: Counts, keep_last: int) -> None:
    """After a kill: last.pt and the newest step checkpoint load; rotation kept at most K+1 (a kill
    between writing step N and deleting the oldest leaves one extra)."""
    counts.mid_save += bool(list(folder.glob(".*.tmp")))
    steps = sorted(folder.glob("step-*.pt"))
    assert len(steps) <= keep_last + 1, [p.name for p in steps]
    for path in [folder / "last.pt", *steps[-1:]]:
        counts.corrupt += path.exists() and not loads(path)


def kill_training(root: Path, kills: int, rng: random.Random) -> Counts:
    """Start `deepfit train`, kill it at a random moment after its first checkpoint; then
    `--resume` it and kill again; finally let a resume finish the run."""
    data = write_tiny_idx(root / "idx", train=400)
    counts, run, folder = Counts(), root / "run", root / "run" / "checkpoints"
    command = deepfit_command(*TRAIN, "--data-dir", str(data), "--epochs", "10000", "--out", str(run))
    for i in range(kills):
        child = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started = time.monotonic()
        while not (folder / "last.pt").exists() and child.poll() is None and time.monotonic() - started < 120:
            time.sleep(0.01)
        if i % 2:
            time.sleep(rng.uniform(0.0, 1.0))
        else:  # aim: wait for a save to be under way (its temporary file exists), then kill
            wait_for(lambda: bool(list(folder.glob(".*.tmp"))), seconds=rng.uniform(0.2, 2.0))
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate()
        counts.kills += 1
        counts.failed_resumes += i > 0 and child.returncode != -signal.SIGKILL  # a resume that died on its own
        assert child.returncode == -signal.SIGKILL, err
        check_run_folder(folder, counts, keep_last=2)
        command = deepfit_command("--resume", str(run), "--no-progress")
    epoch = load_checkpoint(folder / "last.pt")["epoch"]
    done = subprocess.run(deepfit_command("--resume", str(run), "--epochs", str(epoch + 1), "--no-progress"), cwd=root, capture_output=True, text=True)  # fmt: skip
    counts.failed_resumes += done.returncode != 0
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(folder / "last.pt")["epoch"] == epoch + 1
    assert not list(folder.glob(".*.tmp"))  # the resume cleared what the kills left
    return counts


@pytest.mark.parametrize("kills", [pytest.param(3, id="short"), pytest.param(50, id="long", marks=pytest.mark.slow)])
def test_deepfit_train_killed_at_random_moments_always_resumes(tmp_path: Path, kills: int) -> None:
    counts = kill_training(tmp_path, kills, random.Random(60))
    print(f"\ndeepfit train under SIGKILL: {counts}")
    assert counts.kills == kills and counts.corrupt == 0 and counts.failed_resumes == 0
    assert counts.mid_save > 0  # some kills did land inside a save
