"""Helpers for tests that start process groups: N ranks forked from the test process (torch is
already imported, so a rank starts in well under a second), free ports on 127.0.0.1, time limits,
and every process killed in a `finally`. A test process that has used CUDA cannot fork a rank that
runs autograd (its device threads do not survive a fork): its ranks are spawned instead."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from deepfit.config import Config, set_value
from deepfit.errors import NonFiniteError, StopRequested
from deepfit.fit import fit


def rank_context() -> Any:
    """fork, quick, while this process has not started CUDA; else spawn (a fresh interpreter)."""
    return multiprocessing.get_context("spawn" if torch.cuda.is_initialized() else "fork")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def digits_config(out: Path, **overrides: Any) -> Config:
    """The embedded digits, seeded, CPU, no progress bar; `overrides` as dotted keys (a__b -> a.b)."""
    config = Config()
    values = {"data.name": "digits", "model.name": "mlp", "train.epochs": 3, "train.device": "cpu", "train.progress": False}
    values |= {key.replace("__", "."): value for key, value in overrides.items()}
    values["train.out"] = str(out)
    for key, value in values.items():
        set_value(config, key, value)
    return config


def rank_main(rank: int, size: int, port: int, config: Config, resume: str | None, stop_at: int | None, build: Any) -> None:
    """One rank: torchrun's environment variables, then the ordinary fit() (of `build()` when given)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on two cores
    try:
        fit(config, resume=resume, progress=stop_after(stop_at) if stop_at else None, model=build() if build else None)
    except (NonFiniteError, StopRequested) as err:  # as the CLI ends them: 3, 143, ...; the message kept for the test
        (Path(config.train.out) / f"rank-{rank}.stopped").write_text(str(err))
        sys.exit(err.exit_code)


def stop_after(batches: int) -> Callable[[Any, str, int], Any]:
    """A progress hook that sends SIGTERM to its own process after `batches` batches of the run,
    as a scheduler's preemption would: the run must stop with a resumable checkpoint."""
    seen = [0]

    def progress(items: Any, description: str, total: int) -> Any:
        for item in items:
            yield item
            seen[0] += 1
            if seen[0] == batches:
                os.kill(os.getpid(), signal.SIGTERM)

    return progress


@contextlib.contextmanager
def forked_ranks(
    size: int, config: Config, *, resume: str | None = None, stop_at: int | None = None, build: Callable[[], Any] | None = None
) -> Iterator[list[Any]]:
    """Start `size` ranks of fit(config); yields the processes; kills any still alive on exit."""
    port = free_port()
    context = rank_context()
    procs = [
        context.Process(target=rank_main, args=(rank, size, port, config, resume, stop_at, build), daemon=True) for rank in range(size)
    ]
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)


def run_ranks(
    size: int,
    config: Config,
    *,
    timeout: float = 600,
    resume: str | None = None,
    stop_at: int | None = None,
    build: Callable[[], Any] | None = None,
) -> list[int]:
    """Run fit(config) on `size` forked ranks to the end; their exit codes."""
    with forked_ranks(size, config, resume=resume, stop_at=stop_at, build=build) as procs:
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        assert not any(proc.is_alive() for proc in procs), f"ranks still running after {timeout} s"
        return [int(proc.exitcode or 0) for proc in procs]


def weights(run: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / name, weights_only=True)["model"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def deepfit_process(
    args: Sequence[str], *, cwd: Path, launcher: Sequence[str] = (), env: dict[str, str | None] | None = None
) -> subprocess.Popen[str]:
    """`python -m deepfit ARGS` (or `python -m torch.distributed.run LAUNCHER -m deepfit ARGS`) in
    its own session, so the test can end the whole process tree; `env` over this process's (None: unset)."""
    logs = f"--log-dir={cwd / 'torchrun-logs'}"  # not a torchelastic_* folder left in /tmp by each test
    command = (
        [sys.executable, "-m", "torch.distributed.run", logs, *launcher, "-m", "deepfit"] if launcher else [sys.executable, "-m", "deepfit"]
    )
    merged = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [*command, *args],
        cwd=cwd,
        env={key: value for key, value in merged.items() if value is not None},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (torchrun starts each rank in a session of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def end_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL what the test started: the launcher's ranks (in their own sessions), then its group."""
    for pid in children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=10)


def rank_pid(launcher: subprocess.Popen[str], rank: int, timeout: float = 120) -> int:
    """The pid of the launcher's worker whose environment says RANK=rank."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in children(launcher.pid):
            with contextlib.suppress(OSError):
                if f"\0RANK={rank}\0".encode() in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
                    return pid
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} process appeared within {timeout} s")


def wait_for(path: Path, timeout: float, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {path} appeared: {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.1)
