"""Files a command writes where the person running it names them (`--out`): never over a
checkpoint (a report or an export written over best.pt lost the weights it was made from), and
named for what they hold."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path

from deepfit.errors import ConfigError, DeepfitError

REPORT_SUFFIXES = (".html", ".htm")


def is_checkpoint(path: Path) -> bool:
    """A torch.save archive (data.pkl) that is not TorchScript's (which also has constants.pkl)."""
    names = archive_names(path)
    return "data.pkl" in names and "constants.pkl" not in names


def is_torchscript(source: Path | bytes) -> bool:
    """An archive torch.jit.save wrote (its constants.pkl), a file's or its bytes."""
    return "constants.pkl" in archive_names(source)


def archive_names(source: Path | bytes) -> set[str]:
    """The file names (without folders) in a zip, or none when it is absent, a folder or no zip."""
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as archive:
            return {name.rsplit("/", 1)[-1] for name in archive.namelist()}
    except (OSError, ValueError, zipfile.BadZipFile):
        return set()


def require_output(path: Path, *, what: str, suffixes: Sequence[str] = (), error: type[DeepfitError] = ConfigError) -> None:
    """`error` in one line when `path` holds a PyTorch checkpoint, or (with `suffixes`) its name
    ends in none of them. `what`: the thing written, with its article ("a report")."""
    if suffixes and path.suffix.lower() not in suffixes:
        raise error(f"--out {path}: {what} is written as {', '.join(f'*{s}' for s in suffixes)}; name it so")
    if is_checkpoint(path):
        raise error(f"--out {path} is a PyTorch checkpoint; {what} does not replace weights: write it to another file")
