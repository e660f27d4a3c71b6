"""`deepfit train --devices N`: torchrun's launcher (torch.distributed.run) started in this process,
so one command trains on N GPUs of a laptop or server; `--resume auto`; and what a failed job says.
The training itself runs in the N worker processes, each `python -m deepfit train ...` as under
`torchrun --nproc-per-node N -m deepfit train ...` (deepfit/distributed.py joins them)."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepfit.errors import ConfigError, DeepfitError, NonFiniteError

NO_LAUNCH = "LOCAL_RANK"  # set by torchrun in every worker: --devices is then already in effect


def in_worker() -> bool:
    """True inside a process torchrun started (it sets LOCAL_RANK)."""
    return NO_LAUNCH in os.environ


def wants_launch(devices: int | None) -> bool:
    """--devices N > 1 outside torchrun's workers: start the ranks (inside one, train)."""
    return bool(devices and devices > 1 and not in_worker())


def is_rank0() -> bool:
    """Only rank 0 prints progress for people; the other ranks print only their errors."""
    return os.environ.get("RANK", "0") == "0"


def without_devices(argv: Sequence[str]) -> list[str]:
    """The command line minus `--devices N` / `--devices=N`: what each worker runs."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--devices":
            skip = True
        elif not item.startswith("--devices="):
            out.append(item)
    return out


def launch(argv: Sequence[str], devices: int) -> tuple[int, str | None]:
    """Run `deepfit <argv>` as `devices` ranks on this machine; (exit code, a line for people or None).
    A rank that dies ends the others (torchrun's agent stops them) and is named; a SIGTERM or
    SIGINT to this process reaches every rank, which stop after the same step with a checkpoint."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # its "failed (exitcode: 2) local_rank: 0 (pid: ...) of binary: ..." line: describe_failure says that in words
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(rank_threads(devices)))  # the ranks' default; --train.threads still sets it
    with tempfile.TemporaryDirectory(prefix="deepfit-ranks-") as logs:  # torchrun's own would stay in /tmp, one per launch
        launcher = ["--standalone", f"--nproc-per-node={devices}", f"--log-dir={logs}", "--module", "deepfit"]
        args = get_args_parser().parse_args([*launcher, *without_devices(argv)])
        os.environ[SAID] = os.path.join(logs, "said.txt")
        try:
            run(args)
        except ChildFailedError as err:
            return describe_failure(err.failures)
        except SignalException as err:
            said = f"stopped by {signal.Signals(err.sigval).name}: every rank stopped after the same step and rank 0 wrote a resumable checkpoint"
            return 128 + int(err.sigval), said
        finally:
            del os.environ[SAID]
    return 0, None


SAID = "DEEPFIT_RANKS_SAID"  # a file the ranks of one launch share: the error lines printed so far


def first_to_say(line: str) -> bool:
    """Whether this process prints `line`: yes, unless it is a rank of `--devices N` and another
    rank printed it already. The ranks meet the same bad input alike (a missing file, a class that
    will not import), and N copies of one line told people nothing more; whichever rank gets there
    first says it, so it is never lost to a rank the launcher stopped."""
    path = os.environ.get(SAID)
    if not path or not in_worker():
        return True
    import fcntl

    try:
        with open(path, "a+", encoding="utf-8") as said:
            fcntl.flock(said, fcntl.LOCK_EX)  # released as the file closes
            said.seek(0)
            if line in said.read().split("\0"):
                return False
            said.write(line + "\0")
    except OSError:  # the shared file is not there to ask: say it
        return True
    return True


def require_devices(device_name: str, devices: int) -> None:
    """Refuse, before any rank starts, ranks this machine cannot hold: on CUDA one GPU a rank; on
    the CPU one core a rank (more only share the cores, each with its own copy of torch and the
    data). Every rank would otherwise fail alone with the same line, or the machine would swap."""
    from deepfit.runtime import select_device

    device = select_device(device_name)  # an absent --device is one line here, not one per rank
    if device.type == "cuda" and devices > (count := torch_cuda_count()):
        raise ConfigError(f"--devices {devices}: this machine has {count} CUDA GPU(s), one a rank: at most --devices {count}")
    if device.type == "cpu" and devices > (cores := available_cores()):
        raise ConfigError(f"--devices {devices} on the CPU: this machine has {cores} core(s), one a rank: at most --devices {cores}")


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def available_cores() -> int:
    """The cores this process may run on (its affinity, as a container or taskset limits it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def rank_threads(devices: int) -> int:
    """Intra-op threads for each of `devices` ranks: this process's cores shared out among them.
    torchrun's own default is 1 thread a rank, with a warning banner, whatever the machine."""
    return max(1, available_cores() // devices)


def describe_failure(failures: dict[int, Any]) -> tuple[int, str]:
    """Name the rank that failed first. The agent ends the survivors with SIGTERM and they may lose
    their peer and fail too, so a rank killed by another signal is the cause, then one that exited
    with an error, then the lowest rank. Ranks that stopped together with the same code (a
    non-finite loss: all of them, at the same step) are named together."""

    def blame(item: tuple[int, Any]) -> tuple[int, int]:
        code = item[1].exitcode
        return (0 if code < 0 and code != -signal.SIGTERM else 1 if code > 0 else 2), item[0]

    rank, failure = min(failures.items(), key=blame)
    if failure.exitcode < 0:
        how, code, alike = f"was killed by {signal.Signals(-failure.exitcode).name}", 1, [rank]
    else:
        how, code = f"exited with code {failure.exitcode}", failure.exitcode
        alike = sorted(r for r, f in failures.items() if f.exitcode == failure.exitcode)
    who = f"rank {rank} (pid {failure.pid})" if len(alike) == 1 else f"ranks {', '.join(map(str, alike))}"
    others = sorted(set(failures) - set(alike))
    if others:
        stopped = f"; rank {others[0]} was stopped" if len(others) == 1 else f"; ranks {', '.join(map(str, others))} were stopped"
    else:
        stopped = "; the other ranks were stopped" if len(alike) == 1 else ""
    message = f"{who} {how}{stopped}."
    if code == DeepfitError.exit_code:  # a file, flag or config the ranks refused: their line above says which
        return code, f"{message} The error above names what to fix"
    if code == NonFiniteError.exit_code:  # the ranks' own line says where; resuming would meet it again
        return code, message
    return code, f"{message} The last checkpoint resumes with --resume RUN_DIR"


def resolve_resume(resume: str | None, out: str | None) -> str | None:
    """`--resume auto --out DIR`: DIR when it holds a checkpoint (resume), else None (start there).
    The same command can then be re-run after every preemption."""
    if resume != "auto":
        return resume
    if not out:
        raise ConfigError("--resume auto needs --out RUN_DIR: the folder to start in or resume from")
    return out if (Path(out) / "checkpoints" / "last.pt").is_file() else None


def world_change_note(run_dir: Path) -> str | None:
    """A line when a run saved by one number of ranks resumes on another (the global batch and
    the data order do not depend on it, so the run continues as it would have)."""
    from deepfit.checkpoint import load_checkpoint

    saved = int(load_checkpoint(run_dir / "checkpoints" / "last.pt").get("world_size", 1))
    now = int(os.environ.get("WORLD_SIZE", "1"))
    if saved == now:
        return None
    return f"resuming a run saved by {saved} rank(s) on {now}: same global batch size, same data order"
