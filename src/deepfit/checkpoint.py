"""Self-describing checkpoints: a plain dict of tensors and primitives, written atomically
(temporary file in the same folder, flush, fsync, rename) and read only with weights_only=True."""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfit.errors import CheckpointError

FORMAT_VERSION = 1
KIND = "deepfit-checkpoint"
REQUIRED_KEYS = ("kind", "format_version", "config", "classes", "input_shape", "mean", "std", "model")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` so that `path` holds either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    state = safe_torch_load(path)
    check_state(state, path)
    return state


def resolve_run_checkpoint(run_dir: Path) -> Path:
    """A run folder stands for its best.pt, or last.pt when there is no best."""
    for name in ("best.pt", "last.pt"):
        candidate = run_dir / "checkpoints" / name
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{run_dir} holds no checkpoints/best.pt or checkpoints/last.pt")


def safe_torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsafe content"
        raise CheckpointError(f"{path} was refused by safe loading (weights_only=True): {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, AttributeError, TypeError) as err:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt): {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None


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
