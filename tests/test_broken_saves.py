"""A save that cannot finish (full disk, read-only folder, unserialisable state) leaves the previous
checkpoint byte-identical, leaves no temporary file, and stops the run with a clear message (exit 74)."""

from __future__ import annotations

import csv
import errno
import os
import resource
from pathlib import Path
from typing import Any

import pytest
import torch

from deepfit import checkpoint
from deepfit.checkpoint import CheckpointSaveError, load_checkpoint, save_checkpoint
from tests.conftest import run_deepfit

TINY = ("--data", "mnist", "--epochs", "2", "--no-progress", "--data.batch-size", "16", "--model", "lenet")


def valid_state(weights: torch.Tensor) -> dict[str, Any]:
    return {
        "kind": "deepfit-checkpoint", "format_version": 1, "config": {}, "classes": ["a", "b"],
        "input_shape": [1, 4, 4], "mean": [0.5], "std": [0.25], "model": {"w": weights},
    }  # fmt: skip


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(valid_state(torch.arange(1000.0)), path)
    return path


REAL_WRITE = os.write


def full_disk_writer(fd: int, data: Any) -> int:
    """os.write that stores the first 4 KiB, then finds the disk full."""
    if os.lseek(fd, 0, os.SEEK_CUR) >= 4096:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return REAL_WRITE(fd, bytes(data[:4096]))


def read_only_mkstemp(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


def fsync_full(fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


FAULTS = {
    "disk full while writing": (checkpoint.os, "write", full_disk_writer, "No space left"),
    "disk full at fsync": (checkpoint.os, "fsync", fsync_full, "No space left"),
    "read-only folder": (checkpoint.tempfile, "mkstemp", read_only_mkstemp, "Read-only file system"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failed_save_keeps_the_previous_checkpoint_byte_identical(previous: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    module, name, replacement, words = FAULTS[fault]
    before = previous.read_bytes()
    monkeypatch.setattr(module, name, replacement)
    with pytest.raises(CheckpointSaveError, match=words) as err:
        save_checkpoint(valid_state(torch.zeros(1000)), previous)
    monkeypatch.undo()
    assert "previous checkpoint is unchanged" in str(err.value) and str(previous) in str(err.value)
    assert previous.read_bytes() == before
    assert sorted(p.name for p in previous.parent.iterdir()) == ["last.pt"]  # no temporary left behind
    assert torch.equal(load_checkpoint(previous)["model"]["w"], torch.arange(1000.0))


def test_a_first_save_that_fails_does_not_speak_of_a_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first best.pt on a full disk said 'the previous checkpoint is unchanged': there was none."""
    first = tmp_path / "best.pt"
    monkeypatch.setattr(checkpoint.os, "write", full_disk_writer)
    with pytest.raises(CheckpointSaveError) as err:
        save_checkpoint(valid_state(torch.zeros(1000)), first)
    assert str(err.value) == f"could not write checkpoint {first} (OSError: No space left on device)" and not first.exists()


def test_an_unserialisable_state_keeps_the_previous_checkpoint(previous: Path) -> None:
    before = previous.read_bytes()
    bad = valid_state(torch.zeros(3)) | {"history": [lambda: None]}  # a lambda cannot be pickled
    with pytest.raises(CheckpointSaveError, match="could not serialise"):
        save_checkpoint(bad, previous)
    assert previous.read_bytes() == before
    assert sorted(p.name for p in previous.parent.iterdir()) == ["last.pt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the simulated case above covers it")
def test_a_really_read_only_folder(previous: Path) -> None:
    before = previous.read_bytes()
    previous.parent.chmod(0o500)
    try:
        with pytest.raises(CheckpointSaveError, match="Permission denied"):
            save_checkpoint(valid_state(torch.zeros(3)), previous)
    finally:
        previous.parent.chmod(0o700)
    assert previous.read_bytes() == before


def test_a_run_whose_save_fails_stops_with_a_clear_message(cli, tiny_idx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The third save of the run finds the disk full: exit 74, the reason and the resume command,
    the second save intact; once there is room, the resume finishes the run."""
    real_replace, calls, seen = checkpoint.write_all, [0], {}

    def write_then_fill(fd: int, data: memoryview) -> None:
        calls[0] += 1
        if calls[0] == 3:
            seen["bytes"] = (tmp_path / "r" / "checkpoints" / "last.pt").read_bytes()
            REAL_WRITE(fd, bytes(data[:100]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(fd, data)

    monkeypatch.setattr(checkpoint, "write_all", write_then_fill)
    result = cli("train", *TINY, "--data-dir", str(tiny_idx), "--out", "r", "--checkpoint-every", "1", "--keep-last", "5")
    monkeypatch.undo()
    assert result.code == 74, result.err
    assert "No space left" in result.err and "Traceback" not in result.err and "run folder" not in result.out
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    assert last.read_bytes() == seen["bytes"]
    assert load_checkpoint(last)["step"] == 1  # the last save that completed
    assert not list(last.parent.glob(".*.tmp"))
    assert result.err.strip().splitlines()[-1] == "deepfit: resume with: deepfit train --resume r"
    resumed = cli("train", "--resume", str(tmp_path / "r"), "--no-progress")  # the disk has room again (undo left tmp_path)
    assert resumed.code == 0, resumed.err
    assert [int(row["epoch"]) for row in csv.DictReader((tmp_path / "r" / "metrics.csv").open())] == [1, 2]


def limit_file_size(limit: int) -> Any:
    def apply() -> None:  # in the child, before exec: files may not grow past `limit` bytes (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow  # a real process under RLIMIT_FSIZE: ~23 s; make test-slow runs it
def test_a_real_file_size_limit_in_a_real_process(tiny_idx: Path, tmp_path: Path) -> None:
    """No mocks: the kernel refuses to let a file grow (RLIMIT_FSIZE -> EFBIG) while the resumed
    run saves; the exit code is 74 and the checkpoint from before is byte-identical and loads."""
    import subprocess
    import sys

    first = run_deepfit(["train", *TINY, "--data-dir", str(tiny_idx), "--out", "r", "--epochs", "1"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "deepfit.cli", "train", "--resume", "r", "--epochs", "2", "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size(len(before) // 2),
    )  # fmt: skip
    assert result.returncode == 74, result.stderr
    assert "could not write checkpoint" in result.stderr and "File too large" in result.stderr
    assert last.read_bytes() == before
    assert load_checkpoint(last)["epoch"] == 1


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device", "metrics.csv"), CheckpointSaveError("could not write")])
def test_a_failure_names_the_run_only_when_there_is_a_checkpoint_to_resume(tmp_path: Path, error: Exception) -> None:
    for has_checkpoint in (False, True):
        if has_checkpoint:
            save_checkpoint(valid_state(torch.zeros(3)), tmp_path / "checkpoints" / "last.pt")
        with pytest.raises(type(error)) as raised, checkpoint.resumable_on_failure(tmp_path):
            raise error
        assert getattr(raised.value, "run_dir", None) == (tmp_path if has_checkpoint else None)
        error.__dict__.pop("run_dir", None)
