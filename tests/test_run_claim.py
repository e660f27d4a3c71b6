"""One process trains a run folder at a time: RUN/.lock is flock-ed by the process that trains it,
so a second `--resume` of a run still training (or a run started twice with one --out) stops in
one line instead of writing beside it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import deepfit
from deepfit.checkpoint import HELD, claim_run, claiming, release_run, require_unclaimed
from deepfit.errors import ConfigError

HOLDER = "import sys; from pathlib import Path; from deepfit.checkpoint import claim_run; claim_run(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()"


@contextlib.contextmanager
def claimed_elsewhere(run: Path) -> Iterator[int]:
    """`run` claimed by another process, whose pid is given; it lets go when the block ends."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        yield child.pid
    finally:
        child.communicate(timeout=30)  # closing its stdin ends it


@pytest.fixture
def held_elsewhere(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    with claimed_elsewhere(tmp_path / "run") as pid:
        yield tmp_path / "run", pid


def test_a_run_claimed_by_another_process_is_refused_until_it_ends(held_elsewhere: tuple[Path, int]) -> None:
    run, pid = held_elsewhere
    message = f"^{run} is being trained by another process \\(pid {pid} on {socket.gethostname()}\\); wait for it to end, or stop it$"
    with pytest.raises(ConfigError, match=message):
        claim_run(run)
    with pytest.raises(ConfigError, match=message):
        require_unclaimed(run)
    assert run.resolve() not in HELD


def test_the_claim_ends_with_its_process_however_it_ends(tmp_path: Path) -> None:
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "held\n"
    child.kill()  # SIGKILL: no handler runs, the system drops the lock
    child.communicate(timeout=30)
    claim_run(run)
    try:
        assert (run / ".lock").read_text() == f"{os.getpid()} on {socket.gethostname()}\n"
    finally:
        release_run(run)
    assert run.resolve() not in HELD


def test_a_second_resume_of_a_run_in_training_stops_in_one_line_and_writes_nothing(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("train", "--model", "mlp", "--epochs", "1", "--no-progress", "--out", "first").code == 0
    with claimed_elsewhere(tmp_path / "first") as pid:  # the process training it still
        before = {p: p.stat().st_mtime_ns for p in (tmp_path / "first").rglob("*")}
        second = cli("train", "--resume", "first", "--epochs", "2", "--no-progress")
        assert second.code == 2 and second.out == ""
        assert second.err == (
            f"deepfit: error: first is being trained by another process (pid {pid} on {socket.gethostname()}); wait for it to end, or stop it\n"
        )
        assert {p: p.stat().st_mtime_ns for p in (tmp_path / "first").rglob("*")} == before
        with pytest.raises(ConfigError, match="being trained by another process"):  # the API, as the CLI
            deepfit.fit(model="mlp", epochs=2, progress=False, resume=tmp_path / "first")
    assert cli("train", "--resume", "first", "--epochs", "2", "--no-progress").code == 0  # free again once it ended


def test_fit_lets_go_of_its_run_when_it_returns_or_fails(tmp_path: Path) -> None:
    result = deepfit.fit(model="mlp", epochs=1, progress=False, out=str(tmp_path / "run"))
    assert result.run_dir.resolve() not in HELD and result.run_dir.joinpath(".lock").is_file()
    with pytest.raises(ZeroDivisionError), claiming(tmp_path / "other"):
        assert (tmp_path / "other").resolve() in HELD
        1 / 0  # noqa: B018
    assert (tmp_path / "other").resolve() not in HELD
