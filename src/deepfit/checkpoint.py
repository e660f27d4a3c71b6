"""Self-describing checkpoints: a plain dict of tensors and primitives, written atomically
(temporary file in the same folder, flush, fsync, rename) and read only with weights_only=True.

Loading never runs code: torch.load is always called with an explicit weights_only=True, which
torch (checked in 2.14) keeps even when TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set; that variable
only changes calls that leave weights_only unset. There is no fallback to weights_only=False.
A failed save (full disk, read-only folder, unserialisable state) leaves the previous file
byte-identical and raises CheckpointSaveError."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pickle
import random
import re
import socket
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from deepfit.config import Config, config_from_dict, infer_task, resume_changes
from deepfit.errors import CheckpointError, ConfigError
from deepfit.outfiles import is_torchscript

FORMAT_VERSION = 1
MIN_TORCH = (2, 10)  # earlier releases have known weights_only bypasses (e.g. CVE-2025-32434)
KIND = "deepfit-checkpoint"
REQUIRED_KEYS = ("kind", "format_version", "config", "classes", "input_shape", "mean", "std", "model")


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written; the previous one on disk is untouched."""

    exit_code = 74  # EX_IOERR (sysexits.h): the run stopped because its state could not be saved


# What torch.save raises for a state it cannot serialise.
SAVE_ERRORS = (pickle.PicklingError, TypeError, AttributeError, RuntimeError, ValueError, OSError)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` so that `path` holds either the old file or the whole new one.
    Serialising first, in memory, keeps the two failures apart: torch's own writer turns a full
    disk into an opaque RuntimeError, os.write reports the OS's reason."""
    try:
        buffer = io.BytesIO()
        torch.save(state, buffer)
    except SAVE_ERRORS as err:
        raise CheckpointSaveError(
            f"could not serialise the checkpoint for {path} ({type(err).__name__}: {reason(err)}){kept(path)}"
        ) from None
    try:
        write_atomically(buffer.getbuffer(), path)
    except OSError as err:
        raise CheckpointSaveError(f"could not write checkpoint {path} ({type(err).__name__}: {reason(err)}){kept(path)}") from None


def kept(path: Path) -> str:
    """'; the previous checkpoint is unchanged' where there is one (a first best.pt has none)."""
    return "; the previous checkpoint is unchanged" if path.is_file() else ""


@contextlib.contextmanager
def resumable_on_failure(run_dir: Path) -> Iterator[None]:
    """A failure of the file system while a run trains (a full disk, a folder gone read-only, a
    checkpoint that could not be written) carries the run folder as `run_dir` when its last.pt is
    there to resume from, so the command's error names the way back once the cause is fixed."""
    try:
        yield
    except (CheckpointSaveError, OSError) as err:
        if (run_dir / "checkpoints" / "last.pt").is_file():
            err.run_dir = run_dir  # type: ignore[union-attr]
        raise


def reason(err: BaseException) -> str:
    """The first line of an exception's message (the OS's words for an OSError)."""
    text = getattr(err, "strerror", None) or str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def write_atomically(data: memoryview, path: Path) -> None:
    """Temporary file in the same folder, every byte written, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_all(fd: int, data: memoryview) -> None:
    """os.write until done (it may write less than asked); a full disk raises OSError(ENOSPC)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


TEMP_SUFFIX = ".tmp"


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the half-written temporary files a killed process left in `folder`; returns them.
    Call only when no other process writes there (e.g. when a run is resumed)."""
    stale = sorted(folder.glob(f".*.pt.*{TEMP_SUFFIX}")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a deepfit checkpoint; never unpickles arbitrary objects."""
    path = Path(path)
    if path.is_dir():
        path = resolve_run_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such run folder or checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    state = safe_torch_load(path)
    check_state(state, path)
    return state


def last_checkpoint(run_dir: Path) -> Path:
    """RUN_DIR/checkpoints/last.pt, the one --resume reads; a folder without it is one line saying
    what it may be and how to train it (a run that stopped before its first checkpoint keeps only
    its config.yaml)."""
    path = run_dir / "checkpoints" / "last.pt"
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume {run_dir}: no such run folder")
    if not path.is_file():
        raise CheckpointError(
            f"--resume {run_dir}: it holds no checkpoints/last.pt (a run stopped before its first checkpoint, or not a run folder);"
            f" train it anew with --out {run_dir}"
        )
    return path


def load_resumed(run_dir: Path, config: Config) -> dict[str, Any]:
    """RUN_DIR/checkpoints/last.pt for --resume, refused in one line when `config` changes what it
    restores (config.RESUME_FIXED), before any data is read."""
    state = load_checkpoint(last_checkpoint(run_dir))
    refuse_resume_changes(config_from_dict(state["config"]), config, run_dir)
    return state


def refuse_resume_changes(saved: Config, config: Config, run_dir: Path) -> None:
    """ConfigError naming what `config` changes of the resumed run's `saved` config that the
    checkpoint would overrule (config.RESUME_FIXED)."""
    changes = resume_changes(saved, config)
    if changes:
        fresh = f" from its weights (--init-from {run_dir})" if infer_task(config.data) == "image" else ""
        raise ConfigError(
            f"--resume {run_dir} cannot change {'; '.join(changes)}: a resumed run goes on with the data, model, optimizer and"
            f" schedule it saved; leave {'it' if len(changes) == 1 else 'them'} out, or start a new run{fresh}"
        )


def checkpoint_task(state: dict[str, Any]) -> str:
    """The task a checkpoint was trained for (image, regression, node); checkpoints from before
    tasks existed are image classifiers."""
    data = state.get("config", {}).get("data", {})
    return str(data.get("task", "image")) if isinstance(data, dict) else "image"


def resolve_run_checkpoint(run_dir: Path) -> Path:
    """A run folder stands for its best.pt, or last.pt when there is no best."""
    for name in ("best.pt", "last.pt"):
        candidate = run_dir / "checkpoints" / name
        if candidate.is_file():
            return candidate
    if (run_dir / LR_FIND_TABLE).is_file():  # what `deepfit lr-find` writes: a sweep, no model
        raise CheckpointError(
            f"{run_dir} is an lr-find folder (its {LR_FIND_TABLE} and lr-find.png): a learning-rate sweep, not a trained"
            " model; train one with deepfit train --optim.lr LR, then give its run folder"
        )
    raise CheckpointError(f"{run_dir} holds no checkpoints/best.pt or checkpoints/last.pt")


LR_FIND_TABLE = "lr-find.csv"  # in the folder `deepfit lr-find` writes, beside lr-find.png


def check_torch_version(version: str = torch.__version__) -> None:
    """Refuse torch releases whose weights_only loader has known bypasses."""
    parts = re.match(r"(\d+)\.(\d+)", version)
    found = (int(parts.group(1)), int(parts.group(2))) if parts else (0, 0)
    if found < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise CheckpointError(f"loading checkpoints safely needs torch >= {need}; this is torch {version}; upgrade torch")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "y", "yes", "true")  # torch's own reading


def safe_torch_load(path: Path) -> Any:
    """torch.load with an explicit weights_only=True, from bytes in memory (so no mmap or
    .safetensors detour by file name). Only tensors, containers and primitives come back."""
    check_torch_version()
    if env_flag("TORCH_FORCE_WEIGHTS_ONLY_LOAD") and env_flag("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        # torch refuses to load at all when both are set; say so instead of "corrupt"
        raise CheckpointError("unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: deepfit always loads with weights_only=True")
    data = path.read_bytes()
    if not data.startswith(CHECKPOINT_MAGIC):
        raise CheckpointError(f"{path} is not a checkpoint: {what_file(data, path)}; give a run folder or a .pt file that train wrote")
    if is_torchscript(data):  # torch.load's own answer: a warning, then advice to load it unsafely
        raise CheckpointError(
            f"{path} is not a checkpoint: it is a TorchScript export; give the run folder it came from, or its checkpoints/best.pt"
        )
    try:
        # From memory, not the open file: a real file's read(n) allocates n bytes before reading,
        # so a 7-byte pickle declaring a 2 GiB string cost 2 GiB (found by tests/test_fuzz.py);
        # BytesIO.read(n) returns only what is there.
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} was refused by safe loading (weights_only=True): {refusal(err)}") from None
    except LOAD_ERRORS as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt): {reason(err)}") from None


CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip container; the legacy format opens with a pickle protocol byte


def what_file(data: bytes, path: Path) -> str:
    """A few words on what a file that is not a checkpoint seems to be."""
    head = data[:512]
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM")):
        return "it is an image"
    if path.suffix.lower() == ".onnx" and head.startswith(b"\x08"):  # ModelProto's first field, ir_version
        return "it is an ONNX export (serve --backend onnx serves a run's own)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "its bytes are not torch.save's format"
    return "it is a text file"


def refusal(err: BaseException) -> str:
    """Why safe loading refused a file, without torch's advice to load it unsafely (weights_only=False)."""
    for line in str(err).splitlines():
        if "WeightsUnpickler error" in line or "Unsupported" in line:
            return line.strip().removeprefix("WeightsUnpickler error: ")
    return "it holds objects other than tensors and plain values"


# What torch.load raises for truncated, corrupt or hostile bytes (beyond UnpicklingError).
LOAD_ERRORS = (
    RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, AttributeError, TypeError,
    IndexError, UnicodeDecodeError, OverflowError, MemoryError, struct.error, NotImplementedError,
)  # fmt: skip


def check_state(state: Any, path: Path) -> None:
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise CheckpointError(f"{path} is not a deepfit checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {state.get('format_version')!r}; this deepfit reads version {FORMAT_VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")


def load_model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load weights strictly; a mismatch with the declared architecture is a CheckpointError."""
    try:
        model.load_state_dict(weights, strict=True)
    except (RuntimeError, TypeError) as err:
        detail = " ".join(str(err).split())[:400]
        raise CheckpointError(f"{path}: weights do not fit the declared architecture: {detail}") from None


def rng_state() -> dict[str, Any]:
    """Every global random generator, as tensors and plain numbers (readable by safe loading)."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def new_run_dir(out: str | None, *, data: str, model: str, make: bool = True) -> Path:
    """A fresh run folder: `out` when given (refused if it already holds a run), else
    runs/<data>-<model>-<date-time>, with -2, -3, ... when that exists. That folder is made here
    (unless `make` is off: a rank that only learns rank 0's), so runs started in the same second (a
    sweep) each get their own."""
    if out is not None:
        if (Path(out) / "checkpoints" / "last.pt").exists():
            raise ConfigError(f"{out} already holds a run; use --resume {out} or another --out")
        require_run_or_empty(Path(out))
        return Path(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{Path(data).name.split('.')[0]}-{model}-{stamp}"  # photos.zip, rows.csv.gz -> photos, rows
    if not make:
        return base
    base.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


def require_run_or_empty(out: Path) -> None:
    """--out is a new or empty folder (hidden files such as .DS_Store aside), or one a run started
    (its .lock: a run stopped before its first checkpoint): a run writes config.yaml and
    metrics.csv there, over any of the same name."""
    if not out.is_dir() or (out / LOCK_FILE).is_file():
        return
    entries = sorted(path.name + ("/" if path.is_dir() else "") for path in out.iterdir() if not path.name.startswith("."))
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(
            f"--out {out} holds files that are not a deepfit run ({shown}); a run writes config.yaml, metrics.csv,"
            " checkpoints/ and plots/ there: give a new or empty folder"
        )


LOCK_FILE = ".lock"  # in the run folder: flock-ed by the process training it, holding "PID on HOST"
HELD: dict[Path, IO[str]] = {}  # the run folders this process trains, by resolved path


def claim_run(run_dir: Path) -> None:
    """Make `run_dir` this process's to write: an exclusive flock on RUN/.lock, which the system
    drops when the process ends, however it ends. Another process training the same folder (a
    second --resume, a run started twice with one --out) stops in one line instead of writing
    beside it. A claim this process left behind (a fit that raised, in a notebook) is renewed."""
    release_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = locked(run_dir)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    HELD[run_dir.resolve()] = handle


def require_unclaimed(run_dir: Path) -> None:
    """The ConfigError claim_run would raise, checked without keeping the claim: for a command that
    starts the training elsewhere (torchrun's ranks) or prints before it starts."""
    if (run_dir / LOCK_FILE).is_file() and run_dir.resolve() not in HELD:
        locked(run_dir).close()


def locked(run_dir: Path) -> IO[str]:
    """RUN/.lock opened and flock-ed by this process; ConfigError naming the holder's pid when another process holds it."""
    handle = (run_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(f"{run_dir} is being trained by another process (pid {holder}); wait for it to end, or stop it") from None
    return handle


def release_run(run_dir: Path) -> None:
    """Drop this process's claim on `run_dir`, if it holds one."""
    handle = HELD.pop(run_dir.resolve(), None)
    if handle is not None:
        handle.close()


@contextlib.contextmanager
def claiming(run_dir: Path, *, claim: bool = True) -> Iterator[None]:
    """Claim `run_dir` (claim_run) for what the block writes there, and keep it after the block;
    should the block fail, the claim is dropped. `claim` off: a rank that does not write the run."""
    if claim:
        claim_run(run_dir)
    try:
        yield
    except BaseException:
        release_run(run_dir)
        raise


@contextlib.contextmanager
def holding(run_dir: Path) -> Iterator[None]:
    """Keep the claim on `run_dir` while the block trains, and drop it after, however the block ends."""
    try:
        yield
    finally:
        release_run(run_dir)
